"""LoRA (train.peft) on every task's model: the base stays frozen, the task head trains in full, and the saved
adapter folder loads back (base + adapter, or merged) to the same outputs as the model that was trained."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from config import validate
from models import get_task, task_names
from models.spec import Context
from pipelines.adapters import (
    head_modules,
    is_adapter_dir,
    load_model,
    parameter_counts,
    point_at_base,
    save_model,
    with_lora,
)
from pipelines.predictor import to_device
from tests.adapters import save_adapters_that_disagree

EXAMPLES = Path(__file__).resolve().parents[2] / "jobs" / "examples"
LORA = SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules="auto")


def example_model(task_name: str, tmp_path: Path):
    """The task's example model (tiny, from config) with its processor, labels and a training batch."""
    example = yaml.safe_load((EXAMPLES / f"{task_name}.yaml").read_text())
    labels = example.get("data", {}).get("labels")
    cfg = validate(
        {"task": task_name, "model": example["model"], "task_options": example.get("task_options", {})}
        | ({"data": {"labels": labels}} if labels else {})
    )
    task = get_task(task_name)
    rows = task.demo_data(8, seed=0)
    if not labels:
        labels = sorted(task.labels_in(r[task.label_column] for r in rows)) if task.label_column else []
    processor = task.build_processor(cfg.model, None, iter(rows))
    torch.manual_seed(0)
    model = task.build_model(cfg.model, None, labels, processor)
    columns = [c.name for c in task.columns if c.name in rows[0]]
    features = task.preprocess(
        {c: [r[c] for r in rows] for c in columns},
        processor,
        Context(labels={n: i for i, n in enumerate(labels)}, options=cfg.options(), train=True),
    )
    inputs = to_device(task.collate(features.arrays, processor), torch.device("cpu"))
    return task, model, processor, inputs


def first_output(model, inputs) -> torch.Tensor:
    outputs = model(**inputs)
    values = [v for k, v in outputs.items() if k != "loss" and torch.is_tensor(v)]
    return values[0]


@pytest.mark.parametrize("task_name", task_names())
def test_lora_trains_the_adapter_and_head_only_and_the_saved_adapter_gives_the_same_outputs(task_name, tmp_path):
    task, model, processor, inputs = example_model(task_name, tmp_path)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)  # what a from-scratch run keeps as the adapter's base
    heads = head_modules(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.split(".")[0] not in heads}

    wrapped, line = with_lora(model, LORA)
    trainable, total = parameter_counts(wrapped)
    assert 0 < trainable < total / 2, line
    assert "LoRA r=4 on " in line and f"{trainable:,} of {total:,}" in line
    trained = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trained), trained
    for head in heads:  # the task head trains in full
        assert any(f".{head}." in n and "modules_to_save" in n for n in trained), (head, trained)

    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        wrapped(**inputs).loss.backward()
        optimizer.step(), optimizer.zero_grad()
    wrapped.eval()
    for name, p in wrapped.get_base_model().named_parameters():  # the base's own weights did not move
        plain = name.replace("base_layer.", "")
        if plain in frozen_before:
            torch.testing.assert_close(p, frozen_before[plain], msg=name)
    with torch.no_grad():  # labels kept: seq2seq models take their decoder inputs from them
        expected = first_output(wrapped, inputs)

    adapter_dir = tmp_path / "adapter"
    point_at_base(wrapped, str(base_dir))
    save_model(wrapped, str(adapter_dir))
    processor.save_pretrained(adapter_dir)
    assert is_adapter_dir(str(adapter_dir)) and not (adapter_dir / "config.json").exists()
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    for merge in (False, True):
        loaded, _ = load_model(task, str(adapter_dir), str(base_dir), merge=merge)
        loaded.eval()
        with torch.no_grad():
            torch.testing.assert_close(first_output(loaded, inputs), expected, atol=1e-4, rtol=1e-4)


def test_a_from_scratch_runs_adapter_loads_unchanged_in_a_transformers_pipeline(tmp_path):
    """With the base kept as a from-scratch run keeps it (config with the labels), `transformers.pipeline` takes
    the adapter folder as it is and agrees with the model that was trained."""
    from transformers import pipeline

    task, model, processor, inputs = example_model("text-classification", tmp_path)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    wrapped, _ = with_lora(model, LORA)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        wrapped(**inputs).loss.backward()
        optimizer.step(), optimizer.zero_grad()
    point_at_base(wrapped, str(base_dir))
    save_model(wrapped, str(tmp_path / "adapter"))
    processor.save_pretrained(tmp_path / "adapter")
    texts = ["goal match team", "pasta oven sauce"]
    answers = pipeline("text-classification", model=str(tmp_path / "adapter"))(texts)
    wrapped.eval()
    with torch.no_grad():
        probs = wrapped(**processor(texts, return_tensors="pt", padding=True)).logits.softmax(-1)
    assert [a["label"] for a in answers] == [model.config.id2label[int(i)] for i in probs.argmax(-1)]
    assert [round(a["score"], 4) for a in answers] == [round(float(p.max()), 4) for p in probs]


