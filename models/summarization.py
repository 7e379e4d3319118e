"""summarization: BART or T5 writes a short summary of `source` (see models/seq2seq.py).

Output as `transformers.pipeline("summarization")`: `{"summary_text": ...}`. Metrics: ROUGE-1, ROUGE-2
and ROUGE-L F-measures (0-1) of the generated summaries, summed batch by batch.
"""

from __future__ import annotations

import random

import torch
import torch.distributed as dist

from models.seq2seq import GeneratedTextMetric, Seq2SeqTask

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


class RougeMetric(GeneratedTextMetric):
    """Running sums of per-summary ROUGE F-measures and the summary count."""

    def __init__(self, options):
        super().__init__(options)
        self.sums = torch.zeros(len(ROUGE_KEYS) + 1, dtype=torch.float64)

    def to(self, device):
        self.sums = self.sums.to(device)
        return self

    def add(self, predictions, references):
        from torchmetrics.functional.text.rouge import rouge_score  # only where metrics are computed

        scores = rouge_score(predictions, references, rouge_keys=ROUGE_KEYS)  # means over the batch
        batch = [float(scores[f"{key}_fmeasure"]) * len(predictions) for key in ROUGE_KEYS]
        self.sums += torch.tensor([*batch, len(predictions)], dtype=torch.float64, device=self.sums.device)

    def compute(self):
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        count = float(sums[-1].clamp(min=1))
        return {key: float(sums[i]) / count for i, key in enumerate(ROUGE_KEYS)}


class Summarization(Seq2SeqTask):
    name = "summarization"
    output_key = "summary_text"
    output_columns = {"summary_text": "string"}
    best_metric = "rougeL"
    best_metric_mode = "max"

    def metrics(self, labels, options):
        return RougeMetric(options)

    def demo_data(self, n, seed):
        """Keyword extraction: a sentence of filler words hides two or three topic words; the summary
        is those words in the order they appear."""
        rng = random.Random(seed)
        keywords = (
            "river castle dragon market winter harbor garden tower forest bridge lantern meadow "
            "island comet violin glacier"
        ).split()
        filler = (
            "the a today we they said that about very old new some with from this it was people time "
            "week report story just also more many and of in near"
        ).split()
        rows = []
        for i in range(n):
            chosen = rng.sample(keywords, rng.randint(2, 3))
            words = [rng.choice(filler) for _ in range(rng.randint(6, 14))]
            for word in chosen:
                words.insert(rng.randint(0, len(words)), word)
            in_order = [w for w in words if w in chosen]
            rows.append({"id": f"sum-{seed}-{i}", "source": " ".join(words), "target": " ".join(in_order)})
        return rows


TASK = Summarization()
