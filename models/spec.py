"""The contract between a task and the runtimes: what every task module in `models/` provides.

The runtimes in `pipelines/` (train, batch predict, serve) only ever talk to a `TaskSpec`; a task
owns tensors and meaning (columns, processor, model head, metrics, output format), the runtime
owns Ray, storage and batching. Nothing here imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch


class UserError(Exception):
    """A mistake the user can fix (config, data, location). Reported as one line, no traceback."""


@dataclass(frozen=True)
class Column:
    """A canonical input column of a task; users map their own column names onto it."""

    name: str
    description: str
    required: bool = True
    training_only: bool = False


@dataclass
class Features:
    """The output of `TaskSpec.preprocess` for one batch of rows.

    `arrays` are model inputs per row (ragged lists are fine: `collate` pads them); `lengths`
    lets the runtime batch similar rows together; `errors[i]` is None when row i is usable;
    `flags[i]` is a note kept with a usable row (for example "truncated").
    """

    arrays: dict[str, list]
    lengths: list[int]
    errors: list[str | None]
    flags: list[str | None] = field(default_factory=list)


class StreamingMetric:
    """A metric over an eval split with memory bounded by the label count, not the row count."""

    def update(self, outputs: Any, batch: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """Final values; under torch.distributed the states of all workers are combined."""
        raise NotImplementedError

    def to(self, device: torch.device) -> "StreamingMetric":
        return self


class TaskSpec:
    """One task family. Subclasses set the class attributes and implement the methods."""

    name: str = ""
    architectures: tuple[str, ...] = ()  # what `model.init.architecture` accepts
    columns: tuple[Column, ...] = ()
    label_column: str | None = None  # canonical column whose values make the label set
    best_metric: str = "loss"  # eval metric that picks the best checkpoint
    best_metric_mode: str = "min"  # "max" or "min"
    output_columns: dict[str, str] = {}  # Parquet prediction columns: name -> arrow type name

    # --- data -------------------------------------------------------------------------------
    def labels_in(self, values: Iterable[Any]) -> set:
        """The label values present in a batch of the label column."""
        return {v for v in values if v is not None}

    def demo_data(self, n: int, seed: int) -> list[dict]:
        raise NotImplementedError

    # --- processor and model ----------------------------------------------------------------
    def build_processor(self, model_cfg: Any, source_dir: str | None, train_texts: Iterator[dict]) -> Any:
        """The checkpoint's processor, or one derived from training data for from-scratch runs."""
        raise NotImplementedError

    def build_model(self, model_cfg: Any, source_dir: str | None, labels: list, processor: Any) -> torch.nn.Module:
        raise NotImplementedError

    def load(self, model_dir: str) -> tuple[torch.nn.Module, Any]:
        """A saved model and its processor, for prediction and serving."""
        raise NotImplementedError

    # --- the three steps, shared by train, predict and serve ---------------------------------
    def preprocess(self, batch: dict[str, list], processor: Any, labels: dict | None) -> Features:
        """Columns of rows (canonical names, Python values) -> model inputs, one error or None per
        row. `labels` maps label -> id when training, None when predicting."""
        raise NotImplementedError

    def collate(self, arrays: dict[str, list], processor: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def postprocess(self, outputs: Any, inputs: dict[str, torch.Tensor], model: Any, parameters: dict) -> list:
        """Model outputs -> one JSON-ready prediction per row, in the HF pipeline output format."""
        raise NotImplementedError

    def to_columns(self, predictions: list) -> dict[str, list]:
        """Predictions -> Parquet columns (names and types as in `output_columns`)."""
        raise NotImplementedError

    def metrics(self, labels: list) -> StreamingMetric:
        raise NotImplementedError

    def request_inputs(self, inputs: Any) -> list[dict]:
        """An HTTP `inputs` value (one item or a list) -> rows in canonical column names."""
        raise NotImplementedError
