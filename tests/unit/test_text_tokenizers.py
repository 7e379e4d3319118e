"""Tokenizers trained for from-scratch runs, without Ray: each architecture gets its own kind, and the
saved tokenizer loads back through `AutoTokenizer` with the same ids."""

from __future__ import annotations

from transformers import AutoTokenizer

from models.text_tokenizers import load_tokenizer, train_bpe, train_unigram, train_wordpiece

TEXTS = ["the capital of france is paris .", "alice has 3 red apples and bob has 5 green pears ."] * 40


def test_gpt2_byte_level_bpe_round_trips_any_text_and_pads_with_end_of_text(tmp_path):
    tok = train_bpe(iter(TEXTS), 400, 64, "gpt2")
    text = "Zürich ✓ emoji 🙂 and UPPER case"  # nothing like it in the training texts
    assert tok.decode(tok(text)["input_ids"]) == text  # bytes never become <unk>
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.model_max_length == 64
    assert len(tok("the capital of france")["input_ids"]) < len("the capital of france") / 2  # merges were learned
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == tok(text)["input_ids"] and again.pad_token == "<|endoftext|>"


def test_bart_bpe_wraps_texts_in_its_special_tokens(tmp_path):
    tok = train_bpe(iter(TEXTS), 400, 64, "bart")
    ids = tok("the capital")["input_ids"]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2, 4)
    assert ids[0] == 0 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "the capital"
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("the capital")["input_ids"] == ids


def test_t5_unigram_ends_with_eos_and_has_no_sentinels(tmp_path):
    tok = train_unigram(iter(TEXTS), 300, 64)
    ids = tok("the capital of france")["input_ids"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert ids[-1] == 1 and tok.decode(ids, skip_special_tokens=True) == "the capital of france"
    assert not [t for t in tok.get_vocab() if t.startswith("<extra_id")]
    assert tok.unk_token_id not in tok("Quiet XYZ!")["input_ids"]  # printable ASCII is always known
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("the capital of france")["input_ids"] == ids


def test_wordpiece_and_load_tokenizer_still_work(tmp_path):
    tok = train_wordpiece(iter(TEXTS), 200, lowercase=True, max_length=32)
    assert tok("Paris")["input_ids"][0] == tok.cls_token_id
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path), 16).model_max_length == 16
