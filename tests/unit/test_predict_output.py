"""What `rayformers predict` may write and delete, without Ray: overlapping folders are refused, an
earlier output survives unless replaced on purpose, a partial run resumes only for the same job, and
every bad input file becomes error rows instead of an exception."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from errors import UserError
from models import get_task
from pipelines.media import fetch_file, resolve_paths
from pipelines.predict_output import (
    MARKER,
    Commits,
    check_no_overlap,
    finish,
    load_commits,
    open_output,
    part_name,
    write_part,
)
from pipelines.readers import READ_ERROR, file_blocks, parse_lines, parse_parquet
from pipelines.storage import Storage

FINGERPRINT = {"model": "m:1", "input": "i:1", "settings": "s:1"}


# --- overlapping folders ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "output, other, words",
    [
        ("/runs/a", "/runs/a", "/runs/a is predict.input"),
        ("/runs/a/predictions", "/runs/a", "is inside predict.input"),
        ("/runs", "/runs/a/data", "is a parent of predict.input"),
        ("s3://bucket/run", "s3://bucket/run/data/*.jsonl", "is a parent of predict.input"),
    ],
)
def test_an_output_that_overlaps_the_input_is_refused_naming_both_keys(output, other, words):
    with pytest.raises(UserError, match="predict.output: .*" + words.replace("/", ".")) as caught:
        check_no_overlap(Storage(), output, {"predict.input": other})
    assert "\n" not in str(caught.value) and "predict.input" in str(caught.value)


def test_an_output_beside_the_input_and_model_is_fine():
    check_no_overlap(
        Storage(),
        "s3://bucket/run/predictions",
        {"predict.input": "s3://bucket/run/data", "predict.model": "s3://bucket/run/model", "train.output": None},
    )
    check_no_overlap(Storage(), "/runs/ab", {"predict.input": "/runs/a"})  # a shared prefix is not a parent
    check_no_overlap(Storage(), "s3://a/x", {"predict.input": "/a/x"})  # another filesystem


def test_the_model_and_train_output_are_protected_too():
    with pytest.raises(UserError, match=r"is a parent of train.output"):
        check_no_overlap(Storage(), "s3://b/run", {"train.output": "s3://b/run/train"})
    with pytest.raises(UserError, match=r"is a parent of predict.model"):
        check_no_overlap(Storage(), "s3://b", {"predict.model": "s3://b/model"})


# --- the output folder --------------------------------------------------------------------------


def a_part(rows: int) -> pa.Table:
    return pa.table(
        {
            "id": [f"r{i}" for i in range(rows)],
            "error": pa.nulls(rows, pa.string()),
            "flag": pa.nulls(rows, pa.string()),
        }
    )


def commit(out, unit: int, rows: int) -> None:
    name = write_part(out.work, unit, a_part(rows))
    commits = Commits(out)
    commits.add({"unit": unit, "part": name, "rows": rows, "errors": 0, "flagged": 0})
    commits.flush()


def test_a_folder_predict_did_not_write_is_never_used(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files that rayformers predict did not write"):
        open_output(Storage(), str(tmp_path), FINGERPRINT, 3, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_partial_run_resumes_with_its_committed_units(tmp_path):
    out = open_output(Storage(), str(tmp_path), FINGERPRINT, 3, overwrite=False)
    commit(out, 0, 4)
    (tmp_path / part_name(1)).write_bytes(b"half a part, never committed")
    again = open_output(Storage(), str(tmp_path), FINGERPRINT, 3, overwrite=False)
    assert set(again.done) == {0} and again.work.path == str(tmp_path)
    assert not list(tmp_path.glob("_tmp/*"))  # parts were written under a temporary name, then renamed


@pytest.mark.parametrize("changed, words", [("model", "the model changed"), ("input", "the input files changed")])
def test_resuming_with_another_model_or_input_is_refused(tmp_path, changed, words):
    out = open_output(Storage(), str(tmp_path), FINGERPRINT, 3, overwrite=False)
    commit(out, 0, 4)
    with pytest.raises(UserError, match=f"partial run .*{words}.*predict.overwrite=true"):
        open_output(Storage(), str(tmp_path), {**FINGERPRINT, changed: "other"}, 3, overwrite=False)
    assert (tmp_path / part_name(0)).exists()
    fresh = open_output(Storage(), str(tmp_path), {**FINGERPRINT, changed: "other"}, 3, overwrite=True)
    assert fresh.done == {} and not (tmp_path / part_name(0)).exists()  # our own partial run, started over


def test_a_complete_output_is_kept_until_its_replacement_is_complete(tmp_path):
    out = open_output(Storage(), str(tmp_path), FINGERPRINT, 2, overwrite=False)
    commit(out, 0, 4)
    commit(out, 1, 2)
    finish(out, {"rows": 6})
    with pytest.raises(UserError, match="already holds a complete prediction.*predict.overwrite=true"):
        open_output(Storage(), str(tmp_path), FINGERPRINT, 2, overwrite=False)

    new = open_output(Storage(), str(tmp_path), {**FINGERPRINT, "input": "i:2"}, 1, overwrite=True)
    commit(new, 0, 7)
    # the new run has not finished: the old output is whole, with its marker
    assert pq.ParquetDataset(str(tmp_path)).read().num_rows == 6 and (tmp_path / MARKER).exists()
    finish(new, {"rows": 7})
    assert pq.ParquetDataset(str(tmp_path)).read().num_rows == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_SUCCESS", "_manifest", part_name(0)]
    assert json.loads((tmp_path / MARKER).read_text()) == {"rows": 7}
    assert [r["rows"] for r in load_commits(new.root).values()] == [7]


# --- bad input is a row ---------------------------------------------------------------------------


def rows_of(blocks) -> list[dict]:
    return pa.concat_tables(list(blocks), promote_options="permissive").to_pylist()


def test_a_jsonl_file_of_only_broken_lines_gives_one_error_row_per_line():
    rows = rows_of(parse_lines(b"{broken\nnot json\n[1]\n", "jsonl"))
    assert len(rows) == 3 and all(r[READ_ERROR].startswith(f"line {i}: ") for i, r in enumerate(rows, 1))


def test_a_csv_of_only_malformed_rows_gives_one_error_row_per_row():
    rows = rows_of(parse_lines(b"text,label\na\nb,c,d\ne\n", "csv"))
    assert [r[READ_ERROR] for r in rows] == [
        "line 2: 1 fields, the header has 2",
        "line 3: 3 fields, the header has 2",
        "line 4: 1 fields, the header has 2",
    ]


def test_a_stray_csv_quote_costs_one_row_not_the_rest_of_the_file():
    rows = rows_of(parse_lines(b'id,text\n1,"hello\n2,world\n3,foo\n4,bar\n', "csv"))
    assert len(rows) == 4  # 5 lines: a header and four rows
    assert rows[0][READ_ERROR] == "line 2: a quote that is never closed"
    assert [r["id"] for r in rows[1:]] == ["2", "3", "4"]


def test_a_quoted_field_over_several_lines_is_still_one_row():
    rows = rows_of(parse_lines(b'id,text\n1,"two\nlines"\n2,"a ""quoted"" word"\n', "csv"))
    assert [r["text"] for r in rows] == ["two\nlines", 'a "quoted" word'] and rows[0][READ_ERROR] is None


def test_a_csv_field_over_128_kb_is_read():
    rows = rows_of(parse_lines(b"id,text\n1," + b"w" * 200_000 + b"\n", "csv"))
    assert len(rows[0]["text"]) == 200_000 and rows[0][READ_ERROR] is None


def test_a_nested_type_conflict_is_an_error_row_not_an_arrow_error():
    rows = rows_of(parse_lines(b'{"tags": [1, 2]}\n{"tags": ["a"]}\n', "jsonl"))
    assert rows[0]["tags"] == [1, 2] and rows[1]["tags"] is None
    assert rows[1][READ_ERROR] == "column 'tags' holds a list[str], expected list[int]"


def test_a_truncated_parquet_file_keeps_what_was_read_and_names_the_rest():
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["x"] * 5000}), buf, row_group_size=1000)
    rows = rows_of(parse_parquet(buf.getvalue()[: len(buf.getvalue()) // 2]))
    assert len(rows) == 1 and rows[0][READ_ERROR].startswith("not a readable Parquet file")


@pytest.mark.parametrize("task, name", [("question-answering", "squad.json"), ("object-detection", "coco.json")])
def test_an_unparsable_task_file_is_one_error_row_naming_it(task, name):
    rows = rows_of(
        file_blocks(io.BytesIO(b'{"data": [{"paragraphs": 7}], "images": 3'), f"/data/{name}", "auto", get_task(task))
    )
    assert len(rows) == 1 and rows[0]["_source"] == f"/data/{name}"
    assert rows[0][READ_ERROR].startswith(f"not a valid {'squad' if 'squad' in name else 'coco'} file")


def test_a_folder_where_a_media_file_belongs_is_an_error_row(tmp_path):
    (tmp_path / "img.png").mkdir()
    values, errors = resolve_paths(
        ["img.png"], [str(tmp_path / "data.jsonl")], Storage(), Storage().resolve("/").fs, "image"
    )
    assert values == [None] and errors == [f"image: {tmp_path}/img.png: a folder, not a file"]


class FlakyStore:
    """A filesystem whose first reads fail the way a throttled object store does."""

    def __init__(self, failures: int):
        self.failures = failures

    def cat_file(self, path, start=None, end=None):
        if self.failures:
            self.failures -= 1
            raise TimeoutError("read timed out")
        return b"image bytes"


def test_a_transient_storage_error_is_retried_then_becomes_an_error_row(monkeypatch):
    monkeypatch.setattr("pipelines.media.FETCH_BACKOFF_S", 0)
    assert fetch_file(Storage(), FlakyStore(failures=2), "/x.png", is_uri=False) == b"image bytes"
    with pytest.raises(UserError, match=r"/x.png: could not be read after 3 tries \(TimeoutError: read timed out\)"):
        fetch_file(Storage(), FlakyStore(failures=3), "/x.png", is_uri=False)


# --- units -----------------------------------------------------------------------------------------


def test_a_big_parquet_file_is_split_into_row_group_units_that_cover_every_row_once(tmp_path, monkeypatch):
    from pipelines import predict as module
    from tests.conftest import job_config

    pq.write_table(
        pa.table({"id": [f"r{i}" for i in range(1000)], "text": ["goal"] * 1000}),
        tmp_path / "big.parquet",
        row_group_size=100,
    )
    (tmp_path / "small.jsonl").write_text('{"id": "s0", "text": "soup"}\n')
    monkeypatch.setattr(module, "UNIT_BYTES", 2500)  # a few row groups per unit
    cfg = job_config(predict={"input": str(tmp_path), "output": str(tmp_path) + "-out"})
    units, _ = module.plan_units(Storage(), cfg, get_task("text-classification"))
    big = [u for u in units if u["path"].endswith("big.parquet")]
    assert len(big) > 2 and [u["unit"] for u in units] == list(range(len(units)))
    seen = []
    for u in big:
        with open(u["path"], "rb") as f:
            for block in file_blocks(
                f, u["path"], "auto", None, range(u["first_group"], u["end_group"]), u["first_row"]
            ):
                seen += list(zip(block.column("id").to_pylist(), block.column("_row").to_pylist()))
    assert seen == [(f"r{i}", i) for i in range(1000)]  # each row once, with its position in the whole file
    assert [u for u in units if u["path"].endswith("small.jsonl")][0]["first_group"] == -1  # small files stay whole


def test_a_glob_input_is_one_unit_per_file_it_names_and_its_stamp_follows_the_files(tmp_path):
    from pipelines import predict as module
    from tests.conftest import job_config

    for split in ("train", "eval", "other"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "part-0.jsonl").write_text(f'{{"id": "{split}", "text": "soup"}}\n')
    cfg = job_config(predict={"input": str(tmp_path / "*a*" / "part-0.jsonl"), "output": str(tmp_path) + "-out"})
    units, stamp = module.plan_units(Storage(), cfg, get_task("text-classification"))
    assert sorted(u["path"].rsplit("/", 2)[1] for u in units) == ["eval", "train"]  # not other/
    (tmp_path / "eval" / "part-0.jsonl").write_text('{"id": "eval", "text": "a longer soup"}\n')
    assert module.plan_units(Storage(), cfg, get_task("text-classification"))[1] != stamp
