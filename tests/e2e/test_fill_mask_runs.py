"""fill-mask end to end on one local Ray and the loopback S3 server: masked-LM pre-training of a tiny
BERT from plain .txt files, filling [MASK]s over a JSONL corpus (bad rows kept as error rows), the
saved model in `transformers.pipeline("fill-mask")`, and the same fillers from the Serve endpoint."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs

from tests.conftest import job_config, served

pytestmark = pytest.mark.e2e

SECTIONS = dict(
    task="fill-mask",
    model={"init": {"architecture": "bert", "size": "tiny"}, "max_length": 32, "tokenizer": {"vocab_size": 300}},
    task_options={"mlm_probability": 0.15},
    train={"epochs": 12, "batch_size": 32, "lr": 5e-3, "eval_every": 100, "log_every": 50, "num_workers": 1},
)
CLOZES = ["the cow says [MASK] .", "the capital of japan is [MASK] .", "hot is the opposite of [MASK] ."]
SOUNDS = {"moo", "woof", "meow", "quack", "hoot", "hiss"}
CAPITALS = {"paris", "tokyo", "lima", "oslo", "cairo", "nairobi"}
OPPOSITES = {"cold", "down", "small", "slow", "late", "sad", "hot", "up", "big", "fast", "early", "happy"}


def config(**sections):
    train = {**SECTIONS["train"], **sections.pop("train", {})}
    return job_config(**{**SECTIONS, **sections, "train": train})


def write(uri: str, text: str) -> None:
    with s3fs.S3FileSystem().open(uri.removeprefix("s3://"), "w") as f:
        f.write(text)


@pytest.fixture(scope="module")
def trained(ray_session, session_bucket):
    from models import get_task
    from pipelines.train import train

    task = get_task("fill-mask")
    root = f"s3://{session_bucket}/mlm"
    write(f"{root}/train/corpus.txt", "\n".join(r["text"] for r in task.demo_data(600, seed=0)[1:]) + "\n\n")
    write(f"{root}/eval/corpus.txt", "\n".join(r["text"] for r in task.demo_data(150, seed=1)[1:]) + "\n")
    cfg = config(data={"train": f"{root}/train", "eval": f"{root}/eval"}, train={"output": f"{root}/run"})
    return {"root": root, "model": f"{root}/run/model", "summary": train(cfg), "cfg": cfg}


def untrained_perplexity(cfg, model_uri: str, eval_texts: list[str]) -> float:
    """The same eval masks scored by a freshly initialised model of the same shape and tokenizer (no Ray)."""
    import torch

    from models import get_task
    from models.spec import Context
    from pipelines.storage import Storage

    task = get_task("fill-mask")
    _, processor = task.load(Storage().local_copy(model_uri))
    torch.manual_seed(0)
    model = task.build_model(cfg.model, None, [], processor).eval()
    features = task.preprocess({"text": eval_texts}, processor, Context(labels={}, options=cfg.options()))
    metric = task.metrics([], None)
    with torch.no_grad():
        inputs = task.collate(features.arrays, processor)
        metric.update(model(**inputs), inputs, features.arrays)
    return metric.compute()["perplexity"]


def test_masked_lm_training_on_text_files_lowers_perplexity_far_below_an_untrained_model(trained):
    from models import get_task

    best = trained["summary"]["best"]
    baseline = untrained_perplexity(
        trained["cfg"], trained["model"], [r["text"] for r in get_task("fill-mask").demo_data(150, seed=1)[1:]]
    )
    assert baseline > 100, baseline  # about the vocabulary size: a uniform guess
    assert best["eval_perplexity"] < baseline / 10, (best, baseline)
    assert best["eval_accuracy"] >= 0.4 and best["eval_top5_accuracy"] >= 0.7, best


@pytest.fixture(scope="module")
def predicted(trained, session_bucket):
    from pipelines.predict import predict

    rows = [{"id": f"c{i}", "text": t} for i, t in enumerate(CLOZES)]
    rows += [
        {"id": "two", "text": "the capital of [MASK] is [MASK] ."},
        {"id": "nomask", "text": "the cow says moo ."},
        {"id": "null", "text": None},
        {"id": "long", "text": "the dog says woof . " * 20 + "[MASK]"},
    ]
    corpus = f"s3://{session_bucket}/mlm/corpus/part.jsonl"
    write(corpus, "\n".join(json.dumps(r) for r in rows) + "\n")
    output = f"s3://{session_bucket}/mlm/predictions"
    summary = predict(
        config(
            predict={
                "model": trained["model"],
                "input": corpus,
                "output": output,
                "actors": 1,
                "parameters": {"top_k": 3},
            }
        )
    )
    table = pq.ParquetDataset(output.removeprefix("s3://"), filesystem=s3fs.S3FileSystem()).read().to_pylist()
    return summary, {r["id"]: r for r in table}


def test_predict_fills_each_mask_and_keeps_every_row(predicted):
    summary, by_id = predicted
    assert summary["rows"] == len(by_id) == 7
    top = [by_id[f"c{i}"]["predictions"][0][0]["token_str"] for i in range(3)]
    # the model learned which kind of word goes there (an untrained one ranks the ~300 pieces at random)
    assert top[0] in SOUNDS and top[1] in CAPITALS and top[2] in OPPOSITES, top
    assert by_id["c0"]["predictions"][0][0]["sequence"] == f"the cow says {top[0]}."
    assert len(by_id["c0"]["predictions"][0]) == 3  # predict.parameters.top_k
    two = by_id["two"]["predictions"]
    assert len(two) == 2 and all(len(fills) == 3 for fills in two)  # a list of fillers per mask
    assert by_id["nomask"]["error"] == "text has no [MASK] token" and by_id["nomask"]["predictions"] is None
    assert by_id["null"]["error"] == "text is null"
    assert by_id["long"]["error"] == "text has no [MASK] token within the first 32 tokens"


def test_the_saved_model_loads_in_a_transformers_pipeline_with_the_same_fillers(trained, predicted):
    from transformers import pipeline

    from pipelines.storage import Storage

    _, by_id = predicted
    local = Storage().local_copy(trained["model"])
    plain = pipeline("fill-mask", model=local, top_k=3)(CLOZES)
    for i, fills in enumerate(plain):
        ours = by_id[f"c{i}"]["predictions"][0]
        assert [(f["token"], f["token_str"], f["sequence"]) for f in fills] == [
            (f["token"], f["token_str"], f["sequence"]) for f in ours
        ]
        assert np.allclose([f["score"] for f in fills], [f["score"] for f in ours], atol=1e-4)


def test_the_endpoint_answers_what_batch_prediction_wrote(trained, predicted):
    _, by_id = predicted
    cfg = config(serve={"model": trained["model"]}, predict={"parameters": {"top_k": 3}})
    with served(cfg, "mlm") as url, httpx.Client(timeout=60) as client:
        answers = client.post(f"{url}/predict", json={"inputs": CLOZES}).json()
        five = client.post(f"{url}/predict", json={"inputs": CLOZES[0], "parameters": {"top_k": 5}}).json()
        bad = client.post(f"{url}/predict", json={"inputs": "no mask here"})
    for i, fills in enumerate(answers):
        written = by_id[f"c{i}"]["predictions"][0]
        assert [f["token_str"] for f in fills] == [f["token_str"] for f in written]
        assert np.allclose([f["score"] for f in fills], [f["score"] for f in written], atol=1e-5)
    assert len(five) == 5 and five[0]["token_str"] == answers[0][0]["token_str"]
    assert bad.status_code == 422 and "text has no [MASK] token" in bad.json()["error"]
