"""audio-classification end to end on one local Ray and the loopback S3 server: train a tiny Wav2Vec2
on demo Parquet in S3, classify an audio folder on S3 of ordinary recordings (8 kHz FLAC, 44.1 kHz
stereo WAV, 48 kHz WAV, 22 kHz stereo OGG) beside broken, empty and too-long files, and get the same
answers from the Serve endpoint (base64, data: URL and multipart). A LoRA adapter over the trained model learns a
tenant's labels; predict from its folder and the endpoint (the adapter as a named model, unmerged) answer alike."""

from __future__ import annotations

import base64
import io
import json
import os

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
import soundfile as sf
import soxr

from models.audio import decode, wav_bytes
from models.audio_classification import TASK
from tests.conftest import job_config, put, served

pytestmark = pytest.mark.e2e

SECTIONS = dict(
    model={"init": {"architecture": "wav2vec2", "size": "tiny"}},
    train={"epochs": 3, "batch_size": 16, "lr": 3e-3, "eval_every": 20, "log_every": 10, "num_workers": 1},
)


def config(**sections):
    merged = {k: dict(v) for k, v in SECTIONS.items()}
    for key, value in sections.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return job_config(task="audio-classification", **merged)


def recording(clip: bytes, rate: int, channels: int, fmt: str) -> bytes:
    """A demo clip as a user's recorder would have saved it: another rate, channel count and format."""
    samples = soxr.resample(decode(clip, 16000), 16000, rate)
    if channels > 1:
        samples = np.stack([samples * (0.6 + 0.4 * c / channels) for c in range(channels)], axis=1)
    out = io.BytesIO()
    sf.write(out, samples, rate, format=fmt)
    return out.getvalue()


REAL = {
    "phone.flac": (8000, 1, "FLAC"),
    "studio.wav": (44100, 2, "WAV"),
    "camera.wav": (48000, 1, "WAV"),
    "voice.ogg": (22050, 2, "OGG"),
}


@pytest.fixture(scope="module")
def trained(ray_session, session_bucket):
    """Trained and evaluated on `rayformers demo-data` Parquet (clips inline, read in blocks)."""
    from jobs.catalog import write_demo_data
    from pipelines.train import train

    root = f"s3://{session_bucket}/audio-classes"
    write_demo_data("audio-classification", f"{root}/demo", rows=320, seed=0)
    cfg = config(data={"train": f"{root}/demo/train", "eval": f"{root}/demo/eval"}, train={"output": f"{root}/run"})
    return {"root": root, "model": f"{root}/run/model", "summary": train(cfg)}


def test_training_beats_chance_by_a_wide_margin(trained):
    summary = trained["summary"]
    # four balanced classes: chance (and an untrained model) is near 0.25
    assert summary["best"]["eval_accuracy"] >= 0.85, summary
    assert summary["best"]["eval_macro_f1"] >= 0.8, summary


def test_the_run_report_shows_the_last_evals_confusion_matrix_and_per_class_recall_in_a_browser(trained, tmp_path):
    from tests.e2e.browser import class_rows, open_in_browser

    page = s3fs.S3FileSystem().cat(f"{trained['root']}/run/report.html".removeprefix("s3://")).decode()
    images, dom, _ = open_in_browser(page, tmp_path, colours=True)
    assert images["confusion matrix"][2] > 20, images  # drawn in the browser, not blank
    final, classes = trained["summary"]["final"], class_rows(dom)
    assert f"Last eval (step {final['step']})" in dom and len(classes) == 4, classes
    rows = sum(n for n, *_ in classes.values())
    assert rows == 64  # the eval split's clips (320 // 5), each counted once however many windows it has
    assert sum(n * recall for n, _, _, recall in classes.values()) / rows == pytest.approx(
        final["eval_accuracy"], abs=1e-3
    )


