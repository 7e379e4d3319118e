"""Serving under faults, end to end on the session's Ray with real HTTP on 127.0.0.1: overload is shed with
503 + Retry-After, a replica killed by pid while traffic flows is replaced with the endpoint answering,
and hostile requests get their 4xx while /healthz keeps answering within a second.

The models are tiny and untrained (built from config and saved to a local folder): what is tested is
the serving runtime, not what the model learned. Every load generator is bounded in requests and time
and stops by itself."""

from __future__ import annotations

import base64
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field

import httpx
import pytest

from tests.conftest import free_port, job_config, wait_until

pytestmark = pytest.mark.e2e
TEXT_APP, IMAGE_APP = "faults-text", "faults-image"
TEXT = "the match ended with a late goal and the team celebrated with the fans " * 3


def save_tiny_model(task_name: str, architecture: str, folder: str) -> str:
    """An untrained tiny model of the task, with its processor, saved where `task.load` reads it."""
    from config import ModelConfig
    from models import get_task

    task = get_task(task_name)
    cfg = ModelConfig(init={"architecture": architecture, "size": "tiny"}, max_length=64, tokenizer={"vocab_size": 400})
    rows = task.demo_data(120, 0)
    processor = task.build_processor(cfg, None, iter(rows))
    labels = sorted({str(r[task.label_column]) for r in rows if r.get(task.label_column) is not None})
    task.build_model(cfg, None, labels, processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@dataclass
class Traffic:
    """What a load generator saw: one (start, seconds, status, Retry-After) per request; status 0 when
    the connection failed."""

    shots: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def statuses(self, since: float = 0.0, until: float = float("inf")) -> dict[int, int]:
        counts: dict[int, int] = {}
        for start, _, status, _ in self.shots:
            if since <= start < until:
                counts[status] = counts.get(status, 0) + 1
        return counts


def drive(
    url: str, body: dict, clients: int, max_requests: int, max_seconds: float, stop: threading.Event, traffic: Traffic
) -> list[threading.Thread]:
    """`clients` threads posting `body` back to back until `stop`, `max_requests` in all or `max_seconds`."""
    deadline = time.monotonic() + max_seconds
    budget = iter(range(max_requests))

    def client():
        with httpx.Client(timeout=30) as http:
            while not stop.is_set() and time.monotonic() < deadline and next(budget, None) is not None:
                start = time.monotonic()
                try:
                    response = http.post(url, json=body)
                    status, retry = response.status_code, response.headers.get("retry-after")
                except httpx.HTTPError:
                    status, retry = 0, None
                with traffic.lock:
                    traffic.shots.append((start, time.monotonic() - start, status, retry))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


def drive_at_rate(base: str, path: str, body: dict, rate: float, seconds: float, traffic: Traffic) -> None:
    """Open-loop load: one request every 1/rate s for `seconds` whatever the answers take, as clients arrive in
    production (the benchmark's asyncio client: it takes little of the cores it shares with the server);
    returns when every request has been answered."""
    import asyncio

    from tests.benchmarks.serve_overload import Client, open_loop

    client = Client(int(base.rsplit(":", 1)[1].split("/")[0]), path, body)
    shots = asyncio.run(open_loop(client, rate, min(seconds, 1000 / rate)))
    traffic.shots += [(start, took, status, headers.get("retry-after")) for start, took, status, headers in shots]


PROBE = """
import sys, time, httpx
with httpx.Client(timeout=30) as http:  # a slow answer counts as slow, not as a failure
    while True:
        start = time.monotonic()
        try:
            status = http.get(sys.argv[1]).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        print(time.monotonic() - start, status, flush=True)
        time.sleep(0.2)
"""


class HealthProbe:
    """GET /healthz every 0.2 s while a block runs, from a process of its own (as a load balancer probes; the
    load this test generates must not delay the probe itself): the slowest answer and any failures."""

    def __init__(self, base: str):
        self.base, self.seconds, self.failures = base, [], []

    def __enter__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-c", PROBE, f"{self.base}/healthz"], stdout=subprocess.PIPE, text=True
        )

        def read():
            for line in self.process.stdout:
                seconds, status = line.split()
                self.seconds.append(float(seconds))
                if status != "200":
                    self.failures.append(status)

        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.seconds and time.monotonic() < deadline:  # the block starts once the probe answers
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait(10)
        self.thread.join(10)


