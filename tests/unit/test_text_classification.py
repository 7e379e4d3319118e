"""The text-classification task spec, without Ray: bad rows get reasons, long texts are truncated
and flagged, batches are padded, predictions come in the pipeline's format."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from config import validate
from errors import UserError
from models.spec import Context
from models.text_classification import TASK

CFG = validate(
    {
        "task": "text-classification",
        "model": {"init": {"architecture": "bert"}, "max_length": 16, "tokenizer": {"vocab_size": 300}},
    }
)


@pytest.fixture(scope="module")
def tokenizer():
    return TASK.build_processor(CFG.model, None, iter(TASK.demo_data(200, seed=0)))


def test_bad_rows_get_reasons_and_good_rows_get_ids(tokenizer):
    batch = {
        "text": ["goal match", None, "   ", 7, "chip server"],
        "label": ["sports", "sports", "tech", "tech", "nope"],
    }
    features = TASK.preprocess(batch, tokenizer, Context(labels={"sports": 0, "tech": 1}))
    assert features.errors == [
        None,
        "text is null",
        "text is empty",
        "text is not a string (got int)",
        "unknown label 'nope' (not in the training split)",
    ]
    assert features.arrays["labels"][0] == 0 and features.arrays["input_ids"][1] is None
    assert features.lengths[0] == len(features.arrays["input_ids"][0]) > 2


def test_long_texts_are_truncated_to_the_limit_and_flagged(tokenizer):
    features = TASK.preprocess({"text": ["goal " * 100, "goal"]}, tokenizer, Context())
    assert len(features.arrays["input_ids"][0]) == 16 and features.flags[0] == "truncated to 16 tokens"
    assert features.arrays["input_ids"][0][-1] == tokenizer.sep_token_id
    assert features.flags[1] is None


def test_text_pairs_get_segment_ids(tokenizer):
    features = TASK.preprocess({"text": ["goal match"], "text_pair": ["chip"]}, tokenizer, Context())
    assert 1 in features.arrays["token_type_ids"][0]
    assert TASK.preprocess({"text": ["goal"], "text_pair": [None]}, tokenizer, Context()).errors == [
        "text_pair is null"
    ]


def test_collate_pads_to_the_longest_row(tokenizer):
    batch = TASK.collate(
        {"input_ids": [[2, 5, 3], [2, 3]], "token_type_ids": [[0, 0, 0], [0, 0]], "labels": [1, 0]}, tokenizer
    )
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, tokenizer.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [1, 0]


class Config:
    id2label = {0: "neg", 1: "pos", 2: "neutral"}


class Model:
    config = Config()


def test_postprocess_matches_the_pipeline_format():
    class Out:
        logits = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 1.0]])

    single = TASK.postprocess(Out(), {}, {}, Model(), None, {})
    assert [p["label"] for p in single] == ["pos", "neg"] and 0.7 < single[0]["score"] < 0.8
    ranked = TASK.postprocess(Out(), {}, {}, Model(), None, {"top_k": 2})
    assert [p["label"] for p in ranked[1]] == ["neg", "neutral"] and ranked[1][0]["score"] > ranked[1][1]["score"]
    assert TASK.to_columns(ranked + [None]) == {
        "label": ["pos", "neg", None],
        "score": [ranked[0][0]["score"], ranked[1][0]["score"], None],
    }


def test_request_inputs_take_strings_lists_and_pairs():
    assert TASK.request_inputs("hi") == [{"text": "hi"}]
    assert TASK.request_inputs(["a", "b"]) == [{"text": "a"}, {"text": "b"}]
    assert TASK.request_inputs({"text": "a", "text_pair": "b"}) == [{"text": "a", "text_pair": "b"}]
    with pytest.raises(UserError, match="unknown field"):
        TASK.request_inputs({"txt": "a"})


def test_demo_data_is_balanced_and_labelled_by_topic_words():
    rows = TASK.demo_data(400, seed=3)
    counts = Counter(r["label"] for r in rows)
    assert set(counts) == {"sports", "tech", "food", "travel"} and min(counts.values()) > 60
    assert all(r["id"] and r["text"] for r in rows)
    assert TASK.demo_data(5, seed=3) == TASK.demo_data(5, seed=3)


def test_from_scratch_model_has_the_labels_and_the_vocabulary(tokenizer):
    model = TASK.build_model(CFG.model, None, ["food", "sports"], tokenizer)
    assert model.config.id2label == {0: "food", 1: "sports"} and model.config.vocab_size == len(tokenizer)
    batch = TASK.collate({"input_ids": [[2, 5, 3]], "labels": [1]}, tokenizer)
    assert model(**batch).logits.shape == (1, 2)
