"""How rows and features travel between the stages of a job as Arrow columns.

A block of the user's rows becomes the task's canonical columns (`canonical_rows`; `check_columns` refuses
data without a required one). The features `preprocess` makes travel on as one Arrow column per array,
plus the row's padded length (`LENGTH`), its error (`ERROR`) and its note (`FLAG`); `column_values` reads
them back.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from errors import UserError

if TYPE_CHECKING:
    from models.spec import Features, TaskSpec

LENGTH, ERROR, FLAG = "_length", "error", "flag"


def check_columns(names: list[str], task: TaskSpec, column_map: dict[str, str], training: bool) -> None:
    """A required column missing from the data is a user error for the whole job, not per row."""
    for column in task.columns:
        if not column.required or (column.training_only and not training):
            continue
        theirs = column_map.get(column.name, column.name)
        if theirs not in names:
            hint = f" (mapped by data.columns.{column.name})" if column.name in column_map else ""
            raise UserError(
                f"data: no column {theirs!r}{hint} for {column.description}; the data has {', '.join(sorted(names))}"
            )


def canonical_rows(table: pa.Table, task: TaskSpec, column_map: dict[str, str], training: bool) -> dict[str, list]:
    batch = {}
    for column in task.columns:
        if column.training_only and not training:
            continue
        theirs = column_map.get(column.name, column.name)
        if theirs in table.column_names:
            batch[column.name] = column_values(table, theirs)
    return batch


# Arrays travel between stages as Arrow columns; numpy arrays (pixels, waveforms, masks) as .npy bytes,
# which keep dtype and shape and decode without copying element by element.
_NPY_MAGIC = b"\x93NUMPY"


def _encode(value):
    if isinstance(value, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        return buffer.getvalue()
    return value


def column_values(table: pa.Table, name: str) -> list:
    """A column as Python values, with .npy-encoded cells decoded back to numpy arrays."""
    column = table.column(name)
    values = column.to_pylist()
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return [
            np.load(io.BytesIO(v), allow_pickle=False) if isinstance(v, bytes) and v.startswith(_NPY_MAGIC) else v
            for v in values
        ]
    return values


def features_to_arrow(features: Features) -> dict[str, pa.Array]:
    out = {}
    for name, values in features.arrays.items():
        if any(isinstance(v, np.ndarray) for v in values):
            out[name] = pa.array([_encode(v) for v in values], pa.large_binary())
        else:
            out[name] = pa.array(values)
    out[LENGTH] = pa.array(features.lengths, pa.int64())
    out[ERROR] = pa.array(features.errors, pa.string())
    out[FLAG] = pa.array(features.flags or [None] * len(features.errors), pa.string())
    return out
