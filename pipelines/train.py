"""`rayformers train`: object storage -> Ray Data preprocessing actors -> Ray Train workers.

The driver reads the splits, discovers the label set, builds (or trains) the processor, and
hands tokenised datasets to a `TorchTrainer`. A training split whose preprocessing is the same every
epoch (no random augmentations) and that is small enough is preprocessed once and kept in Ray's object
store (`data.cache_train`): a fresh pass per epoch would restart the preprocessing actors, re-read the
files and re-tokenise, which on small splits costs ten times the training itself. Checkpoints go
to `train.output/checkpoints/` through the same filesystem as the data; running the same command
again resumes from the latest one. At the end the best model is copied to `train.output/model/`
and the figures to `train.output/metrics.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from jobs.config import JobConfig
from models import get_task
from models.spec import UserError
from pipelines.checkpoints import MODEL_DIR
from pipelines.cluster import connect
from pipelines.predictor import Preprocessor, check_columns
from pipelines.readers import ROW, data_files, read_rows
from pipelines.storage import Storage
from pipelines.train_loop import train_loop


def _sort_key(value):
    return (isinstance(value, str), value)


def scan_train_split(ds, task, cfg: JobConfig, max_rows: int) -> tuple[list, int, list[dict]]:
    """One pass over the training split: the label set, the row count, and a sample of rows
    (canonical names, media columns left out) to train a tokenizer or build a vocabulary on."""
    wanted = {c.name: cfg.column(c.name) for c in task.columns if c.kind != "media"}
    present = [theirs for theirs in wanted.values() if theirs in ds.schema().names] or [ROW]
    labels, rows, sample = set(), 0, []
    label_column = cfg.column(task.label_column) if task.label_column else None
    for batch in ds.select_columns(present).iter_batches(batch_size=4096, batch_format="pyarrow"):
        rows += batch.num_rows
        if label_column:
            labels |= task.labels_in(batch.column(label_column).to_pylist())
        if len(sample) < max_rows:
            columns = {ours: batch.column(theirs).to_pylist() for ours, theirs in wanted.items() if theirs in present}
            sample += [{k: v[i] for k, v in columns.items()} for i in range(min(batch.num_rows, max_rows - len(sample)))]
    return sorted(labels, key=_sort_key), rows, sample


def prepare(cfg: JobConfig, storage: Storage, train_raw, output: str):
    """Labels, row count and processor, saved once under `output/prepared` so a resumed run
    uses exactly the same ones."""
    task = get_task(cfg.task)
    prepared = f"{output}/prepared"
    if storage.exists(f"{prepared}/prepared.json"):
        saved = json.loads(storage.read_text(f"{prepared}/prepared.json"))
        processor = task.build_processor(cfg.model, storage.local_copy(prepared), iter(()))
        return saved["labels"], saved["rows"], processor
    labels, rows, sample = scan_train_split(train_raw, task, cfg, cfg.model.tokenizer.max_train_rows)
    if rows == 0:
        raise UserError(f"{cfg.data.train}: the training split has no rows")
    if cfg.data.labels is not None:
        unknown = [label for label in labels if label not in cfg.data.labels]
        if unknown:
            print(f"warning: rows with labels outside data.labels become error rows: {unknown[:10]}", flush=True)
        labels = list(cfg.data.labels)
    elif task.label_column and len(labels) < 2:
        raise UserError(f"{cfg.data.train}: column {cfg.column(task.label_column)!r} has {len(labels)} distinct label(s); at least 2 are needed")
    source_dir = storage.model_path(cfg.model.source) if cfg.model.source else None
    processor = task.build_processor(cfg.model, source_dir, iter(sample))
    with tempfile.TemporaryDirectory() as d:
        processor.save_pretrained(d)
        with open(os.path.join(d, "prepared.json"), "w") as f:
            json.dump({"labels": labels, "rows": rows, "task": cfg.task}, f)
        storage.upload_dir(d, prepared)
    return labels, rows, processor


def cache_train(cfg: JobConfig, task, rows: int) -> bool:
    """Whether to preprocess the training split once and keep it (`data.cache_train`)."""
    if cfg.data.cache_train is not None:
        return cfg.data.cache_train
    if task.augments(cfg.options()):
        return False  # random augmentations must be drawn afresh each epoch
    return rows <= cfg.data.cache_max_rows


def train(cfg: JobConfig) -> dict:
    task = get_task(cfg.task)
    t = cfg.train
    if not t.output:
        raise UserError("train.output: required by `rayformers train` (where checkpoints and the model go)")
    if not cfg.data.train:
        raise UserError("data.train: required by `rayformers train`")
    storage = Storage.from_config(cfg.storage)
    output = storage.check_writable(t.output)
    data_files(storage, cfg.data.train, cfg.data.format, task)
    if cfg.data.eval:
        data_files(storage, cfg.data.eval, cfg.data.format, task)
    if cfg.model.source:
        storage.model_path(cfg.model.source)  # a wrong model URI fails here, before any worker starts

    connect(cfg.ray.address, cfg.ray.num_cpus, t.num_workers * t.cpus_per_worker + cfg.data.preprocess_actors + 1)
    train_raw = read_rows(storage, cfg.data.train, cfg.data.format, task)
    check_columns(train_raw.schema().names, task, cfg.data.columns, training=True)
    labels, rows, processor = prepare(cfg, storage, train_raw, t.output)
    print(f"{cfg.task}: {rows} training rows, {len(labels)} labels {labels[:10]}", flush=True)

    job = cfg.model_dump(mode="json")

    def preprocessed(ds, split: str, uri: str):
        return ds.map_batches(
            Preprocessor,
            fn_constructor_kwargs=dict(job=job, processor=processor, labels=labels, train=split == "train", data_uri=uri),
            batch_format="pyarrow",
            batch_size=cfg.data.preprocess_batch_size,
            concurrency=cfg.data.preprocess_actors,
        )

    datasets = {"train": preprocessed(train_raw, "train", cfg.data.train)}
    if cache_train(cfg, task, rows):
        # one pass now; every epoch then streams the cached blocks instead of re-reading and re-preprocessing
        datasets["train"] = datasets["train"].materialize()
    if cfg.data.eval:
        eval_raw = read_rows(storage, cfg.data.eval, cfg.data.format, task)
        check_columns(eval_raw.schema().names, task, cfg.data.columns, training=True)
        datasets["eval"] = preprocessed(eval_raw, "eval", cfg.data.eval).materialize()

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": cfg.model_dump(mode="json"), "processor": processor, "labels": labels,
                           "train_rows": rows, "has_eval": "eval" in datasets, "output": t.output},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker},
                                     placement_strategy=t.placement_strategy),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=output.path,
            storage_filesystem=output.arrow_fs(),
            failure_config=FailureConfig(max_failures=t.max_failures),
            # Ray keeps the newest `keep_checkpoints` (by step) and always the latest; the best
            # model is kept apart in checkpoints/best by the workers.
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute="step",
                                               checkpoint_score_order="max"),
        ),
        datasets=datasets,
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; a user mistake inside still reads as one line
        cause = exc
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or getattr(cause, "cause", None) or None
        if isinstance(cause, UserError):
            raise cause from None
        raise
    return finalize(cfg, storage, result, time.perf_counter() - started)


def finalize(cfg: JobConfig, storage: Storage, result, seconds: float) -> dict:
    """Copies the best model to train.output/model and writes train.output/metrics.json."""
    out = cfg.train.output.rstrip("/")
    final = dict(result.metrics or {})
    if cfg.train.stop_after_steps:
        print(f"stopped at step {final.get('step')} as asked (train.stop_after_steps); the same command resumes", flush=True)
    best_uri = f"{out}/checkpoints/best"
    if storage.exists(f"{best_uri}/config.json"):
        best = json.loads(storage.read_text(f"{best_uri}/eval_metrics.json"))
        storage.copy_dir(best_uri, f"{out}/model")
    else:
        best = final
        storage.copy_dir(f"{out}/checkpoints/{os.path.basename(result.checkpoint.path)}/{MODEL_DIR}", f"{out}/model")
    summary = {
        "task": cfg.task,
        "final": {k: v for k, v in final.items() if k.startswith("eval_") or k in ("step", "epoch")},
        "best": best,
        "throughput_samples_per_s": final.get("samples_per_s"),
        "skipped_rows": final.get("skipped_rows"),
        "resumed_at_steps": final.get("resumed_at", []),
        "worker_nodes": final.get("worker_nodes"),  # Ray node id of each worker, by rank
        "wall_seconds": round(seconds, 1),
    }
    storage.write_text(f"{out}/metrics.json", json.dumps(summary, indent=2))
    print(f"model: {out}/model", flush=True)
    print("metrics: " + json.dumps(summary), flush=True)
    return summary
