"""`rayformers train`: object storage -> Ray Data preprocessing actors -> Ray Train workers.

The driver reads the splits, discovers the label set, builds (or trains) the processor, and
hands tokenised datasets to a `TorchTrainer`. A training split whose preprocessing is the same every
epoch (no random augmentations) and that is small enough is preprocessed once and kept in Ray's object
store (`data.cache_train`): a fresh pass per epoch would restart the preprocessing actors, re-read the
files and re-tokenise, which on small splits costs ten times the training itself. Checkpoints go
to `train.output/checkpoints/` through the same filesystem as the data; running the same command
again resumes from the latest one, and so does Ray Train by itself when a worker or a node is lost
(`train.max_failures`, `train.max_preemption_failures`). A resume whose config or data no longer
match the run in `train.output` is refused. At the end the best model is copied to
`train.output/model/`, the figures to `train.output/metrics.json`
and the run report to `train.output/report.html` (pipelines/report.py). Every folder written here
(prepared/, model/) is committed with a marker written last, and read only when it has one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from config import JobConfig
from errors import UserError
from models import get_task
from pipelines.checkpoints import MODEL_DIR, best_model
from pipelines.cluster import connect, train_log_level
from pipelines.console import job_console
from pipelines.features import check_columns
from pipelines.history import HISTORY
from pipelines.preprocess import Preprocessor
from pipelines.readers import ROW, SOURCE, column_names, data_files, detect_format, read_rows, with_format
from pipelines.report import EVAL_VIEWS, train_report
from pipelines.storage import COMPLETE, Storage, commit_dir, is_committed, remove
from pipelines.tracking import TENSORBOARD, TRACKING, check_tracking, finish_train
from pipelines.train_loop import train_loop


def _sort_key(value):
    return (isinstance(value, str), value)


def scan_train_split(ds, names: list[str], task, cfg: JobConfig, max_rows: int) -> tuple[list, int, list[dict]]:
    """One pass over the training split: the label set, the row count, and a sample of rows
    (canonical names, media columns left out) to train a tokenizer or build a vocabulary on."""
    wanted = {c.name: cfg.column(c.name) for c in task.columns if c.kind != "media"}
    present = [theirs for theirs in wanted.values() if theirs in names] or [ROW]
    labels, rows, sample = set(), 0, []
    label_column = cfg.column(task.label_column) if task.label_column else None
    for batch in ds.select_columns(present).iter_batches(batch_size=4096, batch_format="pyarrow"):
        rows += batch.num_rows
        if label_column:
            labels |= task.labels_in(batch.column(label_column).to_pylist())
        if len(sample) < max_rows:
            columns = {ours: batch.column(theirs).to_pylist() for ours, theirs in wanted.items() if theirs in present}
            sample += [
                {k: v[i] for k, v in columns.items()} for i in range(min(batch.num_rows, max_rows - len(sample)))
            ]
    return sorted(labels, key=_sort_key), rows, sample


def run_identity(cfg: JobConfig, train_files: list) -> dict:
    """What a resumed run must share with the run that wrote `train.output`, by config key (the labels
    are checked apart: they are saved in prepared/ whether configured or discovered)."""
    uris = sorted(f.uri for f in train_files)
    return {
        "task": cfg.task,
        "model.source": cfg.model.source,
        "model.init": cfg.model.init.model_dump(mode="json") if cfg.model.init else None,
        "model.max_length": cfg.model.max_length,
        "data.train": {"files": len(uris), "sha256": hashlib.sha256("\n".join(uris).encode()).hexdigest()},
        "train.batch_size": cfg.train.batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        # what fixes the order of the rows within an epoch, and so what a saved position means
        "train.data_order": cfg.train.data_order,
        "train.seed": cfg.train.seed,
        "train.shuffle_rows": cfg.train.shuffle_rows,
        "train.length_buckets": cfg.train.length_buckets,
        "train.peft": cfg.train.peft.model_dump(mode="json") if cfg.train.peft else None,
    }


def check_same_run(cfg: JobConfig, storage: Storage, output: str, run: dict) -> None:
    """Refuses to resume the run in `output` with a config or data that changed, in one line, before
    Ray starts."""
    if not is_committed(storage, f"{output}/prepared"):
        return
    saved = json.loads(storage.read_text(f"{output}/prepared/prepared.json"))
    before = saved["run"]
    # keys that an older version did not record are not compared
    changes = [(key, before[key], value) for key, value in run.items() if key in before and before[key] != value]
    if cfg.data.labels is not None and list(cfg.data.labels) != saved["labels"]:
        changes.append(("data.labels", saved["labels"], list(cfg.data.labels)))
    if changes:
        key, old, new = changes[0]
        what = f"{key}: {old!r} before, {new!r} now"
        if key == "data.train":
            what = f"data.train: the file list changed ({old['files']} files before, {new['files']} now)"
        raise UserError(
            f"train.output: {output} holds another run ({what}); resume with the same settings, "
            "choose another train.output, or set train.fresh=true to start over"
        )


def start_fresh(storage: Storage, output: str) -> None:
    """train.fresh: removes what earlier runs wrote to `output` (only those folders and files)."""
    removed = []
    # an MLflow store under train.output (track.mlflow: true) stays: it holds the earlier runs to compare with
    kinds = ("checkpoints", "prepared", "model", "base", "metrics.json", HISTORY, EVAL_VIEWS, "report.html")
    for name in (*kinds, TRACKING, TENSORBOARD):
        if storage.exists(f"{output}/{name}"):
            remove(storage, f"{output}/{name}")
            removed.append(name)
    if removed:
        print(f"train.fresh: removed {', '.join(removed)} from {output}", flush=True)


def prepare(cfg: JobConfig, storage: Storage, train_raw, names: list[str], output: str, run: dict):
    """Labels, row count and processor, saved once under `output/prepared` (with the `run` identity
    that `check_same_run` compares) so a resumed run uses exactly the same ones."""
    task = get_task(cfg.task)
    prepared = f"{output}/prepared"
    if is_committed(storage, prepared):
        saved = json.loads(storage.read_text(f"{prepared}/prepared.json"))
        processor = task.build_processor(cfg.model, storage.local_copy(prepared), iter(()))
        return saved["labels"], saved["rows"], processor
    labels, rows, sample = scan_train_split(train_raw, names, task, cfg, cfg.model.tokenizer.max_train_rows)
    if rows == 0:
        raise UserError(f"{cfg.data.train}: the training split has no rows")
    if cfg.data.labels is not None:
        unknown = [label for label in labels if label not in cfg.data.labels]
        if unknown:
            print(f"warning: rows with labels outside data.labels become error rows: {unknown[:10]}", flush=True)
        labels = list(cfg.data.labels)
    elif task.label_column and len(labels) < 2:
        raise UserError(
            f"{cfg.data.train}: column {cfg.column(task.label_column)!r} has {len(labels)} distinct label(s); at "
            "least 2 are needed"
        )
    source_dir = storage.model_path(cfg.model.source) if cfg.model.source else None
    processor = task.build_processor(cfg.model, source_dir, iter(sample))
    with tempfile.TemporaryDirectory() as d:
        processor.save_pretrained(d)
        with open(os.path.join(d, "prepared.json"), "w") as f:
            json.dump({"labels": labels, "rows": rows, "task": cfg.task, "run": run}, f)
        commit_dir(storage, d, prepared)
    return labels, rows, processor


def cache_train(cfg: JobConfig, task, rows: int) -> bool:
    """Whether to preprocess the training split once and keep it (`data.cache_train`)."""
    if cfg.data.cache_train is not None:
        return cfg.data.cache_train
    if task.augments(cfg.options()):
        return False  # random augmentations must be drawn afresh each epoch
    return rows <= cfg.data.cache_max_rows


def materialized(datasets: dict, cpus: float) -> dict:
    """Each dataset executed and kept in Ray's object store. A pass's fixed cost is mostly starting its
    preprocessing actors (new processes importing torch and transformers, ~6 s on 2 cores), so the passes run
    at the same time when the cluster's free CPUs hold all of them (`cpus`: their actors and a read task each);
    else one after the other: two pools that each hold an actor's CPU and wait for a read task's would wait for
    ever (Ray Data waits for CPUs without a time limit)."""
    if len(datasets) < 2 or ray.available_resources().get("CPU", 0) < cpus:
        return {k: ds.materialize() for k, ds in datasets.items()}
    with ThreadPoolExecutor(len(datasets), thread_name_prefix="materialize") as pool:
        futures = {k: pool.submit(ds.materialize) for k, ds in datasets.items()}
        return {k: f.result() for k, f in futures.items()}


def train(cfg: JobConfig) -> dict:
    """`rayformers train`: the run, inside the console (progress bar or lines) and log file of console.py."""
    with job_console(cfg, "train", cfg.train.output):
        return fine_tune(cfg)


@dataclass
class Inputs:
    """What a run trains on: the label set, the training split's row count, the processor, and the datasets
    (the eval split and a cached training split already preprocessed). `rayformers tune` builds them once and
    hands them to every trial whose searched keys leave preprocessing alone (`shares_inputs`)."""

    labels: list
    rows: int
    processor: object
    datasets: dict
    prepared: str  # the committed prepared/ folder they came from
    train_cached: bool  # the training split is preprocessed already (else each epoch streams it)


def fine_tune(cfg: JobConfig, callbacks: tuple = (), shared: Inputs | None = None) -> dict:
    """The run; `callbacks` go to Ray Train's RunConfig (`rayformers tune` passes Tune's reporter, and the
    search's `shared` inputs)."""
    t = cfg.train
    if not t.output:
        raise UserError("train.output: required by `rayformers train` (where checkpoints and the model go)")
    if not cfg.data.train:
        raise UserError("data.train: required by `rayformers train`")
    storage = Storage.from_config(cfg.storage)
    cfg, train_files, eval_files, run = data_plan(cfg, storage)
    output = storage.check_writable(t.output)
    if cfg.model.source:
        storage.model_path(cfg.model.source)  # a wrong model URI fails here, before any worker starts
    check_tracking(cfg)
    if t.fresh:
        start_fresh(storage, t.output.rstrip("/"))
    else:
        check_same_run(cfg, storage, t.output.rstrip("/"), run)

    exact = t.data_order == "exact"
    # exact order with an uncached training split: each worker streams it through a preprocessing pool of its own
    pools = t.max_workers if exact and t.max_workers > 1 and cfg.data.cache_train is not True else 1
    connect(
        cfg.ray.address,
        cfg.ray.num_cpus,
        t.max_workers * t.cpus_per_worker + max(cfg.data.preprocess_actors, pools) + 1,
    )
    if shared is None:
        inputs = prepared_inputs(cfg, storage, run, train_files, eval_files)
    else:
        inputs = shared
        adopt_prepared(storage, shared.prepared, f"{t.output.rstrip('/')}/prepared", run)
    labels, rows, processor, datasets = inputs.labels, inputs.rows, inputs.processor, inputs.datasets
    print(f"{cfg.task}: {rows} training rows, {len(labels)} labels {labels[:10]}", flush=True)
    check_cpus_for_streaming(cfg, inputs)
    # exact order: every worker reads the whole training split, in order. Every worker reads the whole eval split
    # too, in order, and scores every num_workers-th batch of it (train_loop.evaluate): Ray's split into equal
    # shards leaves out up to num_workers - 1 rows (101 eval rows on 2 workers were scored as 100)
    ingest = ray.data.ExecutionOptions(preserve_order=exact)
    dataset_config = DataConfig(
        datasets_to_split=[] if exact else ["train"],
        execution_options={"train": ingest, "eval": ray.data.ExecutionOptions(preserve_order=True)},
    )

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "job": cfg.model_dump(mode="json"),
            # by reference: Ray Train's controller unpickles this config, and a tokenizer object there costs it
            # transformers' imports (~2 s on 2 cores) before it starts any worker; the workers ray.get it
            "processor": ray.put(processor),
            "labels": labels,
            "train_rows": rows,
            "has_eval": "eval" in datasets,
            "output": t.output,
        },
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker},
            placement_strategy=t.placement_strategy,
        ),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=output.path,
            storage_filesystem=output.arrow_fs(),
            logging_config=LoggingConfig(log_level=train_log_level()),
            callbacks=list(callbacks),
            failure_config=FailureConfig(
                max_failures=t.max_failures, max_preemption_failures=t.max_preemption_failures
            ),
            # Ray keeps the newest `keep_checkpoints` (by step) and always the latest; the best
            # model is kept apart in checkpoints/best by the workers.
            checkpoint_config=CheckpointConfig(
                num_to_keep=t.keep_checkpoints, checkpoint_score_attribute="step", checkpoint_score_order="max"
            ),
        ),
        datasets=datasets,
        dataset_config=dataset_config,
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
    if (result.metrics or {}).get("user_error"):  # raised by every worker alike, reported rather than retried
        raise UserError(result.metrics["user_error"])
    return finalize(cfg, storage, result, time.perf_counter() - started)


