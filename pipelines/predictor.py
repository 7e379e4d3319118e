"""One predictor, three runtimes: the preprocessing stage and the model stage used by training,
`rayformers predict` and the Serve deployment alike.

`Preprocessor` turns rows in the user's column names into task features (run in Ray Data
actors). `Predictor` runs the model over features, batching rows of similar length so little
compute goes into padding, and turns outputs into predictions with the task's `postprocess`.
Neither knows which task it runs.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from errors import UserError
from models import get_task
from models.spec import Context, Features, TaskSpec
from pipelines.media import decode_request_value, resolve_paths
from pipelines.readers import READ_ERROR, SOURCE
from pipelines.storage import Storage

LENGTH, ERROR, FLAG = "_length", "error", "flag"


def check_columns(names: list[str], task: TaskSpec, column_map: dict[str, str], training: bool) -> None:
    """A required column missing from the data is a user error for the whole job, not per row."""
    for column in task.columns:
        if not column.required or (column.training_only and not training):
            continue
        theirs = column_map.get(column.name, column.name)
        if theirs not in names:
            hint = f" (mapped by data.columns.{column.name})" if column.name in column_map else ""
            raise UserError(
                f"data: no column {theirs!r}{hint} for {column.description}; the data has {', '.join(sorted(names))}"
            )


def canonical_rows(table: pa.Table, task: TaskSpec, column_map: dict[str, str], training: bool) -> dict[str, list]:
    batch = {}
    for column in task.columns:
        if column.training_only and not training:
            continue
        theirs = column_map.get(column.name, column.name)
        if theirs in table.column_names:
            batch[column.name] = column_values(table, theirs)
    return batch


# Arrays travel between stages as Arrow columns; numpy arrays (pixels, waveforms, masks) as .npy bytes,
# which keep dtype and shape and decode without copying element by element.
_NPY_MAGIC = b"\x93NUMPY"


def _encode(value):
    if isinstance(value, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        return buffer.getvalue()
    return value


def column_values(table: pa.Table, name: str) -> list:
    """A column as Python values, with .npy-encoded cells decoded back to numpy arrays."""
    column = table.column(name)
    values = column.to_pylist()
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [
            np.load(io.BytesIO(v), allow_pickle=False) if isinstance(v, bytes) and v.startswith(_NPY_MAGIC) else v
            for v in values
        ]
    return values


def features_to_arrow(features: Features) -> dict[str, pa.Array]:
    out = {}
    for name, values in features.arrays.items():
        if any(isinstance(v, np.ndarray) for v in values):
            out[name] = pa.array([_encode(v) for v in values], pa.large_binary())
        else:
            out[name] = pa.array(values)
    out[LENGTH] = pa.array(features.lengths, pa.int64())
    out[ERROR] = pa.array(features.errors, pa.string())
    out[FLAG] = pa.array(features.flags or [None] * len(features.errors), pa.string())
    return out


def fetch_media(task: TaskSpec, batch: dict[str, list], fetch) -> list[str | None]:
    """Media columns of `batch` replaced by file bytes in place; the reason per row where that failed
    (a null in an optional media column is no error)."""
    n = len(next(iter(batch.values()))) if batch else 0
    reasons: list[str | None] = [None] * n
    for column in task.columns:
        if column.kind != "media" or column.name not in batch:
            continue
        given = batch[column.name]
        values, errors = fetch(column.name, given)
        batch[column.name] = values
        for i, why in enumerate(errors):
            if why is not None and reasons[i] is None and (column.required or given[i] is not None):
                reasons[i] = why
    return reasons


class Preprocessor:
    """Ray Data callable class: a block of raw rows -> a block of features (+ pass-through columns).

    The processor comes as the folder it was saved in (`processor_dir`: a model folder, or a training
    run's prepared/), read by each actor: constructor arguments that small travel inline, not through
    the object store (where Ray warns that a restarted actor could lose them)."""

    def __init__(
        self,
        job: dict,
        processor_dir: str,
        labels: list | None,
        train: bool = False,
        keep: tuple[str, ...] = (),
        data_uri: str | None = None,
    ):
        from config import JobConfig

        torch.set_num_threads(1)
        cfg = JobConfig.model_validate(job)
        self.task = get_task(cfg.task)
        self.storage = Storage.from_config(cfg.storage)
        self.processor = self.task.build_processor(cfg.model, self.storage.model_path(processor_dir), iter(()))
        self.column_map = cfg.data.columns
        label_ids = {label: i for i, label in enumerate(labels)} if labels is not None else None
        self.ctx = Context(labels=label_ids, train=train, options=cfg.options(), data=cfg.data)
        self.keep = keep
        self.fs = self.storage.resolve(data_uri).fs if data_uri else None

    def __call__(self, table: pa.Table) -> pa.Table:
        columns = features_to_arrow(self.features(table))
        for name in self.keep:
            if name in table.column_names:
                columns[name] = table.column(name)
        return pa.table(columns)

    def features(self, table: pa.Table) -> Features:
        batch = canonical_rows(table, self.task, self.column_map, training=self.ctx.labels is not None)
        sources = table.column(SOURCE).to_pylist() if SOURCE in table.column_names else [None] * table.num_rows
        media_errors = fetch_media(
            self.task, batch, lambda name, values: resolve_paths(values, sources, self.storage, self.fs, name)
        )
        features = self.task.preprocess(batch, self.processor, self.ctx)
        read_errors = table.column(READ_ERROR).to_pylist() if READ_ERROR in table.column_names else []
        for reasons in (media_errors, read_errors):
            for i, why in enumerate(reasons):
                if why is not None:
                    features.errors[i] = why
        if not features.flags:
            features.flags = [None] * len(features.errors)
        return features


def to_device(value, device: torch.device):
    """Tensors, and lists/dicts of them (DETR's per-image targets), moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def pick_device(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class Predictor:
    """A loaded model with its processor; predicts features or raw rows in length-sorted batches."""

    def __init__(
        self,
        task_name: str,
        model_dir: str,
        batch_size: int = 8,
        use_gpu: bool = False,
        quantize: str = "none",
        threads: int | None = None,
        parameters: dict | None = None,
        options: Any = None,
        data: Any = None,
        storage: Storage | None = None,
        allow_uris: bool = False,
        max_batch_cost: int | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.task = get_task(task_name)
        self.device = pick_device(use_gpu)
        model, self.processor = self.task.load(model_dir)
        model.eval()
        if quantize == "int8":
            if self.device.type != "cpu":
                raise UserError("predict.quantize: int8 dynamic quantisation is for CPU inference only")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model.to(self.device)
        self.batch_size = batch_size
        self.max_batch_cost = max_batch_cost
        self.parameters = parameters or {}
        self.ctx = Context(labels=None, train=False, options=options, data=data)
        self.uri_storage = storage if allow_uris else None  # requests may name files in object storage

    def batches(self, rows: list[int], lengths: list[int]) -> list[list[int]]:
        """Rows (sorted by length) in batches of at most `batch_size`, and, with `max_batch_cost`, of at
        most that many padded length units (rows x longest): on CPU a long row gains nothing from company."""
        out, batch = [], []
        for i in rows:
            if batch and (
                len(batch) == self.batch_size
                or (self.max_batch_cost and (len(batch) + 1) * max(lengths[i], 1) > self.max_batch_cost)
            ):
                out.append(batch)
                batch = []
            batch.append(i)
        return out + [batch] if batch else out

    def predict_arrays(
        self, arrays: dict[str, list], lengths: list[int], errors: list, parameters: dict | None = None
    ) -> list:
        """One prediction per row (None where the row carries an error), in input order."""
        parameters = {**self.parameters, **(parameters or {})}
        n = len(errors)
        predictions: list = [None] * n
        usable = sorted((i for i in range(n) if errors[i] is None), key=lambda i: lengths[i])
        for rows in self.batches(usable, lengths):
            sub = {name: [values[i] for i in rows] for name, values in arrays.items() if name != "labels"}
            inputs = to_device(self.task.collate(sub, self.processor), self.device)
            with torch.inference_mode():
                outputs = self.task.forward(self.model, inputs, parameters)
            done = self.task.postprocess(outputs, inputs, sub, self.model, self.processor, parameters)
            for i, prediction in zip(rows, done):
                predictions[i] = prediction
        return predictions

    def preprocess_rows(self, rows: list[dict]) -> Features:
        """Raw rows in canonical column names (media as base64, bytes or, with allow_uris, a URI) ->
        features; Serve checks their errors before batching."""
        batch = {}
        for column in self.task.columns:
            values = [r.get(column.name) for r in rows]
            if not column.training_only and (column.required or any(v is not None for v in values)):
                batch[column.name] = values
        media_errors = fetch_media(self.task, batch, self.decode_media)
        features = self.task.preprocess(batch, self.processor, self.ctx)
        for i, why in enumerate(media_errors):
            if why is not None:
                features.errors[i] = why
        return features

    def decode_media(self, name: str, values: list) -> tuple[list, list]:
        out, errors = [], []
        for value in values:
            try:
                out.append(decode_request_value(value, self.uri_storage, name) if value is not None else None)
                errors.append(None if value is not None else f"{name} is null")
            except UserError as exc:
                out.append(None)
                errors.append(str(exc))
        return out, errors

    def predict_rows(self, rows: list[dict], parameters: dict | None = None) -> tuple[list, list, list]:
        """Raw rows in canonical column names -> (predictions, errors, flags)."""
        features = self.preprocess_rows(rows)
        predictions = self.predict_arrays(features.arrays, features.lengths, features.errors, parameters)
        return predictions, features.errors, features.flags or [None] * len(rows)


class PredictStage:
    """Ray Data callable class: a block of features (or of raw rows, when it preprocesses them itself)
    -> a block of prediction columns."""

    def __init__(self, job: dict, model_uri: str, keep: tuple[str, ...], preprocess: dict | None = None):
        from config import JobConfig

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # raw rows in: preprocess here (built first: it pins torch to one thread, the predictor then sets its own)
        self.preprocessor = Preprocessor(**preprocess) if preprocess else None
        cfg = JobConfig.model_validate(job)
        p = cfg.predict
        storage = Storage.from_config(cfg.storage)
        model_dir = storage.model_path(model_uri)  # downloaded once per node
        self.predictor = Predictor(
            cfg.task,
            model_dir,
            p.batch_size,
            p.use_gpu,
            p.quantize,
            p.threads_per_actor,
            p.parameters,
            cfg.options(),
            cfg.data,
            storage,
            max_batch_cost=p.max_batch_cost,
        )
        self.keep = keep

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.preprocessor is not None:  # features straight from this block's rows, no Arrow round trip
            features = self.preprocessor.features(table)
            arrays, lengths, errors, flags = features.arrays, features.lengths, features.errors, features.flags
        else:
            names = [n for n in table.column_names if n not in (LENGTH, ERROR, FLAG) and n not in self.keep]
            arrays = {n: column_values(table, n) for n in names}
            lengths, errors, flags = (table.column(n).to_pylist() for n in (LENGTH, ERROR, FLAG))
        task = self.predictor.task
        predictions = self.predictor.predict_arrays(arrays, lengths, errors)
        columns = {n.lstrip("_"): table.column(n) for n in self.keep if n in table.column_names}
        for name, values in task.to_columns(predictions).items():
            kind = task.output_columns[name]
            columns[name] = pa.array(values, pa.type_for_alias(kind) if isinstance(kind, str) else kind)
        columns[ERROR] = pa.array(errors, pa.string())
        columns[FLAG] = pa.array(flags, pa.string())
        return pa.table(columns)
