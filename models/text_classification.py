"""text-classification: one label per text (or text pair), BERT / DistilBERT with a pooled head.

Inputs `text` (+ optional `text_pair`), training label `label` (strings or ints). Output as
`transformers.pipeline("text-classification")`: `{"label", "score"}`, or the top-k list when
`parameters.top_k` is given. Metrics: accuracy and macro-F1.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
)

from config import ModelConfig
from errors import UserError
from models.classification import ClassificationMetric, label_maps, ranked_labels
from models.eval_views import clipped
from models.parameters import TOP_K, sanitize
from models.spec import Column, Features, TaskSpec
from models.text import BERT_SIZES, check_text, pad
from models.text_tokenizers import load_tokenizer, train_wordpiece

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase  # noqa: F401  (named in the TaskSpec base below)

# DistilBERT at the sizes BERT from-scratch runs use.
DISTILBERT_SIZES = {
    name: dict(
        dim=s["hidden_size"],
        n_layers=s["num_hidden_layers"],
        n_heads=s["num_attention_heads"],
        hidden_dim=s["intermediate_size"],
    )
    for name, s in BERT_SIZES.items()
}


class TextClassificationMetric(ClassificationMetric):
    """Accuracy and macro-F1; the report's examples show each text as the model read it."""

    example_column = "text"
    example_note = "Texts are decoded from the tokens the model read (lowercased by an uncased tokenizer, truncated)."

    def example(self, i, inputs, arrays):
        return inputs["input_ids"][i][inputs["attention_mask"][i].bool()].cpu().numpy()

    def described(self, ids):
        """The text, and its pair after a " | " (the tokens between separators, decoded apart); unknown
        words stay visible as the tokenizer's unknown token."""
        p = self.processor
        hidden = set(p.all_special_ids) - {p.unk_token_id}
        pieces = np.split(ids, np.flatnonzero(ids == p.sep_token_id)) if p.sep_token_id is not None else [ids]
        texts = [p.decode([int(i) for i in piece if int(i) not in hidden]).strip() for piece in pieces]
        return clipped(" | ".join(text for text in texts if text))


