"""What the tasks that predict classes share: the label maps a model's config carries, the top-k
ranking with its output columns, and the accuracy / macro-F1 metric of text and audio classification.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from models.eval_views import Confusion, RightAndWrong, class_views
from models.spec import StreamingMetric, View

TOP_K_TYPE = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))


def label_maps(labels: list) -> tuple[dict[int, str], dict[str, int]]:
    """`id2label` and `label2id` for a model config: ids are positions in `labels`, names are strings."""
    id2label = {i: str(label) for i, label in enumerate(labels)}
    return id2label, {name: i for i, name in id2label.items()}


def label_value(value):
    """A label as the user gave it: numpy scalars become Python ones."""
    return value.item() if isinstance(value, np.generic) else value


class ClassificationMetric(StreamingMetric):
    """Accuracy and macro-F1 of the argmax class against `labels`; the report shows the confusion matrix,
    each class's precision and recall, and a few eval rows, right and wrong ones, with the true label, the
    predicted one and its probability. A task says what identifies a row there: `example` keeps something
    small of row i while the eval runs (ids, a length), `described` makes it a table cell at the end."""

    example_column: str | None = None  # the examples table's first column; None: no examples kept
    example_note = ""  # what that column shows, for the report

    def __init__(self, labels: list):
        self.labels = labels
        # imported here: torchmetrics imports all its metrics (scipy.signal among them), ~1 s of CPU in each
        # preprocessing and inference actor and Serve replica, which never compute one
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        self.accuracy = MulticlassAccuracy(num_classes=len(labels), average="micro")
        self.macro_f1 = MulticlassF1Score(num_classes=len(labels), average="macro")
        self.confusion, self.counts = Confusion(len(labels)), None
        self.examples, self.processor = RightAndWrong(), None

    def bind(self, model, processor):
        self.processor = processor

    def to(self, device):
        self.accuracy, self.macro_f1 = self.accuracy.to(device), self.macro_f1.to(device)
        self.confusion.to(device)
        return self

    def update(self, outputs, inputs, arrays):
        self.add(outputs.logits.float().softmax(-1), inputs["labels"], inputs, arrays)

    def add(self, probs: torch.Tensor, truth: torch.Tensor, inputs: dict, arrays: dict) -> None:
        """One eval batch: each row's class probabilities and its true class."""
        predicted = probs.argmax(-1)
        self.accuracy.update(predicted, truth)
        self.macro_f1.update(predicted, truth)
        self.confusion.add(predicted, truth)
        if self.example_column is None or self.examples.full():
            return
        scores = probs.max(-1).values.tolist()
        for i, (true, guess) in enumerate(zip(truth.tolist(), predicted.tolist())):
            if self.examples.wants(true == guess):
                item = {"input": self.example(i, inputs, arrays), "truth": true, "guess": guess, "score": scores[i]}
                self.examples.add(item, true == guess)

    def example(self, i: int, inputs: dict, arrays: dict):
        """What the report will show of eval row i, kept until the eval ends (keep it small)."""
        raise NotImplementedError

    def described(self, kept) -> str:
        """`example`'s value as the examples table's first cell."""
        raise NotImplementedError

    def compute(self):
        self.counts = self.confusion.total()
        return {"accuracy": float(self.accuracy.compute()), "macro_f1": float(self.macro_f1.compute())}

    def views(self):
        if self.counts is None:
            return []
        views = class_views(self.counts, self.labels)
        if self.examples.items:
            names = [str(label) for label in self.labels]
            rows = [
                [
                    self.described(e["input"]),
                    names[e["truth"]],
                    names[e["guess"]],
                    e["score"],
                    "yes" if e["right"] else "no",
                ]
                for e in self.examples.items
            ]
            note = (
                f"{self.example_note} The first eval rows the model got right and the first it got wrong (up to"
                " half of them), with the true label, the predicted one and the probability the model gave it."
            ).strip()
            header = [self.example_column, "true label", "predicted label", "score", "right"]
            views.append(View("Examples", note, header, rows))
        return views


def ranked_labels(probs: torch.Tensor, id2label: dict, k: int) -> list[list[dict]]:
    """Each row's k most likely labels, best first, as `{"label", "score"}` dicts (the pipelines' format)."""
    scores, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [
        [{"label": id2label[i], "score": s} for i, s in zip(row_ids, row_scores)]
        for row_scores, row_ids in zip(scores.tolist(), ids.tolist())
    ]


def top_k_columns(predictions: list) -> dict:
    """Parquet columns of top-k answers: the best label and its score, and the whole list."""
    return {
        "label": [p[0]["label"] if p else None for p in predictions],
        "score": [p[0]["score"] if p else None for p in predictions],
        "top_k": predictions,
    }
