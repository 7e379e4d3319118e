"""object-detection: boxes and classes per image, DETR (class + box heads, bipartite matching loss).

Input `image`; training targets `boxes` (per image a list of COCO `[x, y, width, height]` boxes in
pixels) and `categories` (one class per box, strings or ints). Data: a COCO JSON file (`images`,
`annotations` with `bbox` and `category_id`, `categories`; image paths relative to the JSON's folder),
or Parquet/JSONL rows holding those two lists. From-scratch DETR uses a tiny ResNet backbone built
from its config (no timm, no hub weights). Boxes become what DETR trains on (centre x/y, width,
height relative to the padded batch canvas) and come back as pixels of the original image. Output
as `transformers.pipeline("object-detection")`: per image a list of
`{score, label, box: {xmin, ymin, xmax, ymax}}` above `parameters.threshold` (default 0.5).
Metrics: COCO mAP and mAP@50 (pycocotools' COCOeval); the metric keeps every eval detection (at
most `num_queries` per image) until `compute`.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict
from transformers import (
    AutoImageProcessor,
    AutoModelForObjectDetection,
    DetrConfig,
    DetrForObjectDetection,
    DetrImageProcessorPil,
    ResNetConfig,
)
from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d

from config import DEFAULT_MAX_IMAGE_PIXELS, ModelConfig
from models.classification import label_maps
from models.coco import DetectionMetric, canvas, parse_coco, target_sizes
from models.images import (
    IMAGE_SUFFIXES,
    decode_image,
    encode_png,
    pixel_values,
    random_crop_box,
    resize,
)
from models.parameters import THRESHOLD, sanitize
from models.spec import Column, Features, TaskSpec, one_field_rows

if TYPE_CHECKING:
    from transformers import BaseImageProcessor  # noqa: F401  (named in the TaskSpec base below)

# From-scratch sizes: a ResNet backbone (its last stage feeds the transformer) and a DETR on top.
DETR_SIZES = {
    # tiny: stride-8 features (two ResNet stages), up to 6 objects per image; learns the demo set in ~1000 steps
    "tiny": dict(
        backbone=dict(hidden_sizes=[16, 32], depths=[1, 1]), d_model=64, layers=2, heads=2, ffn=128, queries=6
    ),
    "mini": dict(
        backbone=dict(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1]),
        d_model=128,
        layers=3,
        heads=4,
        ffn=512,
        queries=50,
    ),
    "small": dict(
        backbone=dict(hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2]),
        d_model=256,
        layers=6,
        heads=8,
        ffn=1024,
        queries=100,
    ),
    "base": dict(
        backbone=dict(hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3]),
        d_model=256,
        layers=6,
        heads=8,
        ffn=2048,
        queries=100,
    ),
}
DEFAULT_IMAGE_SIZE = {"tiny": 64, "mini": 256, "small": 512, "base": 800}
MIN_VISIBLE = 0.3  # a random crop keeps a box when at least this fraction of its area stays in the crop
DETECTIONS_TYPE = pa.list_(
    pa.struct(
        [
            ("score", pa.float64()),
            ("label", pa.string()),
            (
                "box",
                pa.struct([("xmin", pa.int64()), ("ymin", pa.int64()), ("xmax", pa.int64()), ("ymax", pa.int64())]),
            ),
        ]
    )
)


class Options(BaseModel):
    """`task_options` for object-detection: the training split's random augmentations (boxes follow)."""

    model_config = ConfigDict(extra="forbid")
    random_resized_crop: tuple[float, float] | None = None  # crop area fraction range; null = off
    horizontal_flip: bool = True


def resized_size(width: int, height: int, processor) -> tuple[int, int]:
    """(height, width) the DETR processor resizes an image to: fixed, or shortest/longest edge kept in ratio."""
    size = processor.size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    shortest, longest = get("shortest_edge"), get("longest_edge")
    scale = shortest / min(width, height)
    if longest and max(width, height) * scale > longest:
        scale = longest / max(width, height)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


class BackboneBatchNorm(torch.nn.BatchNorm2d):
    """Trainable BatchNorm whose saved tensors are exactly DetrFrozenBatchNorm2d's (no `num_batches_tracked`,
    which a `from_pretrained` load would report as an unexpected key; it only matters when momentum is None)."""

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.num_batches_tracked = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        # version 2 keeps BatchNorm from adding a `num_batches_tracked` key to weights that never had one
        super()._load_from_state_dict(state_dict, prefix, {**local_metadata, "version": 2}, *args)


