"""token-classification end to end on one local Ray and the loopback S3 server: train a tiny BERT
tagger from CoNLL files, tag a JSONL corpus (text or words; bad rows kept as error rows), load the saved
model in `transformers.pipeline`, and get the same entities from the Serve endpoint."""

from __future__ import annotations

import json
import re

import httpx
import pyarrow.parquet as pq
import pytest
import s3fs

from tests.conftest import job_config, served

pytestmark = pytest.mark.e2e

SECTIONS = dict(
    task="token-classification",
    model={"init": {"architecture": "bert", "size": "tiny"}, "max_length": 32, "tokenizer": {"vocab_size": 400}},
    train={"epochs": 3, "batch_size": 32, "lr": 3e-3, "eval_every": 30, "log_every": 10, "num_workers": 1},
)
TEXTS = [
    "Grace Lee moved to Berlin last year .",
    "Hooli opened a new store in Cape Town today .",
    "Yesterday Acme Corp said that Bob will visit Oslo .",
]


def config(**sections):
    train = {**SECTIONS["train"], **sections.pop("train", {})}
    return job_config(**{**SECTIONS, **sections, "train": train})


def write(uri: str, text: str) -> None:
    with s3fs.S3FileSystem().open(uri.removeprefix("s3://"), "w") as f:
        f.write(text)


def conll(rows: list[dict]) -> str:
    return (
        "-DOCSTART- O\n\n"
        + "\n\n".join("\n".join(f"{w} {t}" for w, t in zip(r["tokens"], r["ner_tags"])) for r in rows)
        + "\n"
    )


@pytest.fixture(scope="module")
def trained(ray_session, session_bucket):
    from models import get_task
    from pipelines.train import train

    task = get_task("token-classification")
    root = f"s3://{session_bucket}/ner"
    write(f"{root}/train/part-1.conll", conll(task.demo_data(300, seed=0)))
    write(f"{root}/train/part-2.conll", conll(task.demo_data(300, seed=1)))
    write(f"{root}/eval/eval.conll", conll(task.demo_data(120, seed=2)))
    cfg = config(data={"train": f"{root}/train", "eval": f"{root}/eval"}, train={"output": f"{root}/run"})
    return {"root": root, "model": f"{root}/run/model", "summary": train(cfg)}


def test_training_on_conll_files_finds_the_entities(trained):
    best = trained["summary"]["best"]
    # an untrained tagger finds next to no whole entity (F1 near 0); the templated corpus is learnable
    assert best["eval_f1"] >= 0.8, best
    assert best["eval_precision"] >= 0.75 and best["eval_recall"] >= 0.75, best
    # the run report's last eval: per entity type, counts that add up to the run's entity recall
    page = s3fs.S3FileSystem().cat(f"{trained['root']}/run/report.html".removeprefix("s3://")).decode()
    views = page.split('<div id="eval-views"', 1)[1]
    num = r'<td class="num">([\d.]+)</td>'
    found = re.findall(rf"<tr><td>(LOC|ORG|PER)</td>{num}{num}{num}{num}{num}</tr>", views)
    assert sorted(name for name, *_ in found) == ["LOC", "ORG", "PER"], views[:2000]
    right = sum(int(true) * float(recall) for _, true, _, _, recall, _ in found)
    final = trained["summary"]["final"]
    assert right / sum(int(true) for _, true, *_ in found) == pytest.approx(final["eval_recall"], abs=1e-3)
    assert "<th>sentence</th><th>entities</th><th>found</th>" in views  # and a few sentences as tagged


@pytest.fixture(scope="module")
def predicted(trained, session_bucket):
    from pipelines.predict import predict

    rows = [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)]
    rows += [
        {"id": "words", "tokens": ["Dana", "works", "for", "Globex", "in", "Lima", "."]},
        {"id": "null", "text": None},
        {"id": "empty", "text": "   "},
        {"id": "number", "text": 5},
        {"id": "long", "text": "Paris " * 60 + "Julia Roberts ."},
    ]
    lines = [json.dumps(r) for r in rows] + ["{broken"]
    corpus = f"s3://{session_bucket}/ner/corpus/part.jsonl"
    write(corpus, "\n".join(lines) + "\n")
    output = f"s3://{session_bucket}/ner/predictions"
    summary = predict(config(predict={"model": trained["model"], "input": corpus, "output": output, "actors": 1}))
    table = pq.ParquetDataset(output.removeprefix("s3://"), filesystem=s3fs.S3FileSystem()).read().to_pylist()
    return summary, table