@pytest.fixture(scope="module")
def folder(trained, session_bucket):
    """An audio folder on S3, one sub-folder per class, as users have them: recordings at 8-48 kHz,
    mono and stereo, WAV/FLAC/OGG, beside a corrupt file, an empty one, a text file and a long clip."""
    fs = s3fs.S3FileSystem()
    root = f"s3://{session_bucket}/audio-classes/folder"
    files = {}
    for i, row in enumerate(TASK.demo_data(12, seed=21)):
        name, (rate, channels, fmt) = list(REAL.items())[i % len(REAL)]
        files[f"{row['label']}/{i}-{name}"] = recording(row["audio"], rate, channels, fmt)
    files["low/corrupt.flac"] = files[next(k for k in files if k.endswith("phone.flac"))][:60]
    files["low/empty.wav"] = wav_bytes(np.zeros(0))  # a valid header, no samples
    files["high/notes.wav"] = b"just some text"
    long = np.concatenate([decode(r["audio"], 16000) for r in TASK.demo_data(6, seed=4)])
    files["high/long.wav"] = wav_bytes(long)
    for name, data in files.items():
        put(fs, f"{root}/{name}", data)
    return {"root": root, "files": files, "long_seconds": len(long) / 16000}


@pytest.fixture(scope="module")
def predicted(trained, folder):
    from pipelines.predict import predict

    output = f"{folder['root']}-predictions"
    cfg = config(
        data={"format": "folder", "max_audio_seconds": 2.0, "long_audio": "reject"},
        predict={
            "model": trained["model"],
            "input": folder["root"],
            "output": output,
            "actors": 1,
            "parameters": {"top_k": 2},
        },
    )
    summary = predict(cfg)
    table = pq.ParquetDataset(output.removeprefix("s3://"), filesystem=s3fs.S3FileSystem()).read().to_pylist()
    by_name = {r["source"].split("/folder/", 1)[1]: r for r in table}
    return summary, by_name, len(table)


def test_predict_reads_real_recordings_from_an_audio_folder_and_keeps_every_row(folder, predicted):
    summary, by_name, count = predicted
    assert count == summary["rows"] == len(folder["files"]) == 16
    recordings = [name for name in folder["files"] if name.split("-", 1)[-1] in REAL]
    right = sum(by_name[name]["label"] == name.split("/")[0] for name in recordings)
    assert right >= 10, [(name, by_name[name]["label"]) for name in recordings]  # chance: 3 of 12
    for name in recordings:
        row = by_name[name]
        assert row["error"] is None and len(row["top_k"]) == 2 and row["top_k"][0]["label"] == row["label"]
    assert by_name["low/corrupt.flac"]["error"].startswith("not a readable audio file")
    assert by_name["low/corrupt.flac"]["label"] is None
    assert by_name["low/empty.wav"]["error"] == "audio is empty (0 samples)"
    assert by_name["high/notes.wav"]["error"] == "not a readable audio file (Format not recognised.)"
    assert by_name["high/long.wav"]["error"] == (
        f"audio is {folder['long_seconds']:.1f} s long, over " "data.max_audio_seconds=2 (data.long_audio: reject)"
    )
    assert summary["errors"] == 4


def test_the_endpoint_answers_what_batch_prediction_wrote(trained, folder, predicted, lora):
    _, by_name, _ = predicted
    names = [n for n in folder["files"] if n.endswith(("phone.flac", "studio.wav", "voice.ogg"))][:3]
    encoded = [base64.b64encode(folder["files"][n]).decode() for n in names]
    # the LoRA adapter below (`lora`) served beside its base as a named model (base + adapter, unmerged)
    cfg = config(serve={"model": trained["model"], "models": {"tenant": lora["uri"]}})
    with served(cfg, "audio-classes") as url, httpx.Client(timeout=60) as client:
        tenant = [base64.b64encode(r["audio"]).decode() for r in lora["held_out"][:3]]
        adapted = client.post(f"{url}/v1/models/tenant/predict", json={"inputs": tenant, "parameters": {"top_k": 1}})
        assert adapted.status_code == 200, adapted.text  # what `rayformers predict` wrote from the adapter folder
        written = [lora["by_id"][r["id"]] for r in lora["held_out"][:3]]
        assert [a[0]["label"] for a in adapted.json()] == [w["label"] for w in written]
        assert [a[0]["score"] for a in adapted.json()] == pytest.approx([w["score"] for w in written], abs=1e-4)
        answer = client.post(f"{url}/predict", json={"inputs": encoded, "parameters": {"top_k": 2}})
        data_url = client.post(f"{url}/predict", json={"inputs": {"audio": "data:audio/flac;base64," + encoded[0]}})
        upload = client.post(f"{url}/predict", files={"file": ("x.wav", folder["files"][names[1]], "audio/wav")})
        corrupt = client.post(f"{url}/predict", json={"inputs": base64.b64encode(b"not audio").decode()})
    assert answer.status_code == 200, answer.text
    for name, ranked in zip(names, answer.json()):
        written = by_name[name]["top_k"]
        assert [r["label"] for r in ranked] == [w["label"] for w in written]
        assert [r["score"] for r in ranked] == pytest.approx([w["score"] for w in written], abs=1e-5)
    assert data_url.status_code == 200 and data_url.json()[0]["label"] == by_name[names[0]]["label"]
    assert upload.status_code == 200, upload.text
    assert upload.json()[0]["label"] == by_name[names[1]]["label"]
    assert corrupt.status_code == 422 and "not a readable audio file" in corrupt.json()["error"]


