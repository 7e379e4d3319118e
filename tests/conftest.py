"""Shared test fixtures: a real S3 endpoint on loopback, one local Ray for the session, and a
tiny text-classification model trained once and reused by the e2e tests.

The S3 endpoint is moto's standalone server in its own process (started by `make test`, which
passes RAYFORMERS_TEST_S3, or here when pytest runs alone). Nothing is patched in-process.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import models  # noqa: E402,F401  (installs the task registry that config.validate checks jobs against)

# Credentials for the loopback endpoint only; set before Ray starts so its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    """A TCP port nothing listens on, below the kernel's ephemeral range: a port from that range (what binding
    port 0 gives) can be taken, between this call and the server's bind, by an outgoing connection of another
    process or its TIME_WAIT leftover; on a busy machine Ray's dashboard once failed to start that way ("Failed
    to bind to 127.0.0.1:32821 because it's already occupied")."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768  # Linux's default start of the range; elsewhere the same as good a guess
    for _ in range(1000):
        port = random.randrange(10000, ephemeral)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port between 10000 and {ephemeral}")


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def start_s3_server(extra_env: dict | None = None) -> tuple[str, subprocess.Popen]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(extra_env or {})},
    )
    wait_for_port(port)
    return f"http://127.0.0.1:{port}", proc


def wait_until(condition, timeout: float, what: str):
    """The first truthy value of `condition()`, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def s3_endpoint():
    url = os.environ.get("RAYFORMERS_TEST_S3")
    proc = None
    if not url:
        url, proc = start_s3_server()
    os.environ["AWS_ENDPOINT_URL"] = url
    yield url
    if proc:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the loopback S3 server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def session_bucket(s3_endpoint) -> str:
    import boto3

    name = f"session-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for all in-process e2e tests (4 logical CPUs: train workers + data actors)."""
    import ray

    from pipelines.cluster import connect

    connect(None, num_cpus=4)
    yield
    ray.shutdown()


@contextmanager
def served(cfg, name: str = "app"):
    """The config's model behind Ray Serve on a free loopback port, for one test module: yields the base URL."""
    from ray import serve

    from pipelines.serve import app_for

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_for(cfg), name=name, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def put(fs, uri: str, data: bytes) -> None:
    """Writes one object to the loopback S3 server through `fs` (an s3fs filesystem)."""
    with fs.open(uri.removeprefix("s3://"), "wb") as f:
        f.write(data)


def job_config(**sections):
    """A validated JobConfig for text-classification with test-sized defaults, plus overrides.

    RAYFORMERS_TEST_SEED=N sets train.seed (the model's initialisation and the data order) where a test does not
    set it, so the learning tests can be run across seeds:
    `RAYFORMERS_TEST_SEED=7 make test PYTEST_ARGS="-k 'detr or mask2former'"`."""
    from config import validate

    data = {
        "task": "text-classification",
        "model": {"init": {"architecture": "bert", "size": "tiny"}, "max_length": 64, "tokenizer": {"vocab_size": 800}},
        "train": {"epochs": 6, "batch_size": 32, "lr": 1e-3, "eval_every": 40, "log_every": 20, "num_workers": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    if os.environ.get("RAYFORMERS_TEST_SEED"):
        data["train"].setdefault("seed", int(os.environ["RAYFORMERS_TEST_SEED"]))
    return validate(data).with_absolute_paths()


@pytest.fixture(scope="session")
def demo_data_s3(session_bucket) -> str:
    """Learnable text-classification data in S3: s3://bucket/demo/{train,eval}."""
    from jobs.catalog import write_demo_data

    uri = f"s3://{session_bucket}/demo"
    write_demo_data("text-classification", uri, rows=1200, seed=0)
    return uri


@pytest.fixture(scope="session")
def trained_text_model(ray_session, demo_data_s3, session_bucket) -> dict:
    """A tiny BERT trained from S3 data to S3 once per session: {"output", "model", "summary"}."""
    from pipelines.train import train

    output = f"s3://{session_bucket}/runs/shared"
    cfg = job_config(data={"train": f"{demo_data_s3}/train", "eval": f"{demo_data_s3}/eval"}, train={"output": output})
    summary = train(cfg)
    return {"output": output, "model": f"{output}/model", "summary": summary, "data": demo_data_s3}


def pytest_collection_modifyitems(config, items):
    """Every test under tests/unit is a `unit` test: `make test-fast` selects them by marker."""
    for item in items:
        if "tests/unit/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.unit)
