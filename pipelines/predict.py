"""`rayformers predict`: a corpus in object storage -> preprocessing actors -> an actor pool of
predictors -> Parquet.

Exactly one output row per input row: the input's id (or its `source` file and `row` position),
the task's prediction columns, `error` (null when fine) and `flag` (e.g. truncated). Predictors
sort each window of rows by length before batching, so little compute goes into padding.
"""

from __future__ import annotations

import json
import os
import time

import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray

from jobs.config import JobConfig
from models import get_task
from models.spec import UserError
from pipelines.cluster import connect
from pipelines.predictor import ERROR, FLAG, PredictStage, Preprocessor, check_columns
from pipelines.readers import ROW, SOURCE, data_files, read_rows
from pipelines.storage import Storage


def model_uri(cfg: JobConfig, explicit: str | None) -> str:
    if explicit:
        return explicit
    if cfg.train.output:
        return cfg.train.output.rstrip("/") + "/model"
    if cfg.model.source:
        return cfg.model.source
    raise UserError("predict.model: say which model to use (or set train.output / model.source)")


def predict(cfg: JobConfig) -> dict:
    task = get_task(cfg.task)
    p = cfg.predict
    task.sanitize_parameters(p.parameters, cfg.options())  # a bad predict.parameters fails before Ray starts
    if not p.input:
        raise UserError("predict.input: required by `rayformers predict` (the corpus to score)")
    if not p.output:
        raise UserError("predict.output: required by `rayformers predict` (where the Parquet goes)")
    storage = Storage.from_config(cfg.storage)
    source = model_uri(cfg, p.model)
    local_model = storage.model_path(source)
    data_files(storage, p.input, cfg.data.format, task)
    output = storage.check_writable(p.output)
    if output.fs.find(output.path):  # a re-run replaces its predictions, never mixes them
        output.fs.rm(output.path, recursive=True)
        output.fs.makedirs(output.path, exist_ok=True)
    processor = task.build_processor(cfg.model, local_model, iter(()))

    started = time.perf_counter()
    local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    # On CPU the predictor actors preprocess their own rows: a separate preprocessing actor would be one
    # more process competing for the same cores. GPU actors leave that work to CPU actors.
    fused = p.fuse_preprocessing if p.fuse_preprocessing is not None else not p.use_gpu
    actors = p.actors
    if local and actors is None:  # one single-threaded predictor per core beats one multi-threaded one
        actors = 1 if p.use_gpu else max(1, (os.cpu_count() or 1) // p.threads_per_actor)
    connect(cfg.ray.address, cfg.ray.num_cpus, (actors or 0) * p.threads_per_actor + 1)
    if p.use_gpu and ray.cluster_resources().get("GPU", 0) == 0:
        raise UserError("predict.use_gpu: the Ray cluster has no GPUs")
    ray_up = time.perf_counter()
    if actors is None:
        resources = ray.cluster_resources()
        # leave room for the preprocessing actors (0.5 CPU each) and Ray Data's read tasks (1 CPU)
        spare = resources.get("CPU", 2) - (0 if fused else 0.5 * cfg.data.preprocess_actors) - 1
        actors = int(resources["GPU"]) if p.use_gpu else max(1, int(spare) // p.threads_per_actor)

    ds = read_rows(storage, p.input, cfg.data.format, task)
    names = ds.schema().names
    check_columns(names, task, cfg.data.columns, training=False)
    job = cfg.model_dump(mode="json")
    keep = (cfg.data.id_column,) if cfg.data.id_column in names else (SOURCE, ROW)
    preprocess = dict(job=job, processor=processor, labels=None, keep=keep, data_uri=p.input)
    if not fused:
        ds = ds.map_batches(
            Preprocessor,
            fn_constructor_kwargs=preprocess,
            batch_format="pyarrow",
            batch_size=cfg.data.preprocess_batch_size,
            concurrency=cfg.data.preprocess_actors,
            num_cpus=0.5,
        )
    ds = ds.map_batches(
        PredictStage,
        fn_constructor_kwargs=dict(job=job, model_uri=source, keep=keep, preprocess=preprocess if fused else None),
        batch_format="pyarrow",
        batch_size=p.sort_window,
        concurrency=actors,
        num_gpus=1 if p.use_gpu else 0,
        num_cpus=0 if p.use_gpu else p.threads_per_actor,
    )
    ds.write_parquet(output.path, filesystem=output.arrow_fs())
    seconds = time.perf_counter() - started
    return summarize(output, seconds, time.perf_counter() - ray_up, actors)


def summarize(output, seconds: float, pipeline_seconds: float, actors: int) -> dict:
    table = pads.dataset(output.path, filesystem=output.arrow_fs(), format="parquet").to_table()
    rows = table.num_rows
    errors = rows - pc.sum(pc.is_null(table.column(ERROR))).as_py() if rows else 0
    flagged = rows - pc.sum(pc.is_null(table.column(FLAG))).as_py() if rows else 0
    summary = {"rows": rows, "errors": errors, "flagged": flagged, "seconds": round(seconds, 1),
               "rows_per_s": round(rows / seconds, 1), "pipeline_rows_per_s": round(rows / pipeline_seconds, 1),
               "actors": actors, "output": output.uri}
    print(f"wrote {rows} predictions ({errors} errors, {flagged} flagged) to {output.uri} in {seconds:.1f}s "
          f"({rows / seconds:.1f} rows/s; {rows / pipeline_seconds:.1f} rows/s once Ray was up; {actors} predictor actors)",
          flush=True)
    print("summary: " + json.dumps(summary), flush=True)
    for row in table.slice(0, 5).to_pylist():
        print("  " + json.dumps(row, default=str), flush=True)
    return summary
