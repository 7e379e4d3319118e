"""fill-mask: masked-language modelling with BERT, for domain-adaptive pre-training on a plain corpus.

Input `text` (a `.txt` file reads as one row per line). Training masks 15% of the word pieces afresh
in every batch (`collate`), replacing 80% of them with [MASK], 10% with a random piece and leaving
10%; the eval split masks the same pieces every time (seeded by the text), so eval perplexity is
comparable across checkpoints. Prediction fills each [MASK] of a text: as
`transformers.pipeline("fill-mask")`, the top-k `{score, token, token_str, sequence}`, a list per
mask when a text has several. Metrics: perplexity, top-1 and top-5 accuracy on masked pieces.
"""

from __future__ import annotations

import random
import zlib
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModelForMaskedLM, BertConfig

from config import ModelConfig
from models.eval_views import Examples, clipped
from models.parameters import Number, sanitize
from models.spec import Column, Features, StreamingMetric, TaskSpec, View, one_field_rows
from models.text import BERT_SIZES, check_text, pad
from models.text_tokenizers import load_tokenizer, train_wordpiece

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase  # noqa: F401  (named in the TaskSpec base below)

IGNORE = -100
FILLED = pa.struct(
    [("score", pa.float64()), ("token", pa.int64()), ("token_str", pa.string()), ("sequence", pa.string())]
)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mlm_probability: float = Field(0.15, gt=0, lt=1)  # share of word pieces the model must restore


