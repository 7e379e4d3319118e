"""Sequence-to-sequence tasks (summarization, translation): BART or T5 reads `source`, writes `target`.

Shared by models/summarization.py and models/translation.py, which add only their output key, their
metric and their demo data. The source gets `task_options.prefix` (T5's "summarize: ",
"translate English to German: "); sources and targets longer than `max_source_length` /
`max_target_length` are truncated and flagged. Prediction and evaluation generate with
`model.generate`; the settings are the task_options defaults, then `predict.parameters`, then the
request's `parameters` (num_beams, max_new_tokens, min_new_tokens, length_penalty,
no_repeat_ngram_size, early_stopping), with max_new_tokens at most `max_new_tokens_limit` (a request
asking more is refused). Eval metrics generate for each eval batch and keep only running sums.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import (
    AutoModelForSeq2SeqLM,
    BartConfig,
    T5Config,
)

from config import ModelConfig
from errors import UserError
from models.eval_views import Examples, clipped
from models.generation import check_parameters, generate_kwargs, merge_settings
from models.spec import Column, Features, StreamingMetric, TaskSpec, View
from models.text import check_text, pad
from models.text_tokenizers import load_tokenizer, train_bpe, train_unigram

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase  # noqa: F401  (named in the TaskSpec base below)

BART_SIZES = {
    "tiny": dict(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
    ),
    "mini": dict(
        d_model=256,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=1024,
        decoder_ffn_dim=1024,
    ),
    "small": dict(
        d_model=512,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
    ),
    "base": dict(
        d_model=768,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
    ),
}
T5_SIZES = {
    "tiny": dict(d_model=64, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=2),
    "mini": dict(d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4),
    "small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8),
    "base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12),
}
DEFAULT_CONTEXT = 512  # from-scratch models without model.max_length
PARAMETERS = (
    "num_beams",
    "max_new_tokens",
    "min_new_tokens",
    "length_penalty",
    "no_repeat_ngram_size",
    "early_stopping",
)
IGNORE = -100


class Seq2SeqOptions(BaseModel):
    """`task_options` for summarization and translation."""

    model_config = ConfigDict(extra="forbid")
    prefix: str = ""  # put before every source, e.g. "summarize: " for T5
    max_source_length: int | None = Field(None, ge=8)  # default model.max_length (the tokenizer's limit)
    max_target_length: int = Field(128, ge=4)
    num_beams: int = Field(1, ge=1, le=16)
    max_new_tokens: int = Field(64, ge=1)
    max_new_tokens_limit: int = Field(256, ge=1)  # requests asking for more are refused
    min_new_tokens: int = Field(0, ge=0)
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = Field(0, ge=0)
    early_stopping: bool = False
    eval_num_beams: int = Field(1, ge=1, le=16)  # evaluation generates greedily by default: cheaper

    @model_validator(mode="after")
    def _default_within_limit(self):
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("max_new_tokens must not exceed max_new_tokens_limit")
        return self

    def generation_defaults(self) -> dict:
        return dict(
            num_beams=self.num_beams,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            length_penalty=self.length_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            early_stopping=self.early_stopping,
        )


def context_length(processor) -> int:
    limit = processor.model_max_length
    return limit if limit and limit < 10**6 else DEFAULT_CONTEXT


def decoder_limit(model) -> int | None:
    """BART's learned positions bound the output; T5's relative positions do not."""
    return getattr(model.config, "max_position_embeddings", None)


def generate(model, input_ids, attention_mask, kwargs: dict) -> torch.Tensor:
    limit = decoder_limit(model)
    if limit:
        kwargs = {**kwargs, "max_new_tokens": min(kwargs["max_new_tokens"], limit - 2)}
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


class GeneratedTextMetric(StreamingMetric):
    """Generates for each eval batch and hands (predictions, references) as text to `add`; the report
    shows the first few sources with their reference and the model's output."""

    def __init__(self, options: Seq2SeqOptions | None):
        self.options = options or Seq2SeqOptions()
        self.examples = Examples()

    def bind(self, model, processor):
        self.model, self.processor = model, processor

    def update(self, outputs, inputs, arrays):
        o = self.options
        kwargs = dict(num_beams=o.eval_num_beams, max_new_tokens=min(o.max_target_length, o.max_new_tokens_limit))
        with torch.no_grad():
            generated = generate(self.model, inputs["input_ids"], inputs["attention_mask"], kwargs)
        labels = inputs["labels"].masked_fill(inputs["labels"] == IGNORE, self.processor.pad_token_id)
        predictions = [t.strip() for t in self.processor.batch_decode(generated, skip_special_tokens=True)]
        references = [t.strip() for t in self.processor.batch_decode(labels, skip_special_tokens=True)]
        self.add(predictions, references)
        if self.examples.room():
            sources = self.processor.batch_decode(inputs["input_ids"][: self.examples.room()], skip_special_tokens=True)
            for source, reference, output in zip(sources, references, predictions):
                self.examples.add({"source": source.strip(), "reference": reference, "output": output})

    def views(self):
        if not self.examples.items:
            return []
        rows = [[clipped(e["source"]), clipped(e["reference"]), clipped(e["output"])] for e in self.examples.items]
        note = "The first eval rows, generated as the eval does (task_options.eval_num_beams)."
        return [View("Examples", note, ["source", "reference", "output"], rows)]

    def add(self, predictions: list[str], references: list[str]) -> None:
        raise NotImplementedError


