"""Serving under overload, measured side by side in one run: `rayformers serve` driven open-loop at 1x, 2x
and 4x its measured capacity, on 127.0.0.1, bounded in requests and time.

    .venv/bin/python tests/benchmarks/serve_overload.py [--seconds 10] [--replicas 2] [--json FILE]

Capacity is the goodput of 16 closed-loop clients (each sends its next request when the last is
answered). Each open-loop level then sends one request every 1/rate s whatever the answers take, as
independent clients arrive in production. Reported per level: goodput (200s per second), p50/p99 of
the successful requests, the share of 503s, any other status, and the time the endpoint takes after
the load stops to answer at its unloaded p50 again. Targets at 4x: goodput >= 0.9x the 1x goodput,
p99 of successes <= 3x the 1x p99, no 5xx but 503. The model is a tiny untrained BERT classifier
(the serving runtime is what is measured); one request is 16 texts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

TEXT = "the match ended with a late goal and the team celebrated with the fans " * 3


def save_tiny_model(folder: str) -> str:
    from jobs.config import ModelConfig
    from models import get_task

    task = get_task("text-classification")
    cfg = ModelConfig(init={"architecture": "bert", "size": "tiny"}, max_length=64, tokenizer={"vocab_size": 400})
    rows = task.demo_data(120, 0)
    processor = task.build_processor(cfg, None, iter(rows))
    task.build_model(cfg, None, sorted({r["label"] for r in rows}), processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def closed_loop(url: str, body: dict, clients: int, seconds: float) -> float:
    """Goodput (200s per second) of `clients` sending back to back."""
    import httpx

    done, deadline = [], time.monotonic() + seconds

    def client():
        with httpx.Client(timeout=30) as http:
            while time.monotonic() < deadline:
                if http.post(url, json=body).status_code == 200:
                    done.append(1)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(done) / seconds


def open_loop(url: str, body: dict, rate: float, seconds: float) -> list[tuple[float, float, int]]:
    """(start, seconds, status) of one request every 1/rate s for `seconds` (at most 2,000 requests)."""
    import httpx

    shots, lock, local = [], threading.Lock(), threading.local()

    def shoot():
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=30)
        start = time.monotonic()
        try:
            status = local.http.post(url, json=body).status_code
        except httpx.HTTPError:
            status = 0
        with lock:
            shots.append((start, time.monotonic() - start, status))

    with ThreadPoolExecutor(max_workers=128) as pool:
        begin = time.monotonic()
        for i in range(int(min(rate * seconds, 2000))):
            time.sleep(max(0.0, begin + i / rate - time.monotonic()))
            pool.submit(shoot)
    return shots


def recovery(url: str, body: dict, unloaded_p50: float, limit_s: float = 30) -> float:
    """Seconds until a lone request is answered within 1.5x the unloaded p50 (+10 ms) again."""
    import httpx

    begin = time.monotonic()
    with httpx.Client(timeout=30) as http:
        while time.monotonic() - begin < limit_s:
            start = time.monotonic()
            ok = http.post(url, json=body).status_code == 200
            if ok and time.monotonic() - start <= 1.5 * unloaded_p50 + 0.01:
                return time.monotonic() - begin
            time.sleep(0.05)
    return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-queued", type=int, default=None, help="serve.max_queued_requests (default: the config's)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import httpx
    import ray
    from ray import serve

    from jobs.config import validate
    from pipelines.serve import app_for
    from tests.conftest import free_port

    ray.init(address="local", num_cpus=args.replicas + 2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    with tempfile.TemporaryDirectory() as folder:
        cfg = validate({"task": "text-classification", "model": {"source": save_tiny_model(folder), "max_length": 64},
                        "serve": {"min_replicas": args.replicas, "max_replicas": args.replicas, "max_ongoing_requests": 8,
                                  "max_batch_size": 4,
                                  **({"max_queued_requests": args.max_queued} if args.max_queued is not None else {})}
                        }).with_absolute_paths()
        serve.run(app_for(cfg), name="overload", route_prefix="/")
        url, body = f"http://127.0.0.1:{port}/predict", {"inputs": [TEXT] * 16}
        with httpx.Client(timeout=30) as http:
            unloaded = [0.0] * 20
            for i in range(20):
                start = time.monotonic()
                http.post(url, json=body)
                unloaded[i] = time.monotonic() - start
        unloaded_p50 = percentile(unloaded, 0.5)
        capacity = closed_loop(url, body, clients=16, seconds=args.seconds)
        results = {"unloaded_p50_ms": round(unloaded_p50 * 1000, 1), "capacity_rps": round(capacity, 1), "levels": []}
        for factor in (1, 2, 4):
            shots = open_loop(url, body, factor * capacity, args.seconds)
            ok = [s[1] for s in shots if s[2] == 200]
            statuses: dict[int, int] = {}
            for s in shots:
                statuses[s[2]] = statuses.get(s[2], 0) + 1
            level = {"load": f"{factor}x", "rate_rps": round(factor * capacity, 1), "requests": len(shots),
                     "goodput_rps": round(len(ok) / args.seconds, 1), "p50_ms": round(percentile(ok, 0.5) * 1000, 1),
                     "p99_ms": round(percentile(ok, 0.99) * 1000, 1),
                     "share_503": round(statuses.get(503, 0) / max(1, len(shots)), 3), "statuses": statuses,
                     "recovery_s": round(recovery(url, body, unloaded_p50), 2)}
            results["levels"].append(level)
            print(json.dumps(level), flush=True)
        one, four = results["levels"][0], results["levels"][2]
        results["at_4x"] = {"goodput_vs_1x": round(four["goodput_rps"] / max(one["goodput_rps"], 1e-9), 2),
                            "p99_vs_1x": round(four["p99_ms"] / max(one["p99_ms"], 1e-9), 2),
                            "5xx_other_than_503": sum(n for s, n in four["statuses"].items() if s >= 500 and s != 503)}
        print(json.dumps(results), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
