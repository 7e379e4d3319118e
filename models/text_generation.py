"""text-generation: a causal language model (GPT-2) that continues a prompt.

Training rows are plain text (`text`: documents) or prompt/completion pairs (`prompt` + `completion`:
the loss counts completion tokens only). Plain-text documents end with <|endoftext|> and are packed
into blocks of `task_options.block_size` tokens inside each training batch (in `collate`), so one
input row stays one row for the runtime while no compute goes into padding. Metric: perplexity, the
exponential of the mean token loss over the whole eval split.

Prediction continues `prompt` (or `text`). Prompts are left-padded and batched by similar length; a
prompt longer than the context keeps its last tokens and is flagged. Output as
`transformers.pipeline("text-generation")`: `[{"generated_text": prompt + continuation}]`.
`parameters`: max_new_tokens (at most `task_options.max_new_tokens_limit`, else the request is
refused), temperature, top_p, top_k, do_sample, seed, stop, repetition_penalty, return_full_text.
With `do_sample` and `seed`, each row is sampled on its own from that seed, so the answer does not
depend on which rows share its batch. `stream` yields the continuation in pieces (server-sent events).
"""

from __future__ import annotations

import json
import math
import random
import threading
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import AutoModelForCausalLM, GPT2Config, StoppingCriteria, TextIteratorStreamer

from config import ModelConfig
from errors import UserError
from models.eval_views import Examples, clipped
from models.generation import check_parameters, cut_at_stop, generate_kwargs, held_back, merge_settings
from models.spec import Column, Features, StreamingMetric, TaskSpec, View
from models.text import check_text, pad
from models.text_tokenizers import load_tokenizer, train_bpe

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase  # noqa: F401  (named in the TaskSpec base below)

GPT2_SIZES = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=2),
    "mini": dict(n_embd=256, n_layer=4, n_head=4),
    "small": dict(n_embd=512, n_layer=6, n_head=8),
    "base": dict(n_embd=768, n_layer=12, n_head=12),
}
DEFAULT_CONTEXT = 256  # from-scratch models without model.max_length
PARAMETERS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "do_sample",
    "seed",
    "stop",
    "repetition_penalty",
    "return_full_text",
)
IGNORE = -100  # label of tokens the loss skips (prompt, padding)


class Options(BaseModel):
    """`task_options` for text-generation."""

    model_config = ConfigDict(extra="forbid")
    pack: bool = True  # pack plain-text documents into blocks; off: one truncated document per sequence
    block_size: int | None = Field(None, ge=8)  # tokens per packed block; default the model's context length
    max_document_tokens: int = Field(16384, ge=8)  # a longer training document is truncated (and flagged)
    max_new_tokens: int = Field(32, ge=1)
    max_new_tokens_limit: int = Field(256, ge=1)  # requests asking for more are refused
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: list[str] = []

    @model_validator(mode="after")
    def _default_within_limit(self):
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("max_new_tokens must not exceed max_new_tokens_limit")
        return self

    def generation_defaults(self) -> dict:
        return dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            stop=self.stop,
            seed=None,
            return_full_text=True,
        )


def context_length(processor) -> int:
    limit = processor.model_max_length
    return limit if limit and limit < 10**6 else 1024


def model_context(model) -> int:
    return getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)


class Perplexity(StreamingMetric):
    """exp(total token loss / token count) over the split: two numbers, whatever the split's size. The
    report shows how the model continues the first eval rows: their prompt (or first half), greedy."""

    def __init__(self):
        self.sums = torch.zeros(2, dtype=torch.float64)
        self.examples, self.model, self.processor = Examples(limit=4), None, None

    def bind(self, model, processor):
        self.model, self.processor = model, processor

    def to(self, device):
        self.sums = self.sums.to(device)
        return self

    def update(self, outputs, inputs, arrays):
        logits, labels = outputs.logits[:, :-1].float(), inputs["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        self.sums += torch.stack([loss.double(), (labels != IGNORE).sum().double()])
        rows = zip(arrays.get("input_ids", []), arrays.get("prompt_length", []))
        for ids, prompt_length in list(rows)[: self.examples.room()]:
            ids = [int(i) for i in ids]
            cut = int(prompt_length) or len(ids) // 2
            self.examples.add({"prompt": ids[:cut], "reference": ids[cut:]})

    def views(self):
        if not self.examples.items or self.model is None:
            return []
        rows, training = [], self.model.training
        self.model.eval()
        with torch.no_grad():
            for e in self.examples.items:
                prompt = torch.tensor([e["prompt"]], device=self.model.device)
                new = min(max(len(e["reference"]), 1), 40, model_context(self.model) - prompt.shape[1])
                pad_id = self.processor.pad_token_id
                out = self.model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=max(new, 1),
                    do_sample=False,
                    pad_token_id=pad_id if pad_id is not None else self.model.config.eos_token_id,
                )
                text = [self.processor.decode(t, skip_special_tokens=True) for t in (e["prompt"], e["reference"])]
                output = self.processor.decode(out[0, prompt.shape[1] :].tolist(), skip_special_tokens=True)
                rows.append([clipped(text[0]), clipped(text[1]), clipped(output)])
        self.model.train(training)
        note = "The first eval rows: their prompt (or first half), the rest as written, and the greedy continuation."
        return [View("Examples", note, ["prompt", "reference", "output"], rows)]

    def compute(self):
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        mean = float(sums[0] / sums[1].clamp(min=1))
        return {"perplexity": math.exp(min(mean, 50.0))}


