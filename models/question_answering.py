"""question-answering (extractive): the answer is a span of the context, BERT with a start/end head.

Inputs `question` and `context`, training answers `answers` (`{text: [...], answer_start: [...]}` as
in SQuAD / `datasets`, or a list of `{text, answer_start}`); SQuAD JSON files read as is. A context
longer than the model takes is split into overlapping windows (`task_options.doc_stride` tokens
shared); each input row keeps ONE feature row holding all its windows, `collate` flattens them
into the batch (in training every window is an example; a window without the answer points at
[CLS]) and `postprocess` picks the best span over the row's windows. With
`task_options.allow_no_answer` (SQuAD v2) questions without answers train and predict "no answer".
Output `{answer, score, start, end}`, character offsets into the context (a list with `top_k`).
Metrics: SQuAD exact match and token F1.
"""

from __future__ import annotations

import collections
import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModelForQuestionAnswering, BertConfig

from config import ModelConfig
from errors import UserError
from models.parameters import Flag, Number, sanitize
from models.spec import Column, Features, TaskSpec
from models.squad import SquadMetric, answer_list, best_spans, locate, parse_squad, windows_of
from models.text import BERT_SIZES, check_text
from models.text_tokenizers import load_tokenizer, train_wordpiece

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase  # noqa: F401  (named in the TaskSpec base below)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allow_no_answer: bool = False  # SQuAD v2: questions without an answer in the context are allowed
    doc_stride: int = Field(32, ge=0)  # tokens shared by neighbouring windows of a long context
    max_question_tokens: int = Field(64, ge=1)  # longer questions are truncated (and flagged)
    max_windows: int = Field(16, ge=1)  # a longer context is cut after this many windows (and flagged)
    max_answer_tokens: int = Field(30, ge=1)


def flatten(rows: list, pad_value: int, width: int) -> torch.Tensor:
    """Rows of (windows, length[, ...]) arrays -> one (all windows, width[, ...]) tensor."""
    parts = []
    for r in rows:
        r = np.asarray(r)
        padding = [(0, 0), (0, width - r.shape[1])] + [(0, 0)] * (r.ndim - 2)
        parts.append(np.pad(r, padding, constant_values=pad_value))
    return torch.as_tensor(np.concatenate(parts))


