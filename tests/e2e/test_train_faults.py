"""Training under faults, on a real local Ray and the loopback S3 server, killing real processes: a
train worker dies mid-run, the driver is SIGKILLed mid-run, a run resumes with another number of
workers, an upload fails while model/ is written, and a resume meets a changed config or data. Each run
is a tiny BERT on a few hundred rows; `train.log_rows` shows every row trained exactly once per epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml

from tests.conftest import REPO, job_config, wait_until
from tests.e2e.s3_proxy import FlakyS3Proxy

pytestmark = pytest.mark.e2e


def write_rows(uri: str, rows: list[dict]) -> None:
    with s3fs.S3FileSystem().open(uri.removeprefix("s3://"), "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)


@pytest.fixture
def small_data(bucket) -> str:
    """512 learnable training rows plus 16 with an empty text (error rows), and 100 eval rows."""
    from models import get_task

    task = get_task("text-classification")
    bad = [{"id": f"bad-{i}", "text": "", "label": "sports"} for i in range(16)]
    write_rows(f"s3://{bucket}/data/train/part-0.parquet", task.demo_data(512, 0) + bad)
    write_rows(f"s3://{bucket}/data/eval/part-0.parquet", task.demo_data(100, 1))
    return f"s3://{bucket}/data"


def checkpoint_registered(output: str, step: int) -> bool:
    """Whether Ray Train has registered the checkpoint of `step` (a restart resumes from it): its snapshot
    names it. The checkpoint's files alone are not enough; a kill before registration restarts from the one before."""
    fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
    try:
        snapshot = fs.cat(f"{output.removeprefix('s3://')}/checkpoints/checkpoint_manager_snapshot.json")
    except FileNotFoundError:
        return False
    return f"step-{step:08d}".encode() in snapshot


def loads_in_a_pipeline(model_uri: str) -> list[str]:
    from transformers import pipeline

    from pipelines.storage import Storage

    local = Storage().local_copy(model_uri)
    return [
        p["label"] for p in pipeline("text-classification", model=local)(["goal match referee", "pasta garlic oven"])
    ]


def trained_rows(output: str) -> dict[int, Counter]:
    """From train.log_rows: how often each (file, row) was trained on, per epoch."""
    fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
    epochs: dict[int, Counter] = {}
    for path in fs.ls(f"{output.removeprefix('s3://')}/rows"):
        for line in fs.cat(path).decode().splitlines():
            epoch, source, row = line.split("\t")
            epochs.setdefault(int(epoch), Counter())[(source.rsplit("/", 1)[-1], int(row))] += 1
    return epochs


def assert_each_row_once_per_epoch(output: str, rows: set, epochs: int) -> None:
    seen = trained_rows(output)
    assert sorted(seen) == list(range(epochs)), sorted(seen)
    for epoch, counts in seen.items():
        assert set(counts) == rows and set(counts.values()) == {1}, (
            epoch,
            len(rows - set(counts)),
            [k for k, n in counts.items() if n > 1][:5],
        )


SMALL_ROWS = {("part-0.parquet", i) for i in range(512)}  # the 16 empty texts (rows 512-527) are never trained


