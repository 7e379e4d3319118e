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


PANOPTIC = dict(
    model={"init": {"architecture": "mask2former", "size": "tiny"}},  # 64 px: its smallest size
    task_options={"subtask": "panoptic", "augment": False},  # cached: no flips to redraw
)
SHOWN = {"threshold": 0.5}  # segments scored above this are answered (predict, Serve and the pipeline alike)


@pytest.fixture(scope="module")
def panoptic(ray_session, session_bucket):
    """A tiny Mask2Former trained for panoptic segmentation from demo Parquet (images and masks as bytes)."""
    from jobs.catalog import write_demo_data
    from pipelines.train import train

    root = f"s3://{session_bucket}/panoptic"
    write_demo_data("image-segmentation", f"{root}/data", rows=240, seed=0)
    cfg = config(
        **PANOPTIC,
        data={"train": f"{root}/data/train", "eval": f"{root}/data/eval"},
        # 240 steps: at 160 one seed of three (train.seed 1) ended at PQ 0.29; at 240 it reached PQ 0.54
        train={"output": f"{root}/run", "max_steps": 240, "eval_every": 120, "batch_size": 8, "lr": 3e-3},
    )
    return {"root": root, "model": f"{root}/run/model", "summary": train(cfg), "cfg": cfg}


def untrained_scores(cfg) -> dict:
    """The same Mask2Former, freshly initialised, scored by the eval metric on the same eval split."""
    import torch

    from models.spec import Context

    fs = s3fs.S3FileSystem()
    rows = pq.ParquetDataset(cfg.data.eval.removeprefix("s3://"), filesystem=fs).read().to_pylist()
    processor = TASK.build_processor(cfg.model, None, iter(()))
    torch.manual_seed(0)
    model = TASK.build_model(cfg.model, None, DEMO_LABELS, processor).eval()
    metric = TASK.metrics(DEMO_LABELS, cfg.options())
    metric.bind(model, processor)
    ctx = Context(labels={name: i for i, name in enumerate(DEMO_LABELS)}, options=cfg.options(), data=cfg.data)
    for start in range(0, len(rows), 8):
        batch = {k: [r[k] for r in rows[start : start + 8]] for k in ("image", "mask", "instances")}
        features = TASK.preprocess(batch, processor, ctx)
        assert features.errors == [None] * len(batch["image"])
        inputs = TASK.collate(features.arrays, processor)
        with torch.no_grad():
            outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
        metric.update(outputs, inputs, features.arrays)
    return metric.compute()


def test_mask2former_learns_panoptic_segments_and_the_pipeline_reads_them_the_same(panoptic):
    from transformers import pipeline

    from pipelines.predictor import Predictor
    from pipelines.storage import Storage

    best = panoptic["summary"]["best"]
    before = untrained_scores(panoptic["cfg"])
    # untrained: no segment scores above the threshold (PQ 0) and a mean IoU near 0.02-0.1
    assert before["pq"] < 0.05 and before["mean_iou"] < 0.3, before
    # trained runs reached PQ 0.57, mean IoU 0.7 (a bar well below: training on 2 cores is not bit-for-bit repeatable)
    assert best["eval_pq"] >= max(0.35, before["pq"] + 0.3), (best, before)
    assert best["eval_mean_iou"] >= max(0.5, 2 * before["mean_iou"]), (best, before)
    local = Storage().local_copy(panoptic["model"])
    rows = TASK.demo_data(4, seed=40)
    ours, errors, _ = Predictor("image-segmentation", local, parameters=SHOWN).predict_rows(
        [{"image": r["image"]} for r in rows]
    )
    assert errors == [None] * 4 and any(ours)
    plain = pipeline("image-segmentation", model=local)
    for row, mine in zip(rows, ours):
        theirs = plain(Image.open(io.BytesIO(row["image"])), subtask="panoptic", **SHOWN)
        assert [(s["label"], round(s["score"], 4)) for s in theirs] == [
            (s["label"], round(s["score"], 4)) for s in mine
        ]
        for a, b in zip(theirs, mine):
            assert (
                np.asarray(a["mask"]) == np.asarray(Image.open(io.BytesIO(base64.b64decode(b["mask"]))))
            ).mean() > 0.99


