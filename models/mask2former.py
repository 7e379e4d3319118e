"""Mask2Former, image-segmentation's universal model: a binary mask and a class per query, so it learns
instance and panoptic segments as well as semantic ones (SegFormer, the per-pixel model, stays in
models/image_segmentation.py). Here: its from-scratch sizes, processor and model, the mask-classification
inputs it trains on (the targets come from models/segments.py), and its instance and panoptic answers.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessorPil,
    SwinConfig,
)

from errors import UserError
from models.images import to_png_base64
from models.segments import IGNORE

# From-scratch sizes, as SegFormer's in models/image_segmentation.py: "tiny" for 64 px images on a laptop CPU,
# "mini".."base" follow Swin-T.
MASK2FORMER_SIZES = {
    "tiny": dict(
        swin=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 4], window_size=4),
        hidden=32,
        ffn=64,
        encoder_layers=1,
        decoder_layers=2,
        heads=2,
        num_queries=16,
        train_num_points=1024,
        image_size=64,
    ),
    "mini": dict(
        swin=dict(embed_dim=48, depths=[2, 2, 2, 2], num_heads=[3, 6, 12, 24], window_size=7),
        hidden=128,
        ffn=512,
        encoder_layers=3,
        decoder_layers=6,
        heads=4,
        num_queries=50,
        train_num_points=4096,
        image_size=256,
    ),
    "small": dict(
        swin=dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7),
        hidden=256,
        ffn=1024,
        encoder_layers=6,
        decoder_layers=10,
        heads=8,
        num_queries=100,
        train_num_points=12544,
        image_size=384,
    ),
    "base": dict(
        swin=dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7),
        hidden=256,
        ffn=2048,
        encoder_layers=6,
        decoder_layers=10,
        heads=8,
        num_queries=100,
        train_num_points=12544,
        image_size=384,
    ),
}


def is_universal(processor) -> bool:
    """Mask2Former's processor can post-process panoptic output; SegFormer's cannot."""
    return hasattr(processor, "post_process_panoptic_segmentation")


def mask2former_processor(side: int) -> Mask2FormerImageProcessorPil:
    """The from-scratch processor for `side` x `side` images."""
    if side < 64:  # its stride-32 features would be 1x1, which GroupNorm refuses for a single image
        raise UserError(f"model.init.overrides.image_size: Mask2Former needs at least 64 px, got {side}")
    return Mask2FormerImageProcessorPil(
        size={"height": side, "width": side}, size_divisor=32, do_reduce_labels=False, ignore_index=IGNORE
    )


def mask2former_model(size_name: str, side: int, named: dict, overrides: dict) -> Mask2FormerForUniversalSegmentation:
    """A from-scratch model of size `size_name` on a Swin backbone for `side` px images; `named` holds the
    label maps, `overrides` the user's config keys."""
    size = MASK2FORMER_SIZES[size_name]
    backbone = SwinConfig(
        image_size=side, patch_size=4, out_features=["stage1", "stage2", "stage3", "stage4"], **size["swin"]
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=size["hidden"],
        mask_feature_size=size["hidden"],
        hidden_dim=size["hidden"],
        encoder_feedforward_dim=size["ffn"],
        dim_feedforward=size["ffn"],
        encoder_layers=size["encoder_layers"],
        decoder_layers=size["decoder_layers"],
        num_attention_heads=size["heads"],
        num_queries=size["num_queries"],
        train_num_points=size["train_num_points"],
        ignore_value=IGNORE,
        **named,
        **overrides,
    )
    return Mask2FormerForUniversalSegmentation(config)


def mask2former_inputs(pixels: torch.Tensor, arrays: dict[str, list]) -> dict[str, torch.Tensor | list]:
    """What the model takes beside `pixel_values`: its pixel mask and, for training, each image's segment
    masks and their classes."""
    b, _, h, w = pixels.shape
    inputs = {"pixel_mask": torch.ones(b, h, w, dtype=torch.long)}
    if arrays.get("labels") is not None:
        inputs["mask_labels"] = [torch.from_numpy(m).float() for m in arrays["segment_masks"]]
        inputs["class_labels"] = [torch.from_numpy(np.asarray(c, dtype=np.int64)) for c in arrays["segment_classes"]]
    return inputs


def mask2former_segments(outputs, processor, subtask: str, sizes, id2label, parameters: dict) -> list[list[dict]]:
    """Per image, `{score, label, mask}` for each segment the processor finds ("instance" or "panoptic"),
    the mask a PNG (base64) at the image's size in `sizes`."""
    method = (
        processor.post_process_panoptic_segmentation
        if subtask == "panoptic"
        else processor.post_process_instance_segmentation
    )
    found = method(
        outputs,
        threshold=float(parameters.get("threshold", 0.9)),
        mask_threshold=float(parameters.get("mask_threshold", 0.5)),
        overlap_mask_area_threshold=float(parameters.get("overlap_mask_area_threshold", 0.5)),
        target_sizes=sizes,
    )
    results = []
    for result in found:
        seg = result["segmentation"].cpu().numpy()
        results.append(
            [
                {
                    "score": info["score"],
                    "label": id2label[info["label_id"]],
                    "mask": to_png_base64(((seg == info["id"]) * 255).astype(np.uint8)),
                }
                for info in result["segments_info"]
            ]
        )
    return results
