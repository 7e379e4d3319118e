"""The contract between a task and the runtimes: what every task module in `models/` provides.

The runtimes in `pipelines/` (train, batch predict, serve) only ever talk to a `TaskSpec`; a task
owns tensors and meaning (columns, processor, model head, metrics, output format), the runtime
owns Ray, storage, file reading and batching. Nothing here imports Ray.

The flow for every task, in training, batch prediction and serving alike:

    rows (canonical column names, Python values; media columns already fetched as bytes)
      sanitize_parameters(parameters, options)    before any work: request / predict.parameters checked
      -> preprocess(batch, processor, ctx)        in Ray Data actors / on request arrival
      -> Features(arrays, lengths, errors, flags) stored between stages (numpy arrays welcome)
      -> collate(arrays, processor)               model inputs for a batch of usable rows
      -> forward(model, inputs, parameters)       model(**inputs) unless the task says otherwise
      -> postprocess(outputs, inputs, arrays, model, processor, parameters)
      -> one JSON-ready prediction per row        (to_columns: the same as Parquet columns)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Iterable, Iterator, TypeVar, Union

import torch
from pydantic import BaseModel

from config import DataConfig, ModelConfig
from errors import UserError

if TYPE_CHECKING:  # for the annotations only: importing these at run time costs seconds in every actor
    from transformers import BaseImageProcessor, FeatureExtractionMixin, PreTrainedTokenizerBase, ProcessorMixin

# What `TaskSpec.build_processor` gives: a tokenizer (text tasks), an image processor (vision), a feature
# extractor (audio classification), or a processor that holds two (speech recognition: features + tokenizer).
Processor = Union["PreTrainedTokenizerBase", "BaseImageProcessor", "FeatureExtractionMixin", "ProcessorMixin"]
P = TypeVar("P", bound=Processor)  # a task's own: `class TextClassification(TaskSpec["PreTrainedTokenizerBase"])`


@dataclass(frozen=True)
class Column:
    """A canonical input column of a task; users map their own column names onto it.

    `kind="media"` marks a file's content (an image, a clip, a mask, a depth map). In data it may hold
    the bytes themselves or a path/URI (absolute, `s3://…`, or relative to the data file's folder); in
    an HTTP request base64 (or a multipart upload). The runtime fetches/decodes it and hands the task
    `bytes`; when that fails the row reaches `preprocess` with None there and the runtime's reason
    replaces whatever error the task gives it.
    """

    name: str
    description: str
    required: bool = True
    training_only: bool = False
    kind: str = "value"  # "value" (any JSON-like value) or "media" (bytes of a file)


@dataclass
class Context:
    """What `preprocess` knows besides the rows.

    `labels` maps label -> id for the training and eval splits, and is None when predicting.
    `train` is True only for the training split (random augmentations on). `options` is the task's
    validated `task_options` (an instance of `TaskSpec.Options`, or None when the task has none);
    `data` is the job's `DataConfig` (e.g. `max_image_pixels`, `max_audio_seconds`, `long_audio`).
    """

    labels: dict | None = None
    train: bool = False
    options: BaseModel | None = None
    data: DataConfig | None = None


@dataclass
class Features:
    """The output of `TaskSpec.preprocess` for one batch of rows.

    `arrays` are per-row values (numpy arrays of any shape/dtype, lists, numbers, strings; None for
    unusable rows). Every key reaches `collate` and `postprocess`; `collate` picks the model inputs,
    so per-row facts that only postprocessing needs (original image size, offsets, the input text)
    ride along here. `lengths` lets the runtime batch similar rows together (tokens, pixels, samples);
    `errors[i]` is None when row i is usable; `flags[i]` is a note kept with a usable row ("truncated").
    """

    arrays: dict[str, list]
    lengths: list[int]
    errors: list[str | None]
    flags: list[str | None] = field(default_factory=list)


@dataclass
class View:
    """One part of what the run report shows of the final eval besides its numbers: a title, a line
    of explanation, a table (`header` and `rows` of str/int/float cells) and figures (caption, PNG bytes).
    Tasks build them in `StreamingMetric.views` (helpers in models/eval_views.py)."""

    title: str
    note: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    figures: list[tuple[str, bytes]] = field(default_factory=list)


class StreamingMetric(ABC):
    """A metric over an eval split with memory bounded by the label count, not the row count."""

    def bind(self, model: torch.nn.Module, processor: Processor) -> None:
        """Called before each evaluation; metrics that generate (seq2seq, ASR decoding) keep these."""

    @abstractmethod
    def update(self, outputs: Any, inputs: dict[str, Any], arrays: dict[str, list]) -> None:
        """One eval batch: the model's outputs, the collated inputs, and the rows' feature arrays."""
        raise NotImplementedError

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """Final values; under torch.distributed the states of all workers are combined."""
        raise NotImplementedError

    def to(self, device: torch.device) -> "StreamingMetric":
        return self

    def views(self) -> list[View]:
        """What the run report shows of this eval besides `compute`'s numbers (a confusion matrix, a few
        examples with their predictions), called on rank 0 after `compute` for the run's last eval only.
        What it draws from must stay bounded (counts, a handful of examples); by default nothing."""
        return []


def one_field_rows(inputs: Any, field: str, expected: str) -> list[dict]:
    """An HTTP `inputs` value for a task with one input column: one item or a list of them, each a bare
    value or `{field: value}`. Values pass through as sent; the runtime decodes or refuses them per row."""
    rows = []
    for item in inputs if isinstance(inputs, list) else [inputs]:
        if isinstance(item, dict):
            unknown = set(item) - {field}
            if unknown:
                raise UserError(f"inputs: unknown field(s) {sorted(unknown)}; expected {expected}")
            item = item.get(field)
        rows.append({field: item})
    return rows


class TaskSpec(ABC, Generic[P]):
    """One task family. Subclasses set the class attributes and implement every abstract method: a task
    module that misses one fails when it is imported (its spec is instantiated there), not mid-job.
    A subclass names its processor type, `P`, which every hook that takes the processor receives."""

    name: str = ""
    architectures: tuple[str, ...] = ()  # what `model.init.architecture` accepts
    columns: tuple[Column, ...] = ()
    label_column: str | None = None  # canonical column whose values make the label set (None: no classes)
    best_metric: str = "loss"  # eval metric that picks the best checkpoint
    best_metric_mode: str = "min"  # "max" or "min"
    output_columns: dict[str, Any] = {}  # Parquet prediction columns: name -> arrow type alias or pa.DataType
    Options: type[BaseModel] | None = None  # the pydantic model of `task_options` in the YAML, or None
    # Data formats this task adds to the generic ones (parquet, jsonl, csv, text, folder):
    # name -> parser(data: bytes, path: str) -> iterator of rows (dicts). Media paths in rows may be
    # relative to the parsed file's folder. `format_suffixes` maps file suffixes to those names.
    formats: dict[str, Any] = {}
    format_suffixes: dict[str, str] = {}
    media_suffixes: tuple[str, ...] = ()  # files the `folder` format takes as inputs (".png", ".wav", ...)

    # --- data -------------------------------------------------------------------------------
    def labels_in(self, values: Iterable[Any]) -> set:
        """The label values present in a batch of the label column."""
        return {v for v in values if v is not None}

    def folder_rows(self, files: list[str]) -> list[dict]:
        """The `folder` format without a metadata file: relative file paths -> rows (media columns
        hold the relative paths). Default, the `imagefolder`/`audiofolder` convention: every media
        file is a row of the first media column, and its parent folder's name is the label."""
        media = next(c.name for c in self.columns if c.kind == "media")
        rows = []
        for path in sorted(files):
            if not path.lower().endswith(self.media_suffixes):
                continue
            row = {media: path}
            if self.label_column and "/" in path:
                row[self.label_column] = path.rsplit("/", 2)[-2]
            rows.append(row)
        return rows

    @abstractmethod
    def demo_data(self, n: int, seed: int) -> list[dict]:
        """A small learnable dataset in the canonical columns (media as bytes)."""
        raise NotImplementedError

    # --- processor and model ----------------------------------------------------------------
    @abstractmethod
    def build_processor(self, model_cfg: ModelConfig, source_dir: str | None, train_rows: Iterator[dict]) -> P:
        """The checkpoint's processor, or one derived from training data for from-scratch runs.
        Must have `save_pretrained(dir)`; `load` reads it back."""
        raise NotImplementedError

    @abstractmethod
    def build_model(
        self, model_cfg: ModelConfig, source_dir: str | None, labels: list, processor: P
    ) -> torch.nn.Module:
        raise NotImplementedError

    @abstractmethod
    def load(self, model_dir: str) -> tuple[torch.nn.Module, P]:
        """A saved model and its processor, for prediction and serving."""
        raise NotImplementedError

    def augments(self, options: BaseModel | None) -> bool:
        """True when `preprocess` draws random augmentations for the training split: each epoch must
        then preprocess afresh rather than reuse a cached pass."""
        return False

    # --- the three steps, shared by train, predict and serve ---------------------------------
    @abstractmethod
    def sanitize_parameters(self, parameters: dict, options: BaseModel | None) -> dict:
        """A request's `parameters` (or `predict.parameters`) -> the checked, normalised parameters that
        `forward`/`postprocess` receive; called before any work (Serve: before batching; predict: before
        Ray starts). Raises UserError naming the parameter and its allowed range; unknown keys are refused
        and every number is bounded (`models.parameters.sanitize` does this from a table of rules).
        `options` is the task's validated `task_options` (None when the task has none)."""
        raise NotImplementedError

    @abstractmethod
    def preprocess(self, batch: dict[str, list], processor: P, ctx: Context) -> Features:
        """Columns of rows (canonical names, Python values) -> per-row features and errors."""
        raise NotImplementedError

    @abstractmethod
    def collate(self, arrays: dict[str, list], processor: P) -> dict[str, Any]:
        """Feature arrays of usable rows -> model inputs (tensors, or lists/dicts of tensors, e.g.
        DETR's `labels`); with `labels` present when the arrays hold them (training, eval)."""
        raise NotImplementedError

    def forward(self, model: torch.nn.Module, inputs: dict[str, Any], parameters: dict) -> Any:
        """Prediction's forward pass (training always calls `model(**inputs)` for the loss)."""
        return model(**{k: v for k, v in inputs.items() if k != "labels"})

    @abstractmethod
    def postprocess(
        self,
        outputs: Any,
        inputs: dict[str, Any],
        arrays: dict[str, list],
        model: torch.nn.Module,
        processor: P,
        parameters: dict,
    ) -> list:
        """Model outputs -> one JSON-ready prediction per row, in the HF pipeline output format."""
        raise NotImplementedError

    @abstractmethod
    def to_columns(self, predictions: list) -> dict[str, list]:
        """Predictions (None for error rows) -> Parquet columns (names and types as in `output_columns`)."""
        raise NotImplementedError

    @abstractmethod
    def metrics(self, labels: list, options: BaseModel | None) -> StreamingMetric:
        """A fresh metric for one eval; its `views` are what the run report shows of the run's last eval."""
        raise NotImplementedError

    @abstractmethod
    def request_inputs(self, inputs: Any) -> list[dict]:
        """An HTTP `inputs` value (one item or a list) -> rows in canonical column names. Media
        columns keep the request's strings (base64, data: URL, or a URI); the runtime decodes them."""
        raise NotImplementedError

    def stream(
        self, model: torch.nn.Module, processor: P, arrays: dict[str, list], parameters: dict
    ) -> Iterator[str] | None:
        """Pieces of one row's prediction as they are produced (text generation streams tokens);
        None when the task does not stream."""
        return None
