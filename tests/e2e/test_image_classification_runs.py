"""image-classification end to end on one local Ray and the loopback S3 server: train a tiny ViT from an
image folder on S3 (PNG, JPEG, CMYK, palette, RGBA, grayscale, 16-bit files of mixed sizes), classify a
JSONL corpus whose paths point at files (some missing, corrupt or oversized), load the saved model in
`transformers.pipeline`, and get the same answers from the Serve endpoint (base64 and multipart). A LoRA
adapter over the trained model, trained by two DDP workers, learns a tenant's labels; predict from its folder,
transformers' PEFT integration and the endpoint (the adapter as a named model, unmerged) answer alike."""

from __future__ import annotations

import base64
import io
import json
import os
import random

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image

from models.image_classification import TASK, shape_image
from tests.conftest import job_config, put, served

pytestmark = pytest.mark.e2e

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230), "yellow": (235, 220, 30)}
SECTIONS = dict(
    task="image-classification",
    model={"init": {"architecture": "vit", "size": "tiny", "overrides": {"image_size": 32}}},
    data={"format": "folder", "max_image_pixels": 250_000},
    train={"epochs": 4, "batch_size": 32, "lr": 2e-3, "eval_every": 20, "log_every": 10, "num_workers": 1},
)


def config(**sections):
    merged = {k: dict(v) for k, v in SECTIONS.items() if isinstance(v, dict)}
    for key, value in sections.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return job_config(task=SECTIONS["task"], **merged)


