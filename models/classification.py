"""What the tasks that predict classes share: the label maps a model's config carries, the top-k
ranking with its output columns, and the accuracy / macro-F1 metric of text and audio classification.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from models.eval_views import Confusion, class_views
from models.spec import StreamingMetric

TOP_K_TYPE = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))


def label_maps(labels: list) -> tuple[dict[int, str], dict[str, int]]:
    """`id2label` and `label2id` for a model config: ids are positions in `labels`, names are strings."""
    id2label = {i: str(label) for i, label in enumerate(labels)}
    return id2label, {name: i for i, name in id2label.items()}


def label_value(value):
    """A label as the user gave it: numpy scalars become Python ones."""
    return value.item() if isinstance(value, np.generic) else value


class ClassificationMetric(StreamingMetric):
    """Accuracy and macro-F1 of the argmax class against `labels`; the report shows the confusion matrix
    and each class's precision and recall."""

    def __init__(self, labels: list):
        self.labels = labels
        # imported here: torchmetrics imports all its metrics (scipy.signal among them), ~1 s of CPU in each
        # preprocessing and inference actor and Serve replica, which never compute one
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        self.accuracy = MulticlassAccuracy(num_classes=len(labels), average="micro")
        self.macro_f1 = MulticlassF1Score(num_classes=len(labels), average="macro")
        self.confusion, self.counts = Confusion(len(labels)), None

    def to(self, device):
        self.accuracy, self.macro_f1 = self.accuracy.to(device), self.macro_f1.to(device)
        self.confusion.to(device)
        return self

    def update(self, outputs, inputs, arrays):
        self.add(outputs.logits.argmax(-1), inputs["labels"])

    def add(self, predicted: torch.Tensor, truth: torch.Tensor) -> None:
        self.accuracy.update(predicted, truth)
        self.macro_f1.update(predicted, truth)
        self.confusion.add(predicted, truth)

    def compute(self):
        self.counts = self.confusion.total()
        return {"accuracy": float(self.accuracy.compute()), "macro_f1": float(self.macro_f1.compute())}

    def views(self):
        return class_views(self.counts, self.labels) if self.counts is not None else []


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
