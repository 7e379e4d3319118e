"""What the text tasks share: the check that an input is usable text, right-padding of token rows,
and the BERT sizes that from-scratch BERT models are built at.

Task modules import these from here, not from one another.
"""

from __future__ import annotations

import numpy as np
import torch

# Sizes for from-scratch runs; "tiny" trains in a minute on a laptop CPU.
BERT_SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def check_text(value, column: str, allow_empty: bool = False) -> str | None:
    """Why `value` cannot be used as text, or None when it can."""
    if value is None:
        return f"{column} is null"
    if not isinstance(value, str):
        return f"{column} is not a string (got {type(value).__name__})"
    if not allow_empty and not value.strip():
        return f"{column} is empty"
    return None


def pad(rows: list, value: int, dtype=torch.long) -> torch.Tensor:
    """Rows of different lengths -> one (rows x longest) tensor, filled on the right with `value`."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(np.asarray(r), dtype=dtype)
    return out
