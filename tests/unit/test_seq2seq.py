"""The summarization and translation task specs (BART / T5), without Ray: prefixes, truncation flags,
bad rows, bounded generation, and metrics that keep sums."""

from __future__ import annotations

import pytest
import torch

from config import validate
from errors import UserError
from models.generation import ParameterError
from models.seq2seq import Seq2SeqOptions
from models.spec import Context
from models.summarization import TASK as SUMMARIZATION
from models.translation import TASK as TRANSLATION

OPTIONS = Seq2SeqOptions(
    prefix="summarize: ", max_source_length=30, max_target_length=12, max_new_tokens=5, max_new_tokens_limit=8
)


def config(architecture):
    return validate(
        {
            "task": "summarization",
            "model": {"init": {"architecture": architecture}, "max_length": 32, "tokenizer": {"vocab_size": 300}},
        }
    )


@pytest.fixture(scope="module", params=["t5", "bart"])
def built(request):
    cfg = config(request.param)
    tokenizer = SUMMARIZATION.build_processor(cfg.model, None, iter(SUMMARIZATION.demo_data(200, seed=0)))
    torch.manual_seed(0)
    return tokenizer, SUMMARIZATION.build_model(cfg.model, None, [], tokenizer).eval()


def test_the_architecture_gets_its_own_tokenizer_and_model(built):
    tokenizer, model = built
    assert model.config.vocab_size == len(tokenizer) and model.config.pad_token_id == tokenizer.pad_token_id
    kind = model.config.model_type
    assert kind in ("t5", "bart") and type(tokenizer).__name__.startswith("T5" if kind == "t5" else ("Bart", "Roberta"))


def test_bad_rows_get_reasons(built):
    tokenizer, _ = built
    batch = {"source": ["river castle", None, "  ", 5, "river"], "target": ["river", "x", "x", "x", None]}
    features = SUMMARIZATION.preprocess(batch, tokenizer, Context(labels={}, options=OPTIONS))
    assert features.errors == [
        None,
        "source is null",
        "source is empty",
        "source is not a string (got int)",
        "target is null",
    ]
    predicting = SUMMARIZATION.preprocess({"source": ["river", None]}, tokenizer, Context(options=OPTIONS))
    assert predicting.errors == [None, "source is null"] and "labels" not in predicting.arrays


def test_sources_get_the_prefix_and_long_texts_are_truncated_and_flagged(built):
    tokenizer, _ = built
    batch = {"source": ["river castle", "the old river " * 20], "target": ["river", "river " * 20]}
    features = SUMMARIZATION.preprocess(batch, tokenizer, Context(labels={}, options=OPTIONS))
    assert tokenizer.decode(features.arrays["input_ids"][0], skip_special_tokens=True) == "summarize: river castle"
    assert features.flags == [None, "source truncated to 30 tokens; target truncated to 12 tokens"]
    source, target = features.arrays["input_ids"][1], features.arrays["labels"][1]
    assert len(source) == 30 and len(target) == 12
    assert source[-1] == target[-1] == tokenizer.eos_token_id  # truncation keeps the closing </s>


def test_collate_pads_labels_with_the_ignore_index(built):
    tokenizer, _ = built
    features = SUMMARIZATION.preprocess(
        {"source": ["river", "castle tower forest"], "target": ["river", "castle tower forest"]},
        tokenizer,
        Context(labels={}, options=OPTIONS),
    )
    inputs = SUMMARIZATION.collate(features.arrays, tokenizer)
    short = len(features.arrays["labels"][0])
    assert (inputs["labels"][0, short:] == -100).all() and (inputs["labels"][0, :short] >= 0).all()
    assert inputs["attention_mask"].sum(1).tolist() == [len(ids) for ids in features.arrays["input_ids"]]