def data_plan(cfg: JobConfig, storage: Storage) -> tuple[JobConfig, list, list, dict]:
    """The config with its data format resolved, the training and eval files, and the run's identity
    (`check_same_run` compares it with the run already in train.output)."""
    task = get_task(cfg.task)
    cfg = with_format(cfg, detect_format(storage, cfg.data.train, cfg.data.format, task))
    train_files = data_files(storage, cfg.data.train, cfg.data.format, task)
    eval_files = data_files(storage, cfg.data.eval, cfg.data.format, task) if cfg.data.eval else []
    return cfg, train_files, eval_files, run_identity(cfg, train_files)


def adopt_prepared(storage: Storage, shared: str, prepared: str, run: dict) -> None:
    """A run given shared inputs (`rayformers tune`) commits its own copy of their prepared/ folder, with its
    own run identity, so that it resumes and is checked like any run (once: a resume finds it committed)."""
    if is_committed(storage, prepared):
        return
    with tempfile.TemporaryDirectory() as d:
        ignore = shutil.ignore_patterns(COMPLETE, ".complete")  # the markers: commit_dir writes its own
        shutil.copytree(storage.local_copy(shared), d, ignore=ignore, dirs_exist_ok=True)
        with open(os.path.join(d, "prepared.json")) as f:
            saved = json.load(f)
        with open(os.path.join(d, "prepared.json"), "w") as f:
            json.dump({**saved, "run": run}, f)
        commit_dir(storage, d, prepared)


