"""The order in which training rows reach the workers within an epoch: a pure function of the seed,
the epoch and the rows of the training split in file order, so that a resumed run trains every row
of the epoch exactly once, also with another number of workers.

The split is read in windows of `window_rows` rows. Each window's rows (those without an error) are
shuffled with a seed drawn from (seed, epoch, window), cut into groups of batch_size x length_buckets
rows, each group sorted by length and cut into batches, and the window's batches shuffled. That
numbers every batch of the epoch. A run that starts at batch `start` (what the epoch had trained
when the run began) deals batches in rounds of one per worker: batch g goes to worker
(g - start) mod world. So from `start` on, every batch is trained once whatever `world` is, and a
run resumed with the same number of workers sees the same sequence as one never interrupted. The
last round of an epoch may be short: a worker without a batch in it trains the round's first batch
with weight 0, so every worker takes the same number of steps (DDP's collectives stay in lockstep).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.features import ERROR, FLAG, LENGTH, column_values
from pipelines.readers import ROW, SOURCE

KEY_COLUMNS = (SOURCE, ROW)


def window_rows(batch_size: int, length_buckets: int, shuffle_rows: int) -> int:
    """Rows per window: at least one group of batches sorted together, a whole number of groups.
    Independent of the number of workers, so that an elastic resume cuts the same batches."""
    group = batch_size * length_buckets
    return max(group, -(-shuffle_rows // group) * group)


class _Window:
    """One window of the split; its rows are turned into Python values only when a batch of it is used."""

    def __init__(self, table: pa.Table):
        self.table = table
        self._columns = None

    def rows(self, indices: list[int]) -> tuple[dict, list[tuple[str, int]]]:
        if self._columns is None:
            names = [n for n in self.table.column_names if n not in (ERROR, FLAG, LENGTH, *KEY_COLUMNS)]
            self._columns = {n: column_values(self.table, n) for n in names}
            self._keys = list(zip(*(self._key_column(n) for n in KEY_COLUMNS)))
        batch = {name: [values[i] for i in indices] for name, values in self._columns.items()}
        return batch, [self._keys[i] for i in indices]

    def _key_column(self, name: str) -> list:
        if name in self.table.column_names:
            return self.table.column(name).to_pylist()
        return [None] * self.table.num_rows


def window_batches(table: pa.Table, batch_size: int, length_buckets: int, rng: random.Random) -> list[list[int]]:
    """The batches (row indices) cut from one window, in their shuffled order; rows with errors left out."""
    usable = (
        pc.indices_nonzero(pc.is_null(table.column(ERROR))).to_pylist()
        if ERROR in table.column_names
        else list(range(table.num_rows))
    )
    lengths = table.column(LENGTH).to_pylist() if LENGTH in table.column_names else [0] * table.num_rows
    rng.shuffle(usable)
    group = batch_size * length_buckets
    batches = []
    for g in range(0, len(usable), group):
        ordered = sorted(usable[g : g + group], key=lengths.__getitem__)
        batches += [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class Round:
    """One step's worth of batches, one per worker; what this worker gets of it."""

    batch: dict | None  # this worker's rows (model inputs), None in a short last round
    spare: dict | None  # without a batch of its own: the round's first, trained with weight 0
    keys: list = field(default_factory=list)  # (file, row) of each row of `batch`
    skipped: int = 0  # rows with errors in the windows read since the previous round
    position: int = 0  # batches of the epoch dealt once this round is done


def rounds(
    windows: Iterable[pa.Table],
    *,
    seed: int,
    epoch: int,
    batch_size: int,
    length_buckets: int,
    world: int,
    rank: int,
    start: int,
) -> Iterator[Round]:
    """This worker's share of the epoch from batch `start` on; see the module docstring. `windows` are the
    split's rows in file order, `window_rows` at a time (the last window may be shorter)."""
    pending: list[tuple[_Window, list[int]]] = []
    numbered, dealt, skipped = 0, start, 0

    def deal(batches: list[tuple[_Window, list[int]]]) -> Round:
        nonlocal dealt, skipped
        window, indices = batches[rank] if rank < len(batches) else (None, None)
        batch, keys = window.rows(indices) if window is not None else (None, [])
        spare = batches[0][0].rows(batches[0][1])[0] if batch is None else None  # built only when needed
        dealt += len(batches)
        out = Round(batch, spare, keys, skipped, dealt)
        skipped = 0
        return out

    for w, table in enumerate(windows):
        rng = random.Random(f"{seed}/{epoch}/{w}")  # a str seed is hashed with SHA-512: the same in every process
        if ERROR in table.column_names:
            skipped += table.num_rows - table.column(ERROR).null_count
        window = _Window(table)
        for indices in window_batches(table, batch_size, length_buckets, rng):
            numbered += 1
            if numbered <= start:  # trained before this run began
                continue
            pending.append((window, indices))
            if len(pending) == world:
                yield deal(pending)
                pending = []
    if pending:
        yield deal(pending)
    elif skipped:
        yield Round(None, None, [], skipped, dealt)
