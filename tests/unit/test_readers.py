"""Readers keep every row: a line that does not parse, or a value of the wrong type, becomes an
error row instead of failing the file."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from errors import UserError
from pipelines.readers import READ_ERROR, format_of, parse_lines, parse_parquet
from pipelines.storage import Storage


def rows_of(blocks):
    return pa.concat_tables(list(blocks), promote_options="default").to_pylist()


def test_jsonl_bad_lines_become_error_rows_in_place():
    data = b'{"text": "a", "label": "x"}\nnot json\n\n[1, 2]\n{"text": "b", "label": "y"}\n'
    rows = rows_of(parse_lines(data, "jsonl"))
    assert len(rows) == 4
    assert rows[0]["text"] == "a" and rows[0][READ_ERROR] is None
    assert rows[1][READ_ERROR].startswith("line 2: not a JSON object")
    assert rows[2][READ_ERROR].startswith("line 4: not a JSON object")
    assert rows[3]["text"] == "b"


def test_a_number_in_a_text_column_is_nulled_and_named():
    data = b'{"text": "fine"}\n{"text": 42}\n{"text": null}\n'
    rows = rows_of(parse_lines(data, "jsonl"))
    assert [r["text"] for r in rows] == ["fine", None, None]
    assert rows[1][READ_ERROR] == "column 'text' holds a int, expected str"
    assert rows[2][READ_ERROR] is None  # a null is the task's to judge


def test_csv_rows_with_the_wrong_field_count_are_kept_as_errors():
    data = b'text,label\nhello,a\n"comma, inside",b\nonly-one\nthree,fields,here\n'
    rows = rows_of(parse_lines(data, "csv"))
    assert [r["text"] for r in rows] == ["hello", "comma, inside", None, None]
    assert rows[2][READ_ERROR] == "line 4: 1 fields, the header has 2"


def test_parquet_is_read_in_blocks_with_an_empty_error_column():
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["a", "b", None]}), buf)
    rows = rows_of(parse_parquet(buf.getvalue()))
    assert [r["text"] for r in rows] == ["a", "b", None] and all(r[READ_ERROR] is None for r in rows)


def test_formats_come_from_suffixes_or_config():
    assert format_of("x/part-0.PARQUET", "auto") == "parquet"
    assert format_of("x/data.ndjson", "auto") == "jsonl"
    assert format_of("x/data.txt", "csv") == "csv"
    assert format_of("x/notes.txt", "auto") == "text"
    with pytest.raises(UserError, match="data.tsv: unknown data format"):
        format_of("x/data.tsv", "auto")


def test_jsonl_columns_missing_from_the_first_line_are_kept():
    data = b'{"id": 1, "text": "a"}\n{"id": 2, "tokens": ["b", "c"]}\n'
    rows = rows_of(parse_lines(data, "jsonl"))
    assert rows[1]["tokens"] == ["b", "c"] and rows[0]["tokens"] is None and rows[1]["text"] is None


@pytest.mark.parametrize(
    "task_name,layout",
    [
        ("image-classification", ["cat/1.png", "cat/2.png", "dog/3.jpg"]),  # one sub-folder per class
        ("audio-classification", ["yes/a.wav", "no/b.wav"]),
        ("automatic-speech-recognition", ["clips/a.wav", "metadata.csv"]),  # transcripts beside the clips
        ("image-segmentation", ["images/a.png", "masks/a.png"]),  # image/mask pairs
        ("depth-estimation", ["images/a.png", "depth/a.png"]),
    ],
)
def test_auto_format_reads_a_folder_of_media_files_as_the_folder_layout(tmp_path, task_name, layout):
    from models import get_task
    from pipelines.readers import detect_format

    for name in layout:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert detect_format(Storage(), str(tmp_path), "auto", get_task(task_name)) == "folder"
    assert detect_format(Storage(), str(tmp_path), "parquet", get_task(task_name)) == "parquet"  # named: kept


def test_auto_format_keeps_data_files_as_data_files(tmp_path):
    from models import get_task
    from pipelines.readers import detect_format

    task = get_task("image-classification")
    (tmp_path / "part-0.parquet").write_bytes(b"x")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")  # media that the Parquet rows point at
    assert detect_format(Storage(), str(tmp_path), "auto", task) == "auto"
    assert detect_format(Storage(), str(tmp_path / "part-0.parquet"), "auto", task) == "auto"
    assert detect_format(Storage(), str(tmp_path), "auto", get_task("text-classification")) == "auto"  # no media


class FirstBlock:
    """Stands in for a Ray dataset where only its first block's schema is asked for."""

    def __init__(self, names):
        self.names, self.asked = names, 0

    def schema(self):
        self.asked += 1
        return pa.schema([(n, pa.string()) for n in self.names])


def test_a_parquet_splits_columns_come_from_its_footer_without_running_ray_data(tmp_path):
    from pipelines.readers import ROW, SOURCE, column_names, data_files

    pq.write_table(pa.table({"id": ["a"], "text": ["goal"], "label": ["sports"]}), tmp_path / "part-0.parquet")
    (tmp_path / "notes.jsonl").write_text('{"text": "goal"}\n')
    storage = Storage()
    ds = FirstBlock(["from", "ray"])
    parquet = data_files(storage, str(tmp_path / "part-0.parquet"), "auto", None)
    assert column_names(ds, parquet, "auto", None) == ["id", "text", "label", READ_ERROR, SOURCE, ROW]
    assert ds.asked == 0
    # other formats' columns are what the reader makes of the rows: Ray Data's first block says
    jsonl = data_files(storage, str(tmp_path / "notes.jsonl"), "auto", None)
    assert column_names(ds, jsonl, "auto", None) == ["from", "ray"] and ds.asked == 1
    # a file named .parquet that is not one: its error row, from the first block, says why
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    assert column_names(ds, data_files(storage, str(tmp_path / "bad.parquet"), "auto", None), "auto", None) == [
        "from",
        "ray",
    ]
