"""text-generation end to end on one local Ray and the loopback S3 server: train a tiny GPT-2 from
scratch on templated documents and prompt/completion pairs, continue a JSONL corpus of prompts (bad
rows kept as error rows), load the saved model in `transformers.pipeline`, and get the same text from
the Serve endpoint, whole or streamed as server-sent events. A LoRA adapter over the trained model learns a new
template; predict from its folder, transformers' PEFT integration and the endpoint (the adapter as a named model,
unmerged) continue prompts alike."""

from __future__ import annotations

import json
import os
import random

import httpx
import pyarrow.parquet as pq
import pytest
import s3fs

from tests.conftest import job_config, served

pytestmark = pytest.mark.e2e

VOCAB = 400
SECTIONS = dict(
    task="text-generation",
    model={"init": {"architecture": "gpt2", "size": "tiny"}, "max_length": 64, "tokenizer": {"vocab_size": VOCAB}},
    task_options={"max_new_tokens": 6, "max_new_tokens_limit": 16},
    train={"max_steps": 300, "batch_size": 16, "lr": 3e-3, "eval_every": 150, "log_every": 50, "num_workers": 1},
)
CAPITALS = {"france": "paris", "japan": "tokyo", "kenya": "nairobi", "chile": "santiago"}


def config(**sections):
    train = {**SECTIONS["train"], **sections.pop("train", {})}
    return job_config(**{**SECTIONS, **sections, "train": train})


@pytest.fixture(scope="module")
def trained(ray_session, session_bucket):
    from jobs.catalog import write_demo_data
    from pipelines.train import train

    root = f"s3://{session_bucket}/textgen"
    write_demo_data("text-generation", f"{root}/data", rows=600, seed=0)
    cfg = config(data={"train": f"{root}/data/train", "eval": f"{root}/data/eval"}, train={"output": f"{root}/run"})
    return {"root": root, "model": f"{root}/run/model", "summary": train(cfg)}


def test_training_drives_perplexity_far_below_an_untrained_model(trained):
    best = trained["summary"]["best"]
    # an untrained model guesses about uniformly over the vocabulary: perplexity ~ VOCAB
    assert best["eval_perplexity"] < VOCAB / 20, best
    fs = s3fs.S3FileSystem()
    model_dir = trained["model"].removeprefix("s3://")
    assert fs.exists(f"{model_dir}/model.safetensors") and fs.exists(f"{model_dir}/tokenizer.json")