class TextClassification(TaskSpec["PreTrainedTokenizerBase"]):
    name = "text-classification"
    architectures = ("bert", "distilbert")
    columns = (
        Column("text", "the text to classify"),
        Column("text_pair", "a second text, for pair tasks (NLI, paraphrase)", required=False),
        Column("label", "the class, a string or an int", training_only=True),
    )
    label_column = "label"
    best_metric = "accuracy"
    best_metric_mode = "max"
    output_columns = {"label": "string", "score": "float64"}

    # --- processor and model ----------------------------------------------------------------
    def build_processor(self, model_cfg: ModelConfig, source_dir, train_rows):
        if source_dir:
            return load_tokenizer(source_dir, model_cfg.max_length)

        def texts():
            for row in train_rows:
                for column in ("text", "text_pair"):
                    if isinstance(row.get(column), str):
                        yield row[column]

        return train_wordpiece(
            texts(), model_cfg.tokenizer.vocab_size, model_cfg.tokenizer.lowercase, model_cfg.max_length or 512
        )

    def build_model(self, model_cfg: ModelConfig, source_dir, labels, processor):
        id2label, label2id = label_maps(labels)
        if source_dir:
            return AutoModelForSequenceClassification.from_pretrained(
                source_dir,
                num_labels=len(labels),
                id2label=id2label,
                label2id=label2id,
                ignore_mismatched_sizes=True,  # a new head on a checkpoint trained for other labels
                trust_remote_code=model_cfg.trust_remote_code,
                use_safetensors=True,
            )
        init = model_cfg.init
        common = dict(
            vocab_size=len(processor),
            pad_token_id=processor.pad_token_id,
            max_position_embeddings=max(processor.model_max_length, 64) if processor.model_max_length < 10**6 else 512,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            **init.overrides,
        )
        if init.architecture == "bert":
            return AutoModelForSequenceClassification.from_config(BertConfig(**BERT_SIZES[init.size], **common))
        return AutoModelForSequenceClassification.from_config(DistilBertConfig(**DISTILBERT_SIZES[init.size], **common))

    def load(self, model_dir):
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
        return model, load_tokenizer(model_dir, None)

    # --- preprocess / collate / postprocess -------------------------------------------------
    def preprocess(self, batch, processor, ctx):
        labels = ctx.labels
        n = len(batch["text"])
        pairs = batch.get("text_pair")
        errors: list[str | None] = []
        for i in range(n):
            why = check_text(batch["text"][i], "text")
            if why is None and pairs is not None:
                why = check_text(pairs[i], "text_pair")
            if why is None and labels is not None:
                label = batch["label"][i]
                label = label.item() if isinstance(label, np.generic) else label
                if label is None:
                    why = "label is null"
                elif label not in labels:
                    why = f"unknown label {label!r} (not in the training split)"
            errors.append(why)
        ok = [i for i in range(n) if errors[i] is None]
        texts = [batch["text"][i] for i in ok]
        text_pairs = [pairs[i] for i in ok] if pairs is not None else None
        encoded = processor(texts, text_pairs, truncation=False) if ok else {"input_ids": []}
        limit = processor.model_max_length
        too_long = [j for j, ids in enumerate(encoded["input_ids"]) if len(ids) > limit]
        if too_long:  # rare: re-encode only those rows, with the tokenizer's own truncation rules
            again = processor(
                [texts[j] for j in too_long],
                [text_pairs[j] for j in too_long] if text_pairs else None,
                truncation=True,
                max_length=limit,
            )
            for key in encoded:
                for k, j in enumerate(too_long):
                    encoded[key][j] = again[key][k]

        arrays: dict[str, list] = {"input_ids": [None] * n}
        if "token_type_ids" in encoded:
            arrays["token_type_ids"] = [None] * n
        if labels is not None:
            arrays["labels"] = [None] * n
        lengths, flags = [0] * n, [None] * n
        for j, i in enumerate(ok):
            arrays["input_ids"][i] = encoded["input_ids"][j]
            if "token_type_ids" in arrays:
                arrays["token_type_ids"][i] = encoded["token_type_ids"][j]
            if labels is not None:
                label = batch["label"][i]
                arrays["labels"][i] = labels[label.item() if isinstance(label, np.generic) else label]
            lengths[i] = len(encoded["input_ids"][j])
        for j in too_long:
            flags[ok[j]] = f"truncated to {limit} tokens"
        return Features(arrays=arrays, lengths=lengths, errors=errors, flags=flags)

    def collate(self, arrays, processor):
        ids = arrays["input_ids"]
        batch = {"input_ids": pad(ids, processor.pad_token_id), "attention_mask": pad([[1] * len(r) for r in ids], 0)}
        if arrays.get("token_type_ids") is not None:
            batch["token_type_ids"] = pad(arrays["token_type_ids"], 0)
        if arrays.get("labels") is not None:
            batch["labels"] = torch.as_tensor(np.asarray(arrays["labels"], dtype=np.int64))
        return batch

    def sanitize_parameters(self, parameters, options):
        """`top_k` (1-100): how many labels to list (a list answer when given)."""
        return sanitize(parameters, {"top_k": TOP_K}, f"parameter of {self.name}")

    def postprocess(self, outputs, inputs, arrays, model, processor, parameters):
        probs = outputs.logits.float().softmax(-1)
        top_k = parameters.get("top_k")
        ranked = ranked_labels(probs, model.config.id2label, int(top_k or 1))
        return ranked if top_k else [row[0] for row in ranked]

    def to_columns(self, predictions):
        best = [p[0] if isinstance(p, list) else p for p in predictions]
        return {"label": [p["label"] if p else None for p in best], "score": [p["score"] if p else None for p in best]}

    def request_inputs(self, inputs):
        items = inputs if isinstance(inputs, list) else [inputs]
        rows = []
        for item in items:
            if isinstance(item, dict):
                unknown = set(item) - {"text", "text_pair"}
                if unknown:
                    raise UserError(
                        f"inputs: unknown field(s) {sorted(unknown)}; expected 'text' and optional 'text_pair'"
                    )
                rows.append({"text": item.get("text"), "text_pair": item.get("text_pair")})
            else:
                rows.append({"text": item})
        if any(r.get("text_pair") is not None for r in rows):
            return rows
        return [{"text": r["text"]} for r in rows]

    def metrics(self, labels, options):
        return TextClassificationMetric(labels)

    # --- demo data --------------------------------------------------------------------------
    def demo_data(self, n, seed):
        """Texts whose topic words decide the label, buried in shared filler words."""
        rng = random.Random(seed)
        topics = {
            "sports": "goal match team coach league striker referee season stadium score",
            "tech": "software chip server cloud code laptop network robot database app",
            "food": "pasta recipe oven garlic bakery flavor soup chef spice dessert",
            "travel": "flight hotel beach passport museum train island tour luggage map",
        }
        filler = (
            "the a today we they said about very new old some with from this that it was really "
            "people time week report story just also more many"
        ).split()
        rows = []
        for i in range(n):
            label = rng.choice(sorted(topics))
            words = rng.sample(topics[label].split(), rng.randint(1, 3))
            words += [rng.choice(filler) for _ in range(rng.randint(3, 30))]
            rng.shuffle(words)
            rows.append({"id": f"doc-{seed}-{i}", "text": " ".join(words), "label": label})
        return rows


TASK = TextClassification()
