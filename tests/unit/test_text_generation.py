"""The text-generation task spec, without Ray: documents are packed, completions alone are trained on,
bad rows get reasons, long inputs are truncated and flagged, generation is bounded and batching does
not change an answer."""

from __future__ import annotations

import math

import pytest
import torch

from config import validate
from errors import UserError
from models.generation import ParameterError, cut_at_stop, held_back
from models.spec import Context
from models.text_generation import TASK, Options

CFG = validate(
    {
        "task": "text-generation",
        "model": {"init": {"architecture": "gpt2"}, "max_length": 32, "tokenizer": {"vocab_size": 400}},
    }
)
TRAIN = Context(labels={}, train=True, options=Options(block_size=16))
PREDICT = Context(options=Options(max_new_tokens=6, max_new_tokens_limit=8))


@pytest.fixture(scope="module")
def tokenizer():
    return TASK.build_processor(CFG.model, None, iter(TASK.demo_data(300, seed=0)))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return TASK.build_model(CFG.model, None, [], tokenizer).eval()


def test_bad_training_rows_get_reasons(tokenizer):
    batch = {
        "text": ["alice has 3 red apples .", None, "  ", 7, None, None],
        "prompt": [None, None, None, None, "the capital of peru is", 5],
        "completion": [None, None, None, None, "  ", " lima ."],
    }
    features = TASK.preprocess(batch, tokenizer, TRAIN)
    assert features.errors == [
        None,
        "text is null",
        "text is empty",
        "text is not a string (got int)",
        "completion is empty",
        "prompt is not a string (got int)",
    ]


def test_data_without_any_text_column_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match="no column 'text' \\(documents\\) or 'prompt' \\+ 'completion'"):
        TASK.preprocess({"prompt": ["a"]}, tokenizer, TRAIN)
    with pytest.raises(UserError, match="no column 'prompt' \\(or 'text'\\)"):
        TASK.preprocess({}, tokenizer, PREDICT)


def test_documents_end_with_end_of_text_and_pairs_remember_their_prompt(tokenizer):
    batch = {
        "text": ["alice has 3 red apples .", None],
        "prompt": [None, "the capital of peru is"],
        "completion": [None, " lima ."],
    }
    features = TASK.preprocess(batch, tokenizer, TRAIN)
    doc, pair = features.arrays["input_ids"]
    assert doc[-1] == tokenizer.eos_token_id and features.arrays["pack"] == [16, 0]
    prompt_length = features.arrays["prompt_length"][1]
    assert tokenizer.decode(pair[:prompt_length]) == "the capital of peru is"
    assert tokenizer.decode(pair[prompt_length:]) == " lima .<|endoftext|>"


def test_collate_packs_documents_into_blocks_and_masks_prompts(tokenizer):
    docs = ["alice has 3 red apples . bob gave 4 figs to carol .", "the plums of dave are blue ."]
    batch = {
        "text": docs + [None],
        "prompt": [None, None, "the capital of peru is"],
        "completion": [None, None, " lima ."],
    }
    arrays = TASK.preprocess(batch, tokenizer, TRAIN).arrays
    inputs = TASK.collate(arrays, tokenizer)
    stream = arrays["input_ids"][0] + arrays["input_ids"][1]
    blocks = math.ceil(len(stream) / 16)
    assert inputs["input_ids"].shape[0] == 1 + blocks  # the pair, then the documents' blocks
    packed = torch.cat([inputs["input_ids"][1 + b][inputs["attention_mask"][1 + b].bool()] for b in range(blocks)])
    assert packed.tolist() == stream  # nothing lost, nothing repeated, documents in order
    pair_labels = inputs["labels"][0]
    prompt_length = arrays["prompt_length"][2]
    assert (pair_labels[:prompt_length] == -100).all() and pair_labels[prompt_length] != -100
    assert (inputs["labels"][inputs["attention_mask"] == 0] == -100).all()  # padding is never trained on


def test_over_long_training_inputs_are_truncated_and_flagged(tokenizer):
    long = "alice has 3 red apples . " * 40
    packed = TASK.preprocess({"text": [long]}, tokenizer, Context(labels={}, options=Options(max_document_tokens=50)))
    assert len(packed.arrays["input_ids"][0]) == 50 and packed.flags == ["truncated to 50 tokens"]
    unpacked = TASK.preprocess({"text": [long]}, tokenizer, Context(labels={}, options=Options(pack=False)))
    assert len(unpacked.arrays["input_ids"][0]) == 32 and unpacked.flags == ["truncated to 32 tokens"]
    pair = TASK.preprocess({"prompt": [long], "completion": [" lima ."]}, tokenizer, TRAIN)
    ids, prompt_length = pair.arrays["input_ids"][0], pair.arrays["prompt_length"][0]
    assert len(ids) == 32 and pair.flags == ["truncated to 32 tokens"]
    assert tokenizer.decode(ids[prompt_length:]) == " lima .<|endoftext|>"  # the completion survives whole


def test_prompts_keep_their_end_and_leave_room_to_generate(tokenizer):
    features = TASK.preprocess({"prompt": ["apples " * 40 + "the capital of peru is", "", None]}, tokenizer, PREDICT)
    assert features.errors == [None, "prompt is empty", "prompt is null"]
    ids = features.arrays["prompt_ids"][0]
    assert len(ids) == 24 and features.flags[0] == "prompt truncated to its last 24 tokens"  # 32 - limit 8
    assert tokenizer.decode(ids).endswith("the capital of peru is")


def test_prompts_are_left_padded(tokenizer):
    arrays = TASK.preprocess({"text": ["alice has", "the capital of peru is"]}, tokenizer, PREDICT).arrays
    inputs = TASK.collate(arrays, tokenizer)
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][:, -1].tolist() == [1, 1]


