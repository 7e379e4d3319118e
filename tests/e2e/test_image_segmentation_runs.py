"""image-segmentation end to end on one local Ray and the loopback S3 server: train a tiny SegFormer
from S3 folder pairs (images/ + masks/, JPEG and PNG files of mixed sizes and modes), segment a JSONL
corpus with bad files among the good ones, and get the same segments from the Serve endpoint."""

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

from models.image_maps import rle_decode
from models.image_segmentation import DEMO_LABELS, TASK
from tests.conftest import job_config, put, served

pytestmark = pytest.mark.e2e

SECTIONS = dict(
    task="image-segmentation",
    model={"init": {"architecture": "segformer", "size": "tiny", "overrides": {"image_size": 32}}},
    task_options={"augment": False},  # no flips to redraw: the split is preprocessed once (the image tests keep theirs)
    train={"epochs": 6, "batch_size": 16, "lr": 3e-3, "eval_every": 45, "log_every": 25, "num_workers": 1},
)


def config(**sections):
    data = {"labels": DEMO_LABELS, "max_image_pixels": 20_000, **sections.pop("data", {})}
    train = {**SECTIONS["train"], **sections.pop("train", {})}
    return job_config(**{**SECTIONS, **sections, "data": data, "train": train})


def as_file(png: bytes, i: int) -> tuple[str, bytes]:
    """Demo images saved the ways real ones come: JPEG, palette PNG, RGBA PNG, plain PNG."""
    image, out = Image.open(io.BytesIO(png)).convert("RGB"), io.BytesIO()
    kind = i % 4
    if kind == 0:
        image.save(out, "JPEG", quality=92)
        return "jpg", out.getvalue()
    if kind == 1:
        image = image.quantize(64)
    elif kind == 2:
        image = image.convert("RGBA")
    image.save(out, "PNG")
    return "png", out.getvalue()


@pytest.fixture(scope="module")
def trained(ray_session, session_bucket):
    from pipelines.train import train

    fs = s3fs.S3FileSystem()
    root = f"s3://{session_bucket}/segmentation"
    for split, n, seed in (("train", 240, 0), ("eval", 48, 1)):
        for i, row in enumerate(TASK.demo_data(n, seed)):
            suffix, data = as_file(row["image"], i)
            put(fs, f"{root}/{split}/images/{i}.{suffix}", data)
            mask = Image.open(io.BytesIO(row["mask"]))
            if i % 5 == 0:  # palette masks give their indices, not their colours
                mask = mask.convert("P")
                mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
            out = io.BytesIO()
            mask.save(out, "PNG")
            put(fs, f"{root}/{split}/masks/{i}.png", out.getvalue())
    put(fs, f"{root}/train/images/no-mask.png", TASK.demo_data(1, 9)[0]["image"])  # an image without its mask
    put(fs, f"{root}/train/images/wrong.png", TASK.demo_data(1, 9)[0]["image"])
    put(fs, f"{root}/train/masks/wrong.png", TASK.demo_data(1, 9)[0]["mask"][:40])  # a truncated mask file
    cfg = config(
        data={"train": f"{root}/train", "eval": f"{root}/eval", "format": "folder"}, train={"output": f"{root}/run"}
    )
    return {"root": root, "model": f"{root}/run/model", "summary": train(cfg)}


def test_training_from_folder_pairs_segments_the_shapes(trained):
    best = trained["summary"]["best"]
    # An untrained model, or one that calls everything background, scores a mean IoU of at most 0.25
    # (one class of four right); finding the shapes is what lifts it.
    assert best["eval_mean_iou"] >= 0.6, best
    assert best["eval_pixel_accuracy"] >= 0.9, best
    assert trained["summary"]["skipped_rows"] == 2, trained["summary"]  # no mask, truncated mask: once, not per epoch


