"""image-segmentation: a class per pixel (semantic), or labelled segments (instance, panoptic).

SegFormer (semantic, per-pixel head) and Mask2Former (universal: masks + a class per query). Inputs
`image` and, for training, `mask` (one channel, a class id per pixel: index into `data.labels`;
`task_options.ignore_index` marks pixels to ignore) and, for instance/panoptic training, `instances`
(one channel, an instance id per pixel, 0 = no instance: in panoptic those pixels are "stuff" segments
of their class). A mask or instance map of another size than its image is resized (nearest) when the
aspect ratio matches and rejected when it does not. Output as `transformers.pipeline("image-segmentation")`:
a list of `{label, score, mask}` per image, the mask a PNG (base64) at the image's size; in Parquet
the mask is COCO run-length encoding. Metrics (segments.py): mean IoU and pixel
accuracy (confusion matrix), panoptic quality when training panoptic. What only Mask2Former needs (its
sizes, processor and model, mask-classification inputs, instance/panoptic answers) is in mask2former.py.
"""

from __future__ import annotations

import base64
import io
import random
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForSemanticSegmentation,
    Mask2FormerForUniversalSegmentation,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessorPil,
)

from config import DEFAULT_MAX_IMAGE_PIXELS, ModelConfig
from errors import UserError
from models.classification import label_maps
from models.image_maps import decode_map, fit_to, flip, folder_pairs, resize_nearest, rle_encode
from models.images import (
    IMAGE_SUFFIXES,
    decode_image,
    encode_png,
    image_size,
    pixel_values,
    resize,
    to_png_base64,
)
from models.mask2former import (
    MASK2FORMER_SIZES,
    is_universal,
    mask2former_inputs,
    mask2former_model,
    mask2former_processor,
    mask2former_segments,
)
from models.parameters import THRESHOLD, Choice, sanitize
from models.segments import IGNORE, SegmentationMetric, segments
from models.spec import Column, Features, TaskSpec, one_field_rows

if TYPE_CHECKING:
    from transformers import BaseImageProcessor  # noqa: F401  (named in the TaskSpec base below)

# From-scratch sizes; "tiny" trains on 64 px images in a minute on a laptop CPU, "mini".."base" follow MiT-b0..b2
# (Mask2Former's sizes: models/mask2former.py).
SEGFORMER_SIZES = {
    "tiny": dict(
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 2, 4],
        decoder_hidden_size=64,
        image_size=64,
    ),
    "mini": dict(
        hidden_sizes=[32, 64, 160, 256],
        depths=[2, 2, 2, 2],
        num_attention_heads=[1, 2, 5, 8],
        decoder_hidden_size=256,
        image_size=256,
    ),
    "small": dict(
        hidden_sizes=[64, 128, 320, 512],
        depths=[2, 2, 2, 2],
        num_attention_heads=[1, 2, 5, 8],
        decoder_hidden_size=256,
        image_size=512,
    ),
    "base": dict(
        hidden_sizes=[64, 128, 320, 512],
        depths=[3, 4, 6, 3],
        num_attention_heads=[1, 2, 5, 8],
        decoder_hidden_size=768,
        image_size=512,
    ),
}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subtask: Literal["semantic", "instance", "panoptic"] = (
        "semantic"  # what training teaches (instance/panoptic: Mask2Former)
    )
    ignore_index: int = Field(IGNORE, ge=0, le=65535)  # the mask value of pixels to leave out of loss and metrics
    augment: bool = True  # random horizontal flips of the training split
    pq_threshold: float = Field(0.8, gt=0, lt=1)  # segment score kept when evaluating panoptic quality


def model_class(model_type: str):
    if model_type == "mask2former":
        return Mask2FormerForUniversalSegmentation
    if model_type == "segformer":
        return SegformerForSemanticSegmentation
    return AutoModelForSemanticSegmentation