def batch_norm(module: torch.nn.Module) -> None:
    """Replace DETR's frozen BatchNorm layers under `module` with trainable ones, in place."""
    for name, child in module.named_children():
        if isinstance(child, DetrFrozenBatchNorm2d):
            setattr(module, name, BackboneBatchNorm(child.weight.shape[0]))
        else:
            batch_norm(child)


def check_targets(boxes, categories, labels: dict) -> str | None:
    """Why a row's boxes/categories cannot be trained on, or None."""
    if boxes is None or categories is None:
        return f"{'boxes' if boxes is None else 'categories'} is null"
    if len(boxes) != len(categories):
        return f"{len(boxes)} boxes but {len(categories)} categories"
    for j, (box, category) in enumerate(zip(boxes, categories)):
        values = list(box) if box is not None else []
        if len(values) != 4 or not all(isinstance(v, (int, float, np.number)) and np.isfinite(v) for v in values):
            return f"boxes[{j}] is not 4 numbers [x, y, width, height]"
        category = category.item() if isinstance(category, np.generic) else category
        if category not in labels:
            return f"unknown category {category!r} (not in the training split)"
    return None


def transform_boxes(
    xyxy: np.ndarray, crop: tuple[int, int, int, int], out: tuple[int, int], flip: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel xyxy boxes of the original image -> pixel xyxy boxes of the crop resized to `out` (h, w),
    optionally mirrored. Returns (boxes, kept): boxes mostly cut away by the crop are dropped."""
    left, top, right, bottom = crop
    area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    moved = xyxy - np.array([left, top, left, top], dtype=np.float32)
    clipped = np.clip(moved, 0, [right - left, bottom - top] * 2)
    visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    kept = (visible > 0) & (visible >= MIN_VISIBLE * np.maximum(area, 1e-9))
    scale = np.array([out[1] / (right - left), out[0] / (bottom - top)] * 2, dtype=np.float32)
    boxes = clipped[kept] * scale
    if flip:
        boxes = np.stack([out[1] - boxes[:, 2], boxes[:, 1], out[1] - boxes[:, 0], boxes[:, 3]], axis=1)
    return boxes.astype(np.float32).reshape(-1, 4), kept


class ObjectDetection(TaskSpec["BaseImageProcessor"]):
    name = "object-detection"
    architectures = ("detr",)
    columns = (
        Column(
            "image",
            "the image: file bytes, a path or URI (relative to the data file), base64 in requests",
            kind="media",
        ),
        Column("boxes", "per image a list of [x, y, width, height] boxes in pixels (COCO)", training_only=True),
        Column("categories", "per box its class, a string or an int", training_only=True),
    )
    label_column = "categories"
    best_metric = "map"
    best_metric_mode = "max"
    output_columns = {"detections": DETECTIONS_TYPE}
    Options = Options
    formats = {"coco": parse_coco}
    format_suffixes = {".json": "coco"}
    media_suffixes = IMAGE_SUFFIXES

    def labels_in(self, values):
        return {
            c.item() if isinstance(c, np.generic) else c
            for row in values
            if row is not None
            for c in row
            if c is not None
        }

    # --- processor and model ----------------------------------------------------------------
    def build_processor(self, model_cfg: ModelConfig, source_dir, train_rows):
        if source_dir:
            return AutoImageProcessor.from_pretrained(source_dir)
        side = int(model_cfg.init.overrides.get("image_size", DEFAULT_IMAGE_SIZE[model_cfg.init.size]))
        return DetrImageProcessorPil(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3)

    def build_model(self, model_cfg: ModelConfig, source_dir, labels, processor):
        id2label, label2id = label_maps(labels)
        if source_dir:
            return AutoModelForObjectDetection.from_pretrained(
                source_dir,
                num_labels=len(labels),
                id2label=id2label,
                label2id=label2id,
                ignore_mismatched_sizes=True,
                trust_remote_code=model_cfg.trust_remote_code,
                use_safetensors=True,
            )
        init = model_cfg.init
        size = DETR_SIZES[init.size]
        backbone = ResNetConfig(
            embedding_size=size["backbone"]["hidden_sizes"][0],
            layer_type="basic",
            out_features=[f"stage{len(size['backbone']['depths'])}"],
            **size["backbone"],
        )
        overrides = {k: v for k, v in init.overrides.items() if k != "image_size"}
        config = DetrConfig(
            **{
                "backbone_config": backbone,
                "use_timm_backbone": False,
                "use_pretrained_backbone": False,
                "d_model": size["d_model"],
                "encoder_layers": size["layers"],
                "decoder_layers": size["layers"],
                "encoder_attention_heads": size["heads"],
                "decoder_attention_heads": size["heads"],
                "encoder_ffn_dim": size["ffn"],
                "decoder_ffn_dim": size["ffn"],
                "num_queries": size["queries"],
                "num_labels": len(labels),
                "id2label": id2label,
                "label2id": label2id,
                **overrides,
            }
        )
        model = DetrForObjectDetection(config)
        # DETR freezes backbone layers by name, meant for a pretrained ResNet; from scratch they must learn.
        for parameter in model.model.backbone.parameters():
            parameter.requires_grad_(True)
        # DETR also swaps the backbone's BatchNorm for a frozen identity one (pretrained statistics). From scratch
        # that leaves the ResNet unnormalised, and whether training takes off then hangs on the initial draw (and on
        # the CPU's float kernels): 1 seed in 3 stayed at mAP@50 0.01 after 2000 steps. Real BatchNorm learns the
        # statistics; its saved weight/bias/running_mean/running_var are exactly what the frozen layer of a
        # `from_pretrained` load reads, so evaluation-mode outputs are the same after loading.
        batch_norm(model.model.backbone)
        # Object queries drawn with std 0.02 start nearly equal and tiny DETRs collapse onto one box;
        # the original DETR draws them N(0, 1) (nn.Embedding's default).
        torch.nn.init.normal_(model.model.query_position_embeddings.weight, std=1.0)
        return model

    def load(self, model_dir):
        model = AutoModelForObjectDetection.from_pretrained(model_dir, use_safetensors=True)
        return model, AutoImageProcessor.from_pretrained(model_dir)

    # --- preprocess / collate / postprocess -------------------------------------------------
    def preprocess(self, batch, processor, ctx):
        n = len(batch["image"])
        options = ctx.options or Options()
        max_pixels = ctx.data.max_image_pixels if ctx.data is not None else DEFAULT_MAX_IMAGE_PIXELS
        rng = random.Random()
        training = ctx.labels is not None
        arrays: dict[str, list] = {"pixels": [None] * n, "size": [None] * n}
        if training:
            arrays["boxes"], arrays["class_labels"] = [None] * n, [None] * n
        errors: list[str | None] = [None] * n
        flags: list[str | None] = [None] * n
        for i in range(n):
            if training:
                errors[i] = check_targets(batch["boxes"][i], batch["categories"][i], ctx.labels)
                if errors[i]:
                    continue
            image, errors[i] = decode_image(batch["image"][i], max_pixels)
            if image is None:
                continue
            width, height = image.size
            crop = (0, 0, width, height)
            if ctx.train and options.random_resized_crop:
                crop = random_crop_box(width, height, options.random_resized_crop, rng=rng)
            out = resized_size(crop[2] - crop[0], crop[3] - crop[1], processor)
            flip = ctx.train and options.horizontal_flip and rng.random() < 0.5
            pixels = resize(image, out, box=crop, resample=processor.resample)
            arrays["pixels"][i] = np.ascontiguousarray(pixels[:, ::-1]) if flip else pixels
            arrays["size"][i] = [height, width]
            if training:
                xywh = np.asarray([list(b) for b in batch["boxes"][i]], dtype=np.float32).reshape(-1, 4)
                xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
                boxes, kept = transform_boxes(xyxy, crop, out, flip)
                empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
                classes = np.asarray(
                    [ctx.labels[c.item() if isinstance(c, np.generic) else c] for c in batch["categories"][i]],
                    dtype=np.int64,
                )[kept]
                arrays["boxes"][i], arrays["class_labels"][i] = boxes[~empty], classes[~empty]
                if empty.any():
                    flags[i] = f"dropped {int(empty.sum())} empty box(es)"
        lengths = [p.shape[0] * p.shape[1] if p is not None else 0 for p in arrays["pixels"]]
        return Features(arrays=arrays, lengths=lengths, errors=errors, flags=flags)

    def collate(self, arrays, processor):
        height, width = canvas(arrays)
        n = len(arrays["pixels"])
        batch = torch.zeros(n, 3, height, width)  # padded with zeros after normalising, as the HF processor pads
        mask = torch.zeros(n, height, width, dtype=torch.long)
        for i, p in enumerate(arrays["pixels"]):
            batch[i, :, : p.shape[0], : p.shape[1]] = pixel_values([p], processor)[0]
            mask[i, : p.shape[0], : p.shape[1]] = 1
        inputs = {"pixel_values": batch, "pixel_mask": mask}
        if arrays.get("boxes") is not None:
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            inputs["labels"] = []
            for boxes, classes in zip(arrays["boxes"], arrays["class_labels"]):
                xyxy = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4) / scale
                cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)
                inputs["labels"].append(
                    {"class_labels": torch.as_tensor(np.asarray(classes, dtype=np.int64)), "boxes": cxcywh}
                )
        return inputs

    def sanitize_parameters(self, parameters, options):
        """`threshold` (0-1): the lowest score of a box kept."""
        return sanitize(parameters, {"threshold": THRESHOLD}, f"parameter of {self.name}")

    def postprocess(self, outputs, inputs, arrays, model, processor, parameters):
        threshold = float(parameters.get("threshold", 0.5))
        outputs.logits, outputs.pred_boxes = outputs.logits.float(), outputs.pred_boxes.float()
        found = processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=target_sizes(arrays))
        id2label = model.config.id2label
        predictions = []
        for row in found:
            predictions.append(
                [
                    {"score": score, "label": id2label[label], "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), box))}
                    for score, label, box in zip(
                        row["scores"].tolist(), row["labels"].tolist(), row["boxes"].int().tolist()
                    )
                ]
            )
        return predictions

    def to_columns(self, predictions):
        return {"detections": predictions}

    def request_inputs(self, inputs):
        return one_field_rows(inputs, "image", "'image' (base64 or a data: URL)")

    def augments(self, options):
        options = options or Options()
        return bool(options.random_resized_crop or options.horizontal_flip)

    def metrics(self, labels, options):
        return DetectionMetric(labels)

    # --- demo data --------------------------------------------------------------------------
    def demo_data(self, n, seed):
        """One to three shapes on grey noise with exact boxes; each class has its own shape and colour."""
        rng = random.Random(seed)
        return [{"id": f"det-{seed}-{i}", **shapes_scene(rng)} for i in range(n)]


SHAPES = {"circle": (220, 40, 40), "square": (40, 80, 230), "triangle": (40, 200, 60)}


def shapes_scene(rng: random.Random, size: tuple[int, int] | None = None) -> dict:
    """A PNG with non-overlapping shapes, and their COCO boxes and categories."""
    width, height = size or (rng.randint(56, 96), rng.randint(56, 96))
    noise = np.random.default_rng(rng.randrange(2**32)).integers(70, 170, (height, width, 1), dtype=np.uint8)
    image = Image.fromarray(np.repeat(noise, 3, axis=2))
    draw = ImageDraw.Draw(image)
    boxes, categories = [], []
    for _ in range(rng.randint(1, 3)):
        for _attempt in range(20):
            side = rng.randint(min(width, height) // 4, min(width, height) // 2)
            x, y = rng.randint(0, width - side), rng.randint(0, height - side)
            if all(x + side <= bx or bx + bw <= x or y + side <= by or by + bh <= y for bx, by, bw, bh in boxes):
                break
        else:
            continue
        kind = rng.choice(sorted(SHAPES))
        corners = (x, y, x + side - 1, y + side - 1)  # PIL draws both end points: the shape covers `side` pixels
        if kind == "circle":
            draw.ellipse(corners, fill=SHAPES[kind])
        elif kind == "square":
            draw.rectangle(corners, fill=SHAPES[kind])
        else:
            draw.polygon([(x, y + side - 1), (x + side - 1, y + side - 1), (x + (side - 1) / 2, y)], fill=SHAPES[kind])
        boxes.append([float(x), float(y), float(side), float(side)])
        categories.append(kind)
    return {"image": encode_png(image), "boxes": boxes, "categories": categories}


TASK = ObjectDetection()
