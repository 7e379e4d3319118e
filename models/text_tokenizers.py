"""Tokenizers for text tasks: the checkpoint's own, or one trained on the training split.

From-scratch runs cannot download a vocabulary, so BERT-family models get a WordPiece tokenizer
trained with `tokenizers` on the training texts; it is saved next to the model, so
`AutoTokenizer.from_pretrained(model_dir)` loads it like any hub tokenizer.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool, max_length: int) -> PreTrainedTokenizerBase:
    """A BERT-style WordPiece tokenizer learned from `texts`."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL_TOKENS)
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece()
    return BertTokenizerFast(tokenizer_object=tok, model_max_length=max_length, do_lower_case=lowercase)


def load_tokenizer(source_dir: str, max_length: int | None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    if max_length:
        tokenizer.model_max_length = max_length
    return tokenizer