def mask_tokens(
    ids: np.ndarray, maskable: np.ndarray, probability: float, rng: np.random.Generator, mask_id: int, vocab: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of one row: (inputs, labels); at least one piece is chosen when any can be."""
    chosen = (rng.random(len(ids)) < probability) & maskable
    if not chosen.any() and maskable.any():
        chosen[rng.choice(np.flatnonzero(maskable))] = True
    labels = np.where(chosen, ids, IGNORE)
    roll = rng.random(len(ids))
    inputs = ids.copy()
    inputs[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = rng.choice(vocab, size=int(swap.sum()))
    return inputs, labels


class MaskedLMMetric(StreamingMetric):
    """Perplexity (exp of the mean loss per masked piece) and top-1 / top-5 accuracy, as running sums."""

    def __init__(self):
        self.sums = torch.zeros(4, dtype=torch.float64)  # summed loss, top-1 right, top-5 right, masked pieces
        self.examples, self.processor = Examples(), None  # the report's first eval rows, their masks filled

    def bind(self, model, processor):
        self.processor = processor

    def to(self, device):
        self.sums = self.sums.to(device)
        return self

    def update(self, outputs, inputs, arrays):
        labels = inputs["labels"]
        chosen = labels != IGNORE
        logits, targets = outputs.logits[chosen].float(), labels[chosen]
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        self.sums += torch.stack(
            [
                loss.double(),
                (top5[:, 0] == targets).sum().double(),
                (top5 == targets[:, None]).any(-1).sum().double(),
                torch.tensor(float(len(targets)), dtype=torch.float64, device=loss.device),
            ]
        ).to(self.sums.device)
        best = outputs.logits.argmax(-1)
        for i in range(min(self.examples.room(), len(labels) if "input_ids" in inputs else 0)):
            where = (labels[i] != IGNORE).cpu()
            keep = inputs["attention_mask"][i].bool().cpu()
            shown = inputs["input_ids"][i].cpu().masked_fill(where, -1)[keep]  # -1: a masked piece
            self.examples.add(
                {"text": shown.numpy(), "true": labels[i].cpu()[where].numpy(), "found": best[i].cpu()[where].numpy()}
            )

    def compute(self):
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        loss, top1, top5, count = sums.tolist()
        count = max(count, 1)
        return {
            "perplexity": float(np.exp(min(loss / count, 50.0))),
            "accuracy": top1 / count,
            "top5_accuracy": top5 / count,
        }

    def views(self):
        if not self.examples.items or self.processor is None:
            return []
        p, special = self.processor, set(self.processor.all_special_ids)
        rows = []
        for e in self.examples.items:
            tokens = [p.mask_token if i < 0 else p.convert_ids_to_tokens(int(i)) for i in e["text"] if i not in special]
            true, found = (p.convert_ids_to_tokens(e[k].tolist()) for k in ("true", "found"))
            right = sum(a == b for a, b in zip(true, found))
            rows.append(
                [
                    clipped(p.convert_tokens_to_string(tokens)),
                    " ".join(true),
                    " ".join(found),
                    f"{right} of {len(true)}",
                ]
            )
        note = "The first eval rows with the pieces the eval masked, what they were and the model's first choice."
        return [View("Examples", note, ["text", "masked pieces", "predicted", "right"], rows)]


class FillMask(TaskSpec["PreTrainedTokenizerBase"]):
    name = "fill-mask"
    architectures = ("bert",)
    columns = (Column("text", "a text; to predict, with one or more [MASK] tokens"),)
    label_column = None
    best_metric = "perplexity"
    best_metric_mode = "min"
    output_columns = {"predictions": pa.list_(pa.list_(FILLED))}  # per mask, the top-k fillers
    Options = Options

    # --- processor and model ----------------------------------------------------------------
    def build_processor(self, model_cfg: ModelConfig, source_dir, train_rows):
        if source_dir:
            return load_tokenizer(source_dir, model_cfg.max_length)
        texts = (row["text"] for row in train_rows if isinstance(row.get("text"), str))
        return train_wordpiece(
            texts, model_cfg.tokenizer.vocab_size, model_cfg.tokenizer.lowercase, model_cfg.max_length or 512
        )

    def build_model(self, model_cfg: ModelConfig, source_dir, labels, processor):
        if source_dir:
            return AutoModelForMaskedLM.from_pretrained(
                source_dir, trust_remote_code=model_cfg.trust_remote_code, use_safetensors=True
            )
        limit = processor.model_max_length
        return AutoModelForMaskedLM.from_config(
            BertConfig(
                **BERT_SIZES[model_cfg.init.size],
                vocab_size=len(processor),
                pad_token_id=processor.pad_token_id,
                max_position_embeddings=max(limit, 64) if limit < 10**6 else 512,
                **model_cfg.init.overrides,
            )
        )

    def load(self, model_dir):
        return AutoModelForMaskedLM.from_pretrained(model_dir, use_safetensors=True), load_tokenizer(model_dir, None)

    # --- preprocess / collate / postprocess -------------------------------------------------
    def preprocess(self, batch, processor, ctx):
        texts = batch["text"]
        n = len(texts)
        predicting = ctx.labels is None
        probability = (ctx.options or Options()).mlm_probability
        errors = [check_text(t, "text") for t in texts]
        ok = [i for i in range(n) if errors[i] is None]
        encoded = processor([texts[i] for i in ok], truncation=False)["input_ids"] if ok else []
        limit, mask_id = processor.model_max_length, processor.mask_token_id
        arrays: dict[str, list] = {"input_ids": [None] * n}
        if not predicting:
            arrays.update(mask_seed=[None] * n, mlm_probability=[None] * n)
        lengths, flags = [0] * n, [None] * n
        for j, i in enumerate(ok):
            ids = encoded[j]
            if len(ids) <= 2:
                errors[i] = "text has no tokens"
                continue
            if len(ids) > limit:
                ids = ids[: limit - 1] + ids[-1:]
                flags[i] = f"truncated to {limit} tokens"
            if predicting and mask_id not in ids:
                where = f" within the first {limit} tokens" if flags[i] else ""
                errors[i] = f"text has no {processor.mask_token} token{where}"
                continue
            arrays["input_ids"][i] = np.asarray(ids, dtype=np.int64)
            lengths[i] = len(ids)
            if not predicting:  # training draws fresh masks per batch; eval the same masks every time
                arrays["mask_seed"][i] = -1 if ctx.train else zlib.crc32(texts[i].encode("utf-8"))
                arrays["mlm_probability"][i] = probability
        return Features(arrays=arrays, lengths=lengths, errors=errors, flags=flags)

    def collate(self, arrays, processor):
        rows = [np.asarray(ids, dtype=np.int64) for ids in arrays["input_ids"]]
        if arrays.get("mask_seed") is not None:
            special = np.asarray(processor.all_special_ids)
            vocab = np.setdiff1d(np.arange(len(processor)), special)
            masked = []
            for ids, seed, probability in zip(rows, arrays["mask_seed"], arrays["mlm_probability"]):
                rng = np.random.default_rng(None if seed < 0 else int(seed))
                masked.append(
                    mask_tokens(ids, ~np.isin(ids, special), float(probability), rng, processor.mask_token_id, vocab)
                )
            rows = [inputs for inputs, _ in masked]
            labels = pad([labels for _, labels in masked], IGNORE)
        inputs = {
            "input_ids": pad(rows, processor.pad_token_id),
            "attention_mask": pad([np.ones(len(r)) for r in rows], 0),
        }
        if arrays.get("mask_seed") is not None:
            inputs["labels"] = labels
        return inputs

    def sanitize_parameters(self, parameters, options):
        """`top_k` (1-50): fills listed per mask; each costs a decode of the whole sequence."""
        return sanitize(parameters, {"top_k": Number(int, 1, 50)}, f"parameter of {self.name}")

    def postprocess(self, outputs, inputs, arrays, model, processor, parameters):
        top_k = int(parameters.get("top_k") or 5)
        results = []
        for row, ids in enumerate(arrays["input_ids"]):
            ids = np.asarray(ids)
            where = np.flatnonzero(ids == processor.mask_token_id)
            probs = outputs.logits[row, torch.as_tensor(where)].float().softmax(-1)
            values, predicted = probs.topk(min(top_k, probs.shape[-1]))
            single = len(where) == 1
            per_mask = []
            for position, scores, tokens in zip(where, values.tolist(), predicted.tolist()):
                fills = []
                for score, token in zip(scores, tokens):
                    filled = ids.copy()
                    filled[position] = token
                    fills.append(
                        {
                            "score": score,
                            "token": token,
                            "token_str": processor.decode([token]),
                            "sequence": processor.decode(filled, skip_special_tokens=single),
                        }
                    )
                per_mask.append(fills)
            results.append(per_mask[0] if single else per_mask)
        return results

    def to_columns(self, predictions):
        def per_mask(p):
            return None if p is None else [p] if p and isinstance(p[0], dict) else p

        return {"predictions": [per_mask(p) for p in predictions]}

    def request_inputs(self, inputs):
        return one_field_rows(inputs, "text", "'text'")

    def metrics(self, labels, options):
        return MaskedLMMetric()

    # --- demo data --------------------------------------------------------------------------
    def demo_data(self, n, seed):
        """Sentences whose words predict each other (an animal and its sound, a country and its capital).
        The first row is a cloze with a [MASK]: the input Serve's health check predicts."""
        rng = random.Random(seed)
        pairs = [
            (
                "the {} says {} .",
                [
                    ("cow", "moo"),
                    ("dog", "woof"),
                    ("cat", "meow"),
                    ("duck", "quack"),
                    ("owl", "hoot"),
                    ("snake", "hiss"),
                ],
            ),
            (
                "the capital of {} is {} .",
                [
                    ("france", "paris"),
                    ("japan", "tokyo"),
                    ("peru", "lima"),
                    ("norway", "oslo"),
                    ("egypt", "cairo"),
                    ("kenya", "nairobi"),
                ],
            ),
            (
                "{} is the opposite of {} .",
                [
                    ("hot", "cold"),
                    ("up", "down"),
                    ("big", "small"),
                    ("fast", "slow"),
                    ("early", "late"),
                    ("happy", "sad"),
                ],
            ),
        ]
        openers = ["", "", "", "everyone knows that", "as usual"]
        rows = []
        for i in range(n):
            template, words = rng.choice(pairs)
            sentence = template.format(*rng.choice(words))
            rows.append({"id": f"line-{seed}-{i}", "text": f"{rng.choice(openers)} {sentence}".strip()})
        if rows:
            rows[0]["text"] = "the cow says [MASK] ."
        return rows


TASK = FillMask()
