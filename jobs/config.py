"""The job configuration: one YAML per job plus dotted `key=value` overrides, validated once here.

Every mistake becomes a `UserError` with one line naming the key (`train.lr: expected a number,
got 'fast'`). Inner code receives these typed objects, never raw dicts.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from models import get_task, task_names
from models.images import DEFAULT_MAX_IMAGE_PIXELS
from models.spec import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TokenizerConfig(Section):
    """Only for from-scratch runs: the tokenizer trained on the training split."""

    vocab_size: int = Field(
        4000, ge=100, description="Vocabulary size of the WordPiece/BPE tokenizer trained on the training split."
    )
    lowercase: bool = Field(True, description="Lowercase text before training and applying that tokenizer.")
    max_train_rows: int = Field(
        100_000, ge=1, description="Training rows the tokenizer (or a CTC vocabulary) is built from."
    )


class ModelInit(Section):
    architecture: str = Field(
        description="From-scratch architecture, one the task lists in `rayformers tasks` (bert, vit, detr, ...)."
    )
    size: Literal["tiny", "mini", "small", "base"] = Field("tiny", description="Size preset of the from-scratch model.")
    overrides: dict[str, Any] = Field(
        {}, description="Keys of the transformers config to set on top of the preset (e.g. num_hidden_layers)."
    )


class ModelConfig(Section):
    source: str | None = Field(None, description="Hub id, local HF directory, or s3://… HF directory.")
    init: ModelInit | None = Field(None, description="From-scratch: architecture + size preset.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub id in model.source.")
    trust_remote_code: bool = Field(False, description="Run a hub model's own Python code; off unless asked.")
    max_length: int | None = Field(
        None, ge=8, description="Longest input in tokens (text tasks); longer rows are truncated and flagged."
    )
    tokenizer: TokenizerConfig = Field(
        TokenizerConfig(), description="The tokenizer trained for from-scratch text runs."
    )


class StorageConfig(Section):
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, R2, Ceph); else AWS_ENDPOINT_URL."
    )
    region: str | None = Field(None, description="Object-store region; else the standard AWS chain decides.")
    anonymous: bool = Field(False, description="Read public buckets without credentials.")


class DataConfig(Section):
    train: str | None = Field(None, description="Training split: a file, a folder or a glob, as a URI or a path.")
    eval: str | None = Field(
        None, description="Evaluation split (same forms as data.train); evals and the best checkpoint need it."
    )
    format: str = Field(
        "auto",
        description=(
            "Auto (by file suffix), parquet, jsonl, csv, text (one row per line), folder (imagefolder/audiofolder),"
            " or a format the task adds (coco, squad, conll, ...)"
        ),
    )
    columns: dict[str, str] = Field({}, description="Canonical column -> the user's column name.")
    labels: list[str | int] | None = Field(
        None, description="The label set, in id order; discovered from the training split when absent."
    )
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS, ge=1, description="Larger images get an error row (decompression bombs)"
    )
    max_audio_seconds: float = Field(600, gt=0, description="Longest audio clip; longer ones follow data.long_audio.")
    long_audio: Literal["chunk", "reject"] = Field(
        "chunk", description="What happens to clips over max_audio_seconds: cut into chunks, or an error row."
    )
    id_column: str | None = Field("id", description="Carried into predictions; the row position when absent.")
    preprocess_actors: int = Field(1, ge=1, description="Ray Data actors that read, decode and tokenise for training.")
    preprocess_batch_size: int = Field(256, ge=1, description="Rows each preprocessing call receives.")
    cache_train: bool | None = Field(
        None,
        description=(
            "Keep the preprocessed training split in Ray's object store (spilling to disk) after the first pass, so"
            " later epochs skip reading, decoding and tokenising. null (auto): when the task draws no random "
            "augmentations and the split has at most cache_max_rows rows; true/false force it."
        ),
    )
    cache_max_rows: int = Field(
        100_000, ge=0, description="Largest training split kept in Ray's object store when data.cache_train is auto."
    )


class TrainConfig(Section):
    output: str | None = Field(
        None, description="Where checkpoints, prepared/, model/ and metrics.json go (URI or path)."
    )
    num_workers: int | tuple[int, int] = Field(
        1,
        description=(
            "Ray Train workers (DDP ranks), or [min, max] for Ray Train's elastic training: the run starts with "
            "as many as the cluster can place and is resized (from its latest checkpoint) as nodes come and go. "
            "Data order stays exact across any change."
        ),
    )
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs Ray reserves per worker; on CPU a worker uses at least this many torch threads."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description=(
            "Ray placement group strategy for the workers: PACK fills a node first, STRICT_SPREAD puts each on its "
            "own node."
        ),
    )
    epochs: float = Field(
        3.0, gt=0, description="Passes over the training split (fractions allowed); train.max_steps wins when set."
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to train for, instead of epochs.")
    batch_size: int = Field(16, ge=1, description="Rows per step on each worker.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate of AdamW (linear warm-up, then linear decay).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Share of the steps spent warming the learning rate up.")
    max_grad_norm: float | None = Field(1.0, description="Gradient norm clipping (null: none).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Auto: bf16 autocast on GPUs that support it, else fp32."
    )
    eval_every: int = Field(100, ge=1, description="Steps; each eval also writes a checkpoint.")
    log_every: int = Field(10, ge=1, description="Steps between two progress lines.")
    keep_checkpoints: int = Field(
        2, ge=1, description="Step checkpoints kept (the newest ones); the best model is kept apart."
    )
    max_failures: int = Field(
        3,
        ge=-1,
        description=(
            "How many times a run restarts from its latest checkpoint after a worker or node dies or raises "
            "(-1: without limit, 0: never). Preemptions are counted apart (max_preemption_failures)."
        ),
    )
    max_preemption_failures: int = Field(
        -1,
        ge=-1,
        description=(
            "How many node preemptions (spot reclaims) a run survives by restarting from its latest checkpoint "
            "(-1: without limit). Workers also save a checkpoint as soon as Ray Train announces a preemption."
        ),
    )
    preemption_check_every: int = Field(
        10,
        ge=1,
        description=(
            "Optimizer steps between two checks for a preemption notice. Each check waits for every worker: "
            "1.5-4.4 ms with 1-2 local workers, under 1% of a tiny model's steps at the default 10."
        ),
    )
    fresh: bool = Field(
        False,
        description=(
            "Start over although train.output holds an earlier run: its checkpoints, prepared/, model/ and "
            "metrics.json are removed first. Without it a re-run resumes, and refuses a changed config or data."
        ),
    )
    seed: int = Field(42, description="Seed of the model's initialisation and of the data order.")
    length_buckets: int = Field(
        8, ge=1, description="Batches whose rows are sorted together by length (1: no length bucketing)."
    )
    shuffle_rows: int = Field(
        1024,
        ge=0,
        description=(
            "Rows shuffled together every epoch (a window of the training split in file order); batches of "
            "similar length are cut from each window and shuffled within it"
        ),
    )
    data_order: Literal["exact", "streaming"] = Field(
        "exact",
        description=(
            "exact: the rows of an epoch reach the workers in an order fixed by (seed, epoch, the files), and a "
            "resumed run, also with another num_workers, trains every row of the epoch exactly once. Every "
            "worker reads the whole split (cached: from Ray's object store; not cached: each worker preprocesses "
            "it). streaming: Ray Data's streaming split, each worker preprocesses a share; a resume skips the "
            "number of batches already trained, so rows near the resume point may repeat or be missed"
        ),
    )
    log_rows: bool = Field(
        False,
        description=(
            "Record the key (file, row) of every trained row under train.output/rows/, one file per worker and "
            "checkpoint, written with the checkpoint: an audit of what each epoch trained on"
        ),
    )
    stop_after_steps: int | None = Field(None, ge=1, description="End this run early (the next run resumes)")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _worker_count_or_range(cls, value):
        """One line for a wrong value, not one per member of the int | [min, max] union."""
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"expected [min, max] of two integers, got {list(value)!r}")
            return tuple(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value

    @field_validator("num_workers", mode="after")
    @classmethod
    def _worker_range(cls, value):
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError(f"expected a count >= 1 or [min, max] with 1 <= min <= max, got {value}")
        return value

    @property
    def max_workers(self) -> int:
        """The most workers the run may have (`num_workers`, or the top of its range)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]