@pytest.fixture(scope="module")
def predicted(trained, session_bucket):
    from pipelines.predict import predict

    rows = [{"id": country, "prompt": f"the capital of {country} is"} for country in CAPITALS]
    rows += [
        {"id": "doc", "text": "alice has"},
        {"id": "null", "prompt": None},
        {"id": "empty", "prompt": "  "},
        {"id": "number", "prompt": 12},
        {"id": "long", "prompt": "apples " * 100 + "the capital of peru is"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{broken"]
    corpus = f"{trained['root']}/corpus/part.jsonl"
    with s3fs.S3FileSystem().open(corpus.removeprefix("s3://"), "w") as f:
        f.write("\n".join(lines) + "\n")
    output = f"{trained['root']}/predictions"
    cfg = config(
        predict={
            "model": trained["model"],
            "input": corpus,
            "output": output,
            "actors": 1,
            "parameters": {"stop": " ."},
        }
    )
    summary = predict(cfg)
    table = pq.ParquetDataset(output.removeprefix("s3://"), filesystem=s3fs.S3FileSystem()).read().to_pylist()
    return cfg, summary, table


def test_predict_continues_prompts_and_keeps_every_row(predicted):
    _, summary, table = predicted
    assert len(table) == summary["rows"] == 10  # 9 rows + the unparsable line, none lost
    by_id = {r["id"]: r for r in table if r["id"] is not None}
    right = [c for c, city in CAPITALS.items() if by_id[c]["generated_text"] == f"the capital of {c} is {city}"]
    assert len(right) >= 3, [by_id[c]["generated_text"] for c in CAPITALS]  # learned facts, cut at the stop " ."
    assert by_id["doc"]["generated_text"].startswith("alice has ") and by_id["doc"]["error"] is None
    assert by_id["null"]["error"] == "prompt is null" and by_id["null"]["generated_text"] is None
    assert by_id["empty"]["error"] == "prompt is empty"
    assert by_id["number"]["error"] == "column 'prompt' holds a int, expected str"
    assert by_id["long"]["flag"] == "prompt truncated to its last 48 tokens" and by_id["long"]["generated_text"]
    assert [r for r in table if r["id"] is None][0]["error"].startswith("line 10: not a JSON object")


def test_the_saved_model_generates_the_same_text_in_a_transformers_pipeline(trained):
    from transformers import pipeline

    from pipelines.predictor import Predictor
    from pipelines.storage import Storage

    local = Storage().local_copy(trained["model"])
    prompts = [f"the capital of {c} is" for c in CAPITALS] + ["bob gave"]
    plain = pipeline("text-generation", model=local)(prompts, max_new_tokens=6, do_sample=False)
    ours, errors, _ = Predictor("text-generation", local, parameters={"max_new_tokens": 6}).predict_rows(
        [{"prompt": p} for p in prompts]
    )
    assert errors == [None] * len(prompts)
    assert [p[0]["generated_text"] for p in plain] == [p[0]["generated_text"] for p in ours]


def events(body: str) -> list:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def test_the_endpoint_answers_as_batch_prediction_and_streams_the_same_text(trained, predicted, lora):
    cfg, _, table = predicted
    by_id = {r["id"]: r for r in table if r["id"] is not None}
    # the same predict.parameters; the LoRA adapter below (`lora`) served beside it as a named model (unmerged)
    cfg = config(predict=cfg.predict.model_dump(), serve={"model": trained["model"], "models": {"lora": lora["uri"]}})
    with served(cfg, "textgen") as url:
        adapted = httpx.post(
            f"{url}/v1/models/lora/predict", json={"inputs": lora["prompts"], "parameters": {"stop": []}}, timeout=60
        )
        assert adapted.status_code == 200, adapted.text  # what `rayformers predict` wrote from the adapter folder
        assert [a[0]["generated_text"] for a in adapted.json()] == lora["written"]
        answer = httpx.post(f"{url}/predict", json={"inputs": "the capital of japan is"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json() == [{"generated_text": by_id["japan"]["generated_text"]}]
        streamed = httpx.post(
            f"{url}/predict", json={"inputs": "alice has", "stream": True, "parameters": {"stop": []}}, timeout=60
        )
        assert streamed.headers["content-type"].startswith("text/event-stream")
        sse = events(streamed.text)
        whole = httpx.post(
            f"{url}/predict",
            json={"inputs": "alice has", "parameters": {"stop": [], "return_full_text": False}},
            timeout=60,
        ).json()
        assert "".join(e["token"] for e in sse[:-1]) == sse[-1]["generated_text"] == whole[0]["generated_text"]
        assert len(sse) > 2  # more than one piece came before the end
        sampled = [
            httpx.post(
                f"{url}/predict",
                json={
                    "inputs": ["bob", "the capital of chile is"],
                    "parameters": {"do_sample": True, "seed": 5, "temperature": 1.5},
                },
                timeout=60,
            ).json()
            for _ in range(2)
        ]
        assert sampled[0] == sampled[1]  # the same seed, the same sample
        too_long = httpx.post(
            f"{url}/predict", json={"inputs": "bob", "parameters": {"max_new_tokens": 17}}, timeout=60
        )
        assert too_long.status_code == 422 and "limit of 16" in too_long.json()["error"]


def new_template(rng: random.Random, n: int) -> list[str]:
    """Sentences in a template the base model never saw, made of words it did."""
    names = "alice bob carol dave erin frank grace heidi".split()
    fruits, colors = "apples pears plums figs limes melons".split(), "red green yellow purple orange blue".split()
    return [
        f"{a} and {b} ate {rng.randint(2, 9)} {rng.choice(colors)} {rng.choice(fruits)} ."
        for a, b in (rng.sample(names, 2) for _ in range(n))
    ]


@pytest.fixture(scope="module")
def lora(trained):
    """A LoRA adapter over the module's trained GPT-2 (model.source = its S3 folder) for a new template, and what
    `rayformers predict` writes from the adapter folder for prompts of held-out sentences (the endpoint test serves
    the adapter and compares)."""
    import pyarrow as pa

    from pipelines.predict import predict
    from pipelines.train import train

    fs, rng = s3fs.S3FileSystem(), random.Random(3)
    root = f"{trained['root']}/lora"
    train_rows, held_out = new_template(rng, 320), new_template(rng, 24)
    prompts = [" ".join(t.split()[:3]) for t in held_out[:4]]  # "alice and bob"
    for name, rows in (
        ("data", [{"text": t} for t in train_rows]),
        ("prompts", [{"id": i, "prompt": p} for i, p in enumerate(prompts)]),
    ):
        with fs.open(f"{root}/{name}/part-0.parquet".removeprefix("s3://"), "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows), f)
    model = {"init": None, "source": trained["model"]}
    summary = train(
        config(
            model=model,
            data={"train": f"{root}/data"},
            train={"output": f"{root}/run", "max_steps": 30, "eval_every": 30, "peft": {"r": 8, "dropout": 0.0}},
        )
    )
    uri, output = f"{root}/run/model", f"{root}/predictions"
    predict(config(model=model, predict={"model": uri, "input": f"{root}/prompts", "output": output, "actors": 1}))
    table = pq.ParquetDataset(output.removeprefix("s3://"), filesystem=fs).read().to_pylist()
    written = [r["generated_text"] for r in sorted(table, key=lambda r: r["id"])]
    assert [r["error"] for r in table] == [None] * 4 and all(w.startswith(p) for w, p in zip(written, prompts))
    return {"uri": uri, "summary": summary, "held_out": held_out, "prompts": prompts, "written": written}


def perplexity(model, tokenizer, texts: list[str]) -> float:
    import torch

    with torch.no_grad():
        losses = [model(**(t := tokenizer(text, return_tensors="pt")), labels=t["input_ids"]).loss for text in texts]
    return float(torch.exp(torch.stack(losses).mean()))


def test_a_lora_adapter_over_the_trained_model_learns_a_new_template_and_transformers_loads_it(trained, lora):
    """The adapter folder holds the adapter only, pointing at its base; loaded by transformers' own PEFT
    integration onto the base it lowers held-out perplexity on the new template, and continues the held-out prompts
    in a transformers pipeline with the text `rayformers predict` wrote (the endpoint test: Serve's too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from pipelines.storage import Storage

    trainable, total = lora["summary"]["parameters"]["trainable"], lora["summary"]["parameters"]["total"]
    assert trainable < 0.1 * total, lora["summary"]["parameters"]
    adapter = Storage().local_copy(lora["uri"])
    files = set(os.listdir(adapter))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files, files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}, files  # no full model
    pointer = json.loads(open(os.path.join(adapter, "adapter_config.json")).read())["base_model_name_or_path"]
    assert pointer == trained["model"]

    # transformers' PEFT integration (load_adapter; its on/off switches need peft >= 0.22, we pin 0.21.2)
    base_dir, tokenizer = Storage().local_copy(trained["model"]), AutoTokenizer.from_pretrained(adapter)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    model.load_adapter(adapter)
    tuned = perplexity(model, tokenizer, lora["held_out"])
    base = perplexity(AutoModelForCausalLM.from_pretrained(base_dir).eval(), tokenizer, lora["held_out"])
    assert tuned < 0.7 * base, (tuned, base)  # seen: 255 vs 966
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
    plain = generate(lora["prompts"], max_new_tokens=6, do_sample=False)
    assert [p[0]["generated_text"] for p in plain] == lora["written"]
