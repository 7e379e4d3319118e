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
from typing import TYPE_CHECKING, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data.datasource import FileBasedDatasource

from errors import UserError
from pipelines.storage import Storage, storage_errors

if TYPE_CHECKING:  # models imports torch: a read task needs a task module only for the task's own formats
    from models.spec import TaskSpec

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".txt": "text",
}
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
    fmt = format_by_suffix(path, suffix_formats(task))
    if fmt:
        return fmt
    names = ", ".join(sorted({"parquet", "jsonl", "csv", "text", "folder", *(task.formats if task else ())}))
    raise UserError(f"{path}: unknown data format; name it with data.format ({names})")


def format_by_suffix(path: str, table: dict[str, str]) -> str | None:
    return next((fmt for suffix, fmt in table.items() if path.lower().endswith(suffix)), None)


def table_from_rows(rows: list[dict], errors: list[str | None]) -> pa.Table:
    """Rows of Python values -> an Arrow table with one row per input row. A cell whose type disagrees
    with the rest of its column (a number in a text column, a list of numbers among lists of text) is
    nulled and the row gets an error naming it. The columns are every key of any row (pyarrow alone
    keeps only the first row's keys); rows that hold nothing (lines that did not parse) still count."""
    names = list(dict.fromkeys(key for row in rows for key in row))
    columns = {name: [row.get(name) for row in rows] for name in names}
    arrays = {name: _column_array(name, values, errors) for name, values in columns.items()}
    arrays[READ_ERROR] = pa.array(errors, pa.string())
    return pa.table(arrays)