class ImageSegmentation(TaskSpec["BaseImageProcessor"]):
    name = "image-segmentation"
    architectures = ("segformer", "mask2former")
    columns = (
        Column("image", "the image: file bytes, or a path/URI to a JPEG/PNG/... file", kind="media"),
        Column(
            "mask", "one-channel map of class ids (index into data.labels) per pixel", training_only=True, kind="media"
        ),
        Column(
            "instances",
            "one-channel map of instance ids per pixel (0: none), for instance/panoptic training",
            required=False,
            training_only=True,
            kind="media",
        ),
    )
    label_column = None  # class names come from data.labels (index = the id in the masks)
    best_metric = "mean_iou"
    best_metric_mode = "max"
    output_columns = {
        "segments": pa.list_(
            pa.struct(
                [
                    ("label", pa.string()),
                    ("score", pa.float64()),
                    ("mask", pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])),
                ]
            )
        )
    }
    Options = Options
    media_suffixes = IMAGE_SUFFIXES

    # --- data -------------------------------------------------------------------------------
    def folder_rows(self, files):
        """Folder pairs: `images/x.jpg` with `masks/x.png` (and `instances/x.png`), at any depth."""
        return folder_pairs(files, {"masks": "mask", "instances": "instances"}, IMAGE_SUFFIXES)

    # --- processor and model ----------------------------------------------------------------
    def build_processor(self, model_cfg: ModelConfig, source_dir, train_rows):
        if source_dir:
            return AutoImageProcessor.from_pretrained(source_dir)
        init = model_cfg.init
        sizes = SEGFORMER_SIZES if init.architecture == "segformer" else MASK2FORMER_SIZES
        side = int(init.overrides.get("image_size", sizes[init.size]["image_size"]))
        if init.architecture == "segformer":
            return SegformerImageProcessorPil(size={"height": side, "width": side}, do_reduce_labels=False)
        return mask2former_processor(side)

    def build_model(self, model_cfg: ModelConfig, source_dir, labels, processor):
        if len(labels) > 255:
            raise UserError(
                f"data.labels: {len(labels)} classes; image-segmentation takes at most 255 (ids 0..254, 255 = ignore)"
            )
        named = {}
        if labels:
            id2label, label2id = label_maps(labels)
            named = dict(num_labels=len(labels), id2label=id2label, label2id=label2id)
        if source_dir:
            model_type = AutoConfig.from_pretrained(source_dir).model_type
            return model_class(model_type).from_pretrained(
                source_dir,
                **named,
                ignore_mismatched_sizes=bool(named),
                trust_remote_code=model_cfg.trust_remote_code,
                use_safetensors=True,
            )
        if not labels:
            raise UserError(
                "data.labels: image-segmentation from scratch needs the class names, in id order (index = the value "
                "in the masks)"
            )
        init = model_cfg.init
        overrides = {k: v for k, v in init.overrides.items() if k != "image_size"}
        if init.architecture == "segformer":
            size = {k: v for k, v in SEGFORMER_SIZES[init.size].items() if k != "image_size"}
            return SegformerForSemanticSegmentation(
                SegformerConfig(**size, semantic_loss_ignore_index=IGNORE, **named, **overrides)
            )
        return mask2former_model(init.size, image_size(processor)[0], named, overrides)

    def load(self, model_dir):
        model_type = AutoConfig.from_pretrained(model_dir).model_type
        return model_class(model_type).from_pretrained(
            model_dir, use_safetensors=True
        ), AutoImageProcessor.from_pretrained(model_dir)

    # --- preprocess / collate / postprocess -------------------------------------------------
    def preprocess(self, batch, processor, ctx):
        n = len(batch["image"])
        options = ctx.options or Options()
        training = ctx.labels is not None
        universal = is_universal(processor)
        if training and options.subtask != "semantic" and not universal:
            raise UserError(
                f"task_options.subtask: {options.subtask} segmentation needs a Mask2Former model "
                "(model.init.architecture: mask2former)"
            )
        height, width = image_size(processor)
        max_pixels = ctx.data.max_image_pixels if ctx.data is not None else DEFAULT_MAX_IMAGE_PIXELS
        keys = ["pixels", "size"] + (
            ["labels"] + (["segment_masks", "segment_classes"] if universal else []) if training else []
        )
        arrays = {key: [None] * n for key in keys}
        errors, flags, lengths = [None] * n, [None] * n, [0] * n
        rng = random.Random()
        for i in range(n):
            image, why = decode_image(batch["image"][i], max_pixels)
            notes = []
            if why is None and training:
                semantic, instances, why, notes = self.targets(
                    batch, i, image.size, len(ctx.labels), options, processor, max_pixels
                )
            if why is not None:
                errors[i] = why
                continue
            pixels = resize(image, (height, width))
            mirror = ctx.train and options.augment and rng.random() < 0.5
            arrays["pixels"][i] = np.ascontiguousarray(pixels[:, ::-1]) if mirror else pixels
            arrays["size"][i] = [image.size[1], image.size[0]]
            if training:
                semantic = resize_nearest(semantic, height, width)
                instances = resize_nearest(instances, height, width) if instances is not None else None
                if mirror:
                    semantic, instances = flip(semantic), flip(instances) if instances is not None else None
                arrays["labels"][i] = semantic
                if universal:
                    arrays["segment_masks"][i], arrays["segment_classes"][i] = segments(
                        semantic, instances, options.subtask
                    )
            lengths[i] = height * width
            flags[i] = "; ".join(notes) or None
        return Features(arrays=arrays, lengths=lengths, errors=errors, flags=flags)

    def targets(self, batch, i, size, num_labels, options, processor, max_pixels):
        """(class map uint8, instance map or None, reason, notes) for training row i."""
        width, height = size
        mask, why = decode_map(batch["mask"][i], "mask", max_pixels)
        if why:
            return None, None, why, []
        mask, note, why = fit_to(np.asarray(mask), height, width, "mask")
        if why:
            return None, None, why, []
        notes = [note] if note else []
        if not np.issubdtype(mask.dtype, np.integer):
            if not np.all(np.mod(mask, 1) == 0):
                return None, None, f"mask holds non-integer values ({mask.dtype}); expected class ids", []
        mask = mask.astype(np.int64)
        ignore = mask == options.ignore_index
        if getattr(processor, "do_reduce_labels", False):  # ADE20k-style checkpoints: 0 is "other", ids shift down
            ignore |= mask == 0
            mask = mask - 1
        bad = np.unique(mask[~ignore & ((mask < 0) | (mask >= num_labels))])
        if bad.size:
            return (
                None,
                None,
                (
                    f"mask has class id(s) {bad[:5].tolist()} outside data.labels ({num_labels} classes: "
                    f"0..{num_labels - 1}; "
                    f"{options.ignore_index} = ignore)"
                ),
                [],
            )
        semantic = np.where(ignore, IGNORE, mask).astype(np.uint8)
        instances = None
        if options.subtask != "semantic":
            given = batch.get("instances", [None] * (i + 1))[i]
            if given is None:
                return (
                    None,
                    None,
                    f"instances is null ({options.subtask} training needs an instance id map per image)",
                    [],
                )
            instances, why = decode_map(given, "instances", max_pixels)
            if why is None:
                instances, note, why = fit_to(np.asarray(instances).astype(np.int64), height, width, "instances")
                notes += [note] if note else []
            if why:
                return None, None, why, []
        return semantic, instances, None, notes

    def collate(self, arrays, processor):
        inputs = {"pixel_values": pixel_values(arrays["pixels"], processor)}
        if is_universal(processor):
            return inputs | mask2former_inputs(inputs["pixel_values"], arrays)
        if arrays.get("labels") is not None:
            inputs["labels"] = torch.from_numpy(np.stack(arrays["labels"]).astype(np.int64))
        return inputs

    def sanitize_parameters(self, parameters, options):
        """`subtask` (semantic, instance, panoptic), `threshold`, `mask_threshold`,
        `overlap_mask_area_threshold` (0-1)."""
        rules = {
            "subtask": Choice(("semantic", "instance", "panoptic")),
            "threshold": THRESHOLD,
            "mask_threshold": THRESHOLD,
            "overlap_mask_area_threshold": THRESHOLD,
        }
        return sanitize(parameters, rules, f"parameter of {self.name}")

    def postprocess(self, outputs, inputs, arrays, model, processor, parameters):
        universal = is_universal(processor)
        subtask = parameters.get("subtask") or ("panoptic" if universal else "semantic")
        sizes = [tuple(int(s) for s in size) for size in arrays["size"]]
        id2label = model.config.id2label
        if subtask == "semantic":
            results = []
            for seg in processor.post_process_semantic_segmentation(outputs, target_sizes=sizes):
                seg = seg.cpu().numpy()
                results.append(
                    [
                        {
                            "score": None,
                            "label": id2label[int(c)],
                            "mask": to_png_base64(((seg == c) * 255).astype(np.uint8)),
                        }
                        for c in np.unique(seg)
                    ]
                )
            return results
        if subtask not in ("instance", "panoptic") or not universal:
            raise UserError(
                f"parameters.subtask: {subtask!r} is not available for {model.config.model_type} (semantic only)"
            )
        return mask2former_segments(outputs, processor, subtask, sizes, id2label, parameters)

    def to_columns(self, predictions):
        def segment(s):
            mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(s["mask"])))) > 0
            return {"label": s["label"], "score": s["score"], "mask": rle_encode(mask)}

        return {"segments": [[segment(s) for s in p] if p is not None else None for p in predictions]}

    def augments(self, options):
        options = options or Options()
        return options.augment

    def metrics(self, labels, options):
        options = options or Options()
        return SegmentationMetric(len(labels), options.subtask == "panoptic", options.pq_threshold, labels)

    def request_inputs(self, inputs):
        return one_field_rows(inputs, "image", "'image' (base64 or a data: URL)")

    # --- demo data --------------------------------------------------------------------------
    def demo_data(self, n, seed):
        """Coloured shapes on noise, exact masks: class = shape (its colour family), one instance per shape.
        Labels (data.labels): background, circle, square, triangle. Images are 40..72 px, of mixed sizes."""
        rng = random.Random(seed)
        nprng = np.random.default_rng(seed)
        colours = {1: (220, 40, 40), 2: (40, 200, 40), 3: (50, 60, 230)}
        rows = []
        for i in range(n):
            w, h = rng.randint(40, 72), rng.randint(40, 72)
            image = Image.fromarray(nprng.integers(70, 180, (h, w, 3), dtype=np.uint8))
            mask, instances = Image.new("L", (w, h), 0), Image.new("L", (w, h), 0)
            draws = [ImageDraw.Draw(x) for x in (image, mask, instances)]
            for k in range(1, rng.randint(1, 3) + 1):
                cls = rng.randint(1, 3)
                r = rng.randint(6, 14)
                cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
                colour = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in colours[cls])
                for draw, fill in zip(draws, (colour, cls, k)):
                    if cls == 1:
                        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
                    elif cls == 2:
                        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
                    else:
                        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
            rows.append(
                {
                    "id": f"img-{seed}-{i}",
                    "image": encode_png(image),
                    "mask": encode_png(mask),
                    "instances": encode_png(instances),
                }
            )
        return rows


DEMO_LABELS = ["background", "circle", "square", "triangle"]
TASK = ImageSegmentation()