class QuestionAnswering(TaskSpec["PreTrainedTokenizerBase"]):
    name = "question-answering"
    architectures = ("bert",)
    columns = (
        Column("question", "the question"),
        Column("context", "the text that holds the answer"),
        Column("answers", "{text: [...], answer_start: [...]} character offsets into the context", training_only=True),
    )
    label_column = None
    best_metric = "f1"
    best_metric_mode = "max"
    output_columns = {"answer": "string", "score": "float64", "start": "int64", "end": "int64"}
    Options = Options
    formats = {"squad": parse_squad}
    format_suffixes = {".json": "squad"}

    # --- processor and model ----------------------------------------------------------------
    def build_processor(self, model_cfg: ModelConfig, source_dir, train_rows):
        if source_dir:
            return load_tokenizer(source_dir, model_cfg.max_length)

        def texts():
            for row in train_rows:
                for column in ("question", "context"):
                    if isinstance(row.get(column), str):
                        yield row[column]

        return train_wordpiece(
            texts(), model_cfg.tokenizer.vocab_size, model_cfg.tokenizer.lowercase, model_cfg.max_length or 384
        )

    def build_model(self, model_cfg: ModelConfig, source_dir, labels, processor):
        if source_dir:
            return AutoModelForQuestionAnswering.from_pretrained(
                source_dir, trust_remote_code=model_cfg.trust_remote_code, use_safetensors=True
            )
        limit = processor.model_max_length
        return AutoModelForQuestionAnswering.from_config(
            BertConfig(
                **BERT_SIZES[model_cfg.init.size],
                vocab_size=len(processor),
                pad_token_id=processor.pad_token_id,
                max_position_embeddings=max(limit, 64) if limit < 10**6 else 512,
                **model_cfg.init.overrides,
            )
        )

    def load(self, model_dir):
        return AutoModelForQuestionAnswering.from_pretrained(model_dir, use_safetensors=True), load_tokenizer(
            model_dir, None
        )

    # --- preprocess / collate / postprocess -------------------------------------------------
    def preprocess(self, batch, processor, ctx):
        options = ctx.options or Options()
        n = len(batch["question"])
        questions, contexts = list(batch["question"]), batch["context"]
        with_answers = ctx.labels is not None
        errors = [check_text(questions[i], "question") or check_text(contexts[i], "context") for i in range(n)]
        spans: list = [None] * n  # training and eval: (start char, end char) of the first answer, or None
        golds: list = [None] * n
        for i in range(n):
            if errors[i] is None and with_answers:
                answers, errors[i] = answer_list(batch["answers"][i])
                if errors[i] is None and not answers and not options.allow_no_answer:
                    errors[i] = "no answer (set task_options.allow_no_answer for questions without one)"
                elif errors[i] is None and answers:
                    text, start = answers[0]
                    at = locate(contexts[i], text, start)
                    if at is None:
                        errors[i] = f"answer {text!r} is not at answer_start {start} of the context"
                    spans[i] = (at, at + len(text)) if at is not None else None
                if errors[i] is None:
                    golds[i] = [text for text, _ in answers]
        flags: list = [None] * n
        ok = [i for i in range(n) if errors[i] is None]
        limit = processor.model_max_length
        most = min(options.max_question_tokens, limit // 2)
        if ok:  # over-long questions are cut at a token boundary first, so that every window keeps some context
            asked = processor([questions[i] for i in ok], add_special_tokens=False, return_offsets_mapping=True)
            for j, i in enumerate(ok):
                if len(asked["input_ids"][j]) > most:
                    questions[i] = questions[i][: asked["offset_mapping"][j][most - 1][1]]
                    flags[i] = f"question truncated to {most} tokens"
        encoded = (
            processor(
                [questions[i] for i in ok],
                [contexts[i] for i in ok],
                truncation="only_second",
                max_length=limit,
                stride=min(options.doc_stride, limit // 4),
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
            )
            if ok
            else None
        )
        by_row = collections.defaultdict(list)
        for k, j in enumerate(encoded["overflow_to_sample_mapping"] if ok else []):
            by_row[ok[j]].append(k)
        keys = ["input_ids", "token_type_ids", "offsets", "context", "allow_no_answer"]
        keys += ["start_positions", "end_positions", "answer_texts"] if with_answers else []
        arrays: dict[str, list] = {key: [None] * n for key in keys}
        lengths = [0] * n
        for i, windows in by_row.items():
            if len(windows) > options.max_windows:
                windows = windows[: options.max_windows]
                cut = f"context cut to {options.max_windows} windows of {limit} tokens"
                flags[i] = f"{flags[i]}; {cut}" if flags[i] else cut
            width = max(len(encoded["input_ids"][k]) for k in windows)
            ids = np.full((len(windows), width), processor.pad_token_id, dtype=np.int64)
            types = np.zeros((len(windows), width), dtype=np.int64)
            offsets = np.full((len(windows), width, 2), -1, dtype=np.int64)
            positions = np.zeros((2, len(windows)), dtype=np.int64)
            for w, k in enumerate(windows):
                row_ids = encoded["input_ids"][k]
                ids[w, : len(row_ids)] = row_ids
                if "token_type_ids" in encoded:
                    types[w, : len(row_ids)] = encoded["token_type_ids"][k]
                context_tokens = [p for p, s in enumerate(encoded.sequence_ids(k)) if s == 1]
                for p in context_tokens:
                    offsets[w, p] = encoded["offset_mapping"][k][p]
                if spans[i] is not None:
                    positions[:, w] = self.token_span(offsets[w], context_tokens, spans[i])
            arrays["input_ids"][i], arrays["token_type_ids"][i], arrays["offsets"][i] = ids, types, offsets
            arrays["context"][i], arrays["allow_no_answer"][i] = contexts[i], options.allow_no_answer
            if with_answers:
                arrays["start_positions"][i], arrays["end_positions"][i] = positions[0], positions[1]
                arrays["answer_texts"][i] = golds[i]
            lengths[i] = ids.size
        return Features(arrays=arrays, lengths=lengths, errors=errors, flags=flags)

    @staticmethod
    def token_span(offsets: np.ndarray, context_tokens: list[int], span: tuple[int, int]) -> tuple[int, int]:
        """The answer's first and last token in one window, or ([CLS], [CLS]) when the window lacks it."""
        first, last = context_tokens[0], context_tokens[-1]
        if not (offsets[first, 0] <= span[0] and offsets[last, 1] >= span[1]):
            return 0, 0
        start = next(p for p in context_tokens if offsets[p, 1] > span[0])
        end = next(p for p in reversed(context_tokens) if offsets[p, 0] < span[1])
        return start, max(start, end)

    def collate(self, arrays, processor):
        width = max(np.asarray(ids).shape[1] for ids in arrays["input_ids"])
        ids = flatten(arrays["input_ids"], processor.pad_token_id, width)
        inputs = {
            "input_ids": ids,
            "token_type_ids": flatten(arrays["token_type_ids"], 0, width),
            "attention_mask": (ids != processor.pad_token_id).long(),
        }
        if arrays.get("start_positions") is not None:
            inputs["start_positions"] = torch.as_tensor(
                np.concatenate([np.asarray(p) for p in arrays["start_positions"]])
            )
            inputs["end_positions"] = torch.as_tensor(np.concatenate([np.asarray(p) for p in arrays["end_positions"]]))
        return inputs

    def forward(self, model, inputs, parameters):
        return model(**{k: v for k, v in inputs.items() if k not in ("start_positions", "end_positions")})

    def sanitize_parameters(self, parameters, options):
        """`top_k` (1-20 answers), `max_answer_len` (1-512 tokens), `handle_impossible_answer` (true/false)."""
        rules = {"top_k": Number(int, 1, 20), "max_answer_len": Number(int, 1, 512), "handle_impossible_answer": Flag()}
        return sanitize(parameters, rules, f"parameter of {self.name}")

    def postprocess(self, outputs, inputs, arrays, model, processor, parameters):
        top_k = int(parameters.get("top_k") or 1)
        max_tokens = int(parameters.get("max_answer_len") or Options().max_answer_tokens)
        starts, ends = outputs.start_logits.float().cpu().numpy(), outputs.end_logits.float().cpu().numpy()
        results, first = [], 0
        for row, count in enumerate(windows_of(arrays)):
            offsets = np.asarray(arrays["offsets"][row])
            width = offsets.shape[1]
            no_answer = bool(parameters.get("handle_impossible_answer", arrays["allow_no_answer"][row]))
            best = best_spans(
                starts[first : first + count, :width],
                ends[first : first + count, :width],
                offsets,
                arrays["context"][row],
                top_k,
                max_tokens,
                no_answer,
            )
            first += count
            best = best or [{"score": 0.0, "start": 0, "end": 0, "answer": ""}]
            results.append(best if parameters.get("top_k") else best[0])
        return results

    def to_columns(self, predictions):
        best = [p[0] if isinstance(p, list) else p for p in predictions]
        return {name: [p[name] if p else None for p in best] for name in self.output_columns}

    def request_inputs(self, inputs):
        rows = []
        for item in inputs if isinstance(inputs, list) else [inputs]:
            if not isinstance(item, dict):
                raise UserError('inputs: expected {"question": ..., "context": ...} (or a list of them)')
            unknown = set(item) - {"question", "context"}
            if unknown:
                raise UserError(f"inputs: unknown field(s) {sorted(unknown)}; expected 'question' and 'context'")
            rows.append({"question": item.get("question"), "context": item.get("context")})
        return rows

    def metrics(self, labels, options):
        return SquadMetric(options or Options())

    # --- demo data --------------------------------------------------------------------------
    def demo_data(self, n, seed):
        """Short templated biographies; each question asks about one of the four facts, one in six about
        a fact the context lacks (no answer)."""
        rng = random.Random(seed)
        people = ["Alice", "Bob", "Carlos", "Dana", "Eve", "Farid", "Grace", "Hiro", "Ivan", "Julia", "Kofi", "Lena"]
        facts = {
            "city": (
                "{p} lives in {x} .",
                "where does {p} live ?",
                ["Paris", "Berlin", "Tokyo", "Lagos", "Lima", "Oslo", "Madrid", "Cairo", "Seoul", "Quito"],
            ),
            "company": (
                "{p} works at {x} .",
                "where does {p} work ?",
                [
                    "Acme",
                    "Globex",
                    "Initech",
                    "Hooli",
                    "Vandelay",
                    "Tyrell",
                    "Soylent",
                    "Cyberdyne",
                    "Gringotts",
                    "Wonka",
                ],
            ),
            "year": ("{p} was born in {x} .", "when was {p} born ?", [str(y) for y in range(1950, 2010, 3)]),
            "food": (
                "{p} likes to eat {x} .",
                "what does {p} like to eat ?",
                ["pizza", "sushi", "tacos", "noodles", "curry", "salad", "dumplings", "pancakes", "falafel", "paella"],
            ),
            "color": (
                "{p} drives a {x} car .",
                "what color is the car of {p} ?",
                ["red", "blue", "green", "black", "white", "yellow", "silver", "orange", "purple", "brown"],
            ),
        }
        rows = []
        for i in range(n):
            kinds = rng.sample(sorted(facts), 4)
            named = rng.sample(people, 4)
            sentences = [facts[k][0].format(p=p, x=rng.choice(facts[k][2])) for k, p in zip(kinds, named)]
            context = " ".join(sentences)
            if rng.random() < 1 / 6:
                missing = next(k for k in sorted(facts) if k not in kinds)
                question, answers = facts[missing][1].format(p=rng.choice(named)), {"text": [], "answer_start": []}
            else:
                j = rng.randrange(4)
                kind, person = kinds[j], named[j]
                question = facts[kind][1].format(p=person)
                sentence = sentences[j]
                value = next(x for x in facts[kind][2] if sentence == facts[kind][0].format(p=person, x=x))
                at = context.index(sentence) + sentence.index(value, len(person))
                answers = {"text": [value], "answer_start": [at]}
            rows.append({"id": f"q-{seed}-{i}", "question": question, "context": context, "answers": answers})
        return rows


TASK = QuestionAnswering()