def test_a_run_resumed_on_more_workers_survives_a_killed_worker_and_trains_each_row_once_per_epoch(
    ray_session, small_data, bucket, s3_endpoint
):
    import ray
    from ray.util.state import list_actors

    from pipelines.train import train

    output = f"s3://{bucket}/elastic"
    sections = dict(
        data={"train": f"{small_data}/train"},
        train={
            "output": output,
            "num_workers": 1,
            "batch_size": 16,
            "epochs": 2,
            "eval_every": 8,
            "log_rows": True,
            "stop_after_steps": 11,
        },
    )
    first = train(job_config(**sections))
    assert first["final"]["step"] == 11  # a third of the first epoch, on one worker
    # the same run on two workers: the first epoch's other 21 batches (its last step has one batch, which the
    # other worker trains with weight 0), then the second epoch's 32; one worker is killed on the way.
    # The steps after 16 can take less time than finding a worker to kill: the proxy holds the upload of step
    # 24's checkpoint until the kill (if the run gets there first), so the kill lands mid-run on any machine.
    proxy = FlakyS3Proxy(s3_endpoint)
    proxy.hold = lambda method, path: f"/{bucket}/elastic/checkpoints/step-00000024/" in path
    sections["storage"] = {"endpoint_url": proxy.url}
    sections["train"].update(num_workers=2, stop_after_steps=None)
    killed = []

    def kill_a_worker_after_a_checkpoint():
        try:
            wait_until(lambda: checkpoint_registered(output, 16), 900, "the checkpoint at step 16")
            # this session's Ray by its address: other Ray instances on the machine have train workers too
            workers = list_actors(
                address=ray.get_runtime_context().gcs_address,
                detail=True,
                filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
            )
            os.kill(workers[-1].pid, signal.SIGKILL)
            killed.append(workers[-1].pid)
        finally:
            proxy.hold = None
            proxy.release.set()

    killer = threading.Thread(target=kill_a_worker_after_a_checkpoint, daemon=True)
    killer.start()
    try:
        second = train(job_config(**sections))
    finally:
        killer.join(5)
        proxy.close()
    assert killed, "no worker was killed"
    resumed = second["resumed_at_steps"]
    assert len(resumed) == 2 and resumed[0] == 11 and resumed[1] in (16, 24), second
    assert second["final"]["epoch"] == 2 and second["final"]["step"] == 11 + 11 + 16, second
    metrics = json.loads(s3fs.S3FileSystem().cat(f"{bucket}/elastic/metrics.json"))
    assert metrics["resumed_at_steps"] == resumed  # the restarts are on record
    # rows trained before the kill and lost with it are not counted twice; the 16 empty texts once
    assert metrics["samples"] == 2 * 512 and metrics["skipped_rows"] == 16, metrics
    assert metrics["throughput_samples_per_s"] > 0
    assert_each_row_once_per_epoch(output, SMALL_ROWS, 2)
    steps = sorted(
        p.rsplit("-", 1)[-1] for p in s3fs.S3FileSystem().ls(f"{bucket}/elastic/checkpoints") if "/step-" in p
    )
    assert steps == ["00000032", "00000038"]  # keep_checkpoints=2: the newest two
    assert set(loads_in_a_pipeline(f"{output}/model")) <= {"sports", "tech", "food", "travel"}


def write_job(path, data: str, output: str) -> str:
    job = {
        "task": "text-classification",
        "model": {"init": {"architecture": "bert", "size": "tiny"}, "max_length": 64, "tokenizer": {"vocab_size": 800}},
        "data": {"train": f"{data}/train", "eval": f"{data}/eval"},
        "train": {
            "output": output,
            "num_workers": 2,
            "batch_size": 16,
            "epochs": 2,
            "eval_every": 8,
            "lr": 1e-3,
            "log_rows": True,
        },
        "ray": {"num_cpus": 4},
    }
    path.write_text(yaml.safe_dump(job))
    return str(path)


def rayformers(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_rerunning_the_command_after_the_driver_is_killed_completes_the_run(
    ray_session, small_data, bucket, tmp_path, s3_endpoint
):
    import ray

    output = f"s3://{bucket}/killed-driver"
    job = write_job(tmp_path / "job.yaml", small_data, output)
    # the driver joins this session's Ray (as a driver on a cluster would): its job's actors die with it
    address = f"ray.address={ray.get_runtime_context().gcs_address}"
    # The 24 steps after the checkpoint at 8 can take less time than noticing it: the first run's S3 traffic goes
    # through a proxy that holds the upload of step 16's checkpoint, so the driver is killed mid-run on any
    # machine. Killed, its held uploads are closed unanswered: what its dying workers wrote must not land late.
    proxy = FlakyS3Proxy(s3_endpoint)
    proxy.hold = lambda method, path: f"/{bucket}/killed-driver/checkpoints/step-00000016/" in path
    verbose_log = open(tmp_path / "first-run.log", "w")
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "train", job, address, f"storage.endpoint_url={proxy.url}", "-v"],
        cwd=REPO,
        stdout=verbose_log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: checkpoint_registered(output, 8) or driver.poll() is not None, 900, "the checkpoint at step 8"
        )
        assert driver.poll() is None, "the first run ended before it could be killed"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
        proxy.drop_held = True
        proxy.release.set()
    # Ray notices the dead driver and ends its Train workers; the re-run (straight to the loopback S3 server, as
    # the job file says nothing of storage) waits for their CPUs
    try:
        again = rayformers("train", job, address)
    finally:
        proxy.close()
    assert again.returncode == 0, again.stderr[-3000:]
    # the console: Ray's own lines only with -v; our progress lines (with an ETA) and the summary always
    internals = (
        "Reporting training result",
        "Starting execution of Dataset",
        "Checkpoint successfully created",
        "Writing model shards",
        "core_worker.cc",  # Ray's C++ core, on every Ray Data and Train actor (written to fd 2 by the driver too)
        "(RayTrainWorker pid=",  # our own lines come without Ray's prefix
    )
    assert "Reporting training result" in (tmp_path / "first-run.log").read_text()
    console = again.stdout + again.stderr
    assert not [line for line in console.splitlines() if any(i in line for i in internals)], console[-3000:]
    assert "step 30/" in console and " ETA " in console and "metrics: {" in console, console[-3000:]
    # the header, then the log file and the report, each named once; Ray Data's plans went to the log file
    assert console.startswith("rayformers train: text-classification | model bert tiny"), console[:500]
    fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True)
    assert console.count(f"report: {output}/report.html") == 1 and console.count("log: s3://") == 1, console[-3000:]
    logs = fs.ls(f"{bucket}/killed-driver/logs")
    assert len(logs) == 1 and "Starting execution of Dataset" in fs.cat(logs[0]).decode()  # the re-run's (-v: none)
    # the report shows the whole run: history.json kept the first attempt's steps up to the checkpoint resumed
    history = json.loads(fs.cat(f"{bucket}/killed-driver/history.json"))["records"]
    resumed = [r["step"] for r in history if r["kind"] == "resume"]
    logged = [r["step"] for r in history if r["kind"] == "train"]
    # every 10th step once, whichever attempt logged it (the steps after the checkpoint were trained again)
    assert len(resumed) == 1 and logged == [10, 20, 30] and "eval" in {r["kind"] for r in history}, history
    report = fs.cat(f"{bucket}/killed-driver/report.html").decode()
    assert f"resumed at steps [{resumed[0]}]" in report and report.count("data:image/png;base64,") >= 6
    metrics = json.loads(s3fs.S3FileSystem().cat(f"{bucket}/killed-driver/metrics.json"))
    assert (
        metrics["final"]["step"] == 32 and metrics["resumed_at_steps"] and metrics["resumed_at_steps"][0] >= 8
    ), metrics
    assert metrics["skipped_rows"] == 16, metrics  # the 16 empty texts, once, although both workers read them
    assert metrics["samples"] == 2 * 512, metrics
    assert_each_row_once_per_epoch(output, SMALL_ROWS, 2)
    assert set(loads_in_a_pipeline(f"{output}/model")) <= {"sports", "tech", "food", "travel"}


