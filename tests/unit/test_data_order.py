"""The training data order: every row of an epoch trained exactly once, also across a resume with the
same or another number of workers, and the same sequence as an uninterrupted run."""

from __future__ import annotations

import random
from collections import Counter

import pyarrow as pa
import pytest

from pipelines.data_order import rounds, window_rows
from pipelines.features import ERROR, LENGTH
from pipelines.readers import ROW, SOURCE

BATCH, BUCKETS = 4, 2


def split(rows: int = 203, bad_every: int = 17) -> pa.Table:
    """A preprocessed training split in file order: two files, varied lengths, some rows with errors."""
    rng = random.Random(0)
    return pa.table(
        {
            "input_ids": [[i] * rng.randint(1, 9) for i in range(rows)],
            LENGTH: [rng.randint(1, 9) for _ in range(rows)],
            ERROR: [("empty text" if i % bad_every == 5 else None) for i in range(rows)],
            SOURCE: [f"part-{i // 120}.parquet" for i in range(rows)],
            ROW: [i % 120 for i in range(rows)],
        }
    )


def windows(table: pa.Table, size: int):
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


def run(table, *, world, start=0, stop_rounds=None, epoch=0, seed=42, size=24, buckets=BUCKETS):
    """What each worker trains, round by round, until `stop_rounds` rounds (a kill) or the epoch's end."""
    per_rank = []
    for rank in range(world):
        seen = []
        for n, r in enumerate(
            rounds(
                windows(table, size),
                seed=seed,
                epoch=epoch,
                batch_size=BATCH,
                length_buckets=buckets,
                world=world,
                rank=rank,
                start=start,
            )
        ):
            if stop_rounds is not None and n == stop_rounds:
                break
            seen.append((r.keys, r.position, r.batch is not None, r.skipped))
        per_rank.append(seen)
    return per_rank


def keys_of(per_rank) -> list:
    return [key for seen in per_rank for keys, *_ in seen for key in keys]


def usable_keys(table) -> set:
    rows = table.to_pylist()
    return {(r[SOURCE], r[ROW]) for r in rows if r[ERROR] is None}


def test_window_size_does_not_depend_on_the_number_of_workers():
    assert window_rows(16, 8, 1024) == 1024
    assert window_rows(16, 8, 1000) == 1024  # whole groups of batches sorted together
    assert window_rows(16, 8, 0) == 128


@pytest.mark.parametrize("world", [1, 2, 3])
def test_an_epoch_trains_every_usable_row_once_and_workers_stay_in_lockstep(world):
    table = split()
    per_rank = run(table, world=world)
    assert Counter(keys_of(per_rank)) == Counter(usable_keys(table))
    assert len({len(seen) for seen in per_rank}) == 1  # the same number of steps on every worker
    # the batch carries the rows the keys name
    r = next(
        rounds(windows(table, 24), seed=42, epoch=0, batch_size=BATCH, length_buckets=BUCKETS, world=1, rank=0, start=0)
    )
    assert [ids[0] for ids in r.batch["input_ids"]] == [row + 120 * (f == "part-1.parquet") for f, row in r.keys]


def test_rows_with_errors_are_counted_once_per_epoch():
    table = split()
    skipped = sum(s for *_, s in run(table, world=1)[0])
    assert skipped == sum(1 for r in table.to_pylist() if r[ERROR] is not None) == 12


@pytest.mark.parametrize("before,after", [(2, 2), (1, 2), (2, 1), (2, 3), (3, 2)])
def test_a_resume_trains_the_rest_of_the_epoch_exactly_once_with_any_number_of_workers(before, after):
    table = split()
    first = run(table, world=before, stop_rounds=7)  # killed after 7 steps
    position = first[0][-1][1]
    assert all(seen[-1][1] == position for seen in first)  # every worker agrees on the position
    rest = run(table, world=after, start=position)
    assert Counter(keys_of(first) + keys_of(rest)) == Counter(usable_keys(table))


def test_a_resume_with_the_same_workers_sees_the_same_sequence_as_an_uninterrupted_run():
    table = split()
    whole = run(table, world=2)
    first = run(table, world=2, stop_rounds=5)
    rest = run(table, world=2, start=first[0][-1][1])
    for rank in range(2):
        assert [k for k, *_ in first[rank] + rest[rank]] == [k for k, *_ in whole[rank]]


def test_each_epoch_has_its_own_order_and_the_seed_fixes_it():
    table = split()
    epoch0, epoch1 = keys_of(run(table, world=1, epoch=0)), keys_of(run(table, world=1, epoch=1))
    assert set(epoch0) == set(epoch1) and epoch0 != epoch1
    assert epoch0 == keys_of(run(table, world=1, epoch=0))
    assert epoch0 != keys_of(run(table, world=1, epoch=0, seed=7))


def test_batches_hold_rows_of_similar_length():
    table = split(rows=400, bad_every=10_000)
    lengths = dict(
        zip(zip(table.column(SOURCE).to_pylist(), table.column(ROW).to_pylist()), table.column(LENGTH).to_pylist())
    )

    def mean_spread(buckets):
        batches = [keys for keys, *_ in run(table, world=1, size=48, buckets=buckets)[0]]
        return sum(max(lengths[k] for k in keys) - min(lengths[k] for k in keys) for keys in batches) / len(batches)

    assert mean_spread(12) < 0.4 * mean_spread(1)  # sorted in groups of 12 batches vs. unsorted
