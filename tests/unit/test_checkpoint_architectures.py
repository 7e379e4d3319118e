"""A training checkpoint restores every architecture exactly, also those that transformers 5 saves under older
key names (ViT, DETR): a resumed run continues from the saved weights, not from a fresh initialisation."""

from __future__ import annotations

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from config import validate
from models import get_task
from pipelines.checkpoints import TrainState, load_checkpoint, save_checkpoint
from pipelines.predictor import to_device


@pytest.mark.parametrize(
    "task_name, init",
    [
        ("image-classification", {"architecture": "vit", "size": "tiny"}),
        ("object-detection", {"architecture": "detr", "size": "tiny", "overrides": {"image_size": 64}}),
        ("text-classification", {"architecture": "bert", "size": "tiny"}),
    ],
)
def test_a_checkpoint_brings_back_the_same_model(tmp_path, task_name, init):
    from models.spec import Context

    cfg = validate({"task": task_name, "model": {"init": init}})
    task = get_task(task_name)
    rows = task.demo_data(8, seed=0)
    labels = sorted(task.labels_in(r[task.label_column] for r in rows))
    processor = task.build_processor(cfg.model, None, iter(rows))
    torch.manual_seed(0)
    model = task.build_model(cfg.model, None, labels, processor)
    columns = [c.name for c in task.columns if c.name in rows[0]]
    batch = {c: [r[c] for r in rows] for c in columns}
    features = task.preprocess(
        batch, processor, Context(labels={n: i for i, n in enumerate(labels)}, options=cfg.options())
    )
    inputs = to_device(task.collate(features.arrays, processor), torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_linear_schedule_with_warmup(optimizer, 1, 10)
    for _ in range(2):  # moved away from its initialisation (and BatchNorm statistics updated)
        model(**inputs).loss.backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    model.eval()
    without_labels = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        before = model(**without_labels).logits
    save_checkpoint(str(tmp_path), model, processor, optimizer, scheduler, TrainState(step=2))

    torch.manual_seed(1)
    fresh = task.build_model(cfg.model, None, labels, processor)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = load_checkpoint(
        str(tmp_path), fresh, fresh_optimizer, get_linear_schedule_with_warmup(fresh_optimizer, 1, 10)
    )
    fresh.eval()
    with torch.no_grad():
        after = fresh(**without_labels).logits
    assert state.step == 2
    torch.testing.assert_close(after, before)
