"""Checkpoints hold weights, optimizer and scheduler state without pickles, and restore exactly."""

from __future__ import annotations

import json

import torch
from transformers import BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup

from pipelines.checkpoints import load_checkpoint, save_checkpoint


class Processor:
    def save_pretrained(self, d):
        (d / "processor.json").write_text("{}")


def tiny():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=32, num_labels=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_linear_schedule_with_warmup(optimizer, 2, 10)
    return model, optimizer, scheduler


def test_a_checkpoint_restores_model_optimizer_and_scheduler(tmp_path):
    model, optimizer, scheduler = tiny()
    for _ in range(3):
        model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([1])).loss.backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    save_checkpoint(str(tmp_path), model, Processor(), optimizer, scheduler, {"step": 3, "epoch": 0})
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))  # safetensors only

    fresh, fresh_opt, fresh_sched = tiny()
    state = load_checkpoint(str(tmp_path), fresh, fresh_opt, fresh_sched)
    assert state == {"step": 3, "epoch": 0}
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    saved = optimizer.state_dict()["state"][0]
    restored = fresh_opt.state_dict()["state"][0]
    assert torch.equal(saved["exp_avg"], restored["exp_avg"]) and float(saved["step"]) == float(restored["step"])
    assert json.loads((tmp_path / "optimizer.json").read_text())["param_groups"][0]["lr"] == optimizer.param_groups[0]["lr"]