class PredictConfig(Section):
    model: str | None = Field(None, description="Defaults to train.output/model, then model.source.")
    input: str | None = Field(None, description="The corpus to score: a file, a folder or a glob.")
    output: str | None = Field(None, description="Folder of the Parquet predictions (with _manifest/ and _SUCCESS).")
    batch_size: int = Field(8, ge=1, description="Rows per forward pass.")
    max_batch_cost: int | None = Field(
        None,
        ge=1,
        description="At most this many padded length units per batch (rows x longest row: tokens, pixels, samples)",
    )
    sort_window: int = Field(
        256, ge=1, description="Rows sorted by length together; smaller windows spread over more actors."
    )
    actors: int | None = Field(None, ge=1, description="Default: one per CPU (one per GPU with use_gpu)")
    threads_per_actor: int = Field(1, ge=1, description="Torch threads per predictor actor.")
    use_gpu: bool = Field(False, description="One GPU per predictor actor.")
    quantize: Literal["none", "int8"] = Field(
        "none", description="Int8: dynamic int8 quantisation of the Linear layers (CPU)."
    )
    fuse_preprocessing: bool | None = Field(
        None,
        description=(
            "Predictor actors preprocess each window of rows inline (default on CPU: no extra work on the same "
            "cores); false (default with use_gpu): a thread in each predictor actor preprocesses the next window "
            "while the model runs on the current one."
        ),
    )
    parameters: dict[str, Any] = Field(
        {}, description="Prediction parameters, as a request's `parameters` (e.g. top_k)."
    )
    overwrite: bool = Field(
        False,
        description=(
            "Replace a complete earlier output in predict.output (one with a _SUCCESS marker), or restart a "
            "partial one made with another model, input or settings. The earlier output stays intact until "
            "the new one is complete. Without it such a run is refused; a partial run of the same job resumes."
        ),
    )


