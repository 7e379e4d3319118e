"""A re-run of `rayformers train` resumes only the run it started: a changed task, model, labels, data
file list or batch math is refused in one line naming the key (no Ray needed to see it)."""

from __future__ import annotations

import json

import pytest

from errors import UserError
from pipelines.storage import Storage, commit_dir, is_committed
from pipelines.train import check_same_run, run_identity, start_fresh
from tests.conftest import job_config


def saved_run(tmp_path, cfg, files):
    prepared = tmp_path / "staging"
    prepared.mkdir()
    (prepared / "prepared.json").write_text(
        json.dumps({"labels": ["a", "b"], "rows": 10, "run": run_identity(cfg, files)})
    )
    commit_dir(Storage(), str(prepared), str(tmp_path / "out" / "prepared"))


def files(tmp_path, *names):
    from pipelines.readers import data_files

    (tmp_path / "data").mkdir(exist_ok=True)
    for name in names:
        (tmp_path / "data" / name).write_text('{"text": "x", "label": "a"}\n')
    return data_files(Storage(), str(tmp_path / "data"), "auto", None)


@pytest.mark.parametrize(
    "change, line",
    [
        ({"train": {"batch_size": 8}}, "train.batch_size: 32 before, 8 now"),
        ({"train": {"grad_accum": 2}}, "train.grad_accum: 1 before, 2 now"),
        ({"model": {"max_length": 128}}, "model.max_length: 64 before, 128 now"),
        ({"model": {"init": {"architecture": "distilbert", "size": "tiny"}}}, "model.init: {'architecture': 'bert'"),
        ({"data": {"labels": ["b", "a"]}}, "data.labels: ['a', 'b'] before, ['b', 'a'] now"),
    ],
)
def test_a_changed_setting_is_named(tmp_path, change, line):
    data = files(tmp_path, "a.jsonl")
    saved_run(tmp_path, job_config(), data)
    same = job_config(train={"epochs": 10, "lr": 1e-4, "num_workers": 2})  # neither changes what a step means
    check_same_run(same, Storage(), str(tmp_path / "out"), run_identity(same, data))
    changed = job_config(**change)
    with pytest.raises(UserError) as refused:
        check_same_run(changed, Storage(), str(tmp_path / "out"), run_identity(changed, data))
    assert str(refused.value).startswith(f"train.output: {tmp_path}/out holds another run ({line}")
    assert str(refused.value).endswith("or set train.fresh=true to start over") and "\n" not in str(refused.value)


def test_a_changed_file_list_is_named_and_a_fresh_start_removes_only_what_training_wrote(tmp_path, capsys):
    cfg = job_config()
    saved_run(tmp_path, cfg, files(tmp_path, "a.jsonl"))
    with pytest.raises(UserError, match=r"\(data.train: the file list changed \(1 files before, 2 now\)\)"):
        check_same_run(cfg, Storage(), str(tmp_path / "out"), run_identity(cfg, files(tmp_path, "b.jsonl")))
    (tmp_path / "out" / "notes.txt").write_text("the user's")
    start_fresh(Storage(), str(tmp_path / "out"))
    assert not is_committed(Storage(), str(tmp_path / "out" / "prepared"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]
    assert capsys.readouterr().out.strip() == f"train.fresh: removed prepared from {tmp_path}/out"


@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 20), (5, 5), (0, 1)])
def test_the_learning_rate_schedule_is_transformers_linear_warmup_step_for_step(warmup, total):
    import torch
    from transformers import get_linear_schedule_with_warmup

    from pipelines.train_loop import linear_schedule_with_warmup

    def rates(make) -> list[float]:
        optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
        schedule = make(optimizer, warmup, total)
        out = []
        for _ in range(total + 2):
            out.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return out

    ours = rates(linear_schedule_with_warmup)
    assert ours == rates(get_linear_schedule_with_warmup) and max(ours) > 0
