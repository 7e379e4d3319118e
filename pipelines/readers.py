"""Reads data (a file, a folder or a glob) into Ray Data: Parquet, JSON Lines, CSV, plain text (one
row per line), a `folder` of media files (the Hugging Face imagefolder/audiofolder layout), and the
formats a task adds (COCO, SQuAD, CoNLL: `TaskSpec.formats`).

Each row keeps where it came from (`_source` file and `_row` position in it), so predictions can
name their input even without an id column. A line that does not parse becomes a row with
`_read_error` set instead of failing the whole file: no input row is ever lost.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
from collections import Counter
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data.datasource import FileBasedDatasource

from models import get_task
from models.spec import TaskSpec, UserError
from pipelines.storage import Storage, storage_errors

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
           ".txt": "text"}
SOURCE, ROW, READ_ERROR = "_source", "_row", "_read_error"
ROWS_PER_BLOCK = 2048
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def suffix_formats(task: TaskSpec | None) -> dict[str, str]:
    """File suffix -> format name; a task's own suffixes win (its `.json` may be COCO or SQuAD)."""
    return {**FORMATS, **(task.format_suffixes if task else {})}


def suffixes_for(fmt: str, task: TaskSpec | None) -> tuple[str, ...]:
    table = suffix_formats(task)
    if fmt == "auto":
        return tuple(table)
    own = tuple(s for s, f in table.items() if f == fmt)
    return own or ("",)  # a format with no suffix of its own takes every file


def format_of(path: str, configured: str, task: TaskSpec | None = None) -> str:
    if configured != "auto":
        return configured
    for suffix, fmt in suffix_formats(task).items():
        if path.lower().endswith(suffix):
            return fmt
    names = ", ".join(sorted({"parquet", "jsonl", "csv", "text", "folder", *(task.formats if task else ())}))
    raise UserError(f"{path}: unknown data format; name it with data.format ({names})")


def table_from_rows(rows: list[dict], errors: list[str | None]) -> pa.Table:
    """Rows of Python values -> an Arrow table. A cell whose type disagrees with the rest of its
    column (a number in a text column) is nulled and the row gets an error naming it. The columns are
    every key of any row (pyarrow alone keeps only the first row's keys)."""
    names = list(dict.fromkeys(key for row in rows for key in row))
    rows = [{name: row.get(name) for name in names} for row in rows]
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        columns = {key for row in rows for key in row}
        for column in columns:
            kinds = Counter(type(r.get(column)).__name__ for r in rows if r.get(column) is not None)
            if len(kinds) <= 1:
                continue
            keep = "str" if "str" in kinds else kinds.most_common(1)[0][0]
            for i, row in enumerate(rows):
                value = row.get(column)
                if value is not None and type(value).__name__ != keep:
                    row[column] = None
                    why = f"column {column!r} holds a {type(value).__name__}, expected {keep}"
                    errors[i] = why if errors[i] is None else f"{errors[i]}; {why}"
        table = pa.Table.from_pylist(rows)
    return table.append_column(READ_ERROR, pa.array(errors, pa.string()))


def parse_parquet(data: bytes) -> Iterator[pa.Table]:
    for batch in pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=ROWS_PER_BLOCK):
        table = pa.Table.from_batches([batch])
        yield table.append_column(READ_ERROR, pa.nulls(table.num_rows, pa.string()))


def parse_rows(rows: Iterator[dict]) -> Iterator[pa.Table]:
    """Rows a task's format parser yields, a block at a time."""
    block: list[dict] = []
    for row in rows:
        block.append(row)
        if len(block) == ROWS_PER_BLOCK:
            yield table_from_rows(block, [None] * len(block))
            block = []
    if block:
        yield table_from_rows(block, [None] * len(block))


def parse_lines(data: bytes, fmt: str) -> Iterator[pa.Table]:
    """JSON Lines, CSV or plain text, a block at a time; a line that does not parse becomes an error row."""
    text = data.decode("utf-8", errors="replace")
    rows: list[dict] = []
    errors: list[str | None] = []
    if fmt == "text":
        for line in text.splitlines():
            if line.strip():
                rows.append({"text": line})
                errors.append(None)
            if len(rows) == ROWS_PER_BLOCK:
                yield table_from_rows(rows, errors)
                rows, errors = [], []
    elif fmt == "jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
                if not isinstance(value, dict):
                    raise ValueError("not an object")
                rows.append(value)
                errors.append(None)
            except ValueError as exc:
                rows.append({})
                errors.append(f"line {lineno}: not a JSON object ({exc})")
            if len(rows) == ROWS_PER_BLOCK:
                yield table_from_rows(rows, errors)
                rows, errors = [], []
    else:
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None) or []
        for values in reader:
            lineno = reader.line_num
            if not values:
                continue
            if len(values) != len(header):
                rows.append({})
                errors.append(f"line {lineno}: {len(values)} fields, the header has {len(header)}")
            else:
                rows.append(dict(zip(header, values)))
                errors.append(None)
            if len(rows) == ROWS_PER_BLOCK:
                yield table_from_rows(rows, errors)
                rows, errors = [], []
    if rows:
        yield table_from_rows(rows, errors)


