"""depth-estimation end to end on one local Ray and the loopback S3 server: train a tiny GLPN from S3
folder pairs (images/ + depth/ as 16-bit millimetre PNGs and float-metre .npy files, invalid pixels 0),
estimate depth over a JSONL corpus with bad files, and get the same depth maps from the Serve endpoint."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image

from models.depth_estimation import TASK
from tests.conftest import job_config, put, served

pytestmark = pytest.mark.e2e

SECTIONS = dict(
    task="depth-estimation",
    model={"init": {"architecture": "glpn", "size": "tiny", "overrides": {"image_size": 32}}},
    task_options={"augment": False},  # no flips to redraw: the split is preprocessed once (the image tests keep theirs)
    train={"epochs": 8, "batch_size": 16, "lr": 2e-3, "eval_every": 40, "log_every": 20, "num_workers": 1},
)


def config(**sections):
    train = {**SECTIONS["train"], **sections.pop("train", {})}
    return job_config(**{**SECTIONS, **sections, "train": train})


def metres(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["depth"]))).astype(np.float32) / 1000


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def jpeg(png: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).save(out, "JPEG", quality=92)
    return out.getvalue()


@pytest.fixture(scope="module")
def trained(ray_session, session_bucket):
    from pipelines.train import train

    fs = s3fs.S3FileSystem()
    root = f"s3://{session_bucket}/depth"
    eval_rows = TASK.demo_data(40, 1)
    for split, rows in (("train", TASK.demo_data(200, 0)), ("eval", eval_rows)):
        for i, row in enumerate(rows):
            put(
                fs,
                f"{root}/{split}/images/{i}.jpg" if i % 2 else f"{root}/{split}/images/{i}.png",
                jpeg(row["image"]) if i % 2 else row["image"],
            )
            if i % 3 == 0:  # float metres in .npy, 0 still meaning "unknown"
                put(fs, f"{root}/{split}/depth/{i}.npy", npy(metres(row)))
            else:
                put(fs, f"{root}/{split}/depth/{i}.png", row["depth"])
    put(fs, f"{root}/train/images/lonely.png", eval_rows[0]["image"])  # no depth map: an error row
    cfg = config(
        data={"train": f"{root}/train", "eval": f"{root}/eval", "format": "folder"}, train={"output": f"{root}/run"}
    )
    return {"root": root, "model": f"{root}/run/model", "summary": train(cfg), "eval": eval_rows}


def test_training_from_folder_pairs_beats_the_best_constant_depth(trained):
    best = trained["summary"]["best"]
    # The best single depth for all pixels (what a model that ignores the image can at most learn):
    truth = np.concatenate([metres(r)[metres(r) > 0] for r in trained["eval"]])
    constant = min(np.mean(np.abs(c - truth) / truth) for c in np.linspace(0.5, 8, 151))
    assert constant > 0.25
    assert best["eval_abs_rel"] <= 0.5 * constant, (best, constant)
    assert best["eval_delta1"] >= 0.8 and best["eval_rmse"] < 1.0, best
    assert trained["summary"]["skipped_rows"] == 1, trained["summary"]  # the image without a depth map, counted once


@pytest.fixture(scope="module")
def corpus(trained, session_bucket):
    fs = s3fs.S3FileSystem()
    root = f"s3://{session_bucket}/depth/corpus"
    files, rows = {}, []
    for i, row in enumerate(TASK.demo_data(6, seed=31)):
        files[f"files/{i}.jpg"] = jpeg(row["image"])
        rows.append({"id": f"ramp-{i}", "image": f"files/{i}.jpg"})
    files["files/corrupt.jpg"] = files["files/0.jpg"][:300]
    files["files/text.png"] = b"not a picture"
    for name, data in files.items():
        put(fs, f"{root}/{name}", data)
    rows += [
        {"id": "corrupt", "image": "files/corrupt.jpg"},
        {"id": "text", "image": "files/text.png"},
        {"id": "missing", "image": "files/nowhere.jpg"},
    ]
    with fs.open(f"{root.removeprefix('s3://')}/corpus.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return {
        "root": root,
        "rows": rows,
        "files": files,
        "truth": {f"ramp-{i}": metres(r) for i, r in enumerate(TASK.demo_data(6, seed=31))},
    }


@pytest.fixture(scope="module")
def predicted(trained, corpus):
    from pipelines.predict import predict

    output = f"{corpus['root']}-predictions"
    cfg = config(
        data={"format": "jsonl"},
        predict={"model": trained["model"], "input": f"{corpus['root']}/corpus.jsonl", "output": output, "actors": 1},
    )
    summary = predict(cfg)
    table = pq.ParquetDataset(output.removeprefix("s3://"), filesystem=s3fs.S3FileSystem()).read().to_pylist()
    return summary, {r["id"]: r for r in table}, len(table)


def test_predict_writes_depth_arrays_at_each_image_size_and_keeps_every_row(corpus, predicted):
    summary, by_id, count = predicted
    assert count == summary["rows"] == len(corpus["rows"]) == 9
    for key, truth in corpus["truth"].items():
        depth = np.asarray(by_id[key]["predicted_depth"], dtype=np.float32)
        assert by_id[key]["error"] is None and depth.shape == truth.shape  # resized back to the input's size
        valid = truth > 0
        assert np.mean(np.abs(depth[valid] - truth[valid]) / truth[valid]) < 0.25
    assert by_id["corrupt"]["error"].startswith("image is corrupt") and by_id["corrupt"]["predicted_depth"] is None
    assert by_id["text"]["error"] == "not an image (unrecognised file format)"
    assert "nowhere.jpg" in by_id["missing"]["error"]
    assert summary["errors"] == 3


def test_the_endpoint_answers_what_batch_prediction_wrote(trained, corpus, predicted):
    _, by_id, _ = predicted
    encoded = [base64.b64encode(corpus["files"][f"files/{i}.jpg"]).decode() for i in range(3)]
    cfg = config(serve={"model": trained["model"]})
    with served(cfg, "depth") as url, httpx.Client(timeout=60) as client:
        answer = client.post(f"{url}/predict", json={"inputs": encoded})
        upload = client.post(f"{url}/predict", files={"file": ("x.jpg", corpus["files"]["files/1.jpg"], "image/jpeg")})
        corrupt = client.post(f"{url}/predict", json={"inputs": base64.b64encode(b"not an image").decode()})
    assert answer.status_code == 200, answer.text
    for i, result in enumerate(answer.json()):
        millimetres = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["predicted_depth"]))))
        assert millimetres.dtype == np.uint16 and result["unit"] == "mm"
        written = np.asarray(by_id[f"ramp-{i}"]["predicted_depth"], dtype=np.float32)
        # the same millimetres; a batch of another make-up may round one pixel the other way (float sums differ)
        assert np.abs(millimetres.astype(np.int64) - np.round(written * 1000).astype(np.int64)).max() <= 1
        view = Image.open(io.BytesIO(base64.b64decode(result["depth"])))
        assert view.mode == "L" and view.size == (written.shape[1], written.shape[0])
    assert upload.status_code == 200, upload.text
    alone = np.asarray(Image.open(io.BytesIO(base64.b64decode(upload.json()["predicted_depth"]))), dtype=np.int64)
    batched = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()[1]["predicted_depth"]))), dtype=np.int64)
    assert np.abs(alone - batched).max() <= 1  # one file: one answer; alone or in a batch, the same to the millimetre
    assert corrupt.status_code == 422 and "not an image" in corrupt.json()["error"]
