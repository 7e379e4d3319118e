"""LoRA (train.peft) on every task and every seed architecture it builds (`model.init`), as the train loop wraps
them (`pipelines.adapters.with_lora`): the picked modules, the head trained in full, a loss that falls, and a
saved adapter that loads back (our loader, PEFT's own `PeftModel.from_pretrained`, `rayformers merge-adapter`) to
the outputs of the model that was trained."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from config import validate
from models import get_task, task_names
from models.spec import Context
from pipelines.adapters import load_model, merge_adapter, parameter_counts, point_at_base, save_model, with_lora
from pipelines.predictor import to_device

EXAMPLES = Path(__file__).resolve().parents[2] / "jobs" / "examples"
LORA = SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules="auto")
CASES = [(t, a) for t in task_names() for a in get_task(t).architectures]
IDS = [f"{t}-{a}" for t, a in CASES]
BATCH = 4  # rows of the one training batch (the labels come from the 8 demo rows)

# What `target_modules: auto` adapts (PEFT's choice where it has one, else every linear layer outside the head)...
TARGETS = {
    "bert": "query value",
    "distilbert": "q_lin k_lin v_lin out_lin lin1 lin2",
    "gpt2": "c_attn",
    "bart": "q_proj v_proj",
    "t5": "q v",
    "vit": "q_proj k_proj v_proj o_proj fc1 fc2",
    "convnext": "pwconv1 pwconv2",
    "detr": "q_proj k_proj v_proj o_proj fc1 fc2",
    "segformer": "q_proj k_proj v_proj o_proj fc1 fc2",
    "mask2former": "q_proj k_proj v_proj o_proj out_proj fc1 fc2 reduction sampling_offsets attention_weights "
    "value_proj output_proj mask_embedder.0.0 mask_embedder.1.0 mask_embedder.2.0",
    "glpn": "query key value dense dense1 dense2",
    "wav2vec2": "projection q_proj k_proj v_proj out_proj intermediate_dense output_dense",
}
# ... and the head it trains in full: a language model's vocabulary projection (tied to the embeddings or not) stays
# frozen, the masked-LM head's transform before it trains.
HEADS = {
    "audio-classification": "projector classifier",
    "automatic-speech-recognition": "lm_head",
    "depth-estimation": "decoder head",
    "fill-mask": "cls.predictions.transform",
    "image-classification": "classifier",
    "image-segmentation-segformer": "decode_head",
    "image-segmentation-mask2former": "class_predictor",
    "object-detection": "class_labels_classifier bbox_predictor",
    "question-answering": "qa_outputs",
    "summarization": "",
    "text-classification-bert": "classifier",
    "text-classification-distilbert": "pre_classifier classifier",
    "text-generation": "",
    "token-classification": "classifier",
    "translation": "",
}


def model_config(task_name: str, architecture: str, size: str = "tiny") -> dict:
    """The task's example `model:` section with the architecture (and size) swapped in; the example's overrides
    are kept for its own architecture, the image size alone for another."""
    model = yaml.safe_load((EXAMPLES / f"{task_name}.yaml").read_text())["model"]
    init = model["init"]
    overrides = init.get("overrides", {})
    if size != "tiny":
        overrides = {}
    elif init["architecture"] != architecture:
        overrides = {k: v for k, v in overrides.items() if k == "image_size"}
    return model | {"init": {"architecture": architecture, "size": size, "overrides": overrides}}


def prepared(task_name: str, architecture: str, size: str = "tiny"):
    """The task, its validated config, labels and processor (from its demo data), and the demo rows."""
    example = yaml.safe_load((EXAMPLES / f"{task_name}.yaml").read_text())
    labels = example.get("data", {}).get("labels")
    cfg = validate(
        {"task": task_name, "model": model_config(task_name, architecture, size)}
        | {"task_options": example.get("task_options", {})}
        | ({"data": {"labels": labels}} if labels else {})
    )
    task = get_task(task_name)
    rows = task.demo_data(8, seed=0)
    if not labels:
        labels = sorted(task.labels_in(r[task.label_column] for r in rows)) if task.label_column else []
    return task, cfg, labels, task.build_processor(cfg.model, None, iter(rows)), rows


def build(task_name: str, architecture: str):
    """The tiny model the task builds from `model.init`, its processor, and one training batch of its demo data."""
    task, cfg, labels, processor, rows = prepared(task_name, architecture)
    torch.manual_seed(0)
    model = task.build_model(cfg.model, None, labels, processor)
    columns = [c.name for c in task.columns if c.name in rows[0]]
    features = task.preprocess(
        {c: [r[c] for r in rows[:BATCH]] for c in columns},
        processor,
        Context(labels={n: i for i, n in enumerate(labels)}, options=cfg.options(), train=True),
    )
    inputs = to_device(task.collate(features.arrays, processor), torch.device("cpu"))
    return task, model, processor, inputs


def outputs_of(model, inputs) -> dict[str, torch.Tensor]:
    """The model's tensor outputs, without labels (no loss to compute) but for seq2seq models, whose decoder inputs
    are made from them."""
    if not model.config.is_encoder_decoder:
        inputs = {k: v for k, v in inputs.items() if not k.endswith("labels")}
    model.eval()
    with torch.no_grad():
        outputs = model(**inputs)
    return {k: v for k, v in outputs.items() if k != "loss" and torch.is_tensor(v)}


def loss_of(model, inputs) -> float:
    """The training loss on the batch, with the same dropout masks (and Mask2Former's sampled points) each time."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        return float(model(**inputs).loss)


def assert_same(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), what
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=1e-4, msg=lambda m: f"{what} {key}: {m}")