@pytest.fixture(scope="module")
def corpus(trained, session_bucket):
    """A JSONL corpus beside its images (paths relative to it): demo images with known masks, and bad files."""
    fs = s3fs.S3FileSystem()
    root = f"s3://{session_bucket}/segmentation/corpus"
    files, rows, truth = {}, [], {}
    for i, row in enumerate(TASK.demo_data(8, seed=21)):
        suffix, data = as_file(row["image"], i)
        files[f"files/{i}.{suffix}"] = data
        rows.append({"id": f"shape-{i}", "image": f"files/{i}.{suffix}"})
        truth[f"shape-{i}"] = np.asarray(Image.open(io.BytesIO(row["mask"])))
    files["files/corrupt.jpg"] = files["files/0.jpg"][:300]
    files["files/huge.png"] = _png(Image.new("RGB", (200, 150)))  # 30000 > 20000 pixels
    files["files/text.png"] = b"just some text"
    for name, data in files.items():
        put(fs, f"{root}/{name}", data)
    rows += [
        {"id": "corrupt", "image": "files/corrupt.jpg"},
        {"id": "huge", "image": "files/huge.png"},
        {"id": "text", "image": "files/text.png"},
        {"id": "missing", "image": "files/nowhere.png"},
    ]
    with fs.open(f"{root.removeprefix('s3://')}/corpus.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"root": root, "rows": rows, "files": files, "truth": truth}


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


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


def test_predict_writes_rle_masks_at_each_image_size_and_keeps_every_row(corpus, predicted):
    summary, by_id, count = predicted
    assert count == summary["rows"] == len(corpus["rows"]) == 12
    ious = []
    for key, truth in corpus["truth"].items():
        segments = by_id[key]["segments"]
        assert by_id[key]["error"] is None and segments
        masks = {s["label"]: rle_decode(s["mask"]) for s in segments}
        assert all(m.shape == truth.shape for m in masks.values())  # back at the image's own size
        assert sum(m.sum() for m in masks.values()) == truth.size  # semantic: every pixel in exactly one segment
        for c in np.unique(truth):
            found = masks.get(DEMO_LABELS[c], np.zeros_like(truth, bool))
            ious.append((found & (truth == c)).sum() / (found | (truth == c)).sum())
    assert np.mean(ious) >= 0.6, ious
    assert by_id["corrupt"]["error"].startswith("image is corrupt") and by_id["corrupt"]["segments"] is None
    assert by_id["huge"]["error"] == "image has 30000 pixels (200x150), more than data.max_image_pixels=20000"
    assert by_id["text"]["error"] == "not an image (unrecognised file format)"
    assert "nowhere.png" in by_id["missing"]["error"]
    assert summary["errors"] == 4


def test_the_endpoint_answers_what_batch_prediction_wrote(trained, corpus, predicted):
    _, by_id, _ = predicted
    names = ["files/0.jpg", "files/1.png", "files/2.png"]
    encoded = [base64.b64encode(corpus["files"][n]).decode() for n in names]
    cfg = config(serve={"model": trained["model"]})
    with served(cfg, "segmentation") as url, httpx.Client(timeout=60) as client:
        answer = client.post(f"{url}/predict", json={"inputs": encoded})
        upload = client.post(f"{url}/predict", files={"file": ("x.png", corpus["files"]["files/1.png"], "image/png")})
        corrupt = client.post(f"{url}/predict", json={"inputs": base64.b64encode(b"not an image").decode()})
    assert answer.status_code == 200, answer.text
    for i, segments in enumerate(answer.json()):
        written = by_id[f"shape-{i}"]["segments"]
        assert [s["label"] for s in segments] == [w["label"] for w in written]
        for s, w in zip(segments, written):
            png = np.asarray(Image.open(io.BytesIO(base64.b64decode(s["mask"]))))
            assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
            assert ((png > 0) == rle_decode(w["mask"])).all()
    assert upload.status_code == 200, upload.text
    assert [s["label"] for s in upload.json()] == [
        w["label"] for w in by_id["shape-1"]["segments"]
    ]  # one file: its segments
    assert corrupt.status_code == 422 and "not an image" in corrupt.json()["error"]


@pytest.fixture(scope="module")
def panoptic(ray_session, session_bucket):
    """A tiny Mask2Former trained for panoptic segmentation from demo Parquet (images and masks as bytes)."""
    from jobs.catalog import write_demo_data
    from pipelines.train import train

    root = f"s3://{session_bucket}/panoptic"
    write_demo_data("image-segmentation", f"{root}/data", rows=240, seed=0)
    cfg = config(
        model={"init": {"architecture": "mask2former", "size": "tiny"}},  # 64 px: its smallest size
        data={"train": f"{root}/data/train", "eval": f"{root}/data/eval"},
        task_options={"subtask": "panoptic", "augment": False},  # cached: no flips to redraw
        train={"output": f"{root}/run", "max_steps": 160, "eval_every": 120, "batch_size": 8, "lr": 3e-3},
    )
    return {"model": f"{root}/run/model", "summary": train(cfg)}


def test_mask2former_learns_panoptic_segments_and_the_pipeline_reads_them_the_same(panoptic):
    from transformers import pipeline

    from pipelines.predictor import Predictor
    from pipelines.storage import Storage

    best = panoptic["summary"]["best"]
    # untrained: no segment scores above the threshold (PQ 0) and a mean IoU near 0.02
    assert best["eval_pq"] >= 0.2 and best["eval_mean_iou"] >= 0.5, best
    local = Storage().local_copy(panoptic["model"])
    rows = TASK.demo_data(4, seed=40)
    parameters = {"threshold": 0.5}
    ours, errors, _ = Predictor("image-segmentation", local, parameters=parameters).predict_rows(
        [{"image": r["image"]} for r in rows]
    )
    assert errors == [None] * 4 and any(ours)
    plain = pipeline("image-segmentation", model=local)
    for row, mine in zip(rows, ours):
        theirs = plain(Image.open(io.BytesIO(row["image"])), subtask="panoptic", threshold=0.5)
        assert [(s["label"], round(s["score"], 4)) for s in theirs] == [
            (s["label"], round(s["score"], 4)) for s in mine
        ]
        for a, b in zip(theirs, mine):
            assert (
                np.asarray(a["mask"]) == np.asarray(Image.open(io.BytesIO(base64.b64decode(b["mask"]))))
            ).mean() > 0.99