def test_predict_tags_text_and_words_and_keeps_every_row(predicted):
    summary, table = predicted
    assert len(table) == summary["rows"] == 9  # 8 rows + the unparsable line, none lost
    by_id = {r["id"]: r for r in table if r["id"] is not None}
    grace = [(e["entity_group"], e["word"], TEXTS[0][e["start"] : e["end"]]) for e in by_id["t0"]["entities"]]
    assert grace == [("PER", "grace lee", "Grace Lee"), ("LOC", "berlin", "Berlin")]
    assert [(e["entity_group"], e["word"]) for e in by_id["t1"]["entities"]] == [("ORG", "hooli"), ("LOC", "cape town")]
    words = "Dana works for Globex in Lima ."  # the words joined by spaces: offsets point into this
    assert [(e["entity_group"], words[e["start"] : e["end"]]) for e in by_id["words"]["entities"]] == [
        ("PER", "Dana"),
        ("ORG", "Globex"),
        ("LOC", "Lima"),
    ]
    assert all(0 < e["score"] <= 1 for r in table if r["entities"] for e in r["entities"])
    assert by_id["null"]["error"] == "text or tokens is needed" and by_id["null"]["entities"] is None
    assert by_id["empty"]["error"] == "text is empty"
    assert by_id["number"]["error"] == "column 'text' holds a int, expected str"
    assert by_id["long"]["error"] is None and by_id["long"]["flag"] == "truncated to 32 tokens"
    assert [r for r in table if r["id"] is None][0]["error"].startswith("line 9: not a JSON object")
    assert summary["errors"] == 4 and summary["flagged"] == 1


def test_the_saved_model_loads_in_a_transformers_pipeline_with_the_same_entities(trained):
    from transformers import pipeline

    from pipelines.predictor import Predictor
    from pipelines.storage import Storage

    local = Storage().local_copy(trained["model"])
    plain = pipeline("token-classification", model=local, aggregation_strategy="simple")(TEXTS)
    ours, errors, _ = Predictor("token-classification", local).predict_rows([{"text": t} for t in TEXTS])
    assert errors == [None] * 3
    assert [[(e["entity_group"], e["word"], e["start"], e["end"]) for e in row] for row in plain] == [
        [(e["entity_group"], e["word"], e["start"], e["end"]) for e in row] for row in ours
    ]
    assert all(abs(float(a["score"]) - b["score"]) < 1e-4 for x, y in zip(plain, ours) for a, b in zip(x, y))


def test_the_endpoint_answers_what_batch_prediction_wrote(trained, predicted):
    _, table = predicted
    by_id = {r["id"]: r for r in table if r["id"] is not None}
    cfg = config(serve={"model": trained["model"]})
    with served(cfg, "ner") as url, httpx.Client(timeout=60) as client:
        answer = client.post(f"{url}/predict", json={"inputs": TEXTS}).json()
        words = client.post(
            f"{url}/predict", json={"inputs": {"tokens": ["Dana", "works", "for", "Globex", "in", "Lima", "."]}}
        ).json()
        bad = client.post(f"{url}/predict", json={"inputs": ""})
    for i, entities in enumerate(answer):
        written = by_id[f"t{i}"]["entities"]
        assert [(e["entity_group"], e["start"], e["end"]) for e in entities] == [
            (e["entity_group"], e["start"], e["end"]) for e in written
        ]
        assert all(a["score"] == pytest.approx(b["score"], abs=1e-5) for a, b in zip(entities, written))
    assert [e["word"] for e in words] == [e["word"] for e in by_id["words"]["entities"]]
    assert bad.status_code == 422 and "text is empty" in bad.json()["error"]
