"""Reads tabular data (Parquet, JSON Lines, CSV: a file, a folder or a glob) into Ray Data.

Each row keeps where it came from (`_source` file and `_row` position in it), so predictions can
name their input even without an id column. A line that does not parse becomes a row with
`_read_error` set instead of failing the whole file: no input row is ever lost.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data.datasource import FileBasedDatasource

from models.spec import UserError
from pipelines.storage import Storage

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
SOURCE, ROW, READ_ERROR = "_source", "_row", "_read_error"
ROWS_PER_BLOCK = 2048


def format_of(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    for suffix, fmt in FORMATS.items():
        if path.lower().endswith(suffix):
            return fmt
    raise UserError(f"{path}: unknown data format; name it with data.format (parquet, jsonl or csv)")


def table_from_rows(rows: list[dict], errors: list[str | None]) -> pa.Table:
    """Rows of Python values -> an Arrow table. A cell whose type disagrees with the rest of its
    column (a number in a text column) is nulled and the row gets an error naming it."""
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


def parse_lines(data: bytes, fmt: str) -> Iterator[pa.Table]:
    """JSON Lines or CSV, a block at a time; a line that does not parse becomes an error row."""
    text = data.decode("utf-8", errors="replace")
    rows: list[dict] = []
    errors: list[str | None] = []
    if fmt == "jsonl":
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
    """Parquet, JSON Lines and CSV files, streamed in blocks, each row tagged with file and line."""

    def __init__(self, paths, fmt: str, **kwargs):
        super().__init__(paths, **kwargs)
        self._format = fmt

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        fmt = format_of(path, self._format)
        data = f.readall()
        blocks = parse_parquet(data) if fmt == "parquet" else parse_lines(data, fmt)
        start = 0
        for block in blocks:
            n = block.num_rows
            yield block.append_column(SOURCE, pa.array([path] * n, pa.string())).append_column(
                ROW, pa.array(range(start, start + n), pa.int64())
            )
            start += n


def read_rows(storage: Storage, uri: str, fmt: str = "auto") -> ray.data.Dataset:
    """A Ray dataset of every row behind `uri`, tagged with `_source`, `_row` and `_read_error`."""
    suffixes = tuple(FORMATS) if fmt == "auto" else tuple(s for s, f in FORMATS.items() if f == fmt)
    files = storage.list_files(uri, suffixes)
    for file in files:
        format_of(file.path, fmt)  # unknown formats fail here, before Ray reads anything
    source = RowsDatasource([f.path for f in files], fmt, filesystem=files[0].arrow_fs())
    return ray.data.read_datasource(source)
