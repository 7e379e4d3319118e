"""The whole job: one section per top-level key, checked against the task it names.

Inner code receives this typed object, never raw dicts. The task is looked up through the registry the
task modules install (`config.tasks`), since this layer sits below them.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

from pydantic import BaseModel, ValidationError, model_validator

from config.inputs import DataConfig, ModelConfig, StorageConfig
from config.runtimes import PredictConfig, RayConfig, ServeConfig, TrainConfig
from config.section import Section, describe
from config.tasks import task_info
from config.tracking import TrackConfig
from config.tuning import SearchConfig


class JobConfig(Section):
    task: str
    model: ModelConfig = ModelConfig()
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    predict: PredictConfig = PredictConfig()
    serve: ServeConfig = ServeConfig()
    ray: RayConfig = RayConfig()
    track: TrackConfig = TrackConfig()
    tune: SearchConfig = SearchConfig()
    task_options: dict[str, Any] = {}  # the task's own settings (its `Options`; see `rayformers tasks`)

    @model_validator(mode="after")
    def _fits_task(self):
        task = task_info(self.task)
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
                raise ValueError(describe(first)) from None
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
        out.tune.output = fix(out.tune.output)
        out.serve.model = fix(out.serve.model, model=True)
        out.serve.models = {k: fix(v, model=True) for k, v in out.serve.models.items()}
        if out.track.mlflow_is_folder():
            out.track.mlflow = fix(out.track.mlflow)
        return out

    def options(self) -> BaseModel | None:
        """The task's validated `task_options` (an instance of its `Options`), or None."""
        task = task_info(self.task)
        return task.Options.model_validate(self.task_options) if task.Options is not None else None

    def column(self, canonical: str) -> str:
        """The user's name for a canonical column."""
        return self.data.columns.get(canonical, canonical)