def check_cpus_for_streaming(cfg: JobConfig, inputs: Inputs) -> None:
    """An uncached training split in exact order runs one preprocessing pool per worker, during training. When
    the workers and those pools take every CPU, Ray Data's read tasks never get one and the run waits for
    ever (seen: 2 workers and 2 actors on a 4-CPU Ray): refused on a local Ray, a line on a cluster (it may
    grow)."""
    t = cfg.train
    if inputs.train_cached or t.data_order != "exact" or t.max_workers < 2:
        return
    per_worker = max(1, cfg.data.preprocess_actors // t.max_workers)
    needed = t.max_workers * (t.cpus_per_worker + per_worker) + 1
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus >= needed:
        return
    what = (
        f"train.num_workers={t.max_workers} with train.data_order=exact and an uncached training split needs "
        f"{needed:g} CPUs (each worker's CPUs and its own preprocessing actor, and one for reading); the cluster "
        f"has {cpus:g}"
    )
    fixes = "set data.cache_train=true, train.data_order=streaming or fewer workers"
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        print(f"warning: {what}: the run waits until the cluster grows ({fixes})", flush=True)
        return
    raise UserError(f"{what}: {fixes} (ray.num_cpus for a local Ray)")


def prepared_inputs(cfg: JobConfig, storage: Storage, run: dict, train_files: list, eval_files: list) -> Inputs:
    """Reads the splits, prepares the labels and processor (prepared/) and preprocesses: the eval split and a
    cached training split at once, in the Ray Data actors; a training split that is not cached stays a lazy
    dataset that each epoch streams through them."""
    task, t = get_task(cfg.task), cfg.train
    prepared = f"{t.output.rstrip('/')}/prepared"
    train_raw = read_rows(storage, cfg.data.train, cfg.data.format, task)
    names = column_names(train_raw, train_files, cfg.data.format, task)
    check_columns(names, task, cfg.data.columns, training=True)
    labels, rows, processor = prepare(cfg, storage, train_raw, names, t.output.rstrip("/"), run)
    job = cfg.model_dump(mode="json")
    exact = t.data_order == "exact"
    cached = cache_train(cfg, task, rows)
    actors = cfg.data.preprocess_actors
    if exact and not cached and t.max_workers > 1:
        actors = max(1, actors // t.max_workers)  # every worker runs a preprocessing pass of its own
        print(
            f"train.data_order=exact with an uncached training split: each of the {t.max_workers} workers "
            f"preprocesses the whole split ({actors} actor(s) each); data.cache_train=true or "
            "train.data_order=streaming avoids that",
            flush=True,
        )

    def preprocessed(ds, split: str, uri: str, actors: int):
        return ds.map_batches(
            Preprocessor,
            fn_constructor_kwargs=dict(
                job=job,
                processor_dir=prepared,  # prepare() committed it there
                labels=labels,
                train=split == "train",
                data_uri=uri,
                keep=(SOURCE, ROW) if split == "train" else (),
            ),
            batch_format="pyarrow",
            batch_size=cfg.data.preprocess_batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
        )

    datasets = {"train": preprocessed(train_raw, "train", cfg.data.train, actors)}
    # exact: rows keep their file order through reading, preprocessing and the cache (data_order.py numbers
    # them); the setting is this dataset's own, not the process's
    datasets["train"].context.execution_options.preserve_order = exact
    if cfg.data.eval:
        eval_raw = read_rows(storage, cfg.data.eval, cfg.data.format, task)
        check_columns(column_names(eval_raw, eval_files, cfg.data.format, task), task, cfg.data.columns, training=True)
        datasets["eval"] = preprocessed(eval_raw, "eval", cfg.data.eval, cfg.data.preprocess_actors)
    # one pass now for the eval split and a cached training split (every epoch then streams the cached blocks
    # instead of re-reading and re-preprocessing); both passes at once, so their actor pools start together
    passes = {k: v for k, v in datasets.items() if k == "eval" or cached}
    datasets.update(materialized(passes, (actors + 1 if cached else 0) + cfg.data.preprocess_actors + 1))
    return Inputs(labels, rows, processor, datasets, prepared, cached)


def finalize(cfg: JobConfig, storage: Storage, result, seconds: float) -> dict:
    """Copies the best model to train.output/model and writes train.output/metrics.json."""
    out = cfg.train.output.rstrip("/")
    final = dict(result.metrics or {})
    if cfg.train.stop_after_steps:
        print(
            f"stopped at step {final.get('step')} as asked (train.stop_after_steps); the same command resumes",
            flush=True,
        )
    best_uri = best_model(storage, f"{out}/checkpoints/best")
    if best_uri:
        best = json.loads(storage.read_text(f"{best_uri}/eval_metrics.json"))
        commit_dir(storage, best_uri, f"{out}/model")
    else:  # no eval split: the last step's figures
        best = {k: v for k, v in final.items() if k.startswith("eval_") or k in ("step", "epoch")}
        commit_dir(storage, f"{out}/checkpoints/{os.path.basename(result.checkpoint.path)}/{MODEL_DIR}", f"{out}/model")
    summary = {
        "task": cfg.task,
        "final": {k: v for k, v in final.items() if k.startswith("eval_") or k in ("step", "epoch")},
        "best": best,
        "throughput_samples_per_s": final.get("samples_per_s"),
        "samples": final.get("samples"),
        "skipped_rows": final.get("skipped_rows"),
        "resumed_at_steps": final.get("resumed_at", []),
        "worker_nodes": final.get("worker_nodes"),  # Ray node id of each worker, by rank
        "parameters": final.get("parameters"),  # trainable and total (they differ with train.peft)
        "wall_seconds": round(seconds, 1),
    }
    storage.write_text(f"{out}/metrics.json", json.dumps(summary, indent=2))
    print(f"model: {out}/model", flush=True)
    print(f"report: {train_report(cfg, storage, summary)}", flush=True)
    print("metrics: " + json.dumps(summary), flush=True)
    finish_train(cfg, storage, summary)
    return summary