def _column_array(name: str, values: list, errors: list[str | None]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        pass
    kinds = Counter(_kind(v) for v in values if v is not None)
    keep = "str" if "str" in kinds else kinds.most_common(1)[0][0]
    kept = []
    for i, value in enumerate(values):
        if value is not None and _kind(value) != keep:
            value = None
            why = f"column {name!r} holds a {_kind(values[i])}, expected {keep}"
            errors[i] = why if errors[i] is None else f"{errors[i]}; {why}"
        kept.append(value)
    try:
        return pa.array(kept)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # nested values that still disagree: keep their text
        for i, value in enumerate(kept):
            if value is not None and not isinstance(value, str):
                kept[i] = json.dumps(value, default=str)
        return pa.array(kept, pa.string())


def _kind(value) -> str:
    """A value's type name, with the element types of lists and dicts (`list[int]` vs `list[str]`)."""
    if isinstance(value, list):
        inner = sorted({_kind(v) for v in value if v is not None})
        return f"list[{'|'.join(inner)}]" if inner else "list"
    if isinstance(value, dict):
        return "dict"
    return type(value).__name__


def parse_parquet(data, row_groups: range | None = None) -> Iterator[pa.Table]:
    """Parquet bytes or a seekable file (only `row_groups` of it, if given), a block at a time. A file
    that is not Parquet, or is cut short, ends in one error row naming the problem (after the rows
    that could be read)."""
    read = 0
    try:
        source = pa.BufferReader(data) if isinstance(data, (bytes, bytearray)) else data
        for batch in pq.ParquetFile(source).iter_batches(batch_size=ROWS_PER_BLOCK, row_groups=row_groups):
            table = pa.Table.from_batches([batch])
            read += table.num_rows
            yield table.append_column(READ_ERROR, pa.nulls(table.num_rows, pa.string()))
    except (pa.ArrowException, OSError, ValueError) as exc:
        where = f" after row {read}" if read else ""
        yield table_from_rows([{}], [f"not a readable Parquet file{where} ({_reason(exc)})"])


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


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


MAX_CSV_FIELD = 64 * 1024 * 1024  # csv's own default (128 KB) refuses long texts that are real data
MAX_CSV_RECORD_LINES = 10_000  # a quote left open longer than this is a stray quote, not a multi-line field


def csv_records(lines: Iterable[str]) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """(line number, fields or None, reason) per CSV record, from lines that keep their line endings.

    A record spans lines while a quote is open (an odd number of quote characters so far). A quote
    that never closes (a stray one) makes its first line an error record; reading resumes on the next
    line, so the lines after it are not swallowed into one field."""
    csv.field_size_limit(MAX_CSV_FIELD)
    numbered = enumerate(lines, 1)
    again: list[tuple[int, str]] = []  # lines to read once more, after a quote that never closed
    while True:
        first = again.pop() if again else next(numbered, None)
        if first is None:
            return
        taken, quotes = [first], first[1].count('"')
        while quotes % 2 and len(taken) < MAX_CSV_RECORD_LINES:
            more = again.pop() if again else next(numbered, None)
            if more is None:
                break
            taken.append(more)
            quotes += more[1].count('"')
        if quotes % 2:
            yield first[0], None, f"line {first[0]}: a quote that is never closed"
            again.extend(reversed(taken[1:]))
            continue
        try:
            records = list(csv.reader([text for _, text in taken], strict=True))
        except csv.Error as exc:
            yield first[0], None, f"line {first[0]}: not valid CSV ({exc})"
            continue
        for offset, fields in enumerate(records):
            yield first[0] + min(offset, len(taken) - 1), fields, None


def _text_lines(data) -> Iterable[str]:
    """Lines of bytes or of a binary file, decoded as UTF-8 (bad bytes replaced), endings kept."""
    if isinstance(data, (bytes, bytearray)):
        return io.StringIO(bytes(data).decode("utf-8", errors="replace"), newline="")
    return io.TextIOWrapper(data, encoding="utf-8", errors="replace", newline="")


def parse_lines(data, fmt: str) -> Iterator[pa.Table]:
    """JSON Lines, CSV or plain text (bytes or a binary file), a block at a time; a line or record that
    does not parse becomes an error row naming it."""
    rows: list[dict] = []
    errors: list[str | None] = []
    lines = _text_lines(data)
    if fmt in ("text", "jsonl"):
        for lineno, line in enumerate(lines, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if fmt == "text":
                rows.append({"text": line})
                errors.append(None)
            else:
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
        header: list[str] | None = None
        for lineno, values, why in csv_records(lines):
            if header is None:
                if values is None:  # no header to name the columns: this line is an error row
                    rows.append({})
                    errors.append(f"{why} (the header line)")
                elif any(v.strip() for v in values):
                    header = values
                continue
            if values is not None and not values:
                continue
            if why is not None:
                rows.append({})
                errors.append(why)
            elif len(values) != len(header):
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


def file_blocks(
    f, path: str, fmt: str, task: TaskSpec | None, row_groups: range | None = None, first_row: int = 0
) -> Iterator[pa.Table]:
    """The rows of one open data file, a block at a time, tagged with `_source` (the file) and `_row`
    (the position in it). Text formats and Parquet are read in pieces, never whole. A Parquet file
    may be read in part: `row_groups` of it, whose first row is row `first_row` of the file."""
    fmt = format_of(path, fmt, task)
    if task and fmt in task.formats:
        blocks = parse_file(task, fmt, f.read(), path)
    elif fmt == "parquet":  # Parquet needs to seek; Ray Data hands read tasks a forward-only stream
        blocks = parse_parquet(f if getattr(f, "seekable", lambda: False)() else f.read(), row_groups)
    else:
        blocks = parse_lines(f, fmt)
    start = first_row
    for block in blocks:
        n = block.num_rows
        yield block.append_column(SOURCE, pa.array([path] * n, pa.string())).append_column(
            ROW, pa.array(range(start, start + n), pa.int64())
        )
        start += n


class RowsDatasource(FileBasedDatasource):
    """Data files streamed in blocks, each row tagged with file and line. A read task imports the task's
    module (and with it torch, ~3.5 s of CPU in every new Ray worker) only for a format of the task's own."""

    def __init__(self, paths, fmt: str, task: TaskSpec | None = None, **kwargs):
        super().__init__(paths, **kwargs)
        self._format = fmt
        self._task_name = task.name if task else None
        self._suffixes = suffix_formats(task)
        self._task_formats = tuple(task.formats) if task else ()

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        fmt = self._format if self._format != "auto" else format_by_suffix(path, self._suffixes) or "auto"
        task = None
        if self._task_name and (fmt in self._task_formats or fmt == "auto"):
            from models import get_task

            task = get_task(self._task_name)
        yield from file_blocks(f, path, fmt, task)


def parse_file(task: TaskSpec, fmt: str, data: bytes, path: str) -> Iterator[pa.Table]:
    """A task's own format; a file it cannot parse becomes one error row naming the problem."""
    try:
        rows = list(task.formats[fmt](data, path))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError, UserError) as exc:
        yield table_from_rows([{}], [f"not a valid {fmt} file ({_reason(exc)})"])
        return
    yield from parse_rows(iter(rows))


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
        raise UserError(
            f"{uri}: no {', '.join(task.media_suffixes) or 'media'} files or metadata.jsonl/csv found there"
        )
    prefix = uri.rstrip("/")
    for row in rows:
        for name in media:
            if isinstance(row.get(name), str) and not re.match(r"^[a-zA-Z][\w+.-]*://", row[name]):
                row[name] = f"{prefix}/{row[name]}" if "://" in prefix else posixpath.join(base, row[name])
        first = row.get(media[0]) if media else None
        row[SOURCE] = first if isinstance(first, str) else prefix
        row[ROW] = 0
    return rows


def detect_format(storage: Storage, uri: str, fmt: str, task: TaskSpec) -> str:
    """data.format=auto: a folder without data files but with the task's media files (class sub-folders,
    image/mask pairs) or a metadata.jsonl/csv is read as `folder`; anything else keeps `fmt`."""
    if fmt != "auto" or not task.media_suffixes:
        return fmt
    loc = storage.resolve(uri)
    data_suffixes = tuple(suffix_formats(task))
    with storage_errors(uri):
        if not loc.fs.isdir(loc.path):
            return fmt
        top = [p for p in loc.fs.ls(loc.path, detail=False) if not posixpath.basename(p).startswith((".", "_"))]
        if any(p.lower().endswith(data_suffixes) and posixpath.basename(p) not in METADATA_FILES for p in top):
            return fmt  # data files right there: the usual case, decided without a deep listing
        files = [p for p in loc.fs.find(loc.path) if not posixpath.basename(p).startswith((".", "_"))]
    if any(posixpath.basename(p) in METADATA_FILES for p in files):
        return "folder"
    if not any(p.lower().endswith(data_suffixes) for p in files) and any(
        p.lower().endswith(task.media_suffixes) for p in files
    ):
        return "folder"
    return fmt


def with_format(cfg, fmt: str):
    """The job config with data.format set to what `detect_format` found (said once when it changed)."""
    if fmt == cfg.data.format:
        return cfg
    print(f"data.format: {cfg.data.format} -> {fmt} (a folder of media files)", flush=True)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"format": fmt})})


