"""What tracking costs a training run: the same tiny `rayformers train` without tracking, with MLflow + TensorBoard
to an SQLite store under train.output, and with MLflow pointed at a port where nothing listens (the run must
finish in about the same time). Side by side in one Ray, alternating, in this process.

    .venv/bin/python tests/benchmarks/tracking_overhead.py [--rounds 2] [--steps 40]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import models  # noqa: E402,F401  (installs the task registry)
from config import validate  # noqa: E402
from jobs.catalog import write_demo_data  # noqa: E402
from pipelines.cluster import connect  # noqa: E402
from pipelines.train import train  # noqa: E402


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tracking-overhead-"))
    write_demo_data("text-classification", str(work / "data"), rows=480, seed=0)
    kinds = {
        "off": {},
        "mlflow+tensorboard (SQLite under train.output)": {"mlflow": True, "tensorboard": True},
        "mlflow to a dead port": {"mlflow": f"http://127.0.0.1:{dead_port()}"},
    }
    connect(None, num_cpus=4)
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for i, (kind, track) in enumerate(kinds.items()):
            cfg = validate(
                {
                    "task": "text-classification",
                    "model": {"init": {"architecture": "bert", "size": "tiny"}, "max_length": 64},
                    "data": {"train": str(work / "data/train"), "eval": str(work / "data/eval")},
                    "train": {
                        "output": str(work / f"run-{r}-{i}"),
                        "max_steps": args.steps,
                        "eval_every": args.steps // 2,
                        "log_every": 5,
                        "batch_size": 16,
                    },
                    "track": track,
                }
            ).with_absolute_paths()
            started = time.perf_counter()
            train(cfg)
            seconds[kind].append(time.perf_counter() - started)
    base = statistics.median(seconds["off"])
    print(f"\n{args.rounds} rounds of {args.steps} steps, median wall seconds of `train` (ratio to off):")
    for kind, values in seconds.items():
        shown = ", ".join(f"{v:.1f}" for v in values)
        print(f"  {kind:48s} {statistics.median(values):6.1f}  ({statistics.median(values) / base:.2f}x)  [{shown}]")


if __name__ == "__main__":
    main()
