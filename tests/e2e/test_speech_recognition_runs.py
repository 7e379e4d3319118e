"""automatic-speech-recognition end to end on one local Ray and the loopback S3 server: train a tiny
Wav2Vec2 + CTC on demo Parquet in S3 (vocabulary built from the transcripts), transcribe an audio
folder with a metadata.csv (ordinary recordings at 8-48 kHz, stereo, a long clip cut into strided
windows, broken and missing files), load the saved model in `transformers.pipeline`, and get the
same transcripts from the Serve endpoint."""

from __future__ import annotations

import base64
import csv
import io

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
import soundfile as sf
import soxr
import torch
from torchmetrics.text import CharErrorRate

from models.audio import decode, wav_bytes
from models.automatic_speech_recognition import TASK
from tests.conftest import job_config, put, served

pytestmark = pytest.mark.e2e

WINDOWS = {"chunk_length_s": 1.0, "stride_length_s": 0.2}
SECTIONS = dict(
    model={"init": {"architecture": "wav2vec2", "size": "tiny"}},
    # small batches: more updates get CTC past its all-blank start sooner than bigger ones
    train={"epochs": 6, "batch_size": 8, "lr": 3e-3, "eval_every": 60, "log_every": 20, "num_workers": 1},
    task_options=WINDOWS,
)
REAL = {"phone.flac": (8000, 1, "FLAC"), "studio.wav": (44100, 2, "WAV"), "camera.wav": (48000, 1, "WAV")}


def config(**sections):
    merged = {k: dict(v) for k, v in SECTIONS.items()}
    for key, value in sections.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return job_config(task="automatic-speech-recognition", **merged)


def recording(samples: np.ndarray, rate: int, channels: int, fmt: str) -> bytes:
    samples = soxr.resample(samples, 16000, rate)
    if channels > 1:
        samples = np.stack([samples * (0.6 + 0.4 * c / channels) for c in range(channels)], axis=1)
    out = io.BytesIO()
    sf.write(out, samples, rate, format=fmt)
    return out.getvalue()


def cer(predicted: list[str], truth: list[str]) -> float:
    return float(CharErrorRate()(predicted, truth))


@pytest.fixture(scope="module")
def trained(ray_session, session_bucket):
    from jobs.catalog import write_demo_data
    from pipelines.train import train

    root = f"s3://{session_bucket}/speech"
    write_demo_data("automatic-speech-recognition", f"{root}/demo", rows=320, seed=0)
    cfg = config(data={"train": f"{root}/demo/train", "eval": f"{root}/demo/eval"}, train={"output": f"{root}/run"})
    return {"root": root, "model": f"{root}/run/model", "summary": train(cfg)}


def test_training_transcribes_far_better_than_an_untrained_model(trained):
    from pipelines.storage import Storage

    best = trained["summary"]["best"]
    local = Storage().local_copy(trained["model"])
    model, processor = TASK.load(local)
    assert processor.tokenizer.get_vocab() == {
        "[PAD]": 0,
        "[UNK]": 1,
        "|": 2,
        **{c: 3 + i for i, c in enumerate("abcdef")},
    }
    untrained = type(model)(model.config).eval()  # same vocabulary and size, fresh weights
    rows = TASK.demo_data(40, seed=1)
    clips = [torch.from_numpy(decode(r["audio"], 16000)) for r in rows]
    with torch.inference_mode():
        said = [
            processor.tokenizer.decode(
                untrained(input_values=((c - c.mean()) / c.std())[None]).logits[0].argmax(-1).tolist()
            )
            for c in clips
        ]
    baseline = cer(said, [r["text"] for r in rows])
    assert baseline >= 0.9, said[:3]
    assert best["eval_cer"] <= 0.25, best
    assert best["eval_wer"] <= 0.6, best  # an untrained model gets (nearly) every word wrong: WER >= 1