def predict(task, built, sources, parameters):
    tokenizer, model = built
    arrays = task.preprocess({"source": sources}, tokenizer, Context(options=OPTIONS)).arrays
    inputs = task.collate(arrays, tokenizer)
    with torch.inference_mode():
        outputs = task.forward(model, inputs, parameters)
    return outputs, task.postprocess(outputs, inputs, arrays, model, tokenizer, parameters)


def test_generation_follows_parameters_within_the_limit(built):
    outputs, predictions = predict(
        SUMMARIZATION, built, ["river castle", "winter"], {"num_beams": 2, "max_new_tokens": 3}
    )
    assert outputs.shape[1] <= 1 + 3 and [list(p) for p in predictions] == [["summary_text"]] * 2
    _, translations = predict(TRANSLATION, built, ["river"], {})
    assert list(translations[0]) == ["translation_text"]
    with pytest.raises(ParameterError, match="max_new_tokens: 9 is over this model's limit of 8"):
        predict(SUMMARIZATION, built, ["river"], {"max_new_tokens": 9})
    with pytest.raises(ValueError, match="parameters.temperature: not a generation parameter"):
        predict(SUMMARIZATION, built, ["river"], {"temperature": 0.5})
    with pytest.raises(UserError, match="parameters.num_beams: must be between 1 and 16"):
        predict(SUMMARIZATION, built, ["river"], {"num_beams": 0})


def test_metrics_generate_for_the_batch_and_keep_only_sums(built):
    tokenizer, model = built
    features = SUMMARIZATION.preprocess(
        {"source": ["river castle"] * 3, "target": ["river castle"] * 3}, tokenizer, Context(labels={}, options=OPTIONS)
    )
    inputs = SUMMARIZATION.collate(features.arrays, tokenizer)
    metric = SUMMARIZATION.metrics([], OPTIONS)
    metric.bind(model, tokenizer)
    metric.update(None, inputs, features.arrays)
    assert set(metric.compute()) == {"rouge1", "rouge2", "rougeL"} and metric.sums[-1] == 3
    [examples] = metric.views()  # the run report's: source, reference and output of the first rows
    assert examples.header == ["source", "reference", "output"] and len(examples.rows) == 3
    assert all(row[0].endswith("river castle") and row[1] == "river castle" for row in examples.rows), examples.rows


def test_rouge_and_translation_scores_of_known_answers():
    rouge = SUMMARIZATION.metrics([], None)
    rouge.add(["river castle", "winter"], ["river castle", "dragon"])
    assert rouge.compute() == {"rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5}
    translation = TRANSLATION.metrics([], None)
    translation.add(["le chat voit le chien"], ["le chat voit le chien"])
    assert translation.compute() == {"sacrebleu": pytest.approx(100), "chrf": pytest.approx(100)}
    translation.add(["xyz"], ["le roi mange"])
    assert 0 < translation.compute()["sacrebleu"] < 100


def test_request_inputs_and_columns():
    assert SUMMARIZATION.request_inputs("a") == [{"source": "a"}]
    assert TRANSLATION.request_inputs(["a", {"source": "b"}, {"text": "c"}]) == [
        {"source": "a"},
        {"source": "b"},
        {"source": "c"},
    ]
    with pytest.raises(UserError, match="unknown field"):
        TRANSLATION.request_inputs({"src": "a"})
    assert TRANSLATION.to_columns([{"translation_text": "x"}, None]) == {"translation_text": ["x", None]}


def test_demo_data_is_learnable_by_rule():
    for row in SUMMARIZATION.demo_data(50, seed=3):
        words = row["source"].split()
        assert [w for w in words if w in row["target"].split()] == row["target"].split()
    common: dict[str, set] = {}  # source word -> the target words of every row it appears in
    for row in TRANSLATION.demo_data(300, seed=3):
        assert len(row["source"].split()) == len(row["target"].split())
        for word in set(row["source"].split()) - {"the"}:
            common[word] = common.get(word, set(row["target"].split())) & set(row["target"].split())
    assert len(common) == 22 and all(len(words - {"le"}) == 1 for words in common.values())  # one translation each
