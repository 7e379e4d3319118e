"""`rayformers tune` end to end: four trials of a tiny model, two at a time, whose learning rates differ by 100x;
ASHA stops the ones that trail, the best config and model are written, every trial is an MLflow run in the
default local store (`track.mlflow: true`), and the same search again restores it instead of training again.

The search runs as a user runs it, `rayformers tune` in a process of its own: its Ray is sized for two trials
at once (the session's 4-CPU Ray holds one; two there would starve each other's preprocessing actors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
RAYFORMERS = str(Path(sys.executable).with_name("rayformers"))
GOOD, BAD = (1e-2, 2e-2), (1.0, 2.0)  # lr 0.1 once ended best at step 8: 8 steps leave every lr near chance


def tune(config: Path) -> str:
    """What `rayformers tune` printed, stdout and stderr."""
    done = subprocess.run([RAYFORMERS, "tune", str(config)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_asha_stops_the_trials_with_100x_the_learning_rate_and_a_rerun_restores_the_search(
    ray_session, tmp_path, capsys
):
    from mlflow import MlflowClient

    from config import load_config
    from jobs.catalog import write_demo_data
    from pipelines.tune import tune_search

    data, out = tmp_path / "data", tmp_path / "search"
    write_demo_data("text-classification", str(data), rows=160, seed=0)
    config = tmp_path / "tune.yaml"
    cfg = dict(
        task="text-classification",
        model={"init": {"architecture": "bert", "size": "tiny"}, "max_length": 64, "tokenizer": {"vocab_size": 800}},
        data={"train": str(data / "train"), "eval": str(data / "eval")},
        train={"output": str(out), "max_steps": 8, "eval_every": 4, "log_every": 4, "batch_size": 32},
        track={"mlflow": True},
        # the grid runs in order, two at a time: the good pair reaches ASHA's first rung (step 4) before the bad
        # pair, whose lr of 1 throws AdamW's tiny BERT off at once. Rungs at 4 and 12 (reduction factor 3):
        # the last eval (step 8) is no rung, so a trial that got past step 4 ends with its model written.
        tune={
            "space": {"train.lr": {"grid": [*GOOD, *BAD]}},
            "num_samples": 1,
            "max_concurrent_trials": 2,
            "metric": "eval_loss",
            "mode": "min",
            "grace_steps": 4,
            "reduction_factor": 3,
        },
    )
    config.write_text(yaml.safe_dump(cfg))
    printed = tune(config)
    summary = json.loads((out / "tune.json").read_text())
    assert "tune.max_concurrent_trials" not in printed  # its Ray holds two trials at once
    # only train.lr is searched: the data is preprocessed once, and every trial has its own prepared/ for a resume
    assert f"preprocessing the data once for all trials (in {out}/prepared)" in printed
    assert f"best config: {out}/best.yaml" in printed
    # the console: our header and a line per trial event, not the lines of the trials' workers or Tune's tables
    assert printed.startswith("rayformers tune: text-classification | model bert tiny"), printed[:500]
    internals = ("pid=", "core_worker", "Configuration for experiment", "View detailed results", "Traceback")
    assert not [line for line in printed.splitlines() if any(i in line for i in internals)], printed[-3000:]
    trials = {t["params"]["train.lr"]: t for t in summary["trials"]}
    assert sorted(trials) == sorted([*GOOD, *BAD]), summary
    assert all(os.path.exists(os.path.join(t["folder"], "prepared", "_COMPLETE.json")) for t in trials.values())
    for lr in BAD:  # stopped at the first rung, long before the 8 steps of a whole run
        assert trials[lr]["status"] == "stopped early" and trials[lr]["steps"] == 4, summary
        assert not os.path.exists(os.path.join(trials[lr]["folder"], "model"))
        name = f"trial {trials[lr]['trial']} (train.lr={lr:g})"
        assert f"{name}: started" in printed and f"{name}: stopped early at step 4" in printed, printed[-3000:]
        assert f"{name}: step 4 eval_loss=" in printed
    best = summary["best"]
    assert best["params"]["train.lr"] in GOOD and best["status"] == "done" and best["steps"] == 8, summary
    assert best["eval_loss"] < min(trials[lr]["eval_loss"] for lr in BAD)
    assert f"trial {best['trial']} (train.lr={best['params']['train.lr']:g}): finished at step 8" in printed
    best_cfg = load_config(str(out / "best.yaml"))  # a config `rayformers train` takes as it is
    assert best_cfg.train.lr == best["params"]["train.lr"] and best_cfg.train.output == best["folder"]
    assert (out / "best" / "model.safetensors").exists() and (out / "best" / "_COMPLETE.json").exists()

    # track.mlflow: true is one SQLite store under train.output (the search's output), one run per trial
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name("text-classification").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert sorted(runs) == sorted(t["trial"] for t in summary["trials"])
    for trial in summary["trials"]:
        run = runs[trial["trial"]]
        assert float(run.data.params["train.lr"]) == trial["params"]["train.lr"]
        assert run.data.params["train.output"] == trial["folder"]
        history = {k: sorted(m.step for m in client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}
        if trial["status"] == "done":
            assert history["eval/loss"] == [4, 8] and history["train/loss"] == [4, 8], (trial, history)
        else:  # ASHA's stop reaches a trial after its step-4 report, and a tiny run's last 4 steps take under a
            # second: it may have logged step 8 too (seen once), never written a model (checked above)
            assert set(history.get("eval/loss", [])) <= {4, 8}, (trial, history)
        assert run.info.status == ("FINISHED" if trial["status"] == "done" else "KILLED"), trial
    assert runs[best["trial"]].data.tags["rayformers.model"] == f"{best['folder']}/model"

    finished = os.path.getmtime(os.path.join(best["folder"], "metrics.json"))
    # the same search again, in the session's Ray (a Ray start cheaper): Tune's experiment restore, nothing to run
    again = tune_search(load_config(str(config)))
    assert "resuming the search" in capsys.readouterr().out
    assert {t["trial"]: t["status"] for t in again["trials"]} == {t["trial"]: t["status"] for t in summary["trials"]}
    assert os.path.getmtime(os.path.join(best["folder"], "metrics.json")) == finished  # not trained again
    assert yaml.safe_load((out / "best.yaml").read_text())["train"]["lr"] == best["params"]["train.lr"]
    # the same MLflow runs, none added and none reopened
    after = {r.info.run_name: (r.info.run_id, r.info.status) for r in client.search_runs([experiment])}
    assert after == {name: (r.info.run_id, r.info.status) for name, r in runs.items()}