class StopOnEvent(StoppingCriteria):
    """Ends a streamed generation once the reader has seen a stop string."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TextGeneration(TaskSpec["PreTrainedTokenizerBase"]):
    name = "text-generation"
    architectures = ("gpt2",)
    columns = (
        Column("text", "a plain-text document (training) or a prompt to continue", required=False),
        Column("prompt", "a prompt; in training paired with `completion`", required=False),
        Column("completion", "the text the model should write after `prompt`", required=False, training_only=True),
    )
    label_column = None
    best_metric = "perplexity"
    best_metric_mode = "min"
    output_columns = {"generated_text": "string"}
    Options = Options

    # --- processor and model ----------------------------------------------------------------
    def build_processor(self, model_cfg: ModelConfig, source_dir, train_rows):
        if source_dir:
            tokenizer = load_tokenizer(source_dir, model_cfg.max_length)
        else:

            def texts():
                for row in train_rows:
                    for column in ("text", "prompt", "completion"):
                        if isinstance(row.get(column), str):
                            yield row[column]

            tokenizer = train_bpe(
                texts(), model_cfg.tokenizer.vocab_size, model_cfg.max_length or DEFAULT_CONTEXT, "gpt2"
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has none; padded positions are masked anyway
        tokenizer.padding_side = "left"  # as generation wants it (our collate pads by hand either way)
        return tokenizer

    def build_model(self, model_cfg: ModelConfig, source_dir, labels, processor):
        if source_dir:
            model = AutoModelForCausalLM.from_pretrained(
                source_dir, trust_remote_code=model_cfg.trust_remote_code, use_safetensors=True
            )
        else:
            init = model_cfg.init
            config = GPT2Config(
                vocab_size=len(processor),
                n_positions=context_length(processor),
                bos_token_id=processor.eos_token_id,
                eos_token_id=processor.eos_token_id,
                pad_token_id=processor.pad_token_id,
                **{**GPT2_SIZES[init.size], **init.overrides},
            )
            model = AutoModelForCausalLM.from_config(config)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = processor.pad_token_id
        model.generation_config.pad_token_id = processor.pad_token_id
        return model

    def load(self, model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
        tokenizer = load_tokenizer(model_dir, None)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer

    # --- preprocess ---------------------------------------------------------------------------
    def preprocess(self, batch, processor, ctx):
        opts = ctx.options or Options()
        if "text" not in batch and not ("prompt" in batch and ("completion" in batch or ctx.labels is None)):
            wanted = "'prompt' (or 'text')" if ctx.labels is None else "'text' (documents) or 'prompt' + 'completion'"
            raise UserError(f"data: no column {wanted}; map yours with data.columns")
        n = len(next(iter(batch.values())))
        if ctx.labels is None:
            return self._prompts(batch, processor, opts, n)
        texts, prompts, completions = (batch.get(c) or [None] * n for c in ("text", "prompt", "completion"))
        limit, eos = context_length(processor), processor.eos_token_id
        block = min(opts.block_size or limit, limit) if opts.pack else 0
        arrays = {"input_ids": [None] * n, "prompt_length": [0] * n, "pack": [0] * n}
        errors, lengths, flags = [None] * n, [0] * n, [None] * n
        pairs = [i for i in range(n) if completions[i] is not None]
        for i in pairs:
            errors[i] = check_text(completions[i], "completion") or check_text(prompts[i], "prompt", allow_empty=True)
        docs = [i for i in range(n) if completions[i] is None]
        for i in docs:
            errors[i] = (
                check_text(texts[i], "text") if "text" in batch or "completion" not in batch else "completion is null"
            )
        pairs, docs = [i for i in pairs if errors[i] is None], [i for i in docs if errors[i] is None]

        def encode(values):
            return processor(values, add_special_tokens=False, verbose=False)["input_ids"] if values else []

        for i, ids in zip(docs, encode([texts[i] for i in docs])):
            ids = ids + [eos]
            cap = opts.max_document_tokens if block else limit
            if len(ids) > cap:
                ids, flags[i] = ids[:cap], f"truncated to {cap} tokens"
            arrays["input_ids"][i], arrays["pack"][i], lengths[i] = ids, block, len(ids)
        encoded = zip(pairs, encode([prompts[i] for i in pairs]), encode([completions[i] for i in pairs]))
        for i, prompt, completion in encoded:
            prompt, completion = (prompt or [eos]), completion + [eos]  # an empty prompt: start from <|endoftext|>
            if len(prompt) + len(completion) > limit:  # keep the prompt's end and the completion's start
                keep = max(limit - len(completion), limit // 2)
                prompt = prompt[-keep:]
                completion = completion[: limit - len(prompt)]
                flags[i] = f"truncated to {limit} tokens"
            arrays["input_ids"][i], arrays["prompt_length"][i] = prompt + completion, len(prompt)
            lengths[i] = len(prompt) + len(completion)
        return Features(arrays=arrays, lengths=lengths, errors=errors, flags=flags)

    def _prompts(self, batch, processor, opts, n) -> Features:
        """Prediction rows: the prompt's token ids, kept to the context minus room for generation."""
        texts, prompts = batch.get("text") or [None] * n, batch.get("prompt") or [None] * n
        values = [prompts[i] if prompts[i] is not None else texts[i] for i in range(n)]
        names = [
            "text" if "prompt" not in batch or (prompts[i] is None and texts[i] is not None) else "prompt"
            for i in range(n)
        ]
        errors = [check_text(v, name) for v, name in zip(values, names)]
        ok = [i for i in range(n) if errors[i] is None]
        limit = context_length(processor)
        budget = limit - min(opts.max_new_tokens_limit, limit // 2)
        generation = json.dumps({"defaults": opts.generation_defaults(), "limit": opts.max_new_tokens_limit})
        arrays = {"prompt_ids": [None] * n, "prompt": [None] * n, "generation": [generation] * n}
        lengths, flags = [0] * n, [None] * n
        encoded = processor([values[i] for i in ok], add_special_tokens=False, verbose=False)["input_ids"] if ok else []
        for i, ids in zip(ok, encoded):
            if len(ids) > budget:
                ids, flags[i] = ids[-budget:], f"prompt truncated to its last {budget} tokens"
            arrays["prompt_ids"][i], arrays["prompt"][i], lengths[i] = ids, values[i], len(ids)
        return Features(arrays=arrays, lengths=lengths, errors=errors, flags=flags)

    # --- collate / forward / postprocess --------------------------------------------------------
    def collate(self, arrays, processor):
        pad_id = processor.pad_token_id
        if "prompt_ids" in arrays:  # prediction: left padding, so every row continues at the same position
            rows = arrays["prompt_ids"]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, width - len(r) :] = torch.as_tensor(np.asarray(r, dtype=np.int64))
                mask[i, width - len(r) :] = 1
            return {"input_ids": ids, "attention_mask": mask, "generation": json.loads(arrays["generation"][0])}
        sequences, labels, stream, block = [], [], [], 0
        for ids, prompt_length, pack in zip(arrays["input_ids"], arrays["prompt_length"], arrays["pack"]):
            ids = list(ids)
            if pack:  # plain documents of this batch: one token stream, cut into blocks
                stream.extend(ids)
                block = pack
            else:
                sequences.append(ids)
                labels.append([IGNORE] * prompt_length + ids[prompt_length:])
        for start in range(0, len(stream), block or 1):
            sequences.append(stream[start : start + block])
            labels.append(stream[start : start + block])
        return {
            "input_ids": pad(sequences, pad_id),
            "attention_mask": pad([[1] * len(s) for s in sequences], 0),
            "labels": pad(labels, IGNORE),
        }

    def _settings(self, inputs, parameters) -> dict:
        generation = inputs["generation"]
        return merge_settings(generation["defaults"], parameters, PARAMETERS, generation["limit"])

    def _generate_kwargs(self, model, settings, width: int) -> dict:
        kwargs = generate_kwargs(settings)
        # generation also ends at the model's context length (the prompt keeps room for the limit's half)
        kwargs["max_new_tokens"] = max(1, min(settings["max_new_tokens"], model_context(model) - width))
        pad_id = model.generation_config.pad_token_id
        return {**kwargs, "pad_token_id": pad_id if pad_id is not None else model.config.eos_token_id}

    def forward(self, model, inputs, parameters):
        settings = self._settings(inputs, parameters)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        kwargs = self._generate_kwargs(model, settings, ids.shape[1])
        if settings.get("do_sample") and settings.get("seed") is not None:
            rows = []
            for i in range(ids.shape[0]):  # each row from the seed alone: the same answer in any batch
                prompt = ids[i][mask[i].bool()][None]
                torch.manual_seed(settings["seed"])
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
                rows.append(out[0, prompt.shape[1] :].tolist() or [kwargs["pad_token_id"]])
            return {"new_tokens": pad(rows, kwargs["pad_token_id"]), "settings": settings}
        if settings.get("seed") is not None:
            torch.manual_seed(settings["seed"])
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        return {"new_tokens": out[:, ids.shape[1] :], "settings": settings}

    def sanitize_parameters(self, parameters, options):
        """The generation parameters of `PARAMETERS`, bounded as `models.generation.RULES` says;
        max_new_tokens at most `task_options.max_new_tokens_limit`."""
        return check_parameters(parameters, PARAMETERS, (options or Options()).max_new_tokens_limit, self.name)

    def postprocess(self, outputs, inputs, arrays, model, processor, parameters):
        settings = outputs["settings"]
        results = []
        for prompt, tokens in zip(arrays["prompt"], outputs["new_tokens"].tolist()):
            text = cut_at_stop(processor.decode(tokens, skip_special_tokens=True), settings.get("stop"))
            results.append([{"generated_text": prompt + text if settings.get("return_full_text", True) else text}])
        return results

    def stream(self, model, processor, arrays, parameters):
        """One row's continuation in pieces, as `forward` + `postprocess` would write it (continuation
        only). Parameters are checked here, before the first piece, so a bad one fails the request."""
        inputs = self.collate(arrays, processor)
        settings = self._settings(inputs, parameters)
        ids = inputs["input_ids"].to(model.device)
        return self._pieces(model, processor, ids, settings, self._generate_kwargs(model, settings, ids.shape[1]))

    @staticmethod
    def _pieces(model, processor, ids, settings, kwargs):
        streamer = TextIteratorStreamer(processor, skip_prompt=True, skip_special_tokens=True, timeout=600)
        stopped = threading.Event()

        def run():
            if settings.get("seed") is not None:
                torch.manual_seed(settings["seed"])
            with torch.inference_mode():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    streamer=streamer,
                    stopping_criteria=[StopOnEvent(stopped)],
                    **kwargs,
                )

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text, sent, stops = "", 0, settings.get("stop")
        try:
            for piece in streamer:
                text += piece
                cut = cut_at_stop(text, stops)
                if len(cut) < len(text):
                    if len(cut) > sent:
                        yield cut[sent:]
                    return
                safe = len(text) - held_back(text, stops)  # a possible stop string's start waits for the next piece
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
            if len(text) > sent:
                yield text[sent:]
        finally:
            stopped.set()
            thread.join()

    def to_columns(self, predictions):
        return {"generated_text": [p[0]["generated_text"] if p else None for p in predictions]}

    def request_inputs(self, inputs):
        items = inputs if isinstance(inputs, list) else [inputs]
        rows = []
        for item in items:
            if isinstance(item, dict):
                unknown = set(item) - {"text", "prompt"}
                if unknown:
                    raise UserError(f"inputs: unknown field(s) {sorted(unknown)}; expected a string or 'prompt'")
                rows.append({"prompt": item.get("prompt", item.get("text"))})
            else:
                rows.append({"prompt": item})
        return rows

    def metrics(self, labels, options):
        return Perplexity()

    # --- demo data --------------------------------------------------------------------------
    def demo_data(self, n, seed):
        """Templated sentences about people and fruit (plain text), and capital-city facts as
        prompt/completion pairs: a tiny model learns both in a minute."""
        rng = random.Random(seed)
        names = "alice bob carol dave erin frank grace heidi".split()
        fruits = "apples pears plums figs limes melons".split()
        colors = "red green yellow purple orange blue".split()
        capitals = {
            "france": "paris",
            "italy": "rome",
            "spain": "madrid",
            "japan": "tokyo",
            "egypt": "cairo",
            "peru": "lima",
            "kenya": "nairobi",
            "chile": "santiago",
        }
        templates = ["{a} has {k} {c} {f} .", "{a} gave {k} {f} to {b} .", "the {f} of {a} are {c} ."]
        rows = []
        for i in range(n):
            if rng.random() < 0.4:
                country = rng.choice(sorted(capitals))
                rows.append(
                    {
                        "id": f"gen-{seed}-{i}",
                        "text": None,
                        "prompt": f"the capital of {country} is",
                        "completion": f" {capitals[country]} .",
                    }
                )
                continue
            sentences = []
            for _ in range(rng.randint(2, 4)):
                a, b = rng.sample(names, 2)
                sentences.append(
                    rng.choice(templates).format(
                        a=a, b=b, k=rng.randint(2, 9), c=rng.choice(colors), f=rng.choice(fruits)
                    )
                )
            rows.append({"id": f"gen-{seed}-{i}", "text": " ".join(sentences), "prompt": None, "completion": None})
        return rows


TASK = TextGeneration()