class RowsDatasource(FileBasedDatasource):
    """Data files streamed in blocks, each row tagged with file and line."""

    def __init__(self, paths, fmt: str, task_name: str | None = None, **kwargs):
        super().__init__(paths, **kwargs)
        self._format = fmt
        self._task_name = task_name

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        task = get_task(self._task_name) if self._task_name else None
        fmt = format_of(path, self._format, task)
        data = f.readall()
        if task and fmt in task.formats:
            blocks = parse_file(task, fmt, data, path)
        elif fmt == "parquet":
            blocks = parse_parquet(data)
        else:
            blocks = parse_lines(data, fmt)
        start = 0
        for block in blocks:
            n = block.num_rows
            yield block.append_column(SOURCE, pa.array([path] * n, pa.string())).append_column(
                ROW, pa.array(range(start, start + n), pa.int64())
            )
            start += n


def parse_file(task: TaskSpec, fmt: str, data: bytes, path: str) -> Iterator[pa.Table]:
    """A task's own format; a file it cannot parse becomes one error row naming the problem."""
    try:
        yield from parse_rows(task.formats[fmt](data, path))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, UserError) as exc:
        yield table_from_rows([{}], [f"not a valid {fmt} file ({type(exc).__name__}: {exc})"])


def folder_rows(storage: Storage, uri: str, task: TaskSpec) -> list[dict]:
    """The `folder` layout: rows from `metadata.jsonl`/`metadata.csv` files (their `file_name`
    is the first media column), else the task's `folder_rows` over every file. Media paths become
    full URIs; `_source` names the row's (first) media file."""
    root = storage.resolve(uri)
    with storage_errors(uri):
        if not root.fs.isdir(root.path):
            raise UserError(f"{uri}: data.format folder expects a folder")
        files = sorted(p for p in root.fs.find(root.path) if not posixpath.basename(p).startswith((".", "_")))
    media = [c.name for c in task.columns if c.kind == "media"]
    base = root.path.rstrip("/")
    relative = [p[len(base) + 1 :] for p in files]
    metadata = [p for p in relative if posixpath.basename(p) in METADATA_FILES]
    rows: list[dict] = []
    if metadata:
        for meta in metadata:
            folder = posixpath.dirname(meta)
            data = storage.resolve(f"{uri.rstrip('/')}/{meta}")
            with storage_errors(data.uri):
                raw = data.fs.cat_file(data.path)
            fmt = "jsonl" if meta.endswith(".jsonl") else "csv"
            for table in parse_lines(raw, fmt):
                for row in table.to_pylist():
                    if "file_name" in row and media:
                        row[media[0]] = row.pop("file_name")
                    for name in media:
                        if isinstance(row.get(name), str):
                            row[name] = posixpath.normpath(posixpath.join(folder, row[name]))
                    rows.append(row)
    else:
        rows = task.folder_rows([p for p in relative])
    if not rows:
        raise UserError(f"{uri}: no {', '.join(task.media_suffixes) or 'media'} files or metadata.jsonl/csv found there")
    prefix = uri.rstrip("/")
    for row in rows:
        for name in media:
            if isinstance(row.get(name), str) and not re.match(r"^[a-zA-Z][\w+.-]*://", row[name]):
                row[name] = f"{prefix}/{row[name]}" if "://" in prefix else posixpath.join(base, row[name])
        first = row.get(media[0]) if media else None
        row[SOURCE] = first if isinstance(first, str) else prefix
        row[ROW] = 0
    return rows


def data_files(storage: Storage, uri: str, fmt: str, task: TaskSpec | None) -> list:
    """The files behind `uri` in `fmt`, checked before Ray reads anything (one-line errors)."""
    if fmt == "folder":
        return [storage.resolve(uri)]
    files = storage.list_files(uri, suffixes_for(fmt, task))
    for file in files:
        format_of(file.path, fmt, task)
    return files


def read_rows(storage: Storage, uri: str, fmt: str = "auto", task: TaskSpec | None = None) -> ray.data.Dataset:
    """A Ray dataset of every row behind `uri`, tagged with `_source`, `_row` and `_read_error`."""
    if fmt == "folder":
        rows = folder_rows(storage, uri, task)
        errors = [r.get(READ_ERROR) for r in rows]  # a metadata line that did not parse keeps its reason
        table = table_from_rows([{k: v for k, v in r.items() if k not in (SOURCE, ROW, READ_ERROR)} for r in rows], errors)
        table = table.append_column(SOURCE, pa.array([r[SOURCE] for r in rows], pa.string()))
        table = table.append_column(ROW, pa.array([r[ROW] for r in rows], pa.int64()))
        blocks = [table.slice(i, ROWS_PER_BLOCK) for i in range(0, table.num_rows, ROWS_PER_BLOCK)]
        return ray.data.from_arrow(blocks)
    files = data_files(storage, uri, fmt, task)
    source = RowsDatasource([f.path for f in files], fmt, task.name if task else None, filesystem=files[0].arrow_fs())
    return ray.data.read_datasource(source)
