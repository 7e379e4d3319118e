"""`rayformers tune` end to end: two trials of a tiny model whose learning rates differ by 100x, ASHA stopping the
one that trails, the best config and model written, and a second run that restores the search instead of
training again."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.conftest import job_config

pytestmark = pytest.mark.e2e


def test_asha_stops_the_trailing_trial_and_a_rerun_restores_the_search(ray_session, tmp_path):
    from config import load_config
    from jobs.catalog import write_demo_data
    from pipelines.tune import tune_search

    data, out = tmp_path / "data", tmp_path / "search"
    write_demo_data("text-classification", str(data), rows=240, seed=0)
    cfg = job_config(
        data={"train": str(data / "train"), "eval": str(data / "eval")},
        train={"output": str(out), "max_steps": 12, "eval_every": 4, "log_every": 4},
        # lr 0.1 throws AdamW's tiny BERT off at once: its eval loss trails from the first rung (step 4)
        tune={
            "space": {"train.lr": {"grid": [1e-3, 1e-1]}},
            "num_samples": 1,
            "metric": "eval_loss",
            "mode": "min",
            "grace_steps": 4,
        },
    )
    summary = tune_search(cfg)
    trials = {t["params"]["train.lr"]: t for t in summary["trials"]}
    good, bad = trials[1e-3], trials[1e-1]
    assert good["status"] == "done" and good["steps"] == 12, summary
    assert bad["status"] == "stopped early" and bad["steps"] < 12, summary
    assert summary["best"]["trial"] == good["trial"]
    best = load_config(str(out / "best.yaml"))  # a config `rayformers train` takes as it is
    assert best.train.lr == 1e-3 and best.train.output == good["folder"]
    assert (out / "best" / "model.safetensors").exists() and (out / "best" / "_COMPLETE.json").exists()

    finished = os.path.getmtime(os.path.join(good["folder"], "metrics.json"))
    again = tune_search(cfg)  # Tune's experiment restore: nothing left to run
    assert {t["trial"]: t["status"] for t in again["trials"]} == {t["trial"]: t["status"] for t in summary["trials"]}
    assert os.path.getmtime(os.path.join(good["folder"], "metrics.json")) == finished  # not trained again
    assert yaml.safe_load((out / "best.yaml").read_text())["train"]["lr"] == 1e-3
