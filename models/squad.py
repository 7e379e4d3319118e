"""SQuAD, apart from the task's model: its JSON files, its answers and their character offsets, its exact-match
and token-F1 scoring, and the best answer span over the windows of one row (shared by the eval metric and by
`question-answering`'s postprocess)."""

from __future__ import annotations

import collections
import json
import re
import string
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
import torch.distributed as dist

from errors import UserError
from models.eval_views import Examples, clipped
from models.spec import StreamingMetric, View

if TYPE_CHECKING:
    from models.question_answering import Options


def parse_squad(data: bytes, path: str) -> Iterator[dict]:
    """SQuAD v1/v2 JSON: data -> paragraphs -> qas, one row per question."""
    try:
        document = json.loads(data)
        articles = document["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a SQuAD JSON file ({e.__class__.__name__}: {e})") from None
    for article in articles:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                yield {
                    "id": qa.get("id"),
                    "question": qa.get("question"),
                    "context": paragraph.get("context"),
                    "answers": {
                        "text": [a["text"] for a in answers],
                        "answer_start": [a["answer_start"] for a in answers],
                    },
                }


def answer_list(answers) -> tuple[list[tuple[str, int]] | None, str | None]:
    """[(text, answer_start)] from either answer layout, or why it cannot be read."""
    if answers is None:
        return None, "answers is null"
    if isinstance(answers, dict):
        texts, starts = answers.get("text"), answers.get("answer_start")
        texts = [texts] if isinstance(texts, str) else list(texts if texts is not None else [])
        starts = [starts] if isinstance(starts, (int, np.integer)) else list(starts if starts is not None else [])
        if len(texts) != len(starts):
            return None, f"answers has {len(texts)} texts and {len(starts)} answer_start values"
        pairs = list(zip(texts, starts))
    elif isinstance(answers, (list, np.ndarray)):
        if not all(isinstance(a, dict) for a in answers):
            return None, "answers is not {text, answer_start}"
        pairs = [(a.get("text"), a.get("answer_start")) for a in answers]
    else:
        return None, "answers is not {text, answer_start}"
    if not all(isinstance(t, str) and isinstance(s, (int, np.integer)) for t, s in pairs):
        return None, "answers holds a text that is not a string or an answer_start that is not an integer"
    return [(t, int(s)) for t, s in pairs], None


def locate(context: str, text: str, start: int) -> int | None:
    """Where `text` sits in `context`: at `start`, or (datasets are often a few characters off) nearby."""
    if context[start : start + len(text)] == text:
        return start
    near = [m.start() for m in re.finditer(re.escape(text), context)]
    near = [p for p in near if abs(p - start) <= 20]
    return min(near, key=lambda p: abs(p - start)) if near else None


def normalize(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, words."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def squad_scores(prediction: str, answers: list[str]) -> tuple[float, float]:
    """(exact match, token F1), the best over the gold answers; no gold answers means "no answer"."""
    guess = normalize(prediction)
    if not answers:
        return (float(not guess),) * 2
    best_em, best_f1 = 0.0, 0.0
    for answer in answers:
        gold = normalize(answer)
        best_em = max(best_em, float(guess == gold))
        common = sum((collections.Counter(guess) & collections.Counter(gold)).values())
        if common:
            precision, recall = common / len(guess), common / len(gold)
            best_f1 = max(best_f1, 2 * precision * recall / (precision + recall))
        elif not guess and not gold:
            best_f1 = max(best_f1, 1.0)
    return best_em, best_f1


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def best_spans(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: np.ndarray,
    context: str,
    top_k: int,
    max_answer_tokens: int,
    no_answer: bool,
) -> list[dict]:
    """The `top_k` answers over a row's windows, scored as the `question-answering` pipeline scores them:
    per window, softmax over context tokens (and [CLS]) for start and end, a span scores p(start)*p(end)."""
    candidates, null_score = [], 1.0
    for w in range(offsets.shape[0]):
        in_context = offsets[w, :, 0] >= 0
        keep = in_context.copy()
        keep[0] = True  # [CLS]: the "no answer" position
        start = softmax(np.where(keep, start_logits[w], -10000.0))
        end = softmax(np.where(keep, end_logits[w], -10000.0))
        null_score = min(null_score, float(start[0] * end[0]))
        scores = np.outer(start * in_context, end * in_context)
        scores = np.triu(np.tril(scores, max_answer_tokens - 1))  # start <= end < start + max_answer_tokens
        flat = scores.ravel()
        k = min(top_k, int((flat > 0).sum()))
        for index in np.argsort(-flat)[:k]:
            s, e = divmod(int(index), scores.shape[1])
            a, b = int(offsets[w, s, 0]), int(offsets[w, e, 1])
            candidates.append({"score": float(flat[index]), "start": a, "end": b, "answer": context[a:b]})
    if no_answer:
        candidates.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
    best, seen = [], set()
    for candidate in sorted(candidates, key=lambda c: -c["score"]):
        if (candidate["start"], candidate["end"]) not in seen:  # overlapping windows find the same span twice
            seen.add((candidate["start"], candidate["end"]))
            best.append(candidate)
    return best[:top_k]


def windows_of(arrays: dict[str, list]) -> list[int]:
    return [np.asarray(ids).shape[0] for ids in arrays["input_ids"]]


class SquadMetric(StreamingMetric):
    """SQuAD exact match and F1 of each row's best span (or "no answer"), as running sums."""

    def __init__(self, options: Options):
        self.options = options
        self.sums = torch.zeros(3, dtype=torch.float64)  # exact match, F1, rows
        self.examples, self.processor = Examples(), None  # the report's first eval questions

    def bind(self, model, processor):
        self.processor = processor

    def to(self, device):
        self.sums = self.sums.to(device)
        return self

    def update(self, outputs, inputs, arrays):
        starts, ends = outputs.start_logits.float().cpu().numpy(), outputs.end_logits.float().cpu().numpy()
        batch, first = torch.zeros(3, dtype=torch.float64), 0
        for row, count in enumerate(windows_of(arrays)):
            offsets = np.asarray(arrays["offsets"][row])
            width = offsets.shape[1]
            best = best_spans(
                starts[first : first + count, :width],
                ends[first : first + count, :width],
                offsets,
                arrays["context"][row],
                1,
                self.options.max_answer_tokens,
                self.options.allow_no_answer,
            )
            first += count
            found, answers = best[0]["answer"] if best else "", list(arrays["answer_texts"][row])
            em, f1 = squad_scores(found, answers)
            batch += torch.tensor([em, f1, 1.0], dtype=torch.float64)
            ids, types = np.asarray(arrays["input_ids"][row])[0], np.asarray(arrays["token_type_ids"][row])[0]
            self.examples.add(
                {
                    "question": ids[types == 0],
                    "context": arrays["context"][row],
                    "answers": answers,
                    "found": found,
                    "f1": f1,
                }
            )
        self.sums += batch.to(self.sums.device)

    def compute(self):
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        em, f1, rows = sums.tolist()
        return {"exact_match": em / max(rows, 1), "f1": f1 / max(rows, 1)}

    def views(self):
        if not self.examples.items or self.processor is None:
            return []
        rows = [
            [
                clipped(self.processor.decode(e["question"].tolist(), skip_special_tokens=True)),
                clipped(e["context"]),
                " | ".join(e["answers"]) or "(no answer)",
                e["found"] or "(no answer)",
                float(e["f1"]),
            ]
            for e in self.examples.items
        ]
        note = "The first eval questions, their true answers, the span the model picked and its SQuAD F1."
        return [View("Examples", note, ["question", "context", "answers", "found", "F1"], rows)]
