"""Checkpoints hold weights, optimizer and scheduler state without pickles, and restore exactly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup

from pipelines.checkpoints import TrainState, load_checkpoint, read_state, save_checkpoint


class Processor:
    def save_pretrained(self, d):
        (d / "processor.json").write_text("{}")


def tiny():
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=2,
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_linear_schedule_with_warmup(optimizer, 2, 10)
    return model, optimizer, scheduler


def test_a_checkpoint_restores_model_optimizer_and_scheduler(tmp_path):
    model, optimizer, scheduler = tiny()
    for _ in range(3):
        model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([1])).loss.backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    save_checkpoint(str(tmp_path), model, Processor(), optimizer, scheduler, TrainState(step=3, epoch=0))
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))  # safetensors only

    fresh, fresh_opt, fresh_sched = tiny()
    state = load_checkpoint(str(tmp_path), fresh, fresh_opt, fresh_sched)
    assert state == TrainState(step=3, epoch=0)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    saved = optimizer.state_dict()["state"][0]
    restored = fresh_opt.state_dict()["state"][0]
    assert torch.equal(saved["exp_avg"], restored["exp_avg"]) and float(saved["step"]) == float(restored["step"])
    assert (
        json.loads((tmp_path / "optimizer.json").read_text())["param_groups"][0]["lr"]
        == optimizer.param_groups[0]["lr"]
    )


def test_a_checkpoint_missing_a_file_or_holding_a_truncated_one_is_refused(tmp_path):
    model, optimizer, scheduler = tiny()
    save_checkpoint(str(tmp_path), model, Processor(), optimizer, scheduler, TrainState(step=1))
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="incomplete: \\['model/model.safetensors'\\]"):
        load_checkpoint(str(tmp_path), *tiny())
    (tmp_path / "_COMPLETE.json").unlink()
    with pytest.raises(RuntimeError, match="not written completely"):
        load_checkpoint(str(tmp_path), *tiny())


def test_a_state_json_written_before_train_state_existed_loads_and_is_written_back_the_same(tmp_path):
    # as the string-keyed dict of earlier versions wrote it: best_loss and resumed_at appended once set
    written = {
        "step": 40,
        "epoch": 1,
        "position": 3,
        "samples": 640,
        "train_seconds": 12.5,
        "skipped_rows": 2,
        "best": 0.75,
        "best_step": 30,
        "labels": ["neg", "pos"],
        "best_loss": 0.41,
        "resumed_at": [20],
    }
    (tmp_path / "state.json").write_text(json.dumps(written, indent=2))
    state = read_state(str(tmp_path))
    assert (state.step, state.epoch, state.position, state.samples, state.skipped_rows) == (40, 1, 3, 640, 2)
    assert (state.best, state.best_step, state.best_loss, state.resumed_at) == (0.75, 30, 0.41, [20])
    assert state.labels == ["neg", "pos"] and state.train_seconds == 12.5
    assert json.loads(state.to_json()) == written


def test_a_state_from_before_data_positions_restarts_its_epoch_and_has_no_best_loss():
    older = {
        "step": 10,
        "epoch": 2,
        "samples": 160,
        "train_seconds": 3.0,
        "skipped_rows": None,
        "best": 0.5,
        "best_step": 10,
        "labels": None,
    }
    state = TrainState.from_json(json.dumps(older))
    assert state.position == 0 and state.resumed_at == [] and state.best_loss_or_inf() == float("inf")
    assert json.loads(state.to_json()) == {**older, "position": 0}


def test_a_folder_is_committed_by_its_marker_and_an_interrupted_write_reads_as_missing(tmp_path):
    from pipelines.storage import COMPLETE, Storage, commit_dir, is_committed

    storage = Storage()
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "sub" / "weights").write_bytes(b"x" * 10)
    commit_dir(storage, str(source), str(tmp_path / "out"))
    assert is_committed(storage, str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / COMPLETE).read_text()) == {"files": {"config.json": 2, "sub/weights": 10}}
    # a copy of a committed folder (URI to URI) is committed in its own right, with no stale files
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "stale").write_text("old")
    commit_dir(storage, str(tmp_path / "out"), str(tmp_path / "copy"))
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [COMPLETE, "config.json", "sub"]

    from fsspec.implementations.local import LocalFileSystem

    class FailsOnWeights(LocalFileSystem):  # the store fails after the first file: the write stops midway
        def copy(self, path1, path2, **kwargs):
            if path2.endswith("weights"):
                raise OSError("connection reset")
            return super().copy(path1, path2, **kwargs)

    class Broken(Storage):
        def resolve(self, uri):
            loc = super().resolve(uri)
            return type(loc)(loc.uri, FailsOnWeights(), loc.path)

    commit_dir(storage, str(source), str(tmp_path / "broken"))
    with pytest.raises(OSError, match="connection reset"):
        commit_dir(Broken(), str(source), str(tmp_path / "broken"))
    assert (tmp_path / "broken" / "config.json").exists() and not is_committed(storage, str(tmp_path / "broken"))


def test_the_best_model_has_a_complete_copy_whenever_a_replacement_is_interrupted(tmp_path):
    from pipelines.checkpoints import best_model, save_best
    from pipelines.storage import Storage, commit_dir, remove

    storage, best = Storage(), str(tmp_path / "best")
    assert best_model(storage, best) is None
    first, second = tmp_path / "first", tmp_path / "second"
    for d, step in ((first, 1), (second, 2)):
        d.mkdir()
        (d / "eval_metrics.json").write_text(json.dumps({"step": step}))
    save_best(storage, str(first), best)
    assert best_model(storage, best) == best and not (tmp_path / "best.next").exists()
    # interrupted after best.next was committed and before best/ was rewritten: best.next is the newer copy
    commit_dir(storage, str(second), best + ".next")
    remove(storage, best + "/_COMPLETE.json")
    assert best_model(storage, best) == best + ".next"
    save_best(storage, str(second), best)
    assert json.loads((tmp_path / "best" / "eval_metrics.json").read_text()) == {"step": 2}
    assert best_model(storage, best) == best