def replica_pids(app: str) -> list[int]:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,  # other Rays may run on this machine
        filters=[("class_name", "=", f"ServeReplica:{app}:Predictor"), ("state", "=", "ALIVE")],
    )
    return sorted(a.pid for a in actors if a.pid)


def running_replicas(app: str) -> int:
    from ray import serve

    from pipelines.serve import DEPLOYMENT_NAME

    deployment = serve.status().applications[app].deployments[DEPLOYMENT_NAME]  # the models, not the ingress
    return deployment.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def endpoint(ray_session, s3_endpoint, tmp_path_factory):
    """A text classifier on two replicas with a small queue, and an image classifier that may read files
    only under s3://<bucket>/uploads/, on one Serve instance at 127.0.0.1:PORT."""
    import boto3
    from ray import serve

    from pipelines.serve import run_apps

    text_model = save_tiny_model("text-classification", "bert", str(tmp_path_factory.mktemp("text-model")))
    image_model = save_tiny_model("image-classification", "vit", str(tmp_path_factory.mktemp("image-model")))
    bucket = f"faults-{os.getpid()}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    for name in ("a.png", "b.png"):
        s3.put_object(Bucket=bucket, Key=f"uploads/{name}", Body=tiny_png(8, 8) + b"\0" * 60_000)
    s3.put_object(Bucket=bucket, Key="private/key.png", Body=tiny_png(8, 8))

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    text = job_config(
        task="text-classification",
        serve={
            "model": text_model,
            "min_replicas": 2,
            "max_replicas": 2,
            "max_ongoing_requests": 4,
            "max_batch_size": 4,
            "max_queued_requests": 16,
            "health_check_period_s": 2,
            "max_request_bytes": 200_000,
        },
    )
    image = job_config(
        task="image-classification",
        model={"init": {"architecture": "vit", "size": "tiny"}},
        serve={
            "model": image_model,
            "allow_uris": [f"s3://{bucket}/uploads/"],
            "max_media_bytes": 100_000,
            "max_request_bytes": 200_000,
            "max_image_pixels": 1_000_000,
        },
    )
    started = time.monotonic()
    run_apps(text, TEXT_APP, "/text")  # and /text/healthz, an app of its own
    text_start_s = time.monotonic() - started  # two replicas starting side by side: this machine's pace
    run_apps(image, IMAGE_APP, "/image")
    base = f"http://127.0.0.1:{port}"
    yield {"text": f"{base}/text", "image": f"{base}/image", "bucket": bucket, "text_start_s": text_start_s}
    serve.shutdown()