class ServeConfig(Section):
    model: str | None = Field(None, description="The default model; else train.output/model, else model.source.")
    models: dict[str, str] = Field({}, description="Model id -> source, for /v1/models/<id>/predict.")
    route_prefix: str = Field("/", description="Path under which /predict, /healthz and /docs are served.")
    host: str = Field("127.0.0.1", description="Interface the HTTP proxy listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the HTTP proxy listens on.")
    min_replicas: int = Field(1, ge=0, description="Fewest model replicas the autoscaler keeps.")
    max_replicas: int = Field(1, ge=1, description="Most model replicas the autoscaler starts.")
    target_ongoing_requests: float = Field(4, gt=0, description="Ongoing requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(5, ge=0, description="Seconds of high load before a replica is added.")
    downscale_delay_s: float = Field(30, ge=0, description="Seconds of low load before a replica is removed.")
    look_back_period_s: float = Field(30, gt=0, description="Window the autoscaler averages load over.")
    metrics_interval_s: float = Field(10, gt=0, description="How often load is reported to the autoscaler.")
    health_check_period_s: float = Field(10, gt=0, description="Each check runs the model on a tiny input.")
    health_check_timeout_s: float = Field(
        30, gt=0, description="Seconds a health check may take before the replica is replaced."
    )
    max_batch_size: int = Field(8, ge=1, description="Requests' rows batched into one forward pass (@serve.batch).")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="Seconds a batch waits to fill up.")
    max_ongoing_requests: int = Field(
        32, ge=1, description="Requests a replica works on at once (at least max_batch_size)."
    )
    max_queued_requests: int = Field(
        64,
        ge=-1,
        description=(
            "Requests each proxy holds waiting for a replica (Ray Serve's max_queued_requests); past it a request "
            "is answered 503 with Retry-After at once instead of waiting behind all the others (-1: no limit)."
        ),
    )
    retry_after_s: float = Field(1, ge=0, description="The Retry-After a request refused for overload is given.")
    max_models_per_replica: int = Field(
        3, ge=1, description="Models of serve.models a replica keeps loaded (least recently used go)."
    )
    use_gpu: bool = Field(False, description="One GPU per replica.")
    threads_per_replica: int = Field(1, ge=1, description="Torch threads per replica.")
    api_key: SecretStr | None = Field(
        None,
        description=(
            "Bearer key prediction routes require. Printed masked, never exported or submitted in a command line; "
            "on a cluster set RAYFORMERS_API_KEY on the nodes instead (see infra/k8s/rayservice.yaml)."
        ),
    )
    max_request_bytes: int = Field(1_000_000, ge=1, description="Largest request body (413 past it).")
    max_items_per_request: int = Field(64, ge=1, description="Most inputs in one request.")
    allow_uris: list[str] | bool = Field(
        False,
        description=(
            "URI prefixes a request may name instead of sending a file's bytes, e.g. [s3://bucket/uploads/] "
            "(false or []: none). Local paths, file://, '..' and any scheme or bucket not listed are refused."
        ),
    )
    max_media_bytes: int = Field(
        16_000_000,
        ge=1,
        description=("Bytes a request may make a replica fetch from allow_uris, all its items together (413 past it)."),
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description=(
            "Pixels of an image a request may send (checked from its header, before decoding; also "
            "data.max_image_pixels)."
        ),
    )
    max_audio_seconds: float = Field(
        60,
        gt=0,
        description=(
            "Seconds of audio a request may send (checked from its header, before decoding, whatever data.long_audio "
            "says)."
        ),
    )

    @field_validator("max_queued_requests", mode="after")
    @classmethod
    def _queue_bound(cls, value):
        if value == 0:  # Ray Serve takes -1 (no limit) or a count >= 1
            raise ValueError("expected -1 (no limit) or a count >= 1, got 0")
        return value

    @field_validator("allow_uris", mode="after")
    @classmethod
    def _uri_prefixes(cls, value):
        if value is True:
            raise ValueError(
                "serve.allow_uris: list the URI prefixes requests may name, e.g. [s3://bucket/uploads/] "
                "(true would let a request read any file the replica can)"
            )
        prefixes = []
        for prefix in value or []:
            scheme, sep, rest = prefix.partition("://")
            bucket = rest.split("/", 1)[0]
            if not sep or scheme.lower() in ("file", "local", "memory") or not bucket or ".." in rest.split("/"):
                raise ValueError(
                    f"serve.allow_uris: {prefix!r} is not an object-storage prefix like s3://bucket/uploads/ "
                    "(local paths and file:// are never served)"
                )
            prefixes.append(
                prefix if prefix.endswith("/") else prefix + "/"
            )  # s3://b/up must not admit s3://b/up-secret
        return prefixes

    @model_validator(mode="after")
    def _batching_fits(self):
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("serve.max_ongoing_requests must be at least serve.max_batch_size")
        if self.max_replicas < max(self.min_replicas, 1):
            raise ValueError("serve.max_replicas must be at least serve.min_replicas")
        return self


