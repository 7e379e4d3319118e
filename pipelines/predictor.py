"""One predictor, three runtimes: the model stage of `rayformers predict` and of the Serve deployment
(training moves its batches to the device with the same `to_device`).

`Predictor` runs the model over features (from the preprocessing stage, `preprocess.py`, or from raw
request rows), batching rows of similar length so little compute goes into padding, and turns outputs
into predictions with the task's `postprocess`. `PredictStage` is its Ray Data callable class. Neither
knows which task it runs.
"""

from __future__ import annotations

import os

import pyarrow as pa
import torch
from pydantic import BaseModel

from config import DataConfig, JobConfig
from errors import UserError
from models import get_task
from models.spec import Context, Features
from pipelines.adapters import base_source, is_adapter_dir, load_model
from pipelines.features import ERROR, FLAG, LENGTH, column_values
from pipelines.media import decode_request_value
from pipelines.preprocess import Preprocessor, fetch_media
from pipelines.storage import Storage


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
        options: BaseModel | None = None,
        data: DataConfig | None = None,
        storage: Storage | None = None,
        allow_uris: bool = False,
        max_batch_cost: int | None = None,
        loaded: tuple | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.task = get_task(task_name)
        self.device = pick_device(use_gpu)
        if loaded is not None:  # (model, processor) already loaded: an adapter over a base Serve shares
            model, self.processor = loaded
            if quantize != "none":
                raise UserError("predict.quantize: not for adapters served over a shared base model")
        elif is_adapter_dir(model_dir):  # a LoRA run's model/: its base model with the adapter merged in
            base = (storage or Storage()).model_path(base_source(model_dir))
            model, self.processor = load_model(self.task, model_dir, base, merge=True)
        else:
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