# A tenant's own names for the sound classes, in an order that moves every class off the base's head row:
# before training (LoRA starts as a no-op, the base's head under these names) every held-out clip is wrong
TENANT = {"low": "hum", "beeps": "morse", "rising": "siren", "high": "whistle"}


@pytest.fixture(scope="module")
def lora(trained):
    """A LoRA adapter over the module's trained Wav2Vec2 (model.source = its S3 folder), for a tenant that names
    the classes its own way, and what `rayformers predict` writes from the adapter folder for held-out clips (the
    endpoint test serves the adapter and compares)."""
    import pyarrow as pa

    from pipelines.predict import predict
    from pipelines.train import train

    fs, root = s3fs.S3FileSystem(), f"{trained['root']}/lora"
    for split, n, seed in (("train", 256, 40), ("held-out", 32, 41)):
        rows = [{**r, "label": TENANT[r["label"]]} for r in TASK.demo_data(n, seed)]
        with fs.open(f"{root}/{split}/part-0.parquet".removeprefix("s3://"), "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows), f)
    model, peft = {"init": None, "source": trained["model"]}, {"r": 8, "dropout": 0.0}
    summary = train(
        config(
            model=model,
            data={"train": f"{root}/train"},
            train={"output": f"{root}/run", "batch_size": 16, "max_steps": 24, "lr": 5e-3, "peft": peft},
        )
    )
    uri, output = f"{root}/run/model", f"{root}/predictions"
    predict(config(model=model, predict={"model": uri, "input": f"{root}/held-out", "output": output, "actors": 1}))
    by_id = {r["id"]: r for r in pq.ParquetDataset(output.removeprefix("s3://"), filesystem=fs).read().to_pylist()}
    return {"uri": uri, "summary": summary, "held_out": rows, "by_id": by_id}


def test_a_lora_adapter_over_the_trained_model_learns_a_tenants_labels(trained, lora):
    """The adapter folder holds the adapter only, pointing at its base, and `rayformers predict` from it gets
    held-out clips right where the model before training got them wrong (the endpoint test: Serve answers the same;
    PEFT's own loader: tests/unit/test_adapters_every_task.py)."""
    from pipelines.predictor import Predictor
    from pipelines.storage import Storage

    summary, held_out, by_id = lora["summary"], lora["held_out"], lora["by_id"]
    assert summary["parameters"]["trainable"] < 0.2 * summary["parameters"]["total"], summary["parameters"]
    adapter = Storage().local_copy(lora["uri"])
    files = set(os.listdir(adapter))
    assert {"adapter_config.json", "adapter_model.safetensors", "preprocessor_config.json"} <= files, files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}, files  # no full model
    pointer = json.loads(open(os.path.join(adapter, "adapter_config.json")).read())["base_model_name_or_path"]
    assert pointer == trained["model"]
    assert [by_id[r["id"]]["error"] for r in held_out] == [None] * len(held_out)
    after = sum(by_id[r["id"]]["label"] == r["label"] for r in held_out) / len(held_out)
    # before training: the base's head under the tenant's names (LoRA's B matrices start at zero)
    base = Predictor("audio-classification", Storage().local_copy(trained["model"]))
    answers, _, _ = base.predict_rows([{"audio": r["audio"]} for r in held_out])
    head = json.loads(open(os.path.join(adapter, "head_config.json")).read())["id2label"]
    renamed = [head[str(base.model.config.label2id[a[0]["label"]])] for a in answers]
    before = sum(name == r["label"] for name, r in zip(renamed, held_out)) / len(held_out)
    assert after >= 0.8 and after >= before + 0.5, (after, before)
