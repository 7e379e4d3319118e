"""Tracking end to end: a tiny training run on Ray logs to a real `mlflow server` on 127.0.0.1 and to
TensorBoard, is stopped after its first checkpoint, and its resume continues the same MLflow run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, job_config, wait_for_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` in a process of its own (with its own process group, ended as a whole). It takes
    ~30 s to answer on 2 busy cores, so this yields at once and the test waits for the port only when it
    needs it: the server starts while Ray and the data are set up."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
        + ["--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db"]
        + ["--artifacts-destination", str(folder / "artifacts")],
        stdout=open(folder / "server.log", "w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,
    )
    yield {"port": port, "uri": f"http://127.0.0.1:{port}", "log": folder / "server.log"}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def test_a_tracked_run_and_its_resume_are_one_mlflow_run_with_step_indexed_metrics(
    mlflow_server, ray_session, tmp_path
):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from jobs.catalog import write_demo_data
    from pipelines.train import train

    data, out = tmp_path / "data", tmp_path / "run"
    write_demo_data("text-classification", str(data), rows=240, seed=0)  # small: Ray Data's passes dominate
    cfg = job_config(
        data={"train": str(data / "train"), "eval": str(data / "eval")},
        train={"output": str(out), "max_steps": 8, "eval_every": 4, "log_every": 2, "stop_after_steps": 4},
        track={"mlflow": mlflow_server["uri"], "tensorboard": True, "experiment": "e2e-tracking"},
    )
    wait_for_port(mlflow_server["port"], timeout=120)
    train(cfg)  # stopped after its first checkpoint, as a lost worker would leave it
    first = json.loads((out / "tracking.json").read_text())["mlflow_run_id"]
    summary = train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"stop_after_steps": None})}))
    assert summary["resumed_at_steps"] == [4], summary

    client = MlflowClient(tracking_uri=mlflow_server["uri"])
    [run] = client.search_runs([client.get_experiment_by_name("e2e-tracking").experiment_id])
    assert run.info.run_id == first == json.loads((out / "tracking.json").read_text())["mlflow_run_id"]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.max_steps"] == "8" and run.data.params["model.init.architecture"] == "bert"
    tags = run.data.tags
    assert tags["rayformers.task"] == "text-classification" and tags["rayformers.data.train"] == str(data / "train")
    assert tags["rayformers.model"] == f"{out}/model"
    history = {key: [m.step for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}
    assert sorted(history["train/loss"]) == [2, 4, 6, 8]  # each step once, across the resume
    assert sorted(history["train/lr"]) == [2, 4, 6, 8] and sorted(history["train/samples_per_s"]) == [2, 4, 6, 8]
    assert sorted(history["eval/accuracy"]) == [4, 8] and sorted(history["eval/loss"]) == [4, 8]
    assert run.data.metrics["best/accuracy"] == summary["best"]["eval_accuracy"]
    assert run.data.metrics["throughput_samples_per_s"] == pytest.approx(summary["throughput_samples_per_s"])
    assert {"metrics.json", "report.html"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert [e.step for e in events.Scalars("eval/accuracy")] == [4, 8]
    assert events.Scalars("eval/accuracy")[-1].value == pytest.approx(summary["final"]["eval_accuracy"])
