"""Tokenizers for text tasks: the checkpoint's own, or one trained on the training split.

From-scratch runs cannot download a vocabulary, so each architecture gets the kind of tokenizer it
was designed with, trained with `tokenizers` on the training texts: WordPiece for BERT, byte-level
BPE for GPT-2 and BART, Unigram (SentencePiece-style) for T5. It is saved next to the model, so
`AutoTokenizer.from_pretrained(model_dir)` loads it like any hub tokenizer.
"""

from __future__ import annotations

import json
import string
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    BartTokenizerFast,
    BertTokenizerFast,
    GPT2TokenizerFast,
    PreTrainedTokenizerBase,
    T5TokenizerFast,
)

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
GPT2_END_OF_TEXT = "<|endoftext|>"  # GPT-2's only special token: document separator, BOS, EOS and (here) padding
BART_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0-4, as in facebook/bart-*
T5_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0-2, as in t5-*


def train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool, max_length: int) -> PreTrainedTokenizerBase:
    """A BERT-style WordPiece tokenizer learned from `texts`."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece()
    return BertTokenizerFast(tokenizer_object=tok, model_max_length=max_length, do_lower_case=lowercase)


def train_bpe(texts: Iterable[str], vocab_size: int, max_length: int, architecture: str) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer learned from `texts`, for `architecture` "gpt2" or "bart".

    Byte-level BPE never meets an unknown character, so any text round-trips. Only the vocabulary and
    merges are learned; the architecture's own tokenizer class adds its pre-tokenizer, special tokens and
    templates, exactly as it does for the hub checkpoints. GPT-2 has no padding token: it pads with
    <|endoftext|> (padded positions are masked and never trained on)."""
    special = [GPT2_END_OF_TEXT] if architecture == "gpt2" else BART_SPECIAL_TOKENS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    learned = json.loads(tok.to_str())["model"]
    vocab, merges = learned["vocab"], [tuple(m) for m in learned["merges"]]
    if architecture == "gpt2":
        return GPT2TokenizerFast(vocab=vocab, merges=merges, pad_token=GPT2_END_OF_TEXT, model_max_length=max_length)
    if architecture == "bart":
        return BartTokenizerFast(vocab=vocab, merges=merges, model_max_length=max_length)
    raise ValueError(f"no byte-level BPE recipe for {architecture!r}")


def train_unigram(texts: Iterable[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerBase:
    """A T5-style Unigram (SentencePiece) tokenizer learned from `texts`: <pad>=0, </s>=1, <unk>=2,
    no <extra_id_*> sentinels (they only serve span-corruption pre-training). Printable ASCII is always
    in the vocabulary, so only rarer characters missing from the training texts become <unk>.

    The `tokenizers` trainer seeds candidate pieces from substrings shared by distinct words, so a
    corpus with very few distinct words (synthetic demos) ends up close to character-level."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=T5_SPECIAL_TOKENS,
        unk_token="<unk>",
        initial_alphabet=list(string.printable.strip()),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    vocab = [tuple(piece) for piece in json.loads(tok.to_str())["model"]["vocab"]]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def load_tokenizer(source_dir: str, max_length: int | None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    if max_length:
        tokenizer.model_max_length = max_length
    return tokenizer