def two_adapters(tmp_path):
    """A base model and two adapters over it that disagree: B's head is A's with its rows reversed, so on any
    input B answers the label at the mirrored index."""
    task, model, processor, inputs = example_model("text-classification", tmp_path)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    wrapped, _ = with_lora(model, LORA)
    point_at_base(wrapped, str(base_dir))
    dirs = save_adapters_that_disagree(wrapped, processor, tmp_path, seed=3, scale=0.5)
    return task, processor, base_dir, dirs


def test_adapters_over_one_base_share_its_weights_and_each_answers_as_it_would_alone(tmp_path):
    from pipelines.adapters import AdapterPool
    from pipelines.predictor import Predictor

    task, processor, base_dir, dirs = two_adapters(tmp_path)
    texts = [{"text": t} for t in ("goal match team", "pasta oven sauce", "cloud server code", "flight hotel")]
    merged = {n: Predictor(task.name, str(d)) for n, d in dirs.items()}  # each alone, merged into its base
    alone = {n: p.predict_rows(texts)[0] for n, p in merged.items()}
    config = merged["a"].model.config
    names = [config.id2label[i] for i in range(config.num_labels)]
    mirror = dict(zip(names, reversed(names)))
    assert [mirror[p["label"]] for p in alone["a"]] == [p["label"] for p in alone["b"]]

    pool = AdapterPool()
    model_cfg = validate({"task": task.name, "model": {"source": str(base_dir)}}).model
    load = lambda d: task.build_processor(model_cfg, d, iter(()))  # noqa: E731
    views = {
        n: Predictor(task.name, str(d), loaded=pool.view(task, n, str(d), str(base_dir), load)) for n, d in dirs.items()
    }
    assert len(pool.bases) == 1 and views["a"].model.peft is views["b"].model.peft  # one copy of the base
    for _ in range(2):  # alternating, as requests for both arrive
        for name in ("b", "a"):
            got = views[name].predict_rows(texts)[0]
            assert [p["label"] for p in got] == [p["label"] for p in alone[name]]
            for g, e in zip(got, alone[name]):
                assert abs(g["score"] - e["score"]) < 1e-4

    pool.release("a", str(base_dir))  # evicted: B still answers as B
    assert [p["label"] for p in views["b"].predict_rows(texts)[0]] == [p["label"] for p in alone["b"]]
    pool.release("b", str(base_dir))
    again = Predictor(task.name, str(dirs["a"]), loaded=pool.view(task, "a", str(dirs["a"]), str(base_dir), load))
    assert len(pool.bases) == 1 and [p["label"] for p in again.predict_rows(texts)[0]] == [
        p["label"] for p in alone["a"]
    ]


def test_merge_adapter_writes_a_full_model_that_answers_as_the_adapter_and_overwrites_nothing(tmp_path, capsys):
    from transformers import pipeline

    from errors import UserError
    from jobs.cli import run
    from pipelines.predictor import Predictor

    task, processor, base_dir, dirs = two_adapters(tmp_path)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"task": task.name, "model": {"source": str(base_dir)}}))
    out = tmp_path / "merged"
    assert run(["merge-adapter", str(config), str(out), f"predict.model={dirs['b']}"]) == 0
    assert f"model: {out}" in capsys.readouterr().out
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    texts = ["goal match team", "pasta oven sauce"]
    expected = Predictor(task.name, str(dirs["b"])).predict_rows([{"text": t} for t in texts])[0]
    answers = pipeline("text-classification", model=str(out))(texts)
    assert [a["label"] for a in answers] == [e["label"] for e in expected]
    with pytest.raises(UserError, match="exists already"):
        run(["merge-adapter", str(config), str(out), f"predict.model={dirs['b']}"])
    with pytest.raises(UserError, match="not a LoRA adapter"):
        run(["merge-adapter", str(config), str(tmp_path / "again"), f"predict.model={out}"])