class Seq2SeqTask(TaskSpec["PreTrainedTokenizerBase"]):
    """A source text in, a generated text out. Subclasses set `name`, `output_key`, metrics, demo data."""

    architectures = ("bart", "t5")
    columns = (
        Column("source", "the text to read"),
        Column("target", "the text the model should write", training_only=True),
    )
    label_column = None
    output_key = ""  # "summary_text" / "translation_text", as transformers' pipelines answer
    Options = Seq2SeqOptions

    # --- processor and model ----------------------------------------------------------------
    def build_processor(self, model_cfg: ModelConfig, source_dir, train_rows):
        if source_dir:
            return load_tokenizer(source_dir, model_cfg.max_length)

        def texts():
            for row in train_rows:
                for column in ("source", "target"):
                    if isinstance(row.get(column), str):
                        yield row[column]

        size, length = model_cfg.tokenizer.vocab_size, model_cfg.max_length or DEFAULT_CONTEXT
        if model_cfg.init.architecture == "t5":
            return train_unigram(texts(), size, length)
        return train_bpe(texts(), size, length, "bart")

    def build_model(self, model_cfg: ModelConfig, source_dir, labels, processor):
        if source_dir:
            return AutoModelForSeq2SeqLM.from_pretrained(
                source_dir, trust_remote_code=model_cfg.trust_remote_code, use_safetensors=True
            )
        init = model_cfg.init
        if init.architecture == "t5":
            config = T5Config(
                vocab_size=len(processor),
                pad_token_id=processor.pad_token_id,
                eos_token_id=processor.eos_token_id,
                decoder_start_token_id=processor.pad_token_id,
                **{**T5_SIZES[init.size], **init.overrides},
            )
            return AutoModelForSeq2SeqLM.from_config(config)
        config = BartConfig(
            vocab_size=len(processor),
            max_position_embeddings=context_length(processor),
            pad_token_id=processor.pad_token_id,
            bos_token_id=processor.bos_token_id,
            eos_token_id=processor.eos_token_id,
            decoder_start_token_id=processor.eos_token_id,
            forced_eos_token_id=processor.eos_token_id,
            **{**BART_SIZES[init.size], **init.overrides},
        )
        return AutoModelForSeq2SeqLM.from_config(config)

    def load(self, model_dir):
        return AutoModelForSeq2SeqLM.from_pretrained(model_dir, use_safetensors=True), load_tokenizer(model_dir, None)

    # --- preprocess / collate / forward / postprocess -----------------------------------------
    def preprocess(self, batch, processor, ctx):
        opts = ctx.options or self.Options()
        training = ctx.labels is not None
        n = len(batch["source"])
        sources, targets = batch["source"], batch.get("target") or [None] * n
        errors = [
            check_text(sources[i], "source") or (check_text(targets[i], "target") if training else None)
            for i in range(n)
        ]
        ok = [i for i in range(n) if errors[i] is None]
        limit = context_length(processor)
        source_limit = min(opts.max_source_length or limit, limit)
        target_limit = min(opts.max_target_length, limit)
        arrays: dict[str, list] = {"input_ids": [None] * n}
        lengths, notes = [0] * n, [[] for _ in range(n)]
        texts = [opts.prefix + sources[i] for i in ok]
        for i, ids in zip(ok, self._encode(processor, texts, source_limit)):
            arrays["input_ids"][i], lengths[i] = ids[0], len(ids[0])
            if ids[1]:
                notes[i].append(f"source truncated to {source_limit} tokens")
        if training:
            arrays["labels"] = [None] * n
            for i, ids in zip(ok, self._encode(processor, [targets[i] for i in ok], target_limit)):
                arrays["labels"][i] = ids[0]
                lengths[i] += len(ids[0])
                if ids[1]:
                    notes[i].append(f"target truncated to {target_limit} tokens")
        else:
            generation = json.dumps({"defaults": opts.generation_defaults(), "limit": opts.max_new_tokens_limit})
            arrays["generation"] = [generation] * n
        flags = ["; ".join(note) if note else None for note in notes]
        return Features(arrays=arrays, lengths=lengths, errors=errors, flags=flags)

    @staticmethod
    def _encode(processor, texts: list[str], limit: int) -> list[tuple[list[int], bool]]:
        """(token ids, truncated?) per text; the tokenizer's own truncation keeps the closing </s>."""
        if not texts:
            return []
        ids = processor(texts, verbose=False)["input_ids"]
        long = [j for j, row in enumerate(ids) if len(row) > limit]
        if long:
            again = processor([texts[j] for j in long], truncation=True, max_length=limit)["input_ids"]
            for j, row in zip(long, again):
                ids[j] = row
        return [(row, j in long) for j, row in enumerate(ids)]

    def collate(self, arrays, processor):
        ids = arrays["input_ids"]
        inputs = {
            "input_ids": pad(ids, processor.pad_token_id),
            "attention_mask": pad([[1] * len(r) for r in ids], 0),
        }
        if arrays.get("labels") is not None:
            inputs["labels"] = pad(arrays["labels"], IGNORE)
        if arrays.get("generation") is not None:
            inputs["generation"] = json.loads(arrays["generation"][0])
        return inputs

    def forward(self, model, inputs, parameters):
        generation = inputs["generation"]
        settings = merge_settings(generation["defaults"], parameters, PARAMETERS, generation["limit"])
        return generate(model, inputs["input_ids"], inputs["attention_mask"], generate_kwargs(settings))

    def sanitize_parameters(self, parameters, options):
        """The generation parameters of `PARAMETERS`, bounded as `models.generation.RULES` says;
        max_new_tokens at most `task_options.max_new_tokens_limit`."""
        return check_parameters(parameters, PARAMETERS, (options or self.Options()).max_new_tokens_limit, self.name)

    def postprocess(self, outputs, inputs, arrays, model, processor, parameters):
        return [{self.output_key: text.strip()} for text in processor.batch_decode(outputs, skip_special_tokens=True)]

    def to_columns(self, predictions):
        return {self.output_key: [p[self.output_key] if p else None for p in predictions]}

    def request_inputs(self, inputs):
        items = inputs if isinstance(inputs, list) else [inputs]
        rows = []
        for item in items:
            if isinstance(item, dict):
                unknown = set(item) - {"source", "text"}
                if unknown:
                    raise UserError(f"inputs: unknown field(s) {sorted(unknown)}; expected a string or 'source'")
                item = item.get("source", item.get("text"))
            rows.append({"source": item})
        return rows
