"""`rayformers predict` under faults, on a real local Ray and the loopback S3 server: a killed
predictor actor, a killed driver and a re-run, folders it must not touch, and corpora of bad files.
Processes are killed by pid; nothing is mocked. The model is a tiny untrained BERT (what it predicts
does not matter here, only that every input row gets exactly one output row)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from tests.conftest import REPO, job_config, wait_until
from tests.e2e.s3_proxy import FlakyS3Proxy

pytestmark = pytest.mark.e2e

FILES, ROWS_PER_FILE = 12, 25
WORDS = "goal match striker laptop server chip garlic soup recipe hotel beach flight".split()


@pytest.fixture(scope="module")
def tiny_model(s3_endpoint, session_bucket) -> str:
    """An untrained tiny BERT with a tokenizer trained on demo text, in S3."""
    import tempfile

    from models import get_task
    from pipelines.storage import Storage

    task = get_task("text-classification")
    cfg = job_config()
    processor = task.build_processor(cfg.model, None, iter(task.demo_data(200, 0)))
    model = task.build_model(cfg.model, None, ["food", "sports", "tech", "travel"], processor)
    uri = f"s3://{session_bucket}/fault-tests/model"
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        processor.save_pretrained(d)
        Storage().upload_dir(d, uri)
    return uri


def write_corpus(fs, root: str, files: int = FILES, rows: int = ROWS_PER_FILE) -> int:
    for f in range(files):
        lines = [
            json.dumps({"id": f"f{f}-r{r}", "text": " ".join(WORDS[(f + r + k) % len(WORDS)] for k in range(40))})
            for r in range(rows)
        ]
        fs.pipe(f"{root}/corpus/part-{f:02d}.jsonl".removeprefix("s3://"), ("\n".join(lines) + "\n").encode())
    return files * rows


def read_output(fs, uri: str) -> pa.Table:
    fs.invalidate_cache()  # another process rewrote the folder since this one listed it
    return pq.ParquetDataset(uri.removeprefix("s3://"), filesystem=fs).read()


def committed(fs, output: str) -> list[dict]:
    path = output.removeprefix("s3://") + "/_manifest"
    try:
        names = [p for p in fs.ls(path, refresh=True) if p.rsplit("/", 1)[-1].startswith("commits-")]
    except FileNotFoundError:
        return []
    return [json.loads(line) for p in names for line in fs.cat(p).decode().splitlines() if line.strip()]


def parts(fs, output: str) -> list[str]:
    try:
        return [p for p in fs.ls(output.removeprefix("s3://"), refresh=True) if p.endswith(".parquet")]
    except FileNotFoundError:
        return []


def test_a_killed_predictor_actor_costs_no_row(ray_session, tiny_model, bucket, s3_endpoint):
    import ray
    from ray.util.state import list_actors

    from pipelines.predict import predict

    fs = s3fs.S3FileSystem()
    root = f"s3://{bucket}"
    n = write_corpus(fs, root, rows=50)
    output = f"{root}/predictions"
    killed: list[int] = []
    # The other units can be scored in less time than noticing the first part: the run's S3 traffic goes through
    # a proxy that holds every part upload after the first, so the actor is killed while it writes its second
    # unit, on any machine. Its held upload is closed unanswered: a dead actor's part does not land late.
    proxy = FlakyS3Proxy(s3_endpoint)
    proxy.hold = lambda method, path: (
        method == "PUT" and f"/{bucket}/predictions/part-" in path and proxy.count("PUT", "/predictions/part-") >= 1
    )

    gcs = ray.get_runtime_context().gcs_address  # other Rays may run on this machine

    def kill_the_actor_while_it_writes():
        try:
            wait_until(lambda: proxy.held, 300, "the upload of a second part")
            # this run's one predictor, and any of an earlier test's pool that Ray has not ended yet
            for actor in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], detail=True):
                if "UnitScorer" in f"{actor.class_name} {actor.repr_name}" and actor.pid:
                    try:
                        os.kill(actor.pid, signal.SIGKILL)
                        killed.append(actor.pid)
                    except ProcessLookupError:
                        pass
        finally:
            proxy.hold = None
            proxy.drop_held = True
            proxy.release.set()

    killer = threading.Thread(target=kill_the_actor_while_it_writes, daemon=True)
    killer.start()
    cfg = job_config(
        storage={"endpoint_url": proxy.url},
        predict={
            "model": tiny_model,
            "input": f"{root}/corpus",
            "output": output,
            "actors": 1,
            "batch_size": 1,
            "sort_window": 8,
        },
    )
    try:
        summary = predict(cfg)
    finally:
        killer.join(5)
        proxy.close()
    assert killed, "the actor was never seen alive mid-run"
    assert len(parts(fs, output)) == FILES
    table = read_output(fs, output)
    ids = table.column("id").to_pylist()
    assert summary["rows"] == table.num_rows == n and len(set(ids)) == n  # none lost, none doubled
    assert summary["errors"] == 0 and fs.exists(f"{output.removeprefix('s3://')}/_SUCCESS")


def rayformers_predict(*overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "predict", str(REPO / "jobs/examples/text-classification.yaml"), *overrides],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )


def kill_tree(proc: subprocess.Popen) -> None:
    """The driver by its pid, then anything it started in its own session."""
    proc.kill()
    proc.wait(30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_killed_driver_is_resumed_by_running_the_same_command_again(ray_session, tiny_model, bucket, s3_endpoint):
    """Both runs join the session's Ray as a cluster job would, so the test pays for no Ray start;
    the cluster outlives the killed driver and drops its actors, as on a real cluster."""
    import ray

    from pipelines.predict_output import COMMIT_EVERY_S

    fs = s3fs.S3FileSystem()
    root = f"s3://{bucket}"
    files = 20
    n = write_corpus(fs, root, files=files, rows=20)
    output = f"{root}/predictions"
    command = (
        f"predict.model={tiny_model}",
        f"predict.input={root}/corpus",
        f"predict.output={output}",
        "predict.actors=1",
        "predict.batch_size=1",
        "predict.sort_window=4",
        f"ray.address={ray.get_runtime_context().gcs_address}",
    )

    # The whole corpus can be scored in less time than noticing a third of it: the first run's S3 traffic goes
    # through a proxy that lets part uploads through until a commit is on record and a third of the parts are
    # written, then holds the rest, so the driver is killed mid-run on any machine. The driver commits what it
    # has every COMMIT_EVERY_S, when a unit comes in: no part lands before that much time has passed since it
    # opened the output, so that the first unit in is committed. Killed, its held uploads are closed unanswered.
    opened: list[float] = []

    def hold(method: str, path: str) -> bool:
        if method != "PUT":
            return False
        if path.endswith("/predictions/_manifest/run.json"):
            opened.append(time.monotonic())
        if f"/{bucket}/predictions/part-" not in path:
            return False
        if not opened or time.monotonic() < opened[0] + 2 * COMMIT_EVERY_S:
            return True
        return proxy.count("PUT", "/predictions/_manifest/commits-") >= 1 and (
            proxy.count("PUT", "/predictions/part-") >= files // 3
        )

    proxy = FlakyS3Proxy(s3_endpoint)
    proxy.hold = hold
    first = rayformers_predict(*command, f"storage.endpoint_url={proxy.url}")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if first.poll() is not None:
                pytest.fail("the first run ended before it could be killed:\n" + first.stdout.read()[-3000:])
            if committed(fs, output) and len(parts(fs, output)) >= files // 3:
                break
            time.sleep(0.1)
        else:
            pytest.fail("no unit was committed in time")
    finally:
        kill_tree(first)
        proxy.drop_held = True
        proxy.release.set()
    before = {r["unit"] for r in committed(fs, output)}
    assert 0 < len(before) < files
    assert not fs.exists(f"{output.removeprefix('s3://')}/_SUCCESS")  # a partial output says so

    # straight to the loopback S3 server (the example's storage section names no endpoint)
    second = rayformers_predict(*command)
    try:
        out, _ = second.communicate(timeout=240)
    finally:
        proxy.close()
    assert second.returncode == 0, out[-3000:]
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("summary: "))[len("summary: ") :])
    table = read_output(fs, output)
    ids = table.column("id").to_pylist()
    assert table.num_rows == summary["rows"] == n and len(set(ids)) == n
    records = committed(fs, output)
    runs = {r["run"] for r in records}
    assert len(runs) == 2 and sorted(r["unit"] for r in records if r["unit"] not in before) == sorted(
        set(range(files)) - before
    )
    # the re-run scored only the units the first run had not committed
    assert summary["units_resumed"] == len(before) and summary["units_scored"] == files - len(before)
    assert summary["rows_scored"] == n - 20 * len(before)
    marker = json.loads(fs.cat(f"{output.removeprefix('s3://')}/_SUCCESS"))
    assert marker["rows"] == n
    # the console shows our progress lines (with an ETA) and summary, not Ray Data's plans or Ray's notices
    internals = ("Starting execution of Dataset", "Execution plan of", "Progress bars disabled", "Token authentication")
    assert not [line for line in out.splitlines() if any(i in line for i in internals)], out[-3000:]
    assert re.search(r"^predict: \d+/\d+ units, .* rows/s, ETA \d+s$", out, re.M), out[-3000:]


def test_predict_refuses_to_write_over_its_input_model_or_run(s3_endpoint, tiny_model, bucket):
    from pipelines.predict import predict

    fs = s3fs.S3FileSystem()
    root = f"s3://{bucket}"
    write_corpus(fs, root, files=2, rows=3)
    before = sorted(fs.find(bucket))
    for output, key in (
        (root, "predict.input"),
        (f"{root}/corpus/out", "predict.input"),
        (tiny_model.rsplit("/", 1)[0], "predict.model"),
    ):
        with pytest.raises(Exception, match=f"predict.output: {output} .*{key}") as caught:
            predict(job_config(predict={"model": tiny_model, "input": f"{root}/corpus", "output": output}))
        assert type(caught.value).__name__ == "UserError"
    with pytest.raises(Exception, match="is inside train.output"):
        predict(
            job_config(
                train={"output": f"{root}/run"},
                predict={"model": tiny_model, "input": f"{root}/corpus", "output": f"{root}/run/predictions"},
            )
        )
    assert sorted(fs.find(bucket)) == before  # nothing written, nothing deleted


def test_an_earlier_output_survives_a_refused_and_a_failed_run(ray_session, tiny_model, bucket, monkeypatch):
    from errors import UserError
    from pipelines.predict import predict
    from pipelines.predict_output import Commits

    fs = s3fs.S3FileSystem()
    root = f"s3://{bucket}"
    write_corpus(fs, root, files=3, rows=10)
    output = f"{root}/predictions"
    sections = {"model": tiny_model, "input": f"{root}/corpus", "output": output, "actors": 1}
    assert predict(job_config(predict=sections))["rows"] == 30
    marker = fs.cat(f"{output.removeprefix('s3://')}/_SUCCESS")

    with pytest.raises(UserError, match="already holds a complete prediction.*predict.overwrite=true"):
        predict(job_config(predict=sections))
    # a replacement whose driver dies after its first committed unit leaves the old output whole
    fs.pipe(f"{bucket}/corpus/part-99.jsonl", b'{"id": "late", "text": "goal"}\n')
    real = Commits.add

    def commit_then_die(self, record):
        real(self, record)
        self.flush()
        raise RuntimeError("the driver's node was lost")

    monkeypatch.setattr(Commits, "add", commit_then_die)
    with pytest.raises(RuntimeError, match="the driver's node was lost"):
        predict(job_config(predict={**sections, "overwrite": True}))
    monkeypatch.setattr(Commits, "add", real)
    assert committed(fs, f"{output}/_next")  # the replacement had begun
    assert fs.cat(f"{output.removeprefix('s3://')}/_SUCCESS") == marker
    assert read_output(fs, output).num_rows == 30  # the old output, whole, with its marker

    summary = predict(job_config(predict={**sections, "overwrite": True}))
    assert summary["rows"] == read_output(fs, output).num_rows == 31
    assert not fs.exists(f"{output.removeprefix('s3://')}/_next")


def truncated_parquet() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(50)], "text": ["goal"] * 50}), buf, row_group_size=10)
    return buf.getvalue()[:300]


def test_bad_files_become_error_rows_and_the_job_finishes(ray_session, tiny_model, bucket):
    from pipelines.predict import predict

    fs = s3fs.S3FileSystem()
    files = {
        "good.jsonl": (b'{"id": "ok1", "text": "goal"}\n{"id": "ok2", "text": "soup"}\n', 2, 0),
        "broken.jsonl": (b"{not json\n{also not\n[1, 2]\n", 3, 3),
        "malformed.csv": (b"id,text\na\nb,c,d\ne\n", 3, 3),
        "long-field.csv": (b"id,text\nlong," + b"goal " * 40_000 + b"\n", 1, 0),
        "stray-quote.csv": (b'id,text\n1,"hello\n2,world\n3,foo\n4,bar\n', 4, 1),
        "nested.jsonl": (
            b'{"id": "n1", "text": "goal", "tags": [1]}\n{"id": "n2", "text": "goal", "tags": ["a"]}\n',
            2,
            1,
        ),
        "truncated.parquet": (truncated_parquet(), 1, 1),
        "empty.jsonl": (b"", 0, 0),
    }
    for name, (data, _, _) in files.items():
        fs.pipe(f"{bucket}/corpus/{name}", data)
    output = f"s3://{bucket}/predictions"
    summary = predict(
        job_config(predict={"model": tiny_model, "input": f"s3://{bucket}/corpus", "output": output, "actors": 1})
    )
    table = read_output(fs, output).to_pylist()
    rows = sum(r for _, r, _ in files.values())
    errors = sum(e for _, _, e in files.values())
    assert summary["rows"] == len(table) == rows and summary["errors"] == errors
    by_file: dict[str, list] = {}
    for row in table:
        by_file.setdefault(row["source"].rsplit("/", 1)[-1], []).append(row)
    for name, (_, n, e) in files.items():
        got = by_file.get(name, [])
        assert len(got) == n and sum(r["error"] is not None for r in got) == e, (name, got)
    assert by_file["truncated.parquet"][0]["error"].startswith("not a readable Parquet file")
    assert by_file["stray-quote.csv"][0]["error"] == "line 2: a quote that is never closed"
    assert by_file["long-field.csv"][0]["label"] is not None  # 200 KB of text is data, read and truncated
