"""question-answering end to end on one local Ray and the loopback S3 server: train a tiny extractive
BERT from a SQuAD JSON file (with unanswerable questions), answer a JSONL corpus whose long contexts
span several windows (bad rows kept as error rows), and get the same answers from the Serve endpoint."""

from __future__ import annotations

import json

import httpx
import pyarrow.parquet as pq
import pytest
import s3fs

from tests.conftest import job_config, served

pytestmark = pytest.mark.e2e

SECTIONS = dict(
    task="question-answering",
    model={"init": {"architecture": "bert", "size": "tiny"}, "max_length": 48, "tokenizer": {"vocab_size": 400}},
    task_options={"allow_no_answer": True, "doc_stride": 12},
    train={"epochs": 24, "batch_size": 32, "lr": 3e-3, "eval_every": 200, "log_every": 50, "num_workers": 1},
)
FILLER = "the weather was nice . it rained all day . everyone stayed at home . "
LONG = (
    FILLER * 3 + "Kofi works at Hooli . " + FILLER * 2 + "Alice likes to eat pizza . Dana was born in 1980 ."
)  # ~100 tokens: windows of 48
QUESTIONS = [
    {
        "id": "short",
        "question": "where does Lena live ?",
        "context": "Bob works at Acme . Lena lives in Oslo . Ivan likes to eat curry .",
    },
    {"id": "long", "question": "where does Kofi work ?", "context": LONG},
    {"id": "none", "question": "when was Ivan born ?", "context": "Ivan works at Wonka . Grace lives in Cairo ."},
]


def config(**sections):
    train = {**SECTIONS["train"], **sections.pop("train", {})}
    return job_config(**{**SECTIONS, **sections, "train": train})


def write(uri: str, text: str) -> None:
    with s3fs.S3FileSystem().open(uri.removeprefix("s3://"), "w") as f:
        f.write(text)


