"""Tracking (`track`) without Ray: what rank 0's Tracker and the driver leave in MLflow and TensorBoard, a resumed
run continuing its MLflow run, and a tracking server that does not answer."""

from __future__ import annotations

import json
import time

import pytest

from errors import UserError
from pipelines.storage import Storage
from pipelines.tracking import (
    TRACKING,
    Tracker,
    check_tracking,
    end_run,
    finish_train,
    flat_params,
    mlflow_uri,
    track_predict,
)
from tests.conftest import free_port, job_config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module, its tables created here (seconds, more on a busy machine)."""
    folder = str(tmp_path_factory.mktemp("mlflow"))
    client(job_config(track={"mlflow": folder})).search_experiments()
    return folder


def tracked(output, store, **track):
    return job_config(train={"output": str(output)}, track={"mlflow": store, "tensorboard": True, **track})


def client(cfg):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_uri(cfg))


def scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, round(e.value, 4)) for e in events.Scalars(tag)]


def test_track_settings_that_cannot_work_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="track.mlflow: true keeps runs under train.output, which is not a local"):
        check_tracking(job_config(train={"output": "s3://bucket/run"}, track={"mlflow": True}))
    with pytest.raises(UserError, match="track.mlflow: true keeps runs under train.output, which is not set"):
        check_tracking(job_config(track={"mlflow": True}))
    with pytest.raises(UserError, match="track.mlflow: expected true, false, a folder or a tracking URI"):
        job_config(track={"mlflow": " "})
    assert mlflow_uri(job_config(train={"output": str(tmp_path)}, track={"mlflow": True})) == (
        f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    )
    assert mlflow_uri(job_config(track={"mlflow": "http://127.0.0.1:5000"})) == "http://127.0.0.1:5000"
    assert mlflow_uri(job_config()) is None


def test_a_search_keeps_its_trials_runs_in_one_store_under_its_output_and_refuses_one_in_object_storage(tmp_path):
    from pipelines.tune import trial_config, tune_search

    search = {"space": {"train.lr": {"grid": [1e-3, 1e-1]}}, "output": str(tmp_path / "search")}
    cfg = job_config(data={"train": "d/train", "eval": "d/eval"}, track={"mlflow": True}, tune=search)
    trial = trial_config(cfg, {"train.lr": 1e-3}, str(tmp_path / "search/trials/a"), "a")
    assert mlflow_uri(trial) == f"sqlite:///{tmp_path}/search/mlflow/mlflow.db"  # no train.output needed

    in_s3 = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"output": "s3://bucket/search"})})
    with pytest.raises(UserError) as refused:  # before Ray starts or any trial runs
        tune_search(in_s3)
    assert str(refused.value) == (
        "track.mlflow: true keeps the trials' runs under tune.output (default: train.output), which is not a "
        "local folder (s3://bucket/search); give track.mlflow a tracking server URI or a local folder"
    )


def test_params_are_the_flattened_config_without_secrets():
    params = flat_params(job_config(train={"lr": 0.002}, serve={"api_key": "s3cret"}))
    assert params["train.lr"] == "0.002" and params["task"] == "text-classification"
    assert params["model.init.architecture"] == "bert"
    assert not any("api_key" in key for key in params) and "s3cret" not in json.dumps(params)


def test_a_training_run_is_one_mlflow_run_that_a_resume_continues_without_repeating_steps(tmp_path, store):
    out = tmp_path / "run"
    cfg = tracked(out, store, experiment="unit-resume")
    storage = Storage()
    first = Tracker(cfg, storage, str(out), None)
    for step in (10, 20, 30):  # checkpoint at 20; the worker dies after logging step 30
        first.log("train", step, {"loss": 1.0 / step, "lr": 1e-3, "samples_per_s": 50.0, "epoch": 0})
    first.log("eval", 20, {"eval_loss": 0.5, "eval_accuracy": 0.7})
    first.close()
    run_id = json.loads((out / TRACKING).read_text())["mlflow_run_id"]

    again = Tracker(cfg, storage, str(out), 20)  # resumed from the checkpoint of step 20
    for step in (30, 40):
        again.log("train", step, {"loss": 2.0 / step, "lr": 1e-3, "samples_per_s": 60.0, "epoch": 1})
    again.log("eval", 40, {"eval_loss": 0.3, "eval_accuracy": 0.9})
    again.close()
    summary = {"final": {"step": 40, "eval_accuracy": 0.9}, "best": {"eval_accuracy": 0.9, "step": 40}, "samples": 640}
    (out / "metrics.json").write_text(json.dumps(summary))
    finish_train(cfg, storage, summary)

    c = client(cfg)
    assert json.loads((out / TRACKING).read_text())["mlflow_run_id"] == run_id
    runs = c.search_runs([c.get_experiment_by_name("unit-resume").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one MLflow run for the training run
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.lr"] == "0.001" and run.data.tags["rayformers.task"] == "text-classification"
    assert run.data.tags["rayformers.model"] == f"{out}/model"
    loss = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "train/loss"))
    assert [s for s, _ in loss] == [10, 20, 30, 40]  # step 30 once: the first attempt's
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "eval/accuracy")] == [(20, 0.7), (40, 0.9)]
    assert run.data.metrics["best/accuracy"] == 0.9 and run.data.metrics["samples"] == 640
    assert "metrics.json" in [a.path for a in c.list_artifacts(run_id)]

    # TensorBoard: the same scalars; the resumed writer purges the dead attempt's step 30
    assert scalars(out / "tensorboard", "train/loss") == [(10, 0.1), (20, 0.05), (30, round(2 / 30, 4)), (40, 0.05)]
    assert scalars(out / "tensorboard", "eval/accuracy") == [(20, 0.7), (40, 0.9)]


def test_predict_logs_its_summary_to_the_training_runs_experiment(tmp_path, store):
    out = tmp_path / "run"
    cfg = tracked(out, store, experiment="unit-predict")
    (out).mkdir()
    (out / TRACKING).write_text(json.dumps({"mlflow_uri": mlflow_uri(cfg), "mlflow_run_id": "abc"}))
    cfg.predict.output = str(tmp_path / "scores")
    track_predict(cfg, Storage(), {"rows": 100, "errors": 2, "rows_per_s": 50.5}, f"{out}/model")
    c = client(cfg)
    [run] = c.search_runs([c.get_experiment_by_name("unit-predict").experiment_id])
    assert run.data.metrics == {"predict/rows": 100, "predict/errors": 2, "predict/rows_per_s": 50.5}
    assert run.data.tags["rayformers.verb"] == "predict" and run.data.tags["rayformers.train_run_id"] == "abc"
    assert run.info.run_name == "scores"


def test_a_tracking_server_that_does_not_answer_is_warned_about_once_and_the_run_goes_on(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = job_config(train={"output": str(out)}, track={"mlflow": f"http://127.0.0.1:{free_port()}"})
    started = time.perf_counter()
    tracker = Tracker(cfg, Storage(), str(out), None)
    for step in range(1, 501):
        tracker.log("train", step, {"loss": 1.0})
    logged = time.perf_counter() - started
    tracker.close()
    closed = time.perf_counter() - started
    finish_train(cfg, Storage(), {"final": {"step": 500}})
    track_predict(cfg, Storage(), {"rows": 1}, "model")
    printed = capsys.readouterr().out
    print(f"500 log calls {logged:.3f}s, closed after {closed:.2f}s")
    assert not tracker.thread.is_alive()  # it gave up at once, not after MLflow's retries
    assert closed < 10  # a hang guard: MLflow's default retries take minutes
    warnings = [line for line in printed.splitlines() if line.startswith("warning: track.mlflow")]
    assert len(warnings) == 2 and "the run goes on" in warnings[0]  # train once, predict once
    assert not (out / TRACKING).exists()


def test_a_run_that_will_not_finish_is_closed_as_killed(tmp_path, store):
    out = tmp_path / "trial"
    cfg = tracked(out, store, experiment="unit-killed")
    tracker = Tracker(cfg, Storage(), str(out), None)
    tracker.log("eval", 4, {"eval_loss": 3.9})
    tracker.close()
    end_run(cfg, Storage(), str(out))  # what `rayformers tune` does for a trial ASHA stopped
    run_id = json.loads((out / TRACKING).read_text())["mlflow_run_id"]
    assert client(cfg).get_run(run_id).info.status == "KILLED"
