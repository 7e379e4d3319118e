"""The question-answering task spec, without Ray: SQuAD files parse, answers become token positions in
every window of a long context, one feature row per question whatever the windows, the best span is
picked across windows with character offsets, "no answer" where allowed, SQuAD EM/F1."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from config import validate
from errors import UserError
from models.question_answering import TASK, Options
from models.squad import squad_scores
from models.spec import Context

CFG = validate(
    {
        "task": "question-answering",
        "model": {"init": {"architecture": "bert"}, "max_length": 32, "tokenizer": {"vocab_size": 300}},
    }
)
TRAIN = Context(labels={}, train=True, options=Options(doc_stride=8))
PREDICT = Context(options=Options(doc_stride=8))
FILLER = "the weather was nice and everyone stayed at home . "


@pytest.fixture(scope="module")
def tokenizer():
    rows = TASK.demo_data(300, seed=0) + [{"context": FILLER}]
    return TASK.build_processor(CFG.model, None, iter(rows))


def test_squad_json_becomes_one_row_per_question():
    squad = {
        "version": "v2.0",
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": "Bob lives in Oslo .",
                        "qas": [
                            {
                                "id": "a",
                                "question": "where does Bob live ?",
                                "answers": [{"text": "Oslo", "answer_start": 13}],
                            },
                            {"id": "b", "question": "when was Bob born ?", "answers": [], "is_impossible": True},
                        ],
                    }
                ],
            }
        ],
    }
    rows = list(TASK.formats["squad"](json.dumps(squad).encode(), "dev.json"))
    assert rows == [
        {
            "id": "a",
            "question": "where does Bob live ?",
            "context": "Bob lives in Oslo .",
            "answers": {"text": ["Oslo"], "answer_start": [13]},
        },
        {
            "id": "b",
            "question": "when was Bob born ?",
            "context": "Bob lives in Oslo .",
            "answers": {"text": [], "answer_start": []},
        },
    ]
    with pytest.raises(UserError, match="not a SQuAD JSON file"):
        list(TASK.formats["squad"](b"[1, 2]", "x.json"))


def test_the_answer_becomes_start_and_end_tokens(tokenizer):
    row = {
        "question": "where does Bob live ?",
        "context": "Eve works at Acme . Bob lives in Oslo .",
        "answers": {"text": ["Oslo"], "answer_start": [32]},
    }
    features = TASK.preprocess({k: [v] for k, v in row.items()}, tokenizer, TRAIN)
    assert features.errors == [None]
    arrays = features.arrays
    assert np.asarray(arrays["input_ids"][0]).shape[0] == 1  # a short context is one window
    s, e = int(arrays["start_positions"][0][0]), int(arrays["end_positions"][0][0])
    offsets = arrays["offsets"][0][0]
    assert row["context"][offsets[s][0] : offsets[e][1]] == row["answers"]["text"][0]


def test_a_long_context_is_split_into_windows_and_each_window_gets_its_labels(tokenizer):
    context = FILLER * 6 + "Bob lives in Oslo . " + FILLER * 6
    answer_start = context.index("Oslo")
    batch = {
        "question": ["where does Bob live ?", "where does Eve live ?"],
        "context": [context, "Eve lives in Lima ."],
        "answers": [{"text": ["Oslo"], "answer_start": [answer_start]}, [{"text": "Lima", "answer_start": 13}]],
    }
    features = TASK.preprocess(batch, tokenizer, TRAIN)
    assert features.errors == [None, None]
    ids = np.asarray(features.arrays["input_ids"][0])
    assert ids.shape[0] > 3 and ids.shape[1] == 32  # one feature row holds every window
    starts = np.asarray(features.arrays["start_positions"][0])
    holding = [w for w in range(ids.shape[0]) if starts[w] > 0]
    assert holding and (starts == 0).sum() >= 2  # windows without the answer point at [CLS]
    for w in holding:
        offsets = features.arrays["offsets"][0][w]
        assert context[offsets[starts[w]][0] : offsets[features.arrays["end_positions"][0][w]][1]] == "Oslo"
    inputs = TASK.collate(features.arrays, tokenizer)  # windows of both rows flattened into one batch
    assert inputs["input_ids"].shape == (ids.shape[0] + 1, 32) and inputs["start_positions"].shape == (
        ids.shape[0] + 1,
    )
    assert inputs["attention_mask"][-1].sum() < 32  # the short row is padded


def test_bad_rows_get_reasons(tokenizer):
    batch = {
        "question": ["where ?", None, "where ?", "where ?", "where ?", "where ?"],
        "context": [
            "Bob lives in Oslo .",
            "x",
            "   ",
            "Bob lives in Oslo .",
            "Bob lives in Oslo .",
            "Bob lives in Oslo .",
        ],
        "answers": [
            {"text": ["Lima"], "answer_start": [13]},
            None,
            None,
            {"text": [], "answer_start": []},
            None,
            {"text": ["Oslo", "x"], "answer_start": [13]},
        ],
    }
    errors = TASK.preprocess(batch, tokenizer, TRAIN).errors
    assert errors == [
        "answer 'Lima' is not at answer_start 13 of the context",
        "question is null",
        "context is empty",
        "no answer (set task_options.allow_no_answer for questions without one)",
        "answers is null",
        "answers has 2 texts and 1 answer_start values",
    ]
    allowed = Context(labels={}, train=True, options=Options(allow_no_answer=True))
    features = TASK.preprocess({k: v[3:4] for k, v in batch.items()}, tokenizer, allowed)
    assert features.errors == [None] and features.arrays["start_positions"][0].tolist() == [0]


def test_answers_a_few_characters_off_are_found_nearby(tokenizer):
    features = TASK.preprocess(
        {
            "question": ["where ?"],
            "context": ["Bob lives in Oslo ."],
            "answers": [{"text": ["Oslo"], "answer_start": [11]}],
        },
        tokenizer,
        TRAIN,
    )
    assert features.errors == [None]


def test_long_questions_and_huge_contexts_are_cut_and_flagged(tokenizer):
    batch = {"question": ["where does bob live " * 30, "where ?"], "context": ["Bob lives in Oslo .", FILLER * 200]}
    features = TASK.preprocess(batch, tokenizer, Context(options=Options(max_windows=4)))
    assert features.errors == [None, None]
    assert features.flags[0] == "question truncated to 16 tokens"
    assert (
        features.flags[1] == "context cut to 4 windows of 32 tokens"
        and np.asarray(features.arrays["input_ids"][1]).shape[0] == 4
    )


def fake_outputs(features, targets: dict[int, tuple[int, int, int]]):
    """Logits that put the answer of row r at window w, tokens (s, e)."""
    total = sum(np.asarray(ids).shape[0] for ids in features.arrays["input_ids"])
    width = max(np.asarray(ids).shape[1] for ids in features.arrays["input_ids"])
    start, end = torch.zeros(total, width), torch.zeros(total, width)
    first = 0
    for row, ids in enumerate(features.arrays["input_ids"]):
        if row in targets:
            w, s, e = targets[row]
            start[first + w, s], end[first + w, e] = 12.0, 12.0
        first += np.asarray(ids).shape[0]
    return SimpleNamespace(start_logits=start, end_logits=end)


def test_the_best_span_over_all_windows_comes_back_with_character_offsets(tokenizer):
    context = FILLER * 6 + "Bob lives in Oslo . " + FILLER * 6
    features = TASK.preprocess({"question": ["where does Bob live ?"], "context": [context]}, tokenizer, PREDICT)
    offsets = features.arrays["offsets"][0]
    w = next(w for w in range(offsets.shape[0]) if (offsets[w, :, 0] == context.index("Oslo")).any())
    p = int(np.nonzero(offsets[w, :, 0] == context.index("Oslo"))[0][0])
    outputs = fake_outputs(features, {0: (w, p, p)})
    best = TASK.postprocess(outputs, {}, features.arrays, None, tokenizer, {})[0]
    assert best["answer"] == "Oslo" and (best["start"], best["end"]) == (
        context.index("Oslo"),
        context.index("Oslo") + 4,
    )
    assert best["score"] > 0.9
    top = TASK.postprocess(outputs, {}, features.arrays, None, tokenizer, {"top_k": 3})[0]
    assert len(top) == 3 and top[0] == best and top[1]["score"] <= top[0]["score"]
    assert TASK.to_columns([best, None]) == {
        "answer": ["Oslo", None],
        "score": [best["score"], None],
        "start": [best["start"], None],
        "end": [best["end"], None],
    }


def test_no_answer_wins_only_where_allowed(tokenizer):
    batch = {"question": ["when was Bob born ?"], "context": ["Bob lives in Oslo ."]}
    allowed = TASK.preprocess(batch, tokenizer, Context(options=Options(allow_no_answer=True)))
    outputs = fake_outputs(allowed, {0: (0, 0, 0)})  # the model points at [CLS]
    assert TASK.postprocess(outputs, {}, allowed.arrays, None, tokenizer, {})[0]["answer"] == ""
    strict = TASK.preprocess(batch, tokenizer, PREDICT)
    answer = TASK.postprocess(outputs, {}, strict.arrays, None, tokenizer, {})[0]
    assert answer["answer"] and answer["end"] > answer["start"]  # SQuAD v1: always some span of the context


def test_squad_exact_match_and_f1():
    assert squad_scores("The Oslo!", ["oslo"]) == (1.0, 1.0)
    assert squad_scores("Oslo city", ["oslo"]) == (0.0, pytest.approx(2 / 3))
    assert squad_scores("", []) == (1.0, 1.0) and squad_scores("Oslo", []) == (0.0, 0.0)


def test_the_metric_scores_each_question_once_over_its_windows(tokenizer):
    context = FILLER * 6 + "Bob lives in Oslo . " + FILLER * 6
    batch = {
        "question": ["where does Bob live ?", "where does Eve live ?"],
        "context": [context, "Eve lives in Lima ."],
        "answers": [
            {"text": ["Oslo"], "answer_start": [context.index("Oslo")]},
            {"text": ["Lima"], "answer_start": [13]},
        ],
    }
    features = TASK.preprocess(batch, tokenizer, Context(labels={}, options=Options(doc_stride=8)))
    starts = np.asarray(features.arrays["start_positions"][0])
    w = int(np.nonzero(starts)[0][0])
    eve = int(np.nonzero(features.arrays["offsets"][1][0, :, 0] == 0)[0][0])  # the context's first token
    outputs = fake_outputs(
        features, {0: (w, int(starts[w]), int(features.arrays["end_positions"][0][w])), 1: (0, eve, eve)}
    )
    metric = TASK.metrics([], Options())
    metric.bind(None, tokenizer)
    metric.update(outputs, {}, features.arrays)
    assert metric.compute() == {"exact_match": 0.5, "f1": 0.5}  # row 0 right; row 1 answers "Eve", not "Lima"
    [examples] = metric.views()  # the run report's: question, context, true answers, the span found, its F1
    assert [row[0] for row in examples.rows] == ["where does bob live?", "where does eve live?"]  # as decoded
    assert [row[2:] for row in examples.rows] == [["Oslo", "Oslo", 1.0], ["Lima", "Eve", 0.0]]


def test_a_training_batch_gives_a_loss(tokenizer):
    model = TASK.build_model(CFG.model, None, [], tokenizer)
    features = TASK.preprocess(
        {k: [r[k] for r in TASK.demo_data(8, seed=2)] for k in ("question", "context", "answers")},
        tokenizer,
        Context(labels={}, train=True, options=Options(allow_no_answer=True)),
    )
    assert features.errors == [None] * 8
    assert model(**TASK.collate(features.arrays, tokenizer)).loss.item() > 0


def test_requests_need_a_question_and_a_context():
    assert TASK.request_inputs({"question": "q", "context": "c"}) == [{"question": "q", "context": "c"}]
    with pytest.raises(UserError, match="expected"):
        TASK.request_inputs("just a question")
    with pytest.raises(UserError, match="unknown field"):
        TASK.request_inputs([{"question": "q", "context": "c", "answer": "x"}])


def test_demo_answers_sit_where_they_say():
    rows = TASK.demo_data(60, seed=5)
    answered = [r for r in rows if r["answers"]["text"]]
    assert 30 < len(answered) < 60
    for r in answered:
        start = r["answers"]["answer_start"][0]
        assert r["context"][start : start + len(r["answers"]["text"][0])] == r["answers"]["text"][0]