def squad(rows: list[dict]) -> str:
    qas = [
        {
            "id": r["id"],
            "question": r["question"],
            "is_impossible": not r["answers"]["text"],
            "answers": [
                {"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])
            ],
        }
        for r in rows
    ]
    return json.dumps(
        {
            "version": "v2.0",
            "data": [
                {"title": "demo", "paragraphs": [{"context": r["context"], "qas": [q]} for r, q in zip(rows, qas)]}
            ],
        }
    )


@pytest.fixture(scope="module")
def trained(ray_session, session_bucket):
    from models import get_task
    from pipelines.train import train

    task = get_task("question-answering")
    root = f"s3://{session_bucket}/qa"
    write(f"{root}/train/train-v2.json", squad(task.demo_data(800, seed=0)))
    evaluation = task.demo_data(120, seed=1)
    write(f"{root}/eval/dev.jsonl", "\n".join(json.dumps(r) for r in evaluation) + "\n")
    cfg = config(data={"train": f"{root}/train", "eval": f"{root}/eval"}, train={"output": f"{root}/run"})
    return {"model": f"{root}/run/model", "summary": train(cfg), "eval": evaluation}


def test_training_from_squad_json_answers_most_questions(trained):
    from models.squad import squad_scores

    best = trained["summary"]["best"]
    # the constant baseline, scored here as the eval metric scores it: "no answer" to every question (an untrained
    # model's arbitrary spans score about 0 on the answerable ones, so this is the better of the two)
    constant = [squad_scores("", r["answers"]["text"]) for r in trained["eval"]]
    em, f1 = (sum(s[k] for s in constant) / len(constant) for k in (0, 1))
    assert 0.1 <= em <= 0.25 and f1 == em, (em, f1)  # one question in six has no answer
    # runs reached EM 0.59-1.0 (F1 above it); training on 2 cores is not bit-for-bit repeatable, so the bar sits
    # a little below the worst run seen, and at least three times the constant's
    assert best["eval_exact_match"] >= max(0.5, 3 * em) and best["eval_f1"] >= max(0.55, 3 * f1), (best, em)


@pytest.fixture(scope="module")
def predicted(trained, session_bucket):
    from pipelines.predict import predict

    rows = QUESTIONS + [
        {"id": "null", "question": None, "context": "x"},
        {"id": "empty", "question": "where ?", "context": " "},
        {"id": "number", "question": "where ?", "context": 7},
    ]
    corpus = f"s3://{session_bucket}/qa/corpus/part.jsonl"
    write(corpus, "\n".join(json.dumps(r) for r in rows) + "\n")
    output = f"s3://{session_bucket}/qa/predictions"
    summary = predict(config(predict={"model": trained["model"], "input": corpus, "output": output, "actors": 1}))
    table = pq.ParquetDataset(output.removeprefix("s3://"), filesystem=s3fs.S3FileSystem()).read().to_pylist()
    return summary, {r["id"]: r for r in table}


def test_predict_finds_answers_in_any_window_and_keeps_every_row(predicted):
    summary, by_id = predicted
    assert summary["rows"] == len(by_id) == 6
    short = by_id["short"]
    # which span a tiny model picks is the eval metric's business; here: a real span with offsets into the context
    assert short["answer"] and QUESTIONS[0]["context"][short["start"] : short["end"]] == short["answer"]
    long = by_id["long"]  # several windows, answered as one row with offsets into the whole context
    assert long["error"] is None and long["flag"] is None
    assert long["answer"] and LONG[long["start"] : long["end"]] == long["answer"] and 0 < long["score"] <= 1
    # (the demo model only ever saw one-window contexts: which span it picks here is not asserted)
    none = by_id["none"]  # "no answer" is a candidate (allow_no_answer); whether this tiny model picks it varies by run
    assert none["error"] is None and none["answer"] == QUESTIONS[2]["context"][none["start"] : none["end"]]
    assert 0 < short["score"] <= 1
    assert by_id["null"]["error"] == "question is null" and by_id["null"]["answer"] is None
    assert by_id["empty"]["error"] == "context is empty"
    assert by_id["number"]["error"] == "column 'context' holds a int, expected str"


def test_the_saved_model_loads_with_auto_classes(trained):
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from models import get_task
    from pipelines.storage import Storage

    # transformers 5 dropped the "question-answering" pipeline; its Auto classes still load our output unchanged
    local = Storage().local_copy(trained["model"])
    model, tokenizer = AutoModelForQuestionAnswering.from_pretrained(local), AutoTokenizer.from_pretrained(local)
    ours, _ = get_task("question-answering").load(local)
    inputs = tokenizer(QUESTIONS[0]["question"], QUESTIONS[0]["context"], return_tensors="pt")
    with torch.no_grad():
        out, expected = model(**inputs), ours.eval()(**inputs)
    assert out.start_logits.shape == inputs["input_ids"].shape
    assert torch.allclose(out.start_logits, expected.start_logits) and torch.allclose(
        out.end_logits, expected.end_logits
    )


def test_the_endpoint_answers_what_batch_prediction_wrote(trained, predicted):
    _, by_id = predicted
    cfg = config(serve={"model": trained["model"]})
    with served(cfg, "qa") as url, httpx.Client(timeout=60) as client:
        answers = client.post(
            f"{url}/predict", json={"inputs": [{"question": q["question"], "context": q["context"]} for q in QUESTIONS]}
        ).json()
        top = client.post(
            f"{url}/predict",
            json={"inputs": {"question": QUESTIONS[1]["question"], "context": LONG}, "parameters": {"top_k": 3}},
        ).json()
        bad = client.post(f"{url}/predict", json={"inputs": {"question": "where ?"}})
    for q, answer in zip(QUESTIONS, answers):
        written = by_id[q["id"]]
        assert (answer["answer"], answer["start"], answer["end"]) == (
            written["answer"],
            written["start"],
            written["end"],
        )
        assert answer["score"] == pytest.approx(written["score"], abs=1e-5)
    assert len(top) == 3 and top[0]["score"] >= top[1]["score"] >= top[2]["score"]
    assert (top[0]["answer"], top[0]["start"]) == (by_id["long"]["answer"], by_id["long"]["start"])
    assert bad.status_code == 422 and "context is null" in bad.json()["error"]