def data_files(storage: Storage, uri: str, fmt: str, task: TaskSpec | None) -> list:
    """The files behind `uri` in `fmt`, checked before Ray reads anything (one-line errors)."""
    if fmt == "folder":
        return [storage.resolve(uri)]
    files = storage.list_files(uri, suffixes_for(fmt, task))
    for file in files:
        format_of(file.path, fmt, task)
    return files


def column_names(ds: ray.data.Dataset, files: list, fmt: str, task: TaskSpec | None) -> list[str]:
    """The columns of `ds` (`read_rows` of `files`): a Parquet file's from its footer, on the driver, in
    milliseconds; otherwise from Ray Data's first block. That costs an execution, and Ray Data cancels its
    read task, so the next execution waits for a new worker process (seconds each, twice per training run)."""
    first = files[0] if files else None
    fmt = format_of(first.path, fmt, task) if first else None
    if fmt == "parquet" and fmt not in (task.formats if task else ()):
        try:
            with first.fs.open(first.path, "rb") as f:
                return [*pq.ParquetFile(f).schema_arrow.names, READ_ERROR, SOURCE, ROW]
        except (pa.ArrowException, OSError, ValueError):
            pass  # not readable as Parquet: the first block carries the error row that says why
    return ds.schema().names


def read_rows(storage: Storage, uri: str, fmt: str = "auto", task: TaskSpec | None = None) -> ray.data.Dataset:
    """A Ray dataset of every row behind `uri`, tagged with `_source`, `_row` and `_read_error`."""
    if fmt == "folder":
        rows = folder_rows(storage, uri, task)
        errors = [r.get(READ_ERROR) for r in rows]  # a metadata line that did not parse keeps its reason
        table = table_from_rows(
            [{k: v for k, v in r.items() if k not in (SOURCE, ROW, READ_ERROR)} for r in rows], errors
        )
        table = table.append_column(SOURCE, pa.array([r[SOURCE] for r in rows], pa.string()))
        table = table.append_column(ROW, pa.array([r[ROW] for r in rows], pa.int64()))
        blocks = [table.slice(i, ROWS_PER_BLOCK) for i in range(0, table.num_rows, ROWS_PER_BLOCK)]
        return ray.data.from_arrow(blocks)
    files = data_files(storage, uri, fmt, task)
    source = RowsDatasource([f.path for f in files], fmt, task, filesystem=files[0].arrow_fs())
    return ray.data.read_datasource(source)
