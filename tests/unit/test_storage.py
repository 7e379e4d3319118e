"""Local URIs: files, folders and globs resolve to data files; a missing path is one line."""

from __future__ import annotations

import pytest

from errors import UserError
from pipelines.storage import Storage

SUFFIXES = (".jsonl", ".csv", ".parquet")


def test_a_folder_a_file_and_a_glob(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.jsonl", "a.jsonl", "_SUCCESS", ".hidden.jsonl", "notes.txt"):
        (tmp_path / "d" / name).write_text("{}\n")
    storage = Storage()
    assert [f.path.rsplit("/", 1)[-1] for f in storage.list_files(str(tmp_path / "d"), SUFFIXES)] == [
        "a.jsonl",
        "b.jsonl",
    ]
    assert len(storage.list_files(str(tmp_path / "d" / "a.jsonl"), SUFFIXES)) == 1
    assert len(storage.list_files(f"file://{tmp_path}/d/*.jsonl", SUFFIXES)) == 2


def test_a_missing_path_names_the_uri(tmp_path):
    with pytest.raises(UserError, match=f"^{tmp_path}/nope: no such file or folder$"):
        Storage().list_files(str(tmp_path / "nope"), SUFFIXES)


def test_a_folder_without_data_files(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="no data files"):
        Storage().list_files(str(tmp_path), SUFFIXES)


def test_an_unsupported_scheme():
    with pytest.raises(UserError, match="unsupported storage scheme 'nosuch'"):
        Storage().resolve("nosuch://bucket/x")


def test_commit_dir_and_text_round_trip(tmp_path):
    from pipelines.storage import commit_dir

    storage = Storage()
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "f.txt").write_text("x")
    commit_dir(storage, str(tmp_path / "src"), str(tmp_path / "dst"))
    assert (tmp_path / "dst" / "sub" / "f.txt").read_text() == "x"
    storage.write_text(str(tmp_path / "out" / "m.json"), "{}")
    assert storage.read_text(str(tmp_path / "out" / "m.json")) == "{}"


def test_media_files_are_read_whole_and_refused_past_the_limit(tmp_path, monkeypatch):
    from pipelines import media

    (tmp_path / "small.bin").write_bytes(b"x" * 10)
    (tmp_path / "big.bin").write_bytes(b"x" * 11)
    monkeypatch.setattr(media, "MAX_MEDIA_BYTES", 10)
    assert media.fetch_file(Storage(), None, str(tmp_path / "small.bin"), is_uri=True) == b"x" * 10
    with pytest.raises(UserError, match="big.bin: more than the 10 bytes a media file may have"):
        media.fetch_file(Storage(), None, str(tmp_path / "big.bin"), is_uri=True)
    with pytest.raises(UserError, match="nope.bin"):
        media.fetch_file(Storage(), None, str(tmp_path / "nope.bin"), is_uri=True)


def test_a_request_may_name_a_file_only_where_serve_allow_uris_is_on(tmp_path):
    from pipelines.media import decode_request_value

    (tmp_path / "a.png").write_bytes(b"png bytes")
    with pytest.raises(UserError, match=r"URIs are not accepted here \(serve.allow_uris is off\)"):
        decode_request_value(f"file://{tmp_path}/a.png", None, "image")
    assert decode_request_value(f"file://{tmp_path}/a.png", Storage(), "image") == b"png bytes"
    assert decode_request_value("data:image/png;base64,cG5n", None, "image") == b"png"


def test_a_training_runs_model_folder_is_used_only_once_its_marker_is_written(tmp_path):
    from pipelines.storage import COMPLETE, Storage

    run = tmp_path / "run"
    (run / "prepared").mkdir(parents=True)
    (run / "prepared" / COMPLETE).write_text("{}")
    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")  # a run killed while it wrote model/
    with pytest.raises(UserError) as refused:
        Storage().model_path(str(run / "model"))
    assert str(refused.value) == (
        f"{run}/model: the training run in {run} did not finish writing its model (no "
        f"{COMPLETE}); run the same `rayformers train` again to finish it"
    )
    (run / "model" / COMPLETE).write_text("{}")
    assert Storage().model_path(str(run / "model")) == str(run / "model")
    # a model folder from anywhere else (saved by transformers, downloaded) needs no marker
    (tmp_path / "elsewhere" / "model").mkdir(parents=True)
    assert Storage().model_path(str(tmp_path / "elsewhere" / "model")) == str(tmp_path / "elsewhere" / "model")
