"""The fill-mask task spec, without Ray: training masks afresh per batch with BERT's 80/10/10 rule,
eval masks the same pieces every time, texts without [MASK] get error rows when predicting, and the
fillers come in the `transformers` pipeline's format."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from config import validate
from errors import UserError
from models.fill_mask import IGNORE, TASK, Options, mask_tokens
from models.spec import Context

CFG = validate(
    {
        "task": "fill-mask",
        "model": {"init": {"architecture": "bert"}, "max_length": 16, "tokenizer": {"vocab_size": 200}},
    }
)


@pytest.fixture(scope="module")
def tokenizer():
    return TASK.build_processor(CFG.model, None, iter(TASK.demo_data(300, seed=0)))


def test_bert_masking_picks_about_15_percent_and_splits_them_80_10_10():
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 100, size=100_000)
    maskable = np.ones(len(ids), dtype=bool)
    maskable[::10] = False  # special tokens are never chosen
    inputs, labels = mask_tokens(ids, maskable, 0.15, rng, mask_id=4, vocab=np.arange(5, 100))
    chosen = labels != IGNORE
    assert 0.14 < chosen.sum() / maskable.sum() < 0.16 and not chosen[~maskable].any()
    assert (labels[chosen] == ids[chosen]).all()
    masked, kept = (inputs[chosen] == 4).mean(), (inputs[chosen] == ids[chosen]).mean()
    assert 0.78 < masked < 0.82 and 0.09 < kept < 0.12  # kept includes the random swaps that drew the same piece
    assert (inputs[~chosen] == ids[~chosen]).all()


def test_training_masks_change_between_batches_and_eval_masks_do_not(tokenizer):
    texts = ["the capital of france is paris . the capital of japan is tokyo ."]
    train = TASK.preprocess(
        {"text": texts}, tokenizer, Context(labels={}, train=True, options=Options(mlm_probability=0.5))
    )
    draws = {tuple(TASK.collate(train.arrays, tokenizer)["labels"][0].tolist()) for _ in range(10)}
    assert len(draws) > 1
    evaluation = TASK.preprocess({"text": texts}, tokenizer, Context(labels={}, options=Options(mlm_probability=0.5)))
    draws = {tuple(TASK.collate(evaluation.arrays, tokenizer)["labels"][0].tolist()) for _ in range(10)}
    assert len(draws) == 1
    labels = next(iter(draws))
    assert labels[0] == IGNORE and labels[-1] == IGNORE and any(x != IGNORE for x in labels)  # [CLS]/[SEP] never masked


def test_every_training_row_has_a_masked_piece(tokenizer):
    features = TASK.preprocess({"text": ["cow"] * 20}, tokenizer, Context(labels={}, train=True))
    labels = TASK.collate(features.arrays, tokenizer)["labels"]
    assert ((labels != IGNORE).sum(-1) >= 1).all()


def test_bad_rows_get_reasons_and_long_texts_are_truncated_and_flagged(tokenizer):
    texts = [
        "the cow says [MASK] .",
        "the cow says moo .",
        None,
        "  ",
        3,
        "the cow says moo . " * 10 + "[MASK]",
        "[MASK] " + "the cow says moo . " * 10,
    ]
    features = TASK.preprocess({"text": texts}, tokenizer, Context())
    assert features.errors == [
        None,
        "text has no [MASK] token",
        "text is null",
        "text is empty",
        "text is not a string (got int)",
        "text has no [MASK] token within the first 16 tokens",
        None,
    ]
    assert features.flags[6] == "truncated to 16 tokens" and len(features.arrays["input_ids"][6]) == 16
    training = TASK.preprocess({"text": texts[1:2]}, tokenizer, Context(labels={}, train=True))
    assert training.errors == [None]  # training texts need no [MASK]


def test_fillers_come_in_the_pipeline_format(tokenizer):
    features = TASK.preprocess({"text": ["the cow says [MASK] .", "the [MASK] says [MASK] ."]}, tokenizer, Context())
    inputs = TASK.collate(features.arrays, tokenizer)
    logits = torch.zeros(2, inputs["input_ids"].shape[1], len(tokenizer))
    moo, cow = tokenizer.convert_tokens_to_ids("moo"), tokenizer.convert_tokens_to_ids("cow")
    logits[0, 4, moo] = 9.0
    logits[1, 2, cow], logits[1, 4, moo] = 9.0, 9.0
    out = TASK.postprocess(SimpleNamespace(logits=logits), inputs, features.arrays, None, tokenizer, {"top_k": 3})
    assert len(out[0]) == 3 and out[0][0]["token"] == moo and out[0][0]["token_str"] == "moo"
    assert out[0][0]["sequence"] == "the cow says moo." and out[0][0]["score"] > 0.5
    assert [fills[0]["token_str"] for fills in out[1]] == ["cow", "moo"]  # two masks: a list per mask
    assert out[1][0][0]["sequence"] == "[CLS] the cow says [MASK]. [SEP]"  # as the pipeline: other masks shown
    columns = TASK.to_columns(out + [None])
    assert (
        len(columns["predictions"][0]) == 1
        and len(columns["predictions"][1]) == 2
        and columns["predictions"][2] is None
    )


def test_the_metric_gives_perplexity_and_accuracy(tokenizer):
    labels = torch.tensor([[IGNORE, 7, IGNORE, 9]])
    logits = torch.zeros(1, 4, 20)
    logits[0, 1, 7] = 5.0  # right
    logits[0, 3, 2], logits[0, 3, 9] = 5.0, 4.0  # wrong, but second best
    metric = TASK.metrics([], None)
    metric.bind(None, tokenizer)
    inputs = {"labels": labels, "input_ids": torch.tensor([[12, 7, 13, 2]]), "attention_mask": torch.ones(1, 4)}
    metric.update(SimpleNamespace(logits=logits), inputs, {})
    values = metric.compute()
    expected = torch.nn.functional.cross_entropy(logits[0, [1, 3]], torch.tensor([7, 9])).exp().item()
    assert values["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert values["accuracy"] == 0.5 and values["top5_accuracy"] == 1.0
    [examples] = metric.views()  # the run report's: the masked text, the pieces it hid, the model's first choice
    [(text, hidden, found, right)] = examples.rows
    assert text.count(tokenizer.mask_token) == 2 and right == "1 of 2"
    assert hidden.split() == tokenizer.convert_ids_to_tokens([7, 9]) and found.split()[0] == hidden.split()[0]


def test_a_saved_untrained_model_fills_masks_as_the_pipeline_does(tokenizer, tmp_path):
    from transformers import pipeline

    torch.manual_seed(0)
    model = TASK.build_model(CFG.model, None, [], tokenizer).eval()
    training = TASK.preprocess({"text": ["the cow says moo ."]}, tokenizer, Context(labels={}, train=True))
    assert model(**TASK.collate(training.arrays, tokenizer)).loss.item() > 0
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, processor = TASK.load(str(tmp_path))
    texts = ["the cow says [MASK] .", "the capital of [MASK] is paris ."]
    features = TASK.preprocess({"text": texts}, processor, Context())
    inputs = TASK.collate(features.arrays, processor)
    with torch.no_grad():
        ours = TASK.postprocess(
            TASK.forward(model, inputs, {}), inputs, features.arrays, model, processor, {"top_k": 3}
        )
    plain = pipeline("fill-mask", model=str(tmp_path), top_k=3)(texts)
    for a_row, b_row in zip(ours, plain):
        assert [(a["token"], a["token_str"], a["sequence"]) for a in a_row] == [
            (b["token"], b["token_str"], b["sequence"]) for b in b_row
        ]
        assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(a_row, b_row))


def test_requests_take_strings_or_text_fields():
    assert TASK.request_inputs(["a [MASK]", {"text": "b [MASK]"}]) == [{"text": "a [MASK]"}, {"text": "b [MASK]"}]
    with pytest.raises(UserError, match="unknown field"):
        TASK.request_inputs({"inputs": "x"})