def test_a_resume_with_a_changed_config_or_data_is_refused_in_one_line(ray_session, small_data, bucket, tmp_path):
    from pipelines.train import train

    output = f"s3://{bucket}/changed"
    sections = dict(data={"train": f"{small_data}/train"}, train={"output": output, "max_steps": 2, "eval_every": 2})
    train(job_config(**sections))
    job = write_job(tmp_path / "job.yaml", small_data, output)
    # write_job's batch size (16) differs from job_config's (32): refused before Ray starts
    refused = rayformers("train", job, "data.eval=null", "train.num_workers=1", timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"rayformers: error: train.output: {output} holds another run (train.batch_size: 32 before, "
        "16 now); resume with the same settings, choose another train.output, or set train.fresh=true to start over"
    )
    write_rows(f"{small_data}/train/part-1.parquet", [{"id": "new", "text": "goal", "label": "sports"}])
    refused = rayformers("train", job, "data.eval=null", "train.batch_size=32", timeout=120)
    assert (
        refused.returncode == 2 and "(data.train: the file list changed (1 files before, 2 now))" in refused.stderr
    ), refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_failed_upload_while_writing_the_model_leaves_no_model_and_the_rerun_writes_one(
    ray_session, small_data, bucket, s3_endpoint
):
    from errors import UserError
    from pipelines.storage import Storage
    from pipelines.train import train

    proxy = FlakyS3Proxy(s3_endpoint)
    try:
        output = f"s3://{bucket}/flaky"
        cfg = job_config(
            storage={"endpoint_url": proxy.url},
            data={"train": f"{small_data}/train", "eval": f"{small_data}/eval"},
            # Ray Data's streaming split (train.data_order=streaming) is exercised here
            train={"output": output, "max_steps": 4, "eval_every": 2, "data_order": "streaming"},
        )
        proxy.fail_suffix = f"/{bucket}/flaky/model/model.safetensors"
        with pytest.raises(Exception):
            train(cfg)
        assert proxy.refused >= 1
        fs = s3fs.S3FileSystem()
        # the upload stopped midway: model/ holds the config but no marker, so nothing reads it as a model
        assert fs.exists(f"{bucket}/flaky/model/config.json") and not fs.exists(f"{bucket}/flaky/model/_COMPLETE.json")
        with pytest.raises(UserError, match="did not finish writing its model"):  # predict and serve refuse it
            Storage().model_path(f"{output}/model")
        proxy.fail_suffix = None
        summary = train(cfg)
        assert summary["best"]["step"] in (2, 4)
        assert fs.exists(f"{bucket}/flaky/model/_COMPLETE.json")
        assert set(loads_in_a_pipeline(f"{output}/model")) <= {"sports", "tech", "food", "travel"}
    finally:
        proxy.close()
