"""token-classification (NER): one IOB2 tag per word, BERT with a per-token linear head.

Inputs: `tokens` (a list of words, as in CoNLL) or `text` (a string); training tags `ner_tags`
(one per word, strings like "B-PER" or ids named by `data.labels`). Words become word pieces; only
a word's first piece carries its tag in the loss. Output as `transformers.pipeline(
"token-classification", aggregation_strategy="simple")`: `[{entity_group, score, word, start, end}]`
with character offsets into the text (the words joined by single spaces when `tokens` came in).
Metric: entity-level precision / recall / F1 as `seqeval` counts them.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from transformers import AutoModelForTokenClassification, BertConfig

from config import ModelConfig
from errors import UserError
from models.classification import label_maps
from models.eval_views import Examples, clipped, scores_view
from models.parameters import Strings, sanitize
from models.spec import Column, Features, StreamingMetric, TaskSpec, View
from models.text import BERT_SIZES, check_text, pad
from models.text_tokenizers import load_tokenizer, train_wordpiece

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase  # noqa: F401  (named in the TaskSpec base below)

IGNORE = -100  # label of word pieces after a word's first, and of special tokens: left out of the loss

ENTITY = pa.struct(
    [
        ("entity_group", pa.string()),
        ("score", pa.float64()),
        ("word", pa.string()),
        ("start", pa.int64()),
        ("end", pa.int64()),
    ]
)


def parse_conll(data: bytes, path: str) -> Iterator[dict]:
    """CoNLL-2003 style: one word per line, its tag in the last column, sentences split by blank lines."""
    tokens, tags = [], []
    for line in data.decode("utf-8").splitlines():
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if tokens:
                yield {"tokens": tokens, "ner_tags": tags if len(tags) == len(tokens) else None}
            tokens, tags = [], []
            continue
        tokens.append(parts[0])
        if len(parts) > 1:
            tags.append(parts[-1])
    if tokens:
        yield {"tokens": tokens, "ner_tags": tags if len(tags) == len(tokens) else None}


def sentence_of(text, tokens) -> tuple[str | None, list[tuple[int, int]] | None, str | None]:
    """(the sentence, each word's character span or None for raw text, why the row is unusable)."""
    if tokens is None:
        why = check_text(text, "text")
        return (None, None, "text or tokens is needed" if text is None else why) if why else (text, None, None)
    if isinstance(tokens, np.ndarray):
        tokens = tokens.tolist()
    if not isinstance(tokens, list) or not tokens:
        return None, None, "tokens is not a non-empty list of words"
    if not all(isinstance(t, str) for t in tokens):
        return None, None, "tokens holds a value that is not a string"
    spans, start = [], 0
    for word in tokens:
        spans.append((start, start + len(word)))
        start += len(word) + 1
    sentence = " ".join(tokens)
    return (sentence, spans, None) if sentence.strip() else (None, None, "tokens is empty")


def tag_ids(tags, n_words: int, labels: dict) -> tuple[list[int] | None, str | None]:
    if tags is None:
        return None, "ner_tags is null"
    tags = tags.tolist() if isinstance(tags, np.ndarray) else list(tags)
    if len(tags) != n_words:
        return None, f"ner_tags has {len(tags)} tags for {n_words} words"
    ids = []
    for tag in tags:
        if isinstance(tag, (int, np.integer)) and not isinstance(tag, bool) and tag not in labels:
            if not 0 <= tag < len(labels):
                return None, f"tag id {tag} is out of range (data.labels has {len(labels)})"
            ids.append(int(tag))
        elif tag in labels:
            ids.append(labels[tag])
        else:
            return None, f"unknown tag {tag!r} (not in the training split)"
    return ids, None


def group_entities(tokens: list[dict], ignore: set[str], processor) -> list[dict]:
    """The `simple` aggregation of `TokenClassificationPipeline`: adjacent pieces with one entity type join,
    a B- tag starts a new entity."""

    def tag(entity):
        return (entity[:1], entity[2:]) if entity.startswith(("B-", "I-")) else ("I", entity)

    groups, current = [], []
    for token in tokens:
        if current:
            bi, kind = tag(token["entity"])
            if kind == tag(current[-1]["entity"])[1] and bi != "B":
                current.append(token)
                continue
            groups.append(current)
        current = [token]
    if current:
        groups.append(current)
    out = []
    for group in groups:
        name = group[0]["entity"].split("-", 1)[-1]
        if name in ignore:
            continue
        out.append(
            {
                "entity_group": name,
                "score": float(np.mean([t["score"] for t in group])),
                "word": processor.convert_tokens_to_string([t["word"] for t in group]),
                "start": group[0]["start"],
                "end": group[-1]["end"],
            }
        )
    return out


class EntityMetric(StreamingMetric):
    """seqeval's entity-level micro precision / recall / F1 from running counts (word-level tags); the
    report shows the same counts per entity type and a few sentences with their true and found entities."""

    def __init__(self, labels: list):
        self.names = [str(label) for label in labels]
        self.types = sorted({name.split("-", 1)[-1] for name in self.names if name != "O"})
        self.counts = torch.zeros(5, dtype=torch.float64)  # true positives, predicted, true, words right, words
        self.per_type = torch.zeros(len(self.types), 3, dtype=torch.float64)  # true positives, predicted, true
        self.per_type_total, self.examples = None, Examples()

    def to(self, device):
        self.counts, self.per_type = self.counts.to(device), self.per_type.to(device)
        return self

    def update(self, outputs, inputs, arrays):
        # here, not at the top: seqeval imports scikit-learn and scipy (~1.3 s), which preprocessing actors and
        # Serve replicas never need
        from seqeval.metrics.sequence_labeling import get_entities

        predicted = outputs.logits.argmax(-1).tolist()
        batch = torch.zeros(5, dtype=torch.float64)
        per_type = torch.zeros_like(self.per_type, device="cpu")
        column = {name: k for k, name in enumerate(self.types)}
        for row, (tags, first) in enumerate(zip(arrays["tags"], arrays["first_piece"])):
            true = [self.names[t] for t in tags]
            guess = [self.names[predicted[row][p]] if p >= 0 else "O" for p in np.asarray(first).tolist()]
            true_entities, guessed = set(get_entities(true)), set(get_entities(guess))
            batch += torch.tensor(
                [
                    len(true_entities & guessed),
                    len(guessed),
                    len(true_entities),
                    sum(a == b for a, b in zip(true, guess)),
                    len(true),
                ],
                dtype=torch.float64,
            )
            for k, entities in enumerate((true_entities & guessed, guessed, true_entities)):
                for kind, _, _ in entities:
                    if kind in column:
                        per_type[column[kind], k] += 1
            if self.examples.room() and "text" in arrays:
                self.examples.add({"text": arrays["text"][row], "true": true_entities, "found": guessed})
        self.counts += batch.to(self.counts.device)
        self.per_type += per_type.to(self.per_type.device)

    def compute(self):
        counts = torch.cat([self.counts, self.per_type.flatten()])
        if dist.is_initialized():
            dist.all_reduce(counts)
        self.per_type_total = counts[5:].view(-1, 3).cpu().numpy()
        tp, predicted, true, right, words = counts[:5].tolist()
        precision, recall = tp / max(predicted, 1), tp / max(true, 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "accuracy": right / max(words, 1)}

    def views(self):
        if self.per_type_total is None:
            return []
        tp, predicted, true = self.per_type_total.T
        note = "Entity level, as seqeval counts: an entity is found when its type and its words both match."
        views = [scores_view("Per-entity precision and recall", note, "entity", self.types, tp, predicted, true)]
        if self.examples.items:

            def shown(text: str, entities) -> str:
                words = text.split(" ")
                found = sorted(entities, key=lambda e: e[1])
                return "; ".join(f"{kind}: {' '.join(words[start : end + 1])}" for kind, start, end in found) or "-"

            rows = [
                [clipped(e["text"]), shown(e["text"], e["true"]), shown(e["text"], e["found"])]
                for e in self.examples.items
            ]
            views.append(View("Examples", "The first eval sentences.", ["sentence", "entities", "found"], rows))
        return views


class TokenClassification(TaskSpec["PreTrainedTokenizerBase"]):
    name = "token-classification"
    architectures = ("bert",)
    columns = (
        Column("tokens", "the words of a sentence (a list of strings); or give text", required=False),
        Column("text", "a sentence as one string; or give tokens", required=False),
        Column("ner_tags", "one IOB2 tag per word (strings, or ids named by data.labels)", training_only=True),
    )
    label_column = "ner_tags"
    best_metric = "f1"
    best_metric_mode = "max"
    output_columns = {"entities": pa.list_(ENTITY)}
    formats = {"conll": parse_conll}
    format_suffixes = {".conll": "conll", ".conllu": "conll", ".iob": "conll"}

    def labels_in(self, values):
        return {tag for tags in values if tags is not None for tag in tags if tag is not None}

    # --- processor and model ----------------------------------------------------------------
    def build_processor(self, model_cfg: ModelConfig, source_dir, train_rows):
        if source_dir:
            return load_tokenizer(source_dir, model_cfg.max_length)

        def texts():
            for row in train_rows:
                sentence, _, why = sentence_of(row.get("text"), row.get("tokens"))
                if why is None:
                    yield sentence

        return train_wordpiece(
            texts(), model_cfg.tokenizer.vocab_size, model_cfg.tokenizer.lowercase, model_cfg.max_length or 512
        )

    def build_model(self, model_cfg: ModelConfig, source_dir, labels, processor):
        if any(not isinstance(label, str) for label in labels):
            raise UserError("data.labels: ner_tags holds tag ids; list the tag names in data.labels (index = id)")
        id2label, label2id = label_maps(labels)
        if source_dir:
            return AutoModelForTokenClassification.from_pretrained(
                source_dir,
                num_labels=len(labels),
                id2label=id2label,
                label2id=label2id,
                ignore_mismatched_sizes=True,
                trust_remote_code=model_cfg.trust_remote_code,
                use_safetensors=True,
            )
        limit = processor.model_max_length
        config = BertConfig(
            **BERT_SIZES[model_cfg.init.size],
            vocab_size=len(processor),
            pad_token_id=processor.pad_token_id,
            max_position_embeddings=max(limit, 64) if limit < 10**6 else 512,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            **model_cfg.init.overrides,
        )
        return AutoModelForTokenClassification.from_config(config)

    def load(self, model_dir):
        return AutoModelForTokenClassification.from_pretrained(model_dir, use_safetensors=True), load_tokenizer(
            model_dir, None
        )

    # --- preprocess / collate / postprocess -------------------------------------------------
    def preprocess(self, batch, processor, ctx):
        n = len(next(iter(batch.values())))
        texts, token_lists = batch.get("text", [None] * n), batch.get("tokens", [None] * n)
        training = ctx.labels is not None
        rows = [sentence_of(texts[i], token_lists[i]) for i in range(n)]
        errors = [why for _, _, why in rows]
        tags: list = [None] * n
        if training:
            for i, (sentence, spans, why) in enumerate(rows):
                if why is None and spans is None:
                    errors[i] = "training needs tokens (words) with ner_tags, not text"
                elif why is None:
                    tags[i], errors[i] = tag_ids(batch["ner_tags"][i], len(spans), ctx.labels)
        ok = [i for i in range(n) if errors[i] is None]
        encoded = (
            processor(
                [rows[i][0] for i in ok], return_offsets_mapping=True, return_special_tokens_mask=True, truncation=False
            )
            if ok
            else None
        )
        limit = processor.model_max_length
        arrays: dict[str, list] = {key: [None] * n for key in ("input_ids", "offsets", "special", "text")}
        if training:
            arrays.update(labels=[None] * n, tags=[None] * n, first_piece=[None] * n)
        lengths, flags = [0] * n, [None] * n
        for j, i in enumerate(ok):
            ids, offsets, special = (
                encoded["input_ids"][j],
                encoded["offset_mapping"][j],
                encoded["special_tokens_mask"][j],
            )
            if len(ids) > limit:  # keep the first pieces and the closing [SEP]
                ids, offsets, special = (
                    ids[: limit - 1] + ids[-1:],
                    offsets[: limit - 1] + offsets[-1:],
                    special[: limit - 1] + special[-1:],
                )
                flags[i] = f"truncated to {limit} tokens"
            arrays["input_ids"][i] = np.asarray(ids, dtype=np.int64)
            arrays["offsets"][i] = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            arrays["special"][i] = np.asarray(special, dtype=np.int8)
            arrays["text"][i] = rows[i][0]
            lengths[i] = len(ids)
            if training:
                starts = {start: w for w, (start, _) in enumerate(rows[i][1])}
                first = np.full(len(starts), -1, dtype=np.int64)
                labels = np.full(len(ids), IGNORE, dtype=np.int64)
                for p, ((start, end), is_special) in enumerate(zip(offsets, special)):
                    word = starts.get(start) if not is_special and end > start else None
                    if word is not None and first[word] < 0:
                        first[word], labels[p] = p, tags[i][word]
                arrays["labels"][i], arrays["tags"][i], arrays["first_piece"][i] = labels, tags[i], first
        return Features(arrays=arrays, lengths=lengths, errors=errors, flags=flags)

    def collate(self, arrays, processor):
        ids = arrays["input_ids"]
        inputs = {
            "input_ids": pad(ids, processor.pad_token_id),
            "attention_mask": pad([np.ones(len(r)) for r in ids], 0),
        }
        if arrays.get("labels") is not None:
            inputs["labels"] = pad(arrays["labels"], IGNORE)
        return inputs

    def sanitize_parameters(self, parameters, options):
        """`ignore_labels` (at most 100 labels of at most 100 characters): entities left out (default ["O"])."""
        return sanitize(
            parameters, {"ignore_labels": Strings(max_items=100, max_length=100)}, f"parameter of {self.name}"
        )

    def postprocess(self, outputs, inputs, arrays, model, processor, parameters):
        ignore = set(parameters.get("ignore_labels") or ["O"])
        probs = outputs.logits.float().softmax(-1).cpu().numpy()
        id2label, unk = model.config.id2label, processor.unk_token_id
        results = []
        for row, (ids, offsets, special, text) in enumerate(
            zip(arrays["input_ids"], arrays["offsets"], arrays["special"], arrays["text"])
        ):
            tokens = []
            for p, token_id in enumerate(np.asarray(ids).tolist()):
                if special[p]:
                    continue
                start, end = (int(x) for x in offsets[p])
                best = int(probs[row, p].argmax())
                word = text[start:end] if token_id == unk else processor.convert_ids_to_tokens(token_id)
                tokens.append(
                    {
                        "entity": id2label[best],
                        "score": float(probs[row, p, best]),
                        "word": word,
                        "start": start,
                        "end": end,
                    }
                )
            results.append(group_entities(tokens, ignore, processor))
        return results

    def to_columns(self, predictions):
        return {"entities": predictions}

    def request_inputs(self, inputs):
        rows = []
        for item in inputs if isinstance(inputs, list) else [inputs]:
            if isinstance(item, dict):
                unknown = set(item) - {"text", "tokens"}
                if unknown:
                    raise UserError(f"inputs: unknown field(s) {sorted(unknown)}; expected 'text' or 'tokens'")
                rows.append({"text": item.get("text"), "tokens": item.get("tokens")})
            else:
                rows.append({"text": item, "tokens": None})
        return rows

    def metrics(self, labels, options):
        return EntityMetric(labels)

    # --- demo data --------------------------------------------------------------------------
    def demo_data(self, n, seed):
        """Templated sentences about people, places and companies (multi-word names included)."""
        rng = random.Random(seed)
        names = {
            "PER": [
                "Alice Smith",
                "Bob",
                "Carlos Diaz",
                "Dana",
                "Eve Jones",
                "Farid",
                "Grace Lee",
                "Hiro Tanaka",
                "Ivan",
                "Julia Roberts",
            ],
            "LOC": [
                "Paris",
                "New York",
                "Berlin",
                "San Francisco",
                "Tokyo",
                "Lagos",
                "Lima",
                "Cape Town",
                "Oslo",
                "Rio de Janeiro",
            ],
            "ORG": [
                "Acme Corp",
                "Globex",
                "Initech",
                "Umbrella Inc",
                "Stark Industries",
                "Hooli",
                "Wayne Enterprises",
                "Vandelay",
                "Tyrell",
                "Soylent",
            ],
        }
        templates = [
            "{PER} moved to {LOC} last year .",
            "{PER} works for {ORG} in {LOC} .",
            "The {ORG} office in {LOC} hired {PER} .",
            "{PER} met {PER} at the {ORG} party .",
            "Yesterday {ORG} said that {PER} will visit {LOC} .",
            "In {LOC} , {PER} founded {ORG} .",
            "{ORG} opened a new store in {LOC} today .",
            "Nobody from {LOC} called {PER} again .",
            "The weather was nice and everyone stayed at home .",
            "{PER} thinks {ORG} is growing fast .",
        ]
        rows = []
        for i in range(n):
            tokens, tags = [], []
            for part in rng.choice(templates).split():
                if part.startswith("{") and part.endswith("}"):
                    kind = part[1:-1]
                    words = rng.choice(names[kind]).split()
                    tokens += words
                    tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
                else:
                    tokens.append(part)
                    tags.append("O")
            rows.append({"id": f"sent-{seed}-{i}", "tokens": tokens, "ner_tags": tags})
        return rows


TASK = TokenClassification()
