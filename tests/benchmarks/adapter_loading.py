"""Serving many LoRA adapters: what a replica pays to load one more adapter onto a base it holds, against loading
a full model, and the memory of N adapters over one base against N full models. In one run, in this process.

    .venv/bin/python tests/benchmarks/adapter_loading.py --adapter RUN/model [--n 10]

RUN/model is a `train.peft` run's model/ over a pretrained base (e.g. MiniLM-L6: the README's LoRA example)."""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import models  # noqa: F401  (installs the task registry)
from config import validate
from models import get_task
from pipelines.adapters import AdapterPool, base_source, load_model
from pipelines.storage import Storage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--task", default="text-classification")
    parser.add_argument("--n", type=int, default=10)
    args = parser.parse_args()
    task = get_task(args.task)
    base = Storage().model_path(base_source(args.adapter))
    copies = Path(tempfile.mkdtemp())
    dirs = []
    for i in range(args.n):  # N adapters (copies of one: loading cost and memory do not depend on the weights)
        shutil.copytree(args.adapter, copies / f"adapter-{i}")
        dirs.append(str(copies / f"adapter-{i}"))
    model_cfg = validate({"task": args.task, "model": {"source": base}}).model
    load_processor = lambda d: task.build_processor(model_cfg, d, iter(()))  # noqa: E731

    full = []
    for d in dirs[:3]:  # a full model per adapter: the base read from disk, the adapter merged into it
        start = time.perf_counter()
        model, _ = load_model(task, d, base, merge=True)
        full.append(time.perf_counter() - start)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    pool = AdapterPool()
    start = time.perf_counter()
    pool.view(task, "first", dirs[0], base, load_processor)
    first = time.perf_counter() - start
    more = []
    for i, d in enumerate(dirs[1:], 1):  # onto the warm base
        start = time.perf_counter()
        pool.view(task, f"adapter-{i}", d, base, load_processor)
        more.append(time.perf_counter() - start)
    shared = next(iter(pool.bases.values())).model
    pool_bytes = sum(p.numel() * p.element_size() for p in shared.parameters())

    print(f"full model (base + adapter merged), median of 3: {statistics.median(full):.3f} s")
    print(f"first adapter, base loaded with it: {first:.3f} s")
    print(f"one more adapter onto the warm base, median of {len(more)}: {statistics.median(more):.3f} s")
    print(f"  = {statistics.median(more) / statistics.median(full):.3f}x the full model's load")
    print(f"memory: {args.n} adapters over one base {pool_bytes / 2**20:.1f} MiB of parameters; ")
    print(
        f"        {args.n} full models {args.n * full_bytes / 2**20:.1f} MiB ({args.n * full_bytes / pool_bytes:.1f}x)"
    )


if __name__ == "__main__":
    main()
