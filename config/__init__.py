"""The job configuration schema, the bottom layer every other one may import (`jobs → pipelines →
models → config → errors`): one YAML per job plus dotted `key=value` overrides, validated once.

    section.py   the base of every section; a validation error as one line naming the key
    inputs.py    model, storage, data: what a job reads
    runtimes.py  train, predict, serve, ray: how each verb runs
    tracking.py  track: where runs are recorded (MLflow, TensorBoard)
    tuning.py    tune: the hyper-parameter search of `rayformers tune`
    job.py       the whole job, checked against its task (through `tasks.py`, which the registry fills)
    loading.py   YAML + overrides -> a validated JobConfig; `rayformers config` output
"""

from config.inputs import DEFAULT_MAX_IMAGE_PIXELS, DataConfig, ModelConfig, ModelInit, StorageConfig, TokenizerConfig
from config.job import JobConfig
from config.loading import (
    dump_config,
    explain_config,
    load_config,
    parse_overrides,
    set_dotted,
    validate,
    without_api_key,
)
from config.runtimes import PredictConfig, RayConfig, ServeConfig, TrainConfig
from config.section import Section
from config.tracking import TrackConfig
from config.tuning import SearchConfig

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DataConfig",
    "JobConfig",
    "ModelConfig",
    "ModelInit",
    "PredictConfig",
    "RayConfig",
    "SearchConfig",
    "Section",
    "ServeConfig",
    "StorageConfig",
    "TokenizerConfig",
    "TrackConfig",
    "TrainConfig",
    "dump_config",
    "explain_config",
    "load_config",
    "parse_overrides",
    "set_dotted",
    "validate",
    "without_api_key",
]