def logged(line: str, part: str) -> set[str]:
    """The names the LoRA log line gives in one of its parts: `on ...;` or `trained in full: ...;`."""
    names = re.search(rf"{part} (.*?);", line).group(1)
    return set() if names == "nothing" else set(names.split(", "))


@pytest.mark.parametrize(("task_name", "architecture"), CASES, ids=IDS)
def test_lora_on_every_task_trains_adapters_and_head_and_saves_what_loads_back(task_name, architecture, tmp_path):
    task, model, processor, inputs = build(task_name, architecture)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)  # what a from-scratch run keeps as the adapter's base
    processor.save_pretrained(base_dir)

    wrapped, line = with_lora(model, LORA)
    print(f"{task_name} {architecture}: {line}")
    targets = logged(line, "on")
    assert targets == set(TARGETS[architecture].split()), line
    adapted = [n for n, m in wrapped.named_modules() if hasattr(m, "lora_A")]
    assert all(any(n.endswith(f".{t}") for t in targets) for n in adapted), adapted  # the log names them all
    assert all(any(n.endswith(f".{t}") for n in adapted) for t in targets), adapted  # ... and no more
    heads = logged(line, "trained in full:")
    assert heads == set(HEADS.get(f"{task_name}-{architecture}", HEADS.get(task_name, "")).split()), line
    trained = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "modules_to_save" in n for n in trained), trained
    for head in heads:  # each head's copy trains in full; its original, like the rest of the base, stays frozen
        copy = [p for n, p in wrapped.named_parameters() if f"{head}.modules_to_save." in n]
        original = [p for n, p in wrapped.named_parameters() if f"{head}.original_module." in n]
        assert copy and all(p.requires_grad for p in copy) and not any(p.requires_grad for p in original), head
    trainable, total = parameter_counts(wrapped)
    assert f"{trainable:,} of {total:,}" in line

    statistics = {n: b.clone() for n, b in wrapped.named_buffers() if "running_" in n and "modules_to_save" not in n}
    before = loss_of(wrapped, inputs)  # the adapters start as no change (PEFT's B matrices are zero)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
    for step in range(3):
        torch.manual_seed(step)
        wrapped(**inputs).loss.backward()
        optimizer.step(), optimizer.zero_grad()
    after = loss_of(wrapped, inputs)
    assert after < before, (before, after)
    for name, value in statistics.items():  # the base's BatchNorm layers (DETR's ResNet) keep their statistics
        torch.testing.assert_close(dict(wrapped.named_buffers())[name], value, msg=name)
    expected = outputs_of(wrapped, inputs)

    adapter_dir = tmp_path / "adapter"
    point_at_base(wrapped, str(base_dir))
    save_model(wrapped, str(adapter_dir))
    processor.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()

    loaded, _ = load_model(task, str(adapter_dir), str(base_dir))  # predict and serve; merged, it is merge-adapter's
    assert_same(outputs_of(loaded, inputs), expected, "load_model")
    from peft import PeftModel

    base, _ = task.load(str(base_dir))
    assert_same(outputs_of(PeftModel.from_pretrained(base, adapter_dir), inputs), expected, "PeftModel")
    cfg = validate({"task": task_name, "model": {"source": str(base_dir)}, "predict": {"model": str(adapter_dir)}})
    merged, _ = task.load(merge_adapter(cfg, str(tmp_path / "merged")))
    assert_same(outputs_of(merged, inputs), expected, "merge-adapter")


