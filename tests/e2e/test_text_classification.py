"""text-classification end to end on one local Ray and the loopback S3 server: train from S3,
predict a corpus from S3, load the saved model in `transformers.pipeline`."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import s3fs

pytestmark = pytest.mark.e2e


def read_parquet_dir(uri: str):
    fs = s3fs.S3FileSystem()
    return pq.ParquetDataset(uri.removeprefix("s3://"), filesystem=fs).read()


def test_training_from_s3_beats_chance_by_a_wide_margin(trained_text_model):
    summary = trained_text_model["summary"]
    # four balanced classes: chance is 0.25; an untrained or broken model stays near it
    assert summary["best"]["eval_accuracy"] >= 0.85, summary
    assert summary["best"]["eval_macro_f1"] >= 0.8, summary
    fs = s3fs.S3FileSystem()
    out = trained_text_model["output"].removeprefix("s3://")
    assert fs.exists(f"{out}/model/model.safetensors")
    assert fs.exists(f"{out}/model/tokenizer.json")
    metrics = json.loads(fs.cat(f"{out}/metrics.json"))
    assert metrics["throughput_samples_per_s"] > 0
    assert metrics["best"]["eval_accuracy"] == summary["best"]["eval_accuracy"]
    checkpoints = [p for p in fs.ls(f"{out}/checkpoints") if p.rsplit("/", 1)[-1].startswith("step-")]
    assert 1 <= len(checkpoints) <= 2  # train.keep_checkpoints=2 by default
