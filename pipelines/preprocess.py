"""The preprocessing stage: a Ray Data callable class that turns a block of the user's rows into task
features (media fetched, decoded and checked by the task's `preprocess`), for training and for
`rayformers predict`. The same media fetching serves requests in the predictor (`fetch_media`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from config import JobConfig
from pipelines.features import canonical_rows, features_to_arrow
from pipelines.media import resolve_paths
from pipelines.readers import READ_ERROR, SOURCE
from pipelines.storage import Storage

if TYPE_CHECKING:
    from models.spec import Features, TaskSpec


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
        # models (and torch with it) are imported here, in the actor, not where this class is unpickled:
        # Ray Data's coordinator actors unpickle it too, and the import costs ~3.5 s of CPU in each
        import torch

        from models import get_task
        from models.spec import Context

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