def predict(model, tokenizer, prompts, parameters):
    arrays = TASK.preprocess({"prompt": prompts}, tokenizer, PREDICT).arrays
    inputs = TASK.collate(arrays, tokenizer)
    with torch.inference_mode():
        return TASK.postprocess(TASK.forward(model, inputs, parameters), inputs, arrays, model, tokenizer, parameters)


def test_a_row_gets_the_same_text_alone_or_in_a_padded_batch(model, tokenizer):
    prompts = ["alice has 3", "the capital of france is", "bob"]
    together = predict(model, tokenizer, prompts, {})
    alone = [predict(model, tokenizer, [p], {})[0] for p in prompts]
    assert together == alone
    assert together[1][0]["generated_text"].startswith("the capital of france is")
    sampled = predict(model, tokenizer, prompts, {"do_sample": True, "seed": 7, "top_k": 0})
    assert sampled[1] == predict(model, tokenizer, prompts[1:2], {"do_sample": True, "seed": 7, "top_k": 0})[0]


def test_generation_is_bounded_and_parameters_are_checked(model, tokenizer):
    arrays = TASK.preprocess({"prompt": ["alice has"]}, tokenizer, PREDICT).arrays
    inputs = TASK.collate(arrays, tokenizer)
    out = TASK.forward(model, inputs, {"max_new_tokens": 8, "stop": []})
    assert out["new_tokens"].shape[1] <= 8
    with pytest.raises(ParameterError, match="max_new_tokens: 9 is over this model's limit of 8"):
        TASK.forward(model, inputs, {"max_new_tokens": 9})
    with pytest.raises(ParameterError, match="max_new_tokens: 9"):  # before any piece is streamed
        TASK.stream(model, tokenizer, arrays, {"max_new_tokens": 9})
    with pytest.raises(ValueError, match="parameters.num_beams: not a generation parameter"):
        TASK.forward(model, inputs, {"num_beams": 2})
    with pytest.raises(UserError, match="parameters.temperature: expected float"):
        TASK.forward(model, inputs, {"temperature": "hot"})


def test_stream_yields_the_same_continuation_and_stops_at_stop_strings(model, tokenizer):
    arrays = TASK.preprocess({"prompt": ["alice has"]}, tokenizer, PREDICT).arrays
    full = predict(model, tokenizer, ["alice has"], {"return_full_text": False})[0][0]["generated_text"]
    assert "".join(TASK.stream(model, tokenizer, arrays, {})) == full
    stop = full[2:4]
    pieces = list(TASK.stream(model, tokenizer, arrays, {"stop": [stop]}))
    assert (
        "".join(pieces)
        == cut_at_stop(full, [stop])
        == predict(model, tokenizer, ["alice has"], {"stop": stop, "return_full_text": False})[0][0]["generated_text"]
    )


def test_stop_helpers():
    assert cut_at_stop("paris . rome .", [" .", "rome"]) == "paris"
    assert cut_at_stop("paris", ["x"]) == "paris" and cut_at_stop("paris", None) == "paris"
    assert held_back("tokyo \n", ["\n\n"]) == 1 and held_back("tokyo", ["\n\n"]) == 0


def test_perplexity_of_uniform_guesses_is_the_vocabulary_size():
    metric = TASK.metrics([], None)

    class Out:
        logits = torch.zeros(2, 5, 50)

    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
    metric.update(Out(), {"labels": labels}, {})
    assert metric.compute()["perplexity"] == pytest.approx(50, rel=1e-6)


def test_request_inputs_and_columns():
    assert TASK.request_inputs("hi") == [{"prompt": "hi"}]
    assert TASK.request_inputs(["a", {"prompt": "b"}, {"text": "c"}]) == [
        {"prompt": "a"},
        {"prompt": "b"},
        {"prompt": "c"},
    ]
    with pytest.raises(UserError, match="unknown field"):
        TASK.request_inputs({"inputs": "a"})
    assert TASK.to_columns([[{"generated_text": "x"}], None]) == {"generated_text": ["x", None]}


def test_options_refuse_a_default_over_the_limit():
    with pytest.raises(ValueError, match="max_new_tokens_limit"):
        Options(max_new_tokens=300, max_new_tokens_limit=100)


def test_demo_data_mixes_documents_and_prompt_completion_pairs():
    rows = TASK.demo_data(200, seed=1)
    pairs = [r for r in rows if r["completion"]]
    assert 40 < len(pairs) < 120 and all(r["text"] is None for r in pairs)
    assert all(r["text"].endswith(".") for r in rows if not r["completion"])


def test_the_run_report_shows_prompts_with_their_reference_and_the_greedy_continuation(tokenizer, model):
    batch = {
        "text": [None, "alice has 3 red apples and bob has 2 green pears ."],
        "prompt": ["the capital of peru is", None],
        "completion": [" lima .", None],
    }
    features = TASK.preprocess(batch, tokenizer, Context(labels={}, options=Options(block_size=16)))
    inputs = TASK.collate(features.arrays, tokenizer)
    metric = TASK.metrics([], None)
    metric.bind(model, tokenizer)
    with torch.no_grad():
        metric.update(model(**inputs), inputs, features.arrays)
    metric.compute()
    [examples] = metric.views()
    assert examples.header == ["prompt", "reference", "output"] and len(examples.rows) == 2
    (prompt, reference, output), (first_half, rest, _) = examples.rows
    assert prompt.strip() == "the capital of peru is" and reference.strip() == "lima ." and isinstance(output, str)
    assert (first_half + rest).replace(" ", "") == batch["text"][1].replace(" ", "")  # cut in two, maybe mid-word
    assert not model.training  # generation for the report leaves the model as it found it