def file_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def real_files(rng: random.Random, colour: tuple[int, int, int]) -> dict[str, bytes]:
    """The same kind of picture saved the ways real collections hold images (suffix -> file)."""
    image = shape_image(rng, colour, size=(rng.randint(40, 120), rng.randint(40, 120)))
    rgba = image.convert("RGBA")
    rgba.putalpha(200)
    gray16 = (np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return {
        "photo.jpg": file_bytes(image, "JPEG", quality=90),
        "print.jpg": file_bytes(image.convert("CMYK"), "JPEG"),
        "alpha.png": file_bytes(rgba, "PNG"),
        "palette.png": file_bytes(image.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "gray.png": file_bytes(image.convert("L"), "PNG"),
        "deep.png": file_bytes(Image.fromarray(gray16), "PNG"),
    }


@pytest.fixture(scope="module")
def trained(ray_session, session_bucket):
    from pipelines.train import train

    fs = s3fs.S3FileSystem()
    root = f"s3://{session_bucket}/images"
    for split, n, seed in (("train", 320, 0), ("eval", 80, 1)):
        for i, row in enumerate(TASK.demo_data(n, seed)):
            put(fs, f"{root}/{split}/{row['label']}/{i}.png", row["image"])
    rng = random.Random(7)
    for label, colour in COLOURS.items():  # real-world files among the training images
        for name, data in real_files(rng, colour).items():
            put(fs, f"{root}/train/{label}/real-{name}", data)
    put(fs, f"{root}/train/red/broken.png", b"\x89PNG\r\n\x1a\n not really")
    cfg = config(data={"train": f"{root}/train", "eval": f"{root}/eval"}, train={"output": f"{root}/run"})
    return {"root": root, "model": f"{root}/run/model", "summary": train(cfg)}


def test_training_from_an_image_folder_beats_chance(trained):
    best = trained["summary"]["best"]
    # four balanced colour classes: chance (and an untrained model) is near 0.25
    assert best["eval_accuracy"] >= 0.85, best
    # with four classes the top five hold every answer by construction: here only that the run reports it
    # (tests/unit/test_image_classification.py checks the metric with seven classes)
    assert "eval_top5_accuracy" in best, best
    assert (
        trained["summary"]["skipped_rows"] == 1
    )  # the broken training file was left out (counted once), the job went on


def test_the_run_report_shows_the_last_evals_confusion_matrix_and_example_images_in_a_browser(trained, tmp_path):
    from tests.e2e.browser import class_rows, open_in_browser

    page = s3fs.S3FileSystem().cat(f"{trained['root']}/run/report.html".removeprefix("s3://")).decode()
    images, dom, _ = open_in_browser(page, tmp_path, colours=True)
    # drawn in the browser, not blank: a matrix of shaded cells, pictures of coloured shapes on noise
    assert images["confusion matrix"][2] > 20 and images["example images"][2] > 200, images
    assert images["example images"][0] >= 500, images
    final, classes = trained["summary"]["final"], class_rows(dom)
    assert f"Last eval (step {final['step']})" in dom
    assert set(classes) == set(COLOURS) and sum(rows for rows, *_ in classes.values()) == 80, classes
    hits = sum(rows * recall for rows, _, _, recall in classes.values())
    assert hits / 80 == pytest.approx(final["eval_accuracy"], abs=1e-3)


@pytest.fixture(scope="module")
def corpus(trained, session_bucket):
    """A JSONL corpus beside its images: paths relative to the JSONL file, good and bad ones."""
    fs = s3fs.S3FileSystem()
    root = f"s3://{session_bucket}/images/corpus"
    rng = random.Random(11)
    files, rows = {}, []
    for label in ("red", "blue", "green", "yellow"):
        for name, data in real_files(rng, COLOURS[label]).items():
            files[f"files/{label}-{name}"] = data
            rows.append({"id": f"{label}-{name}", "image": f"files/{label}-{name}", "truth": label})
    files["files/corrupt.jpg"] = file_bytes(shape_image(rng, COLOURS["red"]), "JPEG")[:200]
    files["files/huge.png"] = file_bytes(Image.new("RGB", (600, 600), COLOURS["red"]), "PNG")  # 360000 > 250000 pixels
    files["files/text.png"] = b"just some text"
    for name, data in files.items():
        put(fs, f"{root}/{name}", data)
    rows += [
        {"id": "corrupt", "image": "files/corrupt.jpg"},
        {"id": "huge", "image": "files/huge.png"},
        {"id": "text", "image": "files/text.png"},
        {"id": "missing", "image": "files/nowhere.png"},
        {"id": "null", "image": None},
    ]
    with fs.open(f"{root.removeprefix('s3://')}/corpus.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"root": root, "rows": rows, "files": files}


@pytest.fixture(scope="module")
def predicted(trained, corpus):
    from pipelines.predict import predict

    output = f"{corpus['root']}-predictions"
    cfg = config(
        data={"format": "jsonl"},
        predict={
            "model": trained["model"],
            "input": f"{corpus['root']}/corpus.jsonl",
            "output": output,
            "actors": 1,
            "parameters": {"top_k": 2},
        },
    )
    summary = predict(cfg)
    table = pq.ParquetDataset(output.removeprefix("s3://"), filesystem=s3fs.S3FileSystem()).read().to_pylist()
    return summary, {r["id"]: r for r in table}, len(table)


def test_predict_reads_real_files_and_keeps_every_row(corpus, predicted):
    summary, by_id, count = predicted
    assert count == summary["rows"] == len(corpus["rows"]) == 29
    coloured = [r for r in corpus["rows"] if "truth" in r and r["id"].split("-", 1)[1] not in ("gray.png", "deep.png")]
    right = sum(by_id[r["id"]]["label"] == r["truth"] for r in coloured)
    assert right >= 0.8 * len(coloured), [(r["id"], by_id[r["id"]]["label"]) for r in coloured]
    for r in corpus["rows"][:24]:  # grayscale and 16-bit files are predicted too, just not colour-coded
        row = by_id[r["id"]]
        assert row["error"] is None and len(row["top_k"]) == 2 and row["top_k"][0]["label"] == row["label"]
        assert 0 < row["score"] <= 1
    assert by_id["corrupt"]["error"].startswith("image is corrupt") and by_id["corrupt"]["label"] is None
    assert by_id["huge"]["error"] == "image has 360000 pixels (600x600), more than data.max_image_pixels=250000"
    assert by_id["text"]["error"] == "not an image (unrecognised file format)"
    assert "nowhere.png" in by_id["missing"]["error"]
    assert by_id["null"]["error"] and by_id["null"]["label"] is None
    assert summary["errors"] == 5


def test_the_saved_model_loads_in_a_transformers_pipeline_with_the_same_answers(trained, corpus, predicted):
    from transformers import pipeline

    from pipelines.storage import Storage

    _, by_id, _ = predicted
    classify = pipeline("image-classification", model=Storage().local_copy(trained["model"]), device="cpu")
    for name in ("red-photo.jpg", "blue-print.jpg", "green-alpha.png", "yellow-palette.png"):
        image = Image.open(io.BytesIO(corpus["files"][f"files/{name}"]))
        image = image.convert("RGBA") if image.mode in ("P", "RGBA") else image
        if image.mode == "RGBA":  # the pipeline drops alpha; we composite on white, so hand it the same picture
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image)
        answer = classify(image.convert("RGB"), top_k=2)
        assert [a["label"] for a in answer] == [b["label"] for b in by_id[name]["top_k"]]
        assert answer[0]["score"] == pytest.approx(by_id[name]["score"], abs=2e-3)


def test_the_endpoint_answers_what_batch_prediction_wrote(trained, corpus, predicted, lora):
    _, by_id, _ = predicted
    names = ["red-photo.jpg", "blue-print.jpg", "green-deep.png"]
    encoded = [base64.b64encode(corpus["files"][f"files/{n}"]).decode() for n in names]
    # the LoRA adapter below (`lora`) served beside its base as a named model (base + adapter, unmerged)
    models = {"tenant": lora["uri"]}
    cfg = config(serve={"model": trained["model"], "models": models, "allow_uris": [corpus["root"]]})
    with served(cfg, "images") as url, httpx.Client(timeout=60) as client:
        tenant = [base64.b64encode(r["image"]).decode() for r in lora["held_out"][:3]]
        adapted = client.post(f"{url}/v1/models/tenant/predict", json={"inputs": tenant, "parameters": {"top_k": 1}})
        assert adapted.status_code == 200, adapted.text  # what `rayformers predict` wrote from the adapter folder
        written = [lora["by_id"][r["id"]] for r in lora["held_out"][:3]]
        assert [a[0]["label"] for a in adapted.json()] == [w["label"] for w in written]
        assert [a[0]["score"] for a in adapted.json()] == pytest.approx([w["score"] for w in written], abs=1e-4)
        answer = client.post(f"{url}/predict", json={"inputs": encoded, "parameters": {"top_k": 2}})
        by_uri = client.post(f"{url}/predict", json={"inputs": {"image": f"{corpus['root']}/files/red-photo.jpg"}})
        missing_uri = client.post(f"{url}/predict", json={"inputs": f"{corpus['root']}/files/nowhere.jpg"})
        data_url = client.post(f"{url}/predict", json={"inputs": {"image": "data:image/jpeg;base64," + encoded[0]}})
        upload = client.post(
            f"{url}/predict", files={"file": ("x.jpg", corpus["files"]["files/blue-print.jpg"], "image/jpeg")}
        )
        corrupt = client.post(f"{url}/predict", json={"inputs": base64.b64encode(b"not an image").decode()})
    assert answer.status_code == 200, answer.text
    for name, ranked in zip(names, answer.json()):
        written = by_id[name]["top_k"]
        assert [r["label"] for r in ranked] == [w["label"] for w in written]
        assert [r["score"] for r in ranked] == pytest.approx([w["score"] for w in written], abs=1e-5)
    assert data_url.status_code == 200 and data_url.json()[0]["label"] == by_id["red-photo.jpg"]["label"]
    # serve.allow_uris: the replica reads the file from object storage itself
    assert by_uri.status_code == 200, by_uri.text
    assert by_uri.json()[0]["score"] == pytest.approx(by_id["red-photo.jpg"]["score"], abs=1e-5)
    assert missing_uri.status_code == 422 and "nowhere.jpg" in missing_uri.json()["error"]
    assert upload.status_code == 200, upload.text
    assert upload.json()[0]["label"] == by_id["blue-print.jpg"]["label"]
    assert corrupt.status_code == 422 and "not an image" in corrupt.json()["error"]


# A tenant's own names for the colour classes, in an order that moves every class off the base's head row:
# before training (LoRA starts as a no-op, the base's head under these names) every held-out image is wrong
TENANT = {"red": "apple", "yellow": "banana", "green": "frog", "blue": "sky"}


@pytest.fixture(scope="module")
def lora(trained):
    """A LoRA adapter trained by 2 DDP workers over the module's trained ViT (model.source = its S3 folder), for a
    tenant that names the classes its own way, and what `rayformers predict` writes from the adapter folder for
    held-out images (the endpoint test serves the adapter and compares)."""
    import pyarrow as pa

    from pipelines.predict import predict
    from pipelines.train import train

    fs, root = s3fs.S3FileSystem(), f"{trained['root']}/lora"
    for split, n, seed in (("train", 256, 30), ("held-out", 40, 31)):
        rows = [{**r, "label": TENANT[r["label"]]} for r in TASK.demo_data(n, seed)]
        with fs.open(f"{root}/{split}/part-0.parquet".removeprefix("s3://"), "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows), f)
    model, data = {"init": None, "source": trained["model"]}, {"format": "parquet", "train": f"{root}/train"}
    # preprocessed once (cache_train): uncached, each of the 2 workers runs a preprocessing pass of its own, and
    # 2 workers + 2 actors hold all 4 of the session Ray's CPUs, so no read task ever runs (the run hangs)
    data["cache_train"] = True
    peft = {"r": 8, "dropout": 0.0}
    summary = train(
        config(
            model=model,
            data=data,
            train={
                "output": f"{root}/run",
                "num_workers": 2,
                "batch_size": 16,
                "max_steps": 24,
                "lr": 5e-3,
                "peft": peft,
            },
        )
    )
    uri, output = f"{root}/run/model", f"{root}/predictions"
    predict(
        config(
            model=model, data=data, predict={"model": uri, "input": f"{root}/held-out", "output": output, "actors": 1}
        )
    )
    by_id = {r["id"]: r for r in pq.ParquetDataset(output.removeprefix("s3://"), filesystem=fs).read().to_pylist()}
    return {"uri": uri, "summary": summary, "held_out": rows, "by_id": by_id}


def test_a_lora_adapter_trained_on_two_workers_learns_a_tenants_labels_and_transformers_loads_it(trained, lora):
    """The adapter folder holds the adapter only; `rayformers predict` from it gets held-out images right where the
    model before training got them wrong, and transformers' own PEFT integration loads it onto the base to the
    answers predict wrote (the endpoint test: Serve's too)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, pipeline

    from pipelines.storage import Storage

    summary, held_out, by_id = lora["summary"], lora["held_out"], lora["by_id"]
    assert len(summary["worker_nodes"]) == 2, summary
    assert summary["parameters"]["trainable"] < 0.2 * summary["parameters"]["total"], summary["parameters"]
    adapter = Storage().local_copy(lora["uri"])
    files = set(os.listdir(adapter))
    assert {"adapter_config.json", "adapter_model.safetensors", "preprocessor_config.json"} <= files, files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}, files  # no full model
    assert [by_id[r["id"]]["error"] for r in held_out] == [None] * len(held_out)
    after = sum(by_id[r["id"]]["label"] == r["label"] for r in held_out) / len(held_out)

    # before training: the base under the tenant's labels, as the run started (LoRA's B matrices start at zero)
    base_dir, head = Storage().local_copy(trained["model"]), AutoConfig.from_pretrained(f"{adapter}/head_config.json")
    processor = AutoImageProcessor.from_pretrained(adapter)
    images = [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in held_out]
    untrained = AutoModelForImageClassification.from_pretrained(base_dir, config=head)
    before = pipeline("image-classification", model=untrained, image_processor=processor)(images, top_k=1)
    before = sum(b[0]["label"] == r["label"] for b, r in zip(before, held_out)) / len(held_out)
    assert after >= 0.8 and after >= before + 0.5, (after, before)

    # transformers' PEFT integration (load_adapter) onto the base, in a transformers pipeline
    tuned = AutoModelForImageClassification.from_pretrained(base_dir, config=head)
    tuned.load_adapter(adapter)
    plain = pipeline("image-classification", model=tuned.eval(), image_processor=processor)(images[:8], top_k=1)
    assert [p[0]["label"] for p in plain] == [by_id[r["id"]]["label"] for r in held_out[:8]]
    assert [p[0]["score"] for p in plain] == pytest.approx([by_id[r["id"]]["score"] for r in held_out[:8]], abs=2e-3)


def test_two_workers_that_would_each_stream_an_uncached_split_on_too_few_cpus_are_refused_in_one_line(trained, lora):
    """Uncached (flips drawn afresh each epoch) and in exact order, each of 2 workers streams the split through a
    preprocessing actor of its own: with the session Ray's 4 CPUs no read task would ever run, and the run would
    wait for ever. It is refused before training, naming the keys that fix it."""
    from errors import UserError
    from pipelines.train import train

    root = f"{trained['root']}/lora"
    with pytest.raises(UserError) as refused:
        train(
            config(
                model={"init": None, "source": trained["model"]},
                data={"format": "parquet", "train": f"{root}/train", "cache_train": False},
                train={"output": f"{root}/refused", "num_workers": 2, "max_steps": 4},
            )
        )
    message = str(refused.value)
    assert "needs 5 CPUs" in message and "the cluster has 4" in message, message
    assert "data.cache_train=true" in message and "\n" not in message, message
