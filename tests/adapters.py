"""Two LoRA adapters that disagree, for the adapter tests (unit and e2e)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.adapters import save_model


def save_adapters_that_disagree(wrapped, processor, root: Path, seed: int, scale: float) -> dict[str, Path]:
    """Saves `wrapped` (a LoRA-wrapped classifier) as two adapters under `root`: `a` with its LoRA matrices moved off
    zero (PEFT starts B at zero, so an untouched adapter changes nothing), `b` as `a` with its head's rows reversed,
    so that on any input `b` answers the label at the mirrored index."""
    torch.manual_seed(seed)
    dirs = {}
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * scale)
        for name in ("a", "b"):
            if name == "b":
                for n, p in wrapped.named_parameters():
                    if "modules_to_save" in n:
                        p.copy_(p.flip(0))
            dirs[name] = root / name
            save_model(wrapped, str(dirs[name]))
            processor.save_pretrained(dirs[name])
    return dirs
