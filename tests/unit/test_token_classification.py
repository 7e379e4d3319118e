"""The token-classification task spec, without Ray: CoNLL files parse, tags land on each word's first
piece, bad rows get reasons, long sentences are truncated and flagged, entities are grouped as the
`transformers` pipeline groups them, and the metric counts entities as seqeval does."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from seqeval.metrics import f1_score, precision_score, recall_score

from config import validate
from errors import UserError
from models.spec import Context
from models.token_classification import IGNORE, TASK

CFG = validate(
    {
        "task": "token-classification",
        "model": {"init": {"architecture": "bert"}, "max_length": 16, "tokenizer": {"vocab_size": 300}},
    }
)
LABELS = ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]
IDS = {label: i for i, label in enumerate(LABELS)}


@pytest.fixture(scope="module")
def tokenizer():
    return TASK.build_processor(CFG.model, None, iter(TASK.demo_data(300, seed=0)))


def test_conll_files_become_sentences_of_words_and_tags():
    text = (
        b"-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n"
        b"Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n"
    )
    rows = list(TASK.formats["conll"](text, "train.conll"))
    assert rows == [
        {"tokens": ["EU", "rejects"], "ner_tags": ["B-ORG", "O"]},
        {"tokens": ["Peter", "Blackburn"], "ner_tags": ["B-PER", "I-PER"]},
    ]
    assert TASK.format_suffixes[".conll"] == "conll"


def test_list_valued_tags_make_the_label_set():
    assert TASK.labels_in([["B-PER", "O"], None, ["O", "B-LOC"]]) == {"B-PER", "O", "B-LOC"}


def test_only_the_first_piece_of_each_word_carries_its_tag(tokenizer):
    batch = {
        "tokens": [["Carlos", "Diaz", "visited", "Rio", "de", "Janeiro", "."]],
        "ner_tags": [["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "I-LOC", "O"]],
    }
    features = TASK.preprocess(batch, tokenizer, Context(labels=IDS, train=True))
    assert features.errors == [None]
    labels, first = features.arrays["labels"][0], features.arrays["first_piece"][0]
    assert [labels[p] for p in first] == [IDS[t] for t in batch["ner_tags"][0]]
    assert (labels != IGNORE).sum() == 7  # one labelled piece per word; [CLS], [SEP] and later pieces are ignored
    assert labels[0] == IGNORE and labels[-1] == IGNORE
    assert features.arrays["text"][0] == "Carlos Diaz visited Rio de Janeiro ."


def test_tag_ids_named_by_data_labels_are_accepted(tokenizer):
    features = TASK.preprocess(
        {"tokens": [["Bob", "left"]], "ner_tags": [[IDS["B-PER"], IDS["O"]]]},
        tokenizer,
        Context(labels=IDS, train=True),
    )
    labels = features.arrays["labels"][0]
    assert labels[1] == IDS["B-PER"]


def test_bad_rows_get_reasons(tokenizer):
    batch = {
        "tokens": [["Bob"], [], ["Bob", 3], None, ["Bob", "left"], ["Bob"]],
        "text": [None, None, None, None, None, None],
        "ner_tags": [["B-PER"], [], ["O", "O"], None, ["B-PER"], ["B-XYZ"]],
    }
    errors = TASK.preprocess(batch, tokenizer, Context(labels=IDS, train=True)).errors
    assert errors == [
        None,
        "tokens is not a non-empty list of words",
        "tokens holds a value that is not a string",
        "text or tokens is needed",
        "ner_tags has 1 tags for 2 words",
        "unknown tag 'B-XYZ' (not in the training split)",
    ]
    predicting = TASK.preprocess({"text": ["Bob went home", "  ", 5]}, tokenizer, Context())
    assert predicting.errors == [None, "text is empty", "text is not a string (got int)"]


def test_tag_ids_without_names_are_a_config_error(tokenizer):
    with pytest.raises(UserError, match="data.labels"):
        TASK.build_model(CFG.model, None, [0, 1, 2], tokenizer)


def test_long_sentences_are_truncated_to_the_limit_and_flagged(tokenizer):
    features = TASK.preprocess({"text": ["Paris " * 40, "Paris"]}, tokenizer, Context())
    assert len(features.arrays["input_ids"][0]) == 16 and features.flags[0] == "truncated to 16 tokens"
    assert features.arrays["input_ids"][0][-1] == tokenizer.sep_token_id and features.flags[1] is None


def test_entities_are_grouped_like_the_pipeline_with_character_offsets(tokenizer):
    text = "Grace Lee moved to New York ."
    features = TASK.preprocess({"text": [text]}, tokenizer, Context())
    arrays = features.arrays
    n = len(arrays["input_ids"][0])
    # pieces: [CLS] grace lee moved to new york . [SEP]  -> tags per piece (the vocabulary keeps these words whole)
    tags = ["O", "B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O", "O"]
    assert n == len(tags)
    logits = torch.full((1, n, len(LABELS)), -5.0)
    for p, tag in enumerate(tags):
        logits[0, p, IDS[tag]] = 5.0
    model = SimpleNamespace(config=SimpleNamespace(id2label=dict(enumerate(LABELS))))
    out = TASK.postprocess(SimpleNamespace(logits=logits), {}, arrays, model, tokenizer, {})
    assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in out[0]] == [
        ("PER", "grace lee", 0, 9),
        ("LOC", "new york", 19, 27),
    ]
    assert text[out[0][1]["start"] : out[0][1]["end"]] == "New York"
    assert 0.99 < out[0][0]["score"] <= 1.0
    columns = TASK.to_columns(out + [None])
    assert columns["entities"][0][0]["entity_group"] == "PER" and columns["entities"][1] is None


def test_a_b_tag_starts_a_new_entity(tokenizer):
    from models.token_classification import group_entities

    pieces = [
        {"entity": e, "score": 0.5, "word": w, "start": s, "end": s + len(w)}
        for e, w, s in [("B-PER", "bob", 0), ("B-PER", "eve", 4), ("I-PER", "jones", 8), ("O", "left", 14)]
    ]
    assert [g["word"] for g in group_entities(pieces, {"O"}, tokenizer)] == ["bob", "eve jones"]


def test_the_metric_counts_entities_as_seqeval_does():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "O"]]
    guess = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]]
    metric = TASK.metrics(LABELS, None)
    for t, g in zip(true, guess):
        first = np.arange(1, len(t) + 1)
        logits = torch.zeros(1, len(t) + 2, len(LABELS))
        for w, tag in enumerate(g):
            logits[0, w + 1, IDS[tag]] = 1.0
        metric.update(SimpleNamespace(logits=logits), {}, {"tags": [[IDS[x] for x in t]], "first_piece": [first]})
    values = metric.compute()
    assert values["f1"] == pytest.approx(f1_score(true, guess))
    assert values["precision"] == pytest.approx(precision_score(true, guess))
    assert values["recall"] == pytest.approx(recall_score(true, guess))


def test_requests_take_text_or_words():
    assert TASK.request_inputs("Bob left") == [{"text": "Bob left", "tokens": None}]
    assert TASK.request_inputs([{"tokens": ["Bob", "left"]}, "x"])[0] == {"text": None, "tokens": ["Bob", "left"]}
    with pytest.raises(UserError, match="unknown field"):
        TASK.request_inputs({"sentence": "Bob"})


def test_demo_data_tags_every_word():
    rows = TASK.demo_data(50, seed=1)
    assert all(len(r["tokens"]) == len(r["ner_tags"]) for r in rows)
    assert {t for r in rows for t in r["ner_tags"]} >= {"B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "O"}


def test_an_untrained_model_saved_to_disk_gives_the_pipeline_s_entities(tokenizer, tmp_path):
    from transformers import pipeline

    torch.manual_seed(0)
    model = TASK.build_model(CFG.model, None, LABELS, tokenizer).eval()
    features = TASK.preprocess(
        {
            "tokens": [["Bob", "met", "Eve", "Jones", "in", "Oslo", "."]],
            "ner_tags": [["B-PER", "O", "B-PER", "I-PER", "O", "B-LOC", "O"]],
        },
        tokenizer,
        Context(labels=IDS, train=True),
    )
    assert model(**TASK.collate(features.arrays, tokenizer)).loss.item() > 0  # training's call
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, processor = TASK.load(str(tmp_path))
    texts = ["Bob met Eve Jones in Oslo .", "Acme Corp opened a store in Tokyo today ."]
    features = TASK.preprocess({"text": texts}, processor, Context())
    inputs = TASK.collate(features.arrays, processor)
    with torch.no_grad():
        ours = TASK.postprocess(TASK.forward(model, inputs, {}), inputs, features.arrays, model, processor, {})
    plain = pipeline("token-classification", model=str(tmp_path), aggregation_strategy="simple")(texts)
    assert [[(e["entity_group"], e["word"], e["start"], e["end"]) for e in row] for row in ours] == [
        [(e["entity_group"], e["word"], e["start"], e["end"]) for e in row] for row in plain
    ]
    assert all(abs(a["score"] - float(b["score"])) < 1e-4 for x, y in zip(ours, plain) for a, b in zip(x, y))
    assert sum(len(row) for row in ours) > 0  # an untrained head predicts some entities: the comparison is not empty