class RayConfig(Section):
    address: str | None = Field(
        None, description="Ray cluster to join (host:6379 or auto); else RAY_ADDRESS, else a local Ray."
    )
    num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs of a local Ray (default: enough for the workers and data actors)."
    )


class JobConfig(Section):
    task: str
    model: ModelConfig = ModelConfig()
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    predict: PredictConfig = PredictConfig()
    serve: ServeConfig = ServeConfig()
    ray: RayConfig = RayConfig()
    task_options: dict[str, Any] = {}  # the task's own settings (its `Options`; see `rayformers tasks`)

    @model_validator(mode="after")
    def _fits_task(self):
        task = get_task(self.task)
        generic = {"auto", "parquet", "jsonl", "csv", "text", "folder"}
        if self.data.format not in generic | set(task.formats):
            known = ", ".join(sorted(generic) + sorted(task.formats))
            raise ValueError(f"data.format: expected one of {known} for {self.task}, got {self.data.format!r}")
        if task.Options is None and self.task_options:
            raise ValueError(f"task_options: {self.task} takes no options, got {sorted(self.task_options)}")
        if task.Options is not None:
            for key in self.task_options:
                if key not in task.Options.model_fields:
                    close = difflib.get_close_matches(key, list(task.Options.model_fields), n=1)
                    hint = f" (did you mean task_options.{close[0]}?)" if close else ""
                    raise ValueError(f"task_options.{key}: unknown key for {self.task}{hint}")
            try:
                task.Options.model_validate(self.task_options)
            except ValidationError as exc:
                first = exc.errors()[0]
                first = {**first, "loc": ("task_options", *first["loc"])}
                raise ValueError(_describe(first)) from None
        if (self.model.source is None) == (self.model.init is None):
            raise ValueError("model: set exactly one of model.source (a pretrained model) or model.init (from scratch)")
        if self.model.init and self.model.init.architecture not in task.architectures:
            raise ValueError(
                f"model.init.architecture: {self.model.init.architecture!r} is not one of "
                f"{', '.join(task.architectures)} for {self.task}"
            )
        known = {c.name for c in task.columns}
        for key in self.data.columns:
            if key not in known:
                raise ValueError(
                    f"data.columns.{key}: {self.task} has no column {key!r} (columns: {', '.join(sorted(known))})"
                )
        return self

    def with_absolute_paths(self) -> "JobConfig":
        """Local paths made absolute, since Ray workers do not share the driver's directory."""

        def fix(value: str | None, model: bool = False) -> str | None:
            if value is None or "://" in value:
                return value
            if model and not (os.path.exists(value) or value.startswith((".", "/", "~"))):
                return value  # a hub id
            return os.path.abspath(os.path.expanduser(value))

        out = self.model_copy(deep=True)
        out.model.source = fix(out.model.source, model=True)
        out.data.train, out.data.eval = fix(out.data.train), fix(out.data.eval)
        out.train.output = fix(out.train.output)
        out.predict.model = fix(out.predict.model, model=True)
        out.predict.input, out.predict.output = fix(out.predict.input), fix(out.predict.output)
        out.serve.model = fix(out.serve.model, model=True)
        out.serve.models = {k: fix(v, model=True) for k, v in out.serve.models.items()}
        return out

    def options(self) -> Any:
        """The task's validated `task_options` (an instance of its `Options`), or None."""
        task = get_task(self.task)
        return task.Options.model_validate(self.task_options) if task.Options is not None else None

    def column(self, canonical: str) -> str:
        """The user's name for a canonical column."""
        return self.data.columns.get(canonical, canonical)


