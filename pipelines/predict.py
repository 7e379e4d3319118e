"""`rayformers predict`: a corpus in object storage -> an actor pool of predictors -> Parquet parts,
committed one unit (input file) at a time, so that a crashed run resumes instead of restarting.

Exactly one output row per input row: the input's id (when it has one), its `source` file and `row`
position, the task's prediction columns, `error` (null when fine) and `flag` (e.g. truncated). Each
predictor actor reads one unit, preprocesses and scores it in windows sorted by length (little
compute goes into padding), writes the unit's part whole and returns one small record, which the
driver commits to the manifest. The driver holds records, never rows. The folder layout and its
rules are in `pipelines/predict_output.py`.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from config import JobConfig
from errors import UserError
from models import get_task
from models.spec import TaskSpec
from pipelines.cluster import connect
from pipelines.console import job_console, on_terminal, progress
from pipelines.features import ERROR, FLAG, check_columns
from pipelines.predict_output import (
    Commits,
    check_no_overlap,
    digest,
    file_entries,
    finish,
    first_rows,
    folder_stamp,
    load_commits,
    open_output,
    write_part,
)
from pipelines.predictor import PredictStage
from pipelines.preprocess import Preprocessor
from pipelines.readers import (
    READ_ERROR,
    ROW,
    ROWS_PER_BLOCK,
    SOURCE,
    data_files,
    detect_format,
    file_blocks,
    folder_rows,
    format_of,
    table_from_rows,
    with_format,
)
from pipelines.report import predict_report
from pipelines.storage import Storage
from pipelines.tracking import check_tracking, track_predict

UNIT_BYTES = 256 * 1024 * 1024  # a Parquet file larger than this is split into units of row groups
READ_TRIES = 3  # a unit whose file cannot be read or whose part cannot be written is tried this often
PROGRESS_EVERY_S = 5.0


def model_uri(cfg: JobConfig, explicit: str | None) -> str:
    if explicit:
        return explicit
    if cfg.train.output:
        return cfg.train.output.rstrip("/") + "/model"
    if cfg.model.source:
        return cfg.model.source
    raise UserError("predict.model: say which model to use (or set train.output / model.source)")


def is_path(source: str) -> bool:
    """A model source that names a folder (a URI or a local path), not a hub id."""
    return "://" in source or os.path.isdir(source) or source.startswith((".", "/"))


def plan_units(storage: Storage, cfg: JobConfig, task: TaskSpec) -> tuple[list[dict], str]:
    """The units of work and a stamp of the input that changes when any file does. A unit is a data
    file; a Parquet file over UNIT_BYTES is split into runs of row groups (so a big file is scored
    by several actors and a crash redoes only a part of it); a `folder` layout is sliced by rows."""
    p = cfg.predict
    if cfg.data.format == "folder":
        rows = folder_rows(storage, p.input, task)
        units = [
            unit(i, p.input, rows=json.dumps(rows[start : start + ROWS_PER_BLOCK]))
            for i, start in enumerate(range(0, len(rows), ROWS_PER_BLOCK))
        ]
        return units, folder_stamp(storage.resolve(p.input))
    files = data_files(storage, p.input, cfg.data.format, task)
    entries = file_entries(storage.resolve(p.input), [f.path for f in files])
    units: list[dict] = []
    for f in files:
        size = entries.get(f.path, {}).get("size") or 0
        if size > UNIT_BYTES and format_of(f.path, cfg.data.format, task) == "parquet":
            units += [unit(len(units) + i, f.uri, *piece) for i, piece in enumerate(row_group_runs(f))]
        else:
            units.append(unit(len(units), f.uri))
    return units, folder_stamp(storage.resolve(p.input), entries=entries)


def unit(i: int, path: str, first_group: int = -1, end_group: int = -1, first_row: int = 0, rows: str = "") -> dict:
    return {
        "unit": i,
        "path": path,
        "rows": rows,
        "first_group": first_group,
        "end_group": end_group,
        "first_row": first_row,
    }


def row_group_runs(file) -> list[tuple[int, int, int]]:
    """(first row group, end row group, first row) of runs of about UNIT_BYTES, from the file's footer.
    A footer that cannot be read leaves the file whole: its unit then reports why, as an error row."""
    try:
        with file.fs.open(file.path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
    except (pa.ArrowException, OSError, ValueError):
        return [(-1, -1, 0)]
    runs, first, row, size = [], 0, 0, 0
    start_row = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        size += group.total_byte_size
        row += group.num_rows
        if size >= UNIT_BYTES or g == meta.num_row_groups - 1:
            runs.append((first, g + 1, start_row))
            first, size, start_row = g + 1, 0, row
    return runs or [(-1, -1, 0)]


def fingerprint(cfg: JobConfig, storage: Storage, source: str, input_stamp: str) -> dict:
    model = folder_stamp(storage.resolve(source)) if is_path(source) else f"{source}@{cfg.model.revision}"
    settings = {
        "task": cfg.task,
        "format": cfg.data.format,
        "columns": cfg.data.columns,
        "id": cfg.data.id_column,
        "max_length": cfg.model.max_length,
        "parameters": cfg.predict.parameters,
        "quantize": cfg.predict.quantize,
        "options": cfg.task_options,
    }
    return {"model": f"{source}:{model}", "input": input_stamp, "settings": digest(settings)}


def check_sample_columns(storage: Storage, cfg: JobConfig, task: TaskSpec, units: list[dict]) -> None:
    """A required column missing from the data is a user error for the whole job, found from the
    first rows that parse (a bad first file does not decide it)."""
    for unit in units[:5]:
        loc = storage.resolve(unit["path"])
        if unit["rows"]:
            names = {k for row in json.loads(unit["rows"]) for k in row}
        else:
            try:
                with loc.fs.open(loc.path, "rb") as f:
                    block = next(file_blocks(f, loc.path, cfg.data.format, task), None)
            except OSError:
                continue  # the predictor retries it, and makes it an error row if it stays unreadable
            if block is None or block.column(READ_ERROR).null_count == 0:
                continue
            names = set(block.column_names)
        check_columns(sorted(names), task, cfg.data.columns, training=False)
        return


def predict(cfg: JobConfig) -> dict:
    """`rayformers predict`: the run, inside the console (progress bar or lines) and log file of console.py."""
    with job_console(cfg, "predict", cfg.predict.output):
        return score_corpus(cfg)


def score_corpus(cfg: JobConfig) -> dict:
    task = get_task(cfg.task)
    p = cfg.predict
    task.sanitize_parameters(p.parameters, cfg.options())  # a bad predict.parameters fails before Ray starts
    if not p.input:
        raise UserError("predict.input: required by `rayformers predict` (the corpus to score)")
    if not p.output:
        raise UserError("predict.output: required by `rayformers predict` (where the Parquet goes)")
    check_tracking(cfg)
    storage = Storage.from_config(cfg.storage)
    cfg = with_format(cfg, detect_format(storage, p.input, cfg.data.format, task))
    source = model_uri(cfg, p.model)
    model_key = "predict.model" if p.model else ("train.output" if cfg.train.output else "model.source")
    check_no_overlap(
        storage,
        p.output,
        {"predict.input": p.input, model_key: source if is_path(source) else None, "train.output": cfg.train.output},
    )
    storage.model_path(source)  # a wrong or half-written model fails here, before Ray starts
    units, input_stamp = plan_units(storage, cfg, task)
    check_sample_columns(storage, cfg, task, units)
    out = open_output(storage, p.output, fingerprint(cfg, storage, source, input_stamp), len(units), p.overwrite)
    todo = [u for u in units if u["unit"] not in out.done]
    if out.done:
        print(
            f"resuming {p.output}: {len(out.done)} of {len(units)} units already committed, scoring {len(todo)}",
            flush=True,
        )

    started = time.perf_counter()
    ray_up = started
    actors = 0
    commits = Commits(out)
    if todo:
        local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
        actors = p.actors
        if local and actors is None:  # one single-threaded predictor per core beats one multi-threaded one
            actors = 1 if p.use_gpu else max(1, (os.cpu_count() or 1) // p.threads_per_actor)
        connect(cfg.ray.address, cfg.ray.num_cpus, (actors or 0) * p.threads_per_actor + 1)
        if p.use_gpu and ray.cluster_resources().get("GPU", 0) == 0:
            raise UserError("predict.use_gpu: the Ray cluster has no GPUs")
        ray_up = time.perf_counter()
        if actors is None:
            resources = ray.cluster_resources()
            actors = (
                int(resources["GPU"]) if p.use_gpu else max(1, int(resources.get("CPU", 2) - 1) // p.threads_per_actor)
            )
        actors = max(1, min(actors, len(todo)))
        job = cfg.model_dump(mode="json")
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            UnitScorer,
            fn_constructor_kwargs=dict(job=job, model_uri=source, work_uri=out.work.uri),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if p.use_gpu else 0,
            num_cpus=0 if p.use_gpu else p.threads_per_actor,
        )
        progress = Progress(len(units), len(out.done))
        for record in ds.iter_rows():
            commits.add({k: v.item() if hasattr(v, "item") else v for k, v in record.items()})
            progress.update(record["rows"])
        commits.flush()
    summary = summarize(out, len(units), len(todo), time.perf_counter() - started, time.perf_counter() - ray_up, actors)
    parts = [r["part"] for _, r in sorted(load_commits(out.root).items())]
    print(f"report: {predict_report(cfg, task, storage, out.root, parts, source, summary)}", flush=True)
    track_predict(cfg, storage, summary, source)
    return summary


class Progress:
    """One line every few seconds: units and rows done, rows/s, and an ETA from the units left."""

    def __init__(self, units: int, done: int):
        self.units, self.done, self.rows = units, done, 0
        self.start = self.last = time.monotonic()

    def update(self, rows: int) -> None:
        self.done += 1
        self.rows += rows
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S and self.done < self.units and not on_terminal():
            return
        self.last = now
        rate = self.rows / max(now - self.start, 1e-9)
        per_unit = (now - self.start) / max(self.done, 1)
        eta = per_unit * (self.units - self.done)
        progress(
            self.done,
            self.units,
            f"predict: {self.done}/{self.units} units, {self.rows} rows this run, {rate:.1f} rows/s, ETA {eta:.0f}s",
        )


class UnitScorer:
    """Ray Data callable class: one unit (a data file) in -> its part written whole -> one record out
    (unit, part, rows, errors, flagged, source). A file that cannot be read after a few tries
    becomes one error row naming it."""

    def __init__(self, job: dict, model_uri: str, work_uri: str):
        cfg = JobConfig.model_validate(job)
        self.cfg = cfg
        self.task = get_task(cfg.task)
        self.storage = Storage.from_config(cfg.storage)
        keep = tuple(dict.fromkeys(k for k in (cfg.data.id_column, SOURCE, ROW) if k))
        preprocess = dict(job=job, processor_dir=model_uri, labels=None, keep=keep, data_uri=cfg.predict.input)
        p = cfg.predict
        fused = p.fuse_preprocessing if p.fuse_preprocessing is not None else not p.use_gpu
        # unfused (the GPU default): a thread preprocesses the next window while the model runs on this one.
        # Built before the model: it pins torch to one thread, the predictor then sets its own.
        self.preprocessor = None if fused else Preprocessor(**preprocess)
        self.stage = PredictStage(job, model_uri, keep, preprocess if fused else None)
        self.work = self.storage.resolve(work_uri)
        self.window = cfg.predict.sort_window

    def __call__(self, batch: dict) -> dict:
        unit, path, rows = int(batch["unit"][0]), str(batch["path"][0]), str(batch["rows"][0])
        groups = (
            range(int(batch["first_group"][0]), int(batch["end_group"][0])) if batch["first_group"][0] >= 0 else None
        )
        first_row = int(batch["first_row"][0])
        for attempt in range(READ_TRIES):
            try:
                tables = self.predict_windows(self.windows(path, rows, groups, first_row))
                break
            except (OSError, UserError) as exc:  # storage_errors raises UserError for what a user can fix
                if attempt == READ_TRIES - 1:
                    why = f"{path}: could not read the file after {READ_TRIES} tries ({type(exc).__name__}: {exc})"
                    where = self.storage.resolve(path).path
                    tables = self.predict_windows([self.tag(table_from_rows([{}], [why]), where, first_row)])
                else:
                    time.sleep(0.5 * 2**attempt)
        table = (
            unify(tables) if tables else pa.table({ERROR: pa.array([], pa.string()), FLAG: pa.array([], pa.string())})
        )
        for attempt in range(READ_TRIES):  # a failed write is retried too; a part is only ever whole
            try:
                name = write_part(self.work, unit, table)
                break
            except (OSError, UserError):
                if attempt == READ_TRIES - 1:
                    raise
                time.sleep(0.5 * 2**attempt)
        errors = table.num_rows - table.column(ERROR).null_count
        flagged = table.num_rows - table.column(FLAG).null_count
        return {
            "unit": [unit],
            "part": [name],
            "rows": [table.num_rows],
            "errors": [errors],
            "flagged": [flagged],
            "source": [path],
        }

    def windows(self, path: str, rows: str, groups: range | None = None, first_row: int = 0):
        """The unit's rows, `predict.sort_window` at a time."""
        if rows:  # a slice of a folder layout's rows, listed by the driver
            listed = json.loads(rows)
            errors = [r.get(READ_ERROR) for r in listed]
            table = table_from_rows(
                [{k: v for k, v in r.items() if k not in (SOURCE, ROW, READ_ERROR)} for r in listed], errors
            )
            table = table.append_column(SOURCE, pa.array([r[SOURCE] for r in listed], pa.string()))
            table = table.append_column(ROW, pa.array([r[ROW] for r in listed], pa.int64()))
            yield from (table.slice(i, self.window) for i in range(0, table.num_rows, self.window))
            return
        loc = self.storage.resolve(path)
        with loc.fs.open(loc.path, "rb") as f:
            for block in file_blocks(f, loc.path, self.cfg.data.format, self.task, groups, first_row):
                yield from (block.slice(i, self.window) for i in range(0, block.num_rows, self.window))

    def predict_windows(self, windows) -> list[pa.Table]:
        windows = (self.complete(w) for w in windows)
        if self.preprocessor is None:
            return [self.stage(w) for w in windows]
        out, ahead = [], None
        with ThreadPoolExecutor(1) as pool:
            for window in windows:
                features = pool.submit(self.preprocessor, window)
                if ahead is not None:
                    out.append(self.stage(ahead.result()))
                ahead = features
            if ahead is not None:
                out.append(self.stage(ahead.result()))
        return out

    @staticmethod
    def tag(table: pa.Table, path: str, start: int) -> pa.Table:
        n = table.num_rows
        return table.append_column(SOURCE, pa.array([path] * n, pa.string())).append_column(
            ROW, pa.array(range(start, start + n), pa.int64())
        )

    def complete(self, table: pa.Table) -> pa.Table:
        """Required columns a file lacks (all its lines broken, or another layout) become nulls, and
        rows without a read error get one naming the column, so the task sees the columns it expects."""
        for column in self.task.columns:
            if not column.required or column.training_only:
                continue
            theirs = self.cfg.column(column.name)
            if theirs in table.column_names:
                continue
            table = table.append_column(theirs, pa.nulls(table.num_rows, pa.string()))
            if READ_ERROR not in table.column_names:
                table = table.append_column(READ_ERROR, pa.nulls(table.num_rows, pa.string()))
            errors = [why or f"no column {theirs!r} in this row" for why in table.column(READ_ERROR).to_pylist()]
            table = table.set_column(table.column_names.index(READ_ERROR), READ_ERROR, pa.array(errors, pa.string()))
        return table