@pytest.fixture(scope="module")
def folder(trained, session_bucket):
    """An audio folder with a metadata.csv (file_name, id, text) as users have them."""
    fs = s3fs.S3FileSystem()
    root = f"s3://{session_bucket}/speech/folder"
    utterances = TASK.demo_data(12, seed=21)
    files, rows = {}, []
    for i, row in enumerate(utterances[:9]):
        name, (rate, channels, fmt) = list(REAL.items())[i % len(REAL)]
        files[f"clips/{i}-{name}"] = recording(decode(row["audio"], 16000), rate, channels, fmt)
        rows.append({"file_name": f"clips/{i}-{name}", "id": f"{i}-{name}", "text": row["text"]})
    gap = np.zeros(3200, np.float32)
    long = np.concatenate([np.concatenate([decode(r["audio"], 16000), gap]) for r in utterances[9:]] * 2)
    files["clips/long.wav"] = wav_bytes(long)
    rows.append({"file_name": "clips/long.wav", "id": "long", "text": " ".join(r["text"] for r in utterances[9:] * 2)})
    files["clips/corrupt.flac"] = files["clips/0-phone.flac"][:80]
    files["clips/empty.wav"] = wav_bytes(np.zeros(0))
    rows += [
        {"file_name": "clips/corrupt.flac", "id": "corrupt", "text": ""},
        {"file_name": "clips/empty.wav", "id": "empty", "text": ""},
        {"file_name": "clips/nowhere.wav", "id": "missing", "text": ""},
    ]
    for name, data in files.items():
        put(fs, f"{root}/{name}", data)
    table = io.StringIO()
    writer = csv.DictWriter(table, ["file_name", "id", "text"])
    writer.writeheader()
    writer.writerows(rows)
    put(fs, f"{root}/metadata.csv", table.getvalue().encode())
    return {"root": root, "rows": rows, "files": files, "long_seconds": len(long) / 16000}


@pytest.fixture(scope="module")
def predicted(trained, folder):
    from pipelines.predict import predict

    output = f"{folder['root']}-predictions"
    cfg = config(
        data={"format": "folder"},
        predict={"model": trained["model"], "input": folder["root"], "output": output, "actors": 1},
    )
    summary = predict(cfg)
    table = pq.ParquetDataset(output.removeprefix("s3://"), filesystem=s3fs.S3FileSystem()).read().to_pylist()
    return summary, {r["id"]: r for r in table}, len(table)


def test_predict_transcribes_real_recordings_and_a_long_clip_in_windows(folder, predicted):
    summary, by_id, count = predicted
    assert count == summary["rows"] == len(folder["rows"]) == 13
    recordings = [r for r in folder["rows"] if r["id"][0].isdigit()]
    assert all(by_id[r["id"]]["error"] is None for r in recordings)
    assert cer([by_id[r["id"]]["text"] for r in recordings], [r["text"] for r in recordings]) <= 0.25
    long = next(r for r in folder["rows"] if r["id"] == "long")
    assert folder["long_seconds"] > 3 * WINDOWS["chunk_length_s"]  # several windows, stitched back together
    assert by_id["long"]["error"] is None and cer([by_id["long"]["text"]], [long["text"]]) <= 0.3, by_id["long"]
    assert by_id["corrupt"]["error"].startswith("not a readable audio file") and by_id["corrupt"]["text"] is None
    assert by_id["empty"]["error"] == "audio is empty (0 samples)"
    assert "nowhere.wav" in by_id["missing"]["error"]
    assert summary["errors"] == 3


def test_the_saved_model_transcribes_the_same_in_a_transformers_pipeline(trained, folder, predicted):
    from transformers import pipeline

    from pipelines.storage import Storage

    _, by_id, _ = predicted
    asr = pipeline("automatic-speech-recognition", model=Storage().local_copy(trained["model"]), device="cpu")
    for name in ("0-phone.flac", "1-studio.wav", "2-camera.wav"):
        heard = asr({"raw": decode(folder["files"][f"clips/{name}"], 16000), "sampling_rate": 16000})
        assert heard["text"] == by_id[name]["text"]
    long = asr({"raw": decode(folder["files"]["clips/long.wav"], 16000), "sampling_rate": 16000}, **WINDOWS)
    assert long["text"] == by_id["long"]["text"]


def test_the_endpoint_answers_what_batch_prediction_wrote(trained, folder, predicted):
    _, by_id, _ = predicted
    names = ["0-phone.flac", "1-studio.wav", "long"]
    encoded = [base64.b64encode(folder["files"][f"clips/{n if n != 'long' else 'long.wav'}"]).decode() for n in names]
    cfg = config(serve={"model": trained["model"]})
    with served(cfg, "speech") as url, httpx.Client(timeout=60) as client:
        answer = client.post(f"{url}/predict", json={"inputs": encoded})
        upload = client.post(
            f"{url}/predict", files={"file": ("x.wav", folder["files"]["clips/2-camera.wav"], "audio/wav")}
        )
        corrupt = client.post(f"{url}/predict", json={"inputs": {"audio": base64.b64encode(b"not audio").decode()}})
    assert answer.status_code == 200, answer.text
    assert [a["text"] for a in answer.json()] == [by_id[n]["text"] for n in names]
    assert upload.status_code == 200 and upload.json()["text"] == by_id["2-camera.wav"]["text"]  # one file: one answer
    assert corrupt.status_code == 422 and "not a readable audio file" in corrupt.json()["error"]