@pytest.fixture(scope="module")
def panoptic_predicted(panoptic):
    """`rayformers predict` with the trained Mask2Former over demo images in Parquet, one of them not an image."""
    import pyarrow as pa

    from pipelines.predict import predict

    rows = [{"id": r["id"], "image": r["image"]} for r in TASK.demo_data(6, seed=41)]
    rows.append({"id": "broken", "image": b"not an image"})
    fs = s3fs.S3FileSystem()
    corpus, output = f"{panoptic['root']}/corpus", f"{panoptic['root']}/predictions"
    with fs.open(f"{corpus.removeprefix('s3://')}/part-0.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    cfg = config(
        **PANOPTIC,
        predict={"model": panoptic["model"], "input": corpus, "output": output, "actors": 1, "parameters": SHOWN},
    )
    summary = predict(cfg)
    table = pq.ParquetDataset(output.removeprefix("s3://"), filesystem=fs).read().to_pylist()
    return rows, summary, table


def test_mask2former_predicts_panoptic_segments_for_every_row(panoptic, panoptic_predicted):
    from pipelines.predictor import Predictor
    from pipelines.storage import Storage

    rows, summary, table = panoptic_predicted
    assert summary["rows"] == len(table) == 7 and summary["errors"] == 1, summary
    by_id = {r["id"]: r for r in table}
    assert sorted(by_id) == sorted(r["id"] for r in rows)  # one row per input, none doubled
    assert by_id["broken"]["segments"] is None and "not an image" in by_id["broken"]["error"]
    good = rows[:-1]
    # what the batch job wrote is what the model answers for each image in this process
    local = Storage().local_copy(panoptic["model"])
    ours, errors, _ = Predictor("image-segmentation", local, parameters=SHOWN).predict_rows(
        [{"image": r["image"]} for r in good]
    )
    assert errors == [None] * len(good)
    for row, mine in zip(good, ours):
        written = by_id[row["id"]]
        assert written["error"] is None
        assert [s["label"] for s in written["segments"]] == [s["label"] for s in mine]
        # float32 results move a little with a batch's make-up: scores agree closely, masks but for a few pixels
        assert [s["score"] for s in written["segments"]] == pytest.approx([s["score"] for s in mine], abs=1e-4)
        size = Image.open(io.BytesIO(row["image"])).size[::-1]
        for w, m in zip(written["segments"], mine):
            mask = rle_decode(w["mask"])
            assert mask.shape == size and w["score"] >= SHOWN["threshold"]  # at the image's own size
            assert (mask == (np.asarray(Image.open(io.BytesIO(base64.b64decode(m["mask"])))) > 0)).mean() > 0.99
    # the shapes are found: most images have a segment of a shape class (not only background)
    shapes = [any(s["label"] != "background" for s in by_id[r["id"]]["segments"]) for r in good]
    assert sum(shapes) >= 4, [by_id[r["id"]]["segments"] for r in good]


def test_the_endpoint_segments_as_mask2former_batch_prediction_does(panoptic, panoptic_predicted):
    rows, _, table = panoptic_predicted
    by_id = {r["id"]: r for r in table}
    cfg = config(**PANOPTIC, serve={"model": panoptic["model"]})
    with served(cfg, "panoptic") as url:
        answer = httpx.post(
            f"{url}/predict",
            json={"inputs": [base64.b64encode(r["image"]).decode() for r in rows[:3]], "parameters": SHOWN},
            timeout=60,
        )
    assert answer.status_code == 200, answer.text
    assert len(answer.json()) == 3
    for row, segments in zip(rows, answer.json()):
        written = by_id[row["id"]]["segments"]
        assert [s["label"] for s in segments] == [w["label"] for w in written]
        assert [s["score"] for s in segments] == pytest.approx([w["score"] for w in written], abs=1e-4)
        for s, w in zip(segments, written):
            png = np.asarray(Image.open(io.BytesIO(base64.b64decode(s["mask"]))))
            assert ((png > 0) == rle_decode(w["mask"])).mean() > 0.99