def unify(tables: list[pa.Table]) -> pa.Table:
    """A unit's windows as one table: a column some windows lack is null there; an id column whose
    type differs between windows (numbers, then text) is kept as text."""
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        names = list(dict.fromkeys(n for t in tables for n in t.column_names))
        types = {n: {t.schema.field(n).type for t in tables if n in t.column_names} for n in names}
        fixed = []
        for t in tables:
            for n in t.column_names:
                if len(types[n] - {pa.null()}) > 1:
                    t = t.set_column(
                        t.column_names.index(n),
                        n,
                        pa.array([None if v is None else str(v) for v in t.column(n).to_pylist()], pa.string()),
                    )
            fixed.append(t)
        return pa.concat_tables(fixed, promote_options="permissive")


def summarize(out, units: int, scored: int, seconds: float, pipeline_seconds: float, actors: int) -> dict:
    """Counts from the manifest (one small record per unit), never from the output table."""
    records = load_commits(out.work)
    missing = units - len(records)
    if missing:
        raise RuntimeError(f"{missing} of {units} units have no committed part")  # a bug, not a user error
    rows = sum(r["rows"] for r in records.values())
    errors = sum(r["errors"] for r in records.values())
    flagged = sum(r["flagged"] for r in records.values())
    this_run = sum(r["rows"] for r in records.values() if r.get("run") == out.run_id)
    summary = {
        "rows": rows,
        "errors": errors,
        "flagged": flagged,
        "units": units,
        "units_scored": scored,
        "units_resumed": units - scored,
        "rows_scored": this_run,
        "seconds": round(seconds, 1),
        "rows_per_s": round(this_run / max(seconds, 1e-9), 1),
        "pipeline_rows_per_s": round(this_run / max(pipeline_seconds, 1e-9), 1),
        "actors": actors,
        "output": out.root.uri,
    }
    finish(out, summary)
    print(
        f"wrote {rows} predictions ({errors} errors, {flagged} flagged) to {out.root.uri} in {seconds:.1f}s "
        f"({summary['rows_per_s']} rows/s; {summary['pipeline_rows_per_s']} rows/s once Ray was up; "
        f"{actors} predictor actors; {units - scored} of {units} units from an earlier run)",
        flush=True,
    )
    print("summary: " + json.dumps(summary), flush=True)
    parts = [records[u]["part"] for u in sorted(records)]
    for row in first_rows(out, parts):
        print("  " + json.dumps(row, default=str), flush=True)
    return summary