def tiny_png(width: int, height: int, claimed: tuple[int, int] | None = None) -> bytes:
    """A grey PNG; with `claimed`, its header says that size (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    w, h = claimed or (width, height)
    rows = b"".join(b"\0" + b"\x80" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_overload_is_shed_with_503_and_retry_after_and_latency_recovers(endpoint):
    url = f"{endpoint['text']}/predict"
    # One request is 64 texts, a few forward passes: 4x overloads the models, not Serve's HTTP path (Serve's proxy
    # refuses a request for ~1.3 ms of CPU, and answering one costs it and our ingress ~15 ms here;
    # tests/benchmarks/RESULTS.md).
    body = {"inputs": [TEXT] * 64}
    with httpx.Client(timeout=30) as http:
        times = sorted(_timed(http, url, body) for _ in range(8))
    # From the fastest answer: an upper bound of the capacity, so that the load is 4x or more even when other
    # processes slowed the unloaded answers (two replicas, one request at a time each; batching adds a little).
    unloaded, capacity = times[4], 2 / times[0]
    with HealthProbe(endpoint["text"]) as idle:
        time.sleep(2)
    traffic = Traffic()
    with HealthProbe(endpoint["text"]) as health:
        drive_at_rate(endpoint["text"], "/text/predict", body, rate=4 * capacity, seconds=5, traffic=traffic)
    shed = [s for s in traffic.shots if s[2] == 503]
    served = [s for s in traffic.shots if s[2] == 200]
    print(
        f"\noverload at 4x {capacity:.1f} requests/s: {traffic.statuses()}; unloaded p50 {unloaded * 1000:.0f} ms; "
        f"slowest 503 {max((s[1] for s in shed), default=0) * 1000:.0f} ms; slowest /healthz "
        f"{max(health.seconds) * 1000:.0f} ms ({len(health.failures)} not 200: {health.failures[:5]}); "
        f"slowest unloaded /healthz {max(idle.seconds) * 1000:.0f} ms"
    )
    assert set(traffic.statuses()) <= {200, 503}, traffic.statuses()  # nothing else: no 500s, no dropped connections
    assert shed and served
    assert all(s[3] == "1" for s in shed)  # Retry-After: serve.retry_after_s
    # /healthz is an app of its own: never queued behind predictions at the full ingress or slowed by a forward pass
    assert max(health.seconds) < 1.0 and not health.failures
    assert len(shed) > len(served)  # at 4x most of the excess is refused, not queued
    recovered_at = time.monotonic()
    with httpx.Client(timeout=30) as http:
        while _timed(http, url, body) > 2 * unloaded + 0.05:
            assert time.monotonic() - recovered_at < 5, "latency did not return to its unloaded p50 within 5 s"


def test_requests_by_status_latencies_and_batch_sizes_are_on_rays_prometheus_endpoint(endpoint):
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    scrape = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    wanted = [
        r'ray_serve_num_http_requests_total\{[^}]*status_code="503"',  # shed by Serve's proxy
        r'rayformers_responses_total\{[^}]*status="200"',
        "rayformers_request_seconds_bucket",
        "rayformers_batch_rows_bucket",
        "ray_serve_num_http_requests",
    ]
    deadline, text = time.monotonic() + 40, ""
    while time.monotonic() < deadline:  # metrics reach the agent every few seconds
        text = httpx.get(scrape, timeout=10).text
        if all(re.search(w, text) for w in wanted):
            break
        time.sleep(2)
    assert [w for w in wanted if not re.search(w, text)] == []


def _timed(http: httpx.Client, url: str, body: dict) -> float:
    start = time.monotonic()
    assert http.post(url, json=body).status_code == 200
    return time.monotonic() - start


HOSTILE = [
    (
        "a file of the replica's machine",
        {"inputs": "file:///etc/passwd"},
        422,
        "not under a prefix of serve.allow_uris",
    ),
    ("a local path", {"inputs": "/proc/self/environ"}, 422, "not valid base64"),
    (
        "a path out of the allowed prefix",
        {"inputs": "s3://{bucket}/uploads/../private/key.png"},
        422,
        "not a plain object key",
    ),
    ("another bucket", {"inputs": "s3://other-{bucket}/uploads/a.png"}, 422, "not under a prefix of serve.allow_uris"),
    ("another scheme", {"inputs": "hf://datasets/x/a.png"}, 422, "not under a prefix of serve.allow_uris"),
    (
        "files past the byte budget",
        {"inputs": ["s3://{bucket}/uploads/a.png", "s3://{bucket}/uploads/b.png"]},
        413,
        "serve.max_media_bytes",
    ),
    ("a decompression bomb", {"inputs": "{bomb}"}, 422, "more than serve.max_image_pixels=1000000"),
    (
        "an unbounded top_k",
        {"inputs": "{png}", "parameters": {"top_k": 10**6}},
        422,
        "parameters.top_k: must be between 1 and 100",
    ),
    (
        "an unknown parameter",
        {"inputs": "{png}", "parameters": {"threshold": 0.5}},
        422,
        "parameters.threshold: not a parameter",
    ),
]


@pytest.mark.parametrize("what, body, status, message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_request_gets_its_4xx_while_healthz_answers_within_a_second(endpoint, what, body, status, message):
    values = {
        "bucket": endpoint["bucket"],
        "png": base64.b64encode(tiny_png(8, 8)).decode(),
        "bomb": base64.b64encode(tiny_png(8, 8, claimed=(60_000, 60_000))).decode(),
    }

    def fill(value):
        if isinstance(value, str):
            return value.format(**values)
        if isinstance(value, list):
            return [fill(v) for v in value]
        return {k: fill(v) for k, v in value.items()} if isinstance(value, dict) else value

    with HealthProbe(endpoint["image"]) as health, httpx.Client(timeout=30) as http:
        responses = [http.post(f"{endpoint['image']}/predict", json=fill(body)) for _ in range(5)]
    for response in responses:
        assert response.status_code == status, response.text
        assert message in response.json()["error"], response.text
    assert health.seconds and max(health.seconds) < 1.0 and not health.failures


def test_hostile_bodies_get_400_and_413(endpoint):
    url = f"{endpoint['image']}/predict"

    def endless():
        for _ in range(10_000):  # 40 MB if it were all read; the limit is 200 kB
            yield b"-" * 4096

    with HealthProbe(endpoint["image"]) as health, httpx.Client(timeout=30) as http:
        nested = http.post(url, content=b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
        chunked = http.post(url, content=endless(), headers={"content-type": "multipart/form-data; boundary=x"})
        fine = http.post(url, files={"file": ("a.png", tiny_png(8, 8), "image/png")})
    assert nested.status_code == 400 and "nested more than 32 levels" in nested.json()["error"]
    assert chunked.status_code == 413 and "serve.max_request_bytes" in chunked.json()["error"]
    assert fine.status_code == 200, fine.text
    assert max(health.seconds) < 1.0 and not health.failures


def test_a_killed_replica_is_replaced_while_traffic_flows(endpoint):
    url = f"{endpoint['text']}/predict"
    before = replica_pids(TEXT_APP)
    assert len(before) == 2 and running_replicas(TEXT_APP) == 2
    # Replaced within 30 s, or twice the app's start on this machine where that is longer: a replica's start (a
    # process, torch, the model) is CPU work that takes twice as long on a machine half as fast; under traffic
    # it took 1.07x and 1.22x the app's start measured in the same run (21.0 s / 19.6 s, 26.3 s / 21.6 s, with
    # other tests running), where a fixed 30 s left 1.1x.
    bound = max(30.0, 2 * endpoint["text_start_s"])
    traffic, stop = Traffic(), threading.Event()
    threads = drive(
        url,
        {"inputs": [TEXT] * 4},
        clients=4,
        max_requests=5000,
        max_seconds=bound + 60,
        stop=stop,
        traffic=traffic,
    )
    try:
        # killed while traffic flows: once answers come (the clients' start is slower on a slower or busier machine)
        wait_until(lambda: traffic.statuses().get(200, 0) >= 8, 60, "answers before the kill")
        killed_at = time.monotonic()
        os.kill(before[0], signal.SIGKILL)
        back = None
        while time.monotonic() - killed_at < bound + 15:
            pids = replica_pids(TEXT_APP)
            if len(pids) == 2 and before[0] not in pids and running_replicas(TEXT_APP) == 2:
                back = time.monotonic() - killed_at
                break
            time.sleep(0.25)
        time.sleep(2)  # traffic on the full set again
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    failed = sum(n for status, n in traffic.statuses().items() if status != 200)  # none fail before the kill
    print(
        f"\nreplica loss: sent before the kill {traffic.statuses(until=killed_at)}, after it "
        f"{traffic.statuses(since=killed_at)}; {failed} failed; capacity back after {back and round(back, 1)} s "
        f"(bound {bound:.1f} s; the app started in {endpoint['text_start_s']:.1f} s)"
    )
    assert back is not None and back < bound, f"the killed replica was not replaced within {bound:.1f} s"
    assert traffic.statuses(since=killed_at + 1).get(200, 0) > 0  # the endpoint kept answering
    # only what was in flight on the killed replica fails: at most its max_ongoing_requests
    assert failed <= 4, traffic.statuses()
    assert traffic.statuses(since=killed_at + back).keys() <= {200}