# --- loading ---------------------------------------------------------------------------------


def _describe(error: dict) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    kind, given = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    if kind == "missing":
        return f"{loc}: required key is missing"
    if kind in ("float_parsing", "float_type"):
        return f"{loc}: expected a number, got {given!r}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{loc}: expected an integer, got {given!r}"
    if kind in ("bool_parsing", "bool_type"):
        return f"{loc}: expected true or false, got {given!r}"
    if kind == "literal_error":
        return f"{loc}: expected {error['ctx']['expected']}, got {given!r}"
    if kind in ("string_type",):
        return f"{loc}: expected a string, got {given!r}"
    if kind in ("dict_type", "model_type"):
        return f"{loc}: expected a mapping of keys, got {given!r}"
    message = error["msg"].removeprefix("Value error, ")
    if message.startswith(("model", "serve.", "task:", "task_options", "data.format")) or loc == "":
        return message
    return f"{loc}: {message}"


def _suggest(error: dict, data: dict) -> str:
    """`did you mean …` for a misspelt key."""
    if error["type"] != "extra_forbidden":
        return ""
    *parents, key = [str(p) for p in error["loc"]]
    model: Any = JobConfig
    for p in parents:
        field = model.model_fields.get(p)
        model = getattr(field, "annotation", None) if field else None
        if not isinstance(model, type) or not issubclass(model, BaseModel):
            return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    return f" (did you mean {'.'.join(parents + close)}?)" if close else ""


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key=value, e.g. train.lr=3e-5")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def without_api_key(overrides: list[str]) -> list[str]:
    """The overrides with serve.api_key taken out (also from a whole `serve={...}` mapping), for what
    gets written down or shown: an exported Serve config, a submitted job's command line."""
    kept = []
    for item, (key, value) in zip(overrides, parse_overrides(list(overrides))):
        if key == "serve.api_key":
            continue
        if key == "serve" and isinstance(value, dict) and "api_key" in value:
            value = {k: v for k, v in value.items() if k != "api_key"}
            item = "serve=" + yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        kept.append(item)
    return kept


def validate(data: dict) -> JobConfig:
    if not isinstance(data, dict):
        raise UserError("config: expected a mapping of keys at the top level")
    if "task" in data and data["task"] not in task_names():
        raise UserError(f"task: unknown task {data['task']!r} (known: {', '.join(task_names())})")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UserError(_describe(first) + _suggest(first, data)) from None


def load_config(path: str | None, overrides: list[str] = (), base: dict | None = None) -> JobConfig:
    """The validated config from a YAML file (or `base`) with overrides applied on top."""
    data: Any = copy.deepcopy(base or {})
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}:{where} is not valid YAML") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of keys at the top level")
    for key, value in parse_overrides(list(overrides)):
        set_dotted(data, key, value)
        # model.source and model.init exclude each other: the one given on the command line wins
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        for chosen, other in (("model.source", "init"), ("model.init", "source")):
            if (key == chosen or key.startswith(chosen + ".")) and value is not None and model.get(other) is not None:
                model.pop(other)
                print(f"{key} given: model.{other} from {path or 'the config'} is not used", file=sys.stderr)
    return validate(data).with_absolute_paths()


def explain_config(cfg: JobConfig) -> str:
    """Every key of the config: its value here, its default when that differs, and its description."""
    lines = []

    def walk(prefix: str, section: Section) -> None:
        for key, info in type(section).model_fields.items():
            current = getattr(section, key)
            if isinstance(current, Section):
                walk(f"{prefix}.{key}", current)
                continue
            if key == "api_key":
                shown = "'**********'" if current else "null"
            else:
                shown = json.dumps(current, default=str)
            default = info.get_default() if not info.is_required() else current
            differs = "" if default == current else f" (default {json.dumps(default, default=str)})"
            lines.append(f"{prefix}.{key} = {shown}{differs}\n    {info.description or ''}")

    for name in JobConfig.model_fields:
        value = getattr(cfg, name)
        if isinstance(value, Section):
            walk(name, value)
    return "\n".join(lines) + "\n"


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