@pytest.mark.parametrize(("task_name", "architecture"), CASES, ids=IDS)
def test_lora_trains_a_small_share_of_a_base_sized_model(task_name, architecture):
    """At the `base` size preset (built on the meta device: shapes, no weights), with the default rank 8. SegFormer's
    head is its All-MLP decoder, 13% of the model, trained in full as PEFT's own SegFormer example does."""
    task, cfg, labels, processor, _ = prepared(task_name, architecture, size="base")
    with torch.device("meta"):
        model = task.build_model(cfg.model, None, labels, processor)
        wrapped, line = with_lora(model, SimpleNamespace(r=8, alpha=16, dropout=0.0, target_modules="auto"))
    trainable, total = parameter_counts(wrapped)
    print(f"{task_name} {architecture} base: {line}")
    assert total > 20_000_000 and logged(line, "on") == set(TARGETS[architecture].split()), line
    assert trainable / total < (0.15 if architecture == "segformer" else 0.05), line


def test_a_classifier_adapter_over_a_bare_encoder_loads_in_transformers_and_peft_given_its_labels(tmp_path):
    """A pretrained encoder (a hub checkpoint such as MiniLM: `BertModel`, no labels) as the base. Its config has no
    head, so loaders that read it need the fine-tuned labels, which `head_config.json` holds: given those,
    `transformers.pipeline`, transformers' Auto class and PEFT's `AutoPeftModelFor...` load the adapter folder as
    it is and answer as the model that was trained."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertModel, pipeline

    task, model, processor, inputs = build("text-classification", "bert")
    encoder = {k: v for k, v in model.config.to_dict().items() if k not in ("id2label", "label2id", "architectures")}
    base_dir = tmp_path / "base"
    BertModel(BertConfig(**encoder)).save_pretrained(base_dir)
    processor.save_pretrained(base_dir)  # as a checkpoint has its tokenizer: the pipeline takes the base's
    labels = ["food", "travel", "sport", "tech"]  # not the 2 labels a config without a head stands for
    fine = task.build_model(
        validate({"task": task.name, "model": {"source": str(base_dir)}}).model, str(base_dir), labels, processor
    )
    wrapped, _ = with_lora(fine, LORA)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        wrapped(**inputs).loss.backward()
        optimizer.step(), optimizer.zero_grad()
    adapter_dir = tmp_path / "adapter"
    point_at_base(wrapped, str(base_dir))
    save_model(wrapped, str(adapter_dir))
    processor.save_pretrained(adapter_dir)
    texts = ["goal match team", "pasta oven sauce", "cloud server code"]
    encoded = processor(texts, return_tensors="pt", padding=True)
    expected = outputs_of(wrapped, dict(encoded))["logits"]

    head = AutoConfig.from_pretrained(adapter_dir / "head_config.json")
    assert head.id2label == dict(enumerate(labels))
    answers = pipeline(
        "text-classification",
        model=str(adapter_dir),
        model_kwargs={"num_labels": head.num_labels, "id2label": head.id2label, "label2id": head.label2id},
    )(texts)
    probs = expected.softmax(-1)
    assert [a["label"] for a in answers] == [labels[int(i)] for i in probs.argmax(-1)]
    assert [round(a["score"], 4) for a in answers] == [round(float(p.max()), 4) for p in probs]
    auto = AutoModelForSequenceClassification.from_pretrained(adapter_dir, config=head)  # base + adapter
    torch.testing.assert_close(outputs_of(auto, dict(encoded))["logits"], expected, atol=1e-4, rtol=1e-4)
    peft_auto = AutoPeftModelForSequenceClassification.from_pretrained(
        str(adapter_dir), num_labels=head.num_labels, id2label=head.id2label, label2id=head.label2id
    )
    torch.testing.assert_close(outputs_of(peft_auto, dict(encoded))["logits"], expected, atol=1e-4, rtol=1e-4)
