"""Every task runs its whole contract, for each architecture it accepts (no Ray): demo rows -> processor ->
preprocess -> collate -> a tiny model built from config -> a training loss and an eval metric, and
prediction: forward -> postprocess -> JSON-ready predictions -> the Parquet columns the task declares; then
the same model saved and served as a request is (request inputs -> rows -> the predictor), one item and a list.

Each case is the task's jobs/examples YAML with a tiny `model.init` of the architecture under test."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from config import load_config
from models import get_task, task_names
from models.spec import Context
from pipelines.predictor import Predictor
from pipelines.serve_http import request_rows

EXAMPLES = Path(__file__).resolve().parents[2] / "jobs/examples"
ROWS = 4

# Smaller than the `tiny` presets where those cost seconds; everything else is the preset as users get it.
SMALLER = {
    "vit": {"image_size": 32},
    "convnext": {"image_size": 32},
    "detr": {"image_size": 64},
    "segformer": {"image_size": 32},
    "mask2former": {"image_size": 64},  # the least it takes
    "glpn": {"image_size": 32},
}
# Generation kept to a few tokens (an untrained model never stops early); Mask2Former takes its own path,
# universal segmentation (panoptic uses the instance maps).
SHORT = {"max_new_tokens": 4, "max_target_length": 8}
OPTIONS = {
    ("summarization", "bart"): SHORT,
    ("summarization", "t5"): SHORT,
    ("translation", "bart"): SHORT,
    ("translation", "t5"): SHORT,
    ("text-generation", "gpt2"): {"max_new_tokens": 4},
    ("image-segmentation", "mask2former"): {"subtask": "panoptic"},
}


def cloze(rows: list[dict], processor) -> list[dict]:
    """Fill-mask predicts the [MASK] of a text: each demo sentence with its second-last word masked."""
    out = []
    for row in rows:
        words = row["text"].replace(processor.mask_token, "x").split()
        out.append({**row, "text": " ".join(words[:-2] + [processor.mask_token] + words[-1:])})
    return out


# What a task predicts differs from what it trains on only for fill-mask.
PREDICTION_ROWS = {"fill-mask": cloze}

CASES = [(name, architecture) for name in task_names() for architecture in get_task(name).architectures]


def job(name: str, architecture: str):
    data = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    data["model"]["init"] = {"architecture": architecture, "size": "tiny", "overrides": SMALLER.get(architecture, {})}
    data["task_options"] = {**(data.get("task_options") or {}), **OPTIONS.get((name, architecture), {})}
    return load_config(None, [], base=data)


def column_batch(task, rows: list[dict], training: bool) -> dict[str, list]:
    names = [c.name for c in task.columns if (training or not c.training_only) and any(c.name in r for r in rows)]
    return {name: [r.get(name) for r in rows] for name in names}


def request_item(task, row: dict) -> dict:
    """A demo row as a client sends it: no training columns, media as base64."""
    item = {}
    for column in task.columns:
        if column.training_only or row.get(column.name) is None:
            continue
        value = row[column.name]
        item[column.name] = base64.b64encode(value).decode() if column.kind == "media" else value
    return item


def check_columns(task, predictions: list) -> None:
    """The predictions are JSON (no NaN) and fill the declared Parquet columns with their declared types."""
    json.dumps(predictions, allow_nan=False)
    columns = task.to_columns(predictions)
    assert set(columns) == set(task.output_columns)
    for name, kind in task.output_columns.items():
        values = pa.array(columns[name], pa.type_for_alias(kind) if isinstance(kind, str) else kind)
        assert len(values) == len(predictions)
        assert values.null_count == sum(p is None for p in predictions), name


@pytest.mark.parametrize("name, architecture", CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_a_task_trains_predicts_and_answers_requests(tmp_path, name, architecture):
    task = get_task(name)
    cfg = job(name, architecture)
    options = cfg.options()
    rows = task.demo_data(ROWS, seed=0)
    if task.label_column:
        labels = sorted(task.labels_in(r[task.label_column] for r in rows), key=lambda v: (isinstance(v, str), v))
    else:
        labels = list(cfg.data.labels or [])
    # from-scratch runs derive the processor from the training split's non-media columns
    sample = [{c.name: r[c.name] for c in task.columns if c.kind != "media" and c.name in r} for r in rows]
    processor = task.build_processor(cfg.model, None, iter(sample))
    torch.manual_seed(0)
    model = task.build_model(cfg.model, None, labels, processor)
    label_ids = {label: i for i, label in enumerate(labels)}

    # training and eval: every demo row is usable, the model gives a finite loss, the metric names best_metric
    features = task.preprocess(
        column_batch(task, rows, training=True),
        processor,
        Context(labels=label_ids, train=True, options=options, data=cfg.data),
    )
    assert features.errors == [None] * ROWS and len(features.lengths) == ROWS
    inputs = task.collate(features.arrays, processor)
    model.train()
    loss = model(**inputs).loss
    assert torch.isfinite(loss), loss
    loss.backward()
    model.eval()
    features = task.preprocess(
        column_batch(task, rows, training=True), processor, Context(labels=label_ids, options=options, data=cfg.data)
    )
    inputs = task.collate(features.arrays, processor)
    metric = task.metrics(labels, options)
    metric.bind(model, processor)
    with torch.no_grad():
        metric.update(model(**inputs), inputs, features.arrays)
    values = metric.compute()
    assert all(isinstance(v, float) for v in values.values()), values
    assert task.best_metric == "loss" or task.best_metric in values, (task.best_metric, values)

    # prediction (batch predict's path): the rows without their training columns
    parameters = task.sanitize_parameters({}, options)
    rows = PREDICTION_ROWS.get(name, lambda rows, processor: rows)(rows, processor)
    features = task.preprocess(
        column_batch(task, rows, training=False), processor, Context(options=options, data=cfg.data)
    )
    assert features.errors == [None] * ROWS
    inputs = task.collate(features.arrays, processor)
    assert "labels" not in inputs
    with torch.inference_mode():
        outputs = task.forward(model, inputs, parameters)
    predictions = task.postprocess(outputs, inputs, features.arrays, model, processor, parameters)
    assert len(predictions) == ROWS and None not in predictions
    check_columns(task, predictions + [None])  # an error row is a null in every prediction column

    # serving: the saved model answers a request's inputs, one item and a list, through the predictor
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    predictor = Predictor(name, str(tmp_path), batch_size=2, parameters=parameters, options=options, data=cfg.data)
    items = [request_item(task, r) for r in rows]
    for inputs, count in ((items[0], 1), (items, ROWS)):
        answers, errors, flags = predictor.predict_rows(request_rows(task, inputs, max_items=ROWS), parameters)
        assert errors == [None] * count and len(flags) == count
        assert len(answers) == count and None not in answers
        check_columns(task, answers)
