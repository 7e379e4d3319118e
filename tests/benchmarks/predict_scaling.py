"""Benchmark: does `rayformers predict` stay flat in memory and speed as the corpus grows tenfold?

Same machine, same run: a tiny text classifier (BERT, from config, tokenizer trained on the demo
topics) scores a corpus of N short texts and then one of 10N, each spread over 20 JSONL files, with
the real CLI (`rayformers predict`, a local Ray started by the command). While each command runs,
the resident memory of its whole process tree (driver, GCS, raylet, Ray workers and actors) is
sampled from /proc every 0.25 s. Reports per corpus the peak tree RSS, the driver's own peak RSS,
rows/s once Ray was up (the command's summary) and the whole-command wall time, then the ratios
10N / N. Targets (issue 10): peak memory at 10N <= 1.2x that at N; rows/s at 10N >= 0.9x.

Run: .venv/bin/python tests/benchmarks/predict_scaling.py [--rows 20000] [--files 20] [--out bench-scaling]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
EXAMPLE = str(REPO / "jobs/examples/text-classification.yaml")
WORDS = (
    "goal match striker league coach laptop server chip software cloud garlic soup recipe oven "
    "flavour hotel beach flight passport museum"
).split()


def tree_rss(root: int) -> tuple[int, int]:
    """(bytes resident in `root` and all its descendants, bytes resident in `root` alone), from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/status") as f:
                kb = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = kb * 1024
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total, rss.get(root, 0)


def write_model(directory: Path) -> None:
    from config import validate
    from models import get_task

    task = get_task("text-classification")
    cfg = validate(
        {
            "task": "text-classification",
            "model": {
                "init": {"architecture": "bert", "size": "tiny"},
                "max_length": 64,
                "tokenizer": {"vocab_size": 800},
            },
        }
    )
    processor = task.build_processor(cfg.model, None, iter(task.demo_data(500, 0)))
    model = task.build_model(cfg.model, None, ["food", "sports", "tech", "travel"], processor)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def write_corpus(directory: Path, rows: int, files: int, seed: int) -> None:
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    per_file = rows // files
    for f in range(files):
        with open(directory / f"part-{f:03d}.jsonl", "w") as out:
            for r in range(per_file):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 24)))
                out.write(json.dumps({"id": f"{f}-{r}", "text": text}) + "\n")


def run_predict(model: Path, corpus: Path, output: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "jobs.cli",
        "predict",
        EXAMPLE,
        f"predict.model={model}",
        f"predict.input={corpus}",
        f"predict.output={output}",
        "model.max_length=64",
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"tree": 0, "driver": 0}

    def sample() -> None:
        while proc.poll() is None:
            tree, driver = tree_rss(proc.pid)
            peaks["tree"], peaks["driver"] = max(peaks["tree"], tree), max(peaks["driver"], driver)
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log = proc.communicate()[0]
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"predict failed ({proc.returncode}):\n{log[-3000:]}")
    summary = json.loads((output / "_SUCCESS").read_text())
    summary = summary.get("summary", summary)
    return {
        "rows": summary["rows"],
        "errors": summary["errors"],
        "rows_per_s": summary["pipeline_rows_per_s"],
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_tree_mb": round(peaks["tree"] / 2**20),
        "peak_driver_mb": round(peaks["driver"] / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="N: the small corpus; the large one has 10N")
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--out", default="bench-scaling")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    write_model(out / "model")
    results = {}
    for name, rows in (("N", args.rows), ("10N", 10 * args.rows)):
        write_corpus(out / f"corpus-{name}", rows, args.files, seed=rows)
        results[name] = run_predict(out / "model", out / f"corpus-{name}", out / f"predictions-{name}")
        assert results[name]["rows"] == rows, results[name]  # exactly one output row per input row
        print(f"{name:>3} = {rows:>7} rows: {json.dumps(results[name])}", flush=True)
    small, large = results["N"], results["10N"]
    print(
        f"peak tree memory 10N/N: {large['peak_tree_mb'] / small['peak_tree_mb']:.2f}x (target <= 1.2x); "
        f"driver 10N/N: {large['peak_driver_mb'] / small['peak_driver_mb']:.2f}x; "
        f"rows/s once Ray was up 10N/N: {large['rows_per_s'] / small['rows_per_s']:.2f}x (target >= 0.9x)"
    )


if __name__ == "__main__":
    main()
