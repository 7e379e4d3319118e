"""One predictor, three runtimes: the preprocessing stage and the model stage used by training,
`rayformers predict` and the Serve deployment alike.

`Preprocessor` turns rows in the user's column names into task features (run in Ray Data
actors). `Predictor` runs the model over features, batching rows of similar length so little
compute goes into padding, and turns outputs into predictions with the task's `postprocess`.
Neither knows which task it runs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from models import get_task
from models.spec import Features, TaskSpec, UserError
from pipelines.readers import READ_ERROR
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
            raise UserError(f"data: no column {theirs!r}{hint} for {column.description}; the data has {', '.join(sorted(names))}")


def canonical_rows(table: pa.Table, task: TaskSpec, column_map: dict[str, str], training: bool) -> dict[str, list]:
    batch = {}
    for column in task.columns:
        if column.training_only and not training:
            continue
        theirs = column_map.get(column.name, column.name)
        if theirs in table.column_names:
            batch[column.name] = table.column(theirs).to_pylist()
    return batch


def features_to_arrow(features: Features) -> dict[str, pa.Array]:
    out = {}
    for name, values in features.arrays.items():
        out[name] = pa.array([v.tolist() if isinstance(v, np.ndarray) else v for v in values])
    out[LENGTH] = pa.array(features.lengths, pa.int64())
    out[ERROR] = pa.array(features.errors, pa.string())
    out[FLAG] = pa.array(features.flags or [None] * len(features.errors), pa.string())
    return out


class Preprocessor:
    """Ray Data callable class: a block of raw rows -> a block of features (+ pass-through columns)."""

    def __init__(self, task_name: str, processor: Any, column_map: dict[str, str], labels: list | None,
                 keep: tuple[str, ...] = ()):
        torch.set_num_threads(1)
        self.task = get_task(task_name)
        self.processor = processor
        self.column_map = column_map
        self.label_ids = {label: i for i, label in enumerate(labels)} if labels is not None else None
        self.keep = keep

    def __call__(self, table: pa.Table) -> pa.Table:
        batch = canonical_rows(table, self.task, self.column_map, training=self.label_ids is not None)
        features = self.task.preprocess(batch, self.processor, self.label_ids)
        read_errors = table.column(READ_ERROR).to_pylist() if READ_ERROR in table.column_names else []
        for i, why in enumerate(read_errors):
            if why is not None:
                features.errors[i] = why
        columns = features_to_arrow(features)
        for name in self.keep:
            if name in table.column_names:
                columns[name] = table.column(name)
        return pa.table(columns)


def pick_device(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class Predictor:
    """A loaded model with its processor; predicts features or raw rows in length-sorted batches."""

    def __init__(self, task_name: str, model_dir: str, batch_size: int = 8, use_gpu: bool = False,
                 quantize: str = "none", threads: int | None = None, parameters: dict | None = None):
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
        self.parameters = parameters or {}

    def predict_arrays(self, arrays: dict[str, list], lengths: list[int], errors: list, parameters: dict | None = None) -> list:
        """One prediction per row (None where the row carries an error), in input order."""
        parameters = {**self.parameters, **(parameters or {})}
        n = len(errors)
        predictions: list = [None] * n
        usable = sorted((i for i in range(n) if errors[i] is None), key=lambda i: lengths[i])
        for start in range(0, len(usable), self.batch_size):
            rows = usable[start : start + self.batch_size]
            sub = {name: [values[i] for i in rows] for name, values in arrays.items() if name != "labels"}
            inputs = {k: v.to(self.device) for k, v in self.task.collate(sub, self.processor).items()}
            with torch.inference_mode():
                outputs = self.model(**inputs)
            for i, prediction in zip(rows, self.task.postprocess(outputs, inputs, self.model, parameters)):
                predictions[i] = prediction
        return predictions

    def preprocess_rows(self, rows: list[dict]) -> Features:
        """Raw rows in canonical column names -> features; Serve checks their errors before batching."""
        batch = {}
        for column in self.task.columns:
            values = [r.get(column.name) for r in rows]
            if not column.training_only and (column.required or any(v is not None for v in values)):
                batch[column.name] = values
        return self.task.preprocess(batch, self.processor, None)

    def predict_rows(self, rows: list[dict], parameters: dict | None = None) -> tuple[list, list, list]:
        """Raw rows in canonical column names -> (predictions, errors, flags)."""
        features = self.preprocess_rows(rows)
        predictions = self.predict_arrays(features.arrays, features.lengths, features.errors, parameters)
        return predictions, features.errors, features.flags or [None] * len(rows)


class PredictStage:
    """Ray Data callable class: a block of features -> a block of prediction columns."""

    def __init__(self, task_name: str, model_uri: str, storage_cfg: dict, batch_size: int, use_gpu: bool,
                 quantize: str, threads: int, parameters: dict, keep: tuple[str, ...]):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        model_dir = Storage(**storage_cfg).model_path(model_uri)  # downloaded once per node
        self.predictor = Predictor(task_name, model_dir, batch_size, use_gpu, quantize, threads, parameters)
        self.keep = keep

    def __call__(self, table: pa.Table) -> pa.Table:
        task = self.predictor.task
        names = [n for n in table.column_names if n not in (LENGTH, ERROR, FLAG) and n not in self.keep]
        arrays = {n: table.column(n).to_pylist() for n in names}
        errors = table.column(ERROR).to_pylist()
        predictions = self.predictor.predict_arrays(arrays, table.column(LENGTH).to_pylist(), errors)
        columns = {n.lstrip("_"): table.column(n) for n in self.keep if n in table.column_names}
        for name, values in task.to_columns(predictions).items():
            columns[name] = pa.array(values, pa.type_for_alias(task.output_columns[name]))
        columns[ERROR] = table.column(ERROR)
        columns[FLAG] = table.column(FLAG)
        return pa.table(columns)
