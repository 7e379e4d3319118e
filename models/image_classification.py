"""image-classification: one label per image, ViT ([CLS] head) or ConvNeXT (pooled head).

Input `image` (file bytes, a path/URI, or base64 in requests), training label `label`. Data: an image
folder with one sub-folder per class (Hugging Face `imagefolder`), or Parquet/JSONL/CSV with an image
column and a label column. Training crops and flips at random (`task_options`); eval and prediction
resize and normalise as the saved image processor does, so `transformers.pipeline("image-classification")`
on the trained model sees what we trained on. Output as that pipeline: the top-k `{label, score}`
list (`parameters.top_k`, default 5); Parquet gets `label`, `score` and `top_k`. Metrics: accuracy, top-5.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessorPil,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from config import DEFAULT_MAX_IMAGE_PIXELS, ModelConfig
from models.classification import TOP_K_TYPE, label_maps, label_value, ranked_labels, top_k_columns
from models.eval_views import Confusion, Examples, class_views, picture_grid
from models.images import (
    IMAGE_SUFFIXES,
    decode_image,
    encode_png,
    image_size,
    pixel_values,
    random_crop_box,
    resize,
)
from models.parameters import TOP_K, sanitize
from models.spec import Column, Features, StreamingMetric, TaskSpec, View, one_field_rows

if TYPE_CHECKING:
    from transformers import BaseImageProcessor  # noqa: F401  (named in the TaskSpec base below)

# From-scratch sizes; "tiny" learns the demo set in a minute on a laptop CPU.
VIT_SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, patch_size=8),
    "mini": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768, patch_size=16),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=16),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16),
}
CONVNEXT_SIZES = {
    "tiny": dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]),
    "mini": dict(hidden_sizes=[48, 96, 192, 384], depths=[2, 2, 4, 2]),
    "small": dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3]),
    "base": dict(hidden_sizes=[128, 256, 512, 1024], depths=[3, 3, 27, 3]),
}
DEFAULT_IMAGE_SIZE = {"tiny": 32, "mini": 224, "small": 224, "base": 224}


class Options(BaseModel):
    """`task_options` for image-classification: the training split's random augmentations."""

    model_config = ConfigDict(extra="forbid")
    # random resized crop: the crop's area as a fraction of the image's (torchvision's `scale`); null = off
    random_resized_crop: tuple[float, float] | None = (0.5, 1.0)
    horizontal_flip: bool = True


def eval_pixels(image: Image.Image, processor) -> np.ndarray:
    """Resize as the HF processor does: to height x width, or (ConvNeXT's shortest_edge) the short side to
    size / crop_pct and a centre crop to size x size."""
    height, width = image_size(processor)
    size = processor.size
    shortest = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    crop_pct = getattr(processor, "crop_pct", None)
    if not shortest or shortest >= 384 or not crop_pct:
        return resize(image, (height, width), resample=processor.resample)
    short = int(shortest / crop_pct)
    w, h = image.size
    scale = short / min(w, h)
    resized = image.resize(
        (max(round(w * scale), shortest), max(round(h * scale), shortest)), resample=processor.resample
    )
    left, top = (resized.width - shortest) // 2, (resized.height - shortest) // 2
    return np.asarray(resized.crop((left, top, left + shortest, top + shortest)), dtype=np.uint8)


class AccuracyTop5Metric(StreamingMetric):
    """Accuracy and top-5 accuracy (top-k of all classes when there are fewer than five); the report
    shows the confusion matrix, per-class precision and recall, and a few images with their labels."""

    def __init__(self, labels: list):
        self.labels, num_labels = labels, len(labels)
        from torchmetrics.classification import MulticlassAccuracy  # only where metrics are computed

        self.accuracy = MulticlassAccuracy(num_classes=num_labels, average="micro")
        self.top5 = MulticlassAccuracy(num_classes=num_labels, average="micro", top_k=min(5, num_labels))
        self.confusion, self.counts, self.examples = Confusion(num_labels), None, Examples()

    def to(self, device):
        self.accuracy, self.top5 = self.accuracy.to(device), self.top5.to(device)
        self.confusion.to(device)
        return self

    def update(self, outputs, inputs, arrays):
        self.accuracy.update(outputs.logits, inputs["labels"])
        self.top5.update(outputs.logits, inputs["labels"])
        predicted = outputs.logits.argmax(-1)
        self.confusion.add(predicted, inputs["labels"])
        pixels = arrays.get("pixels", [])
        for i in range(min(self.examples.room(), len(pixels))):
            truth, guess = int(inputs["labels"][i]), int(predicted[i])
            self.examples.add({"image": np.asarray(pixels[i]), "truth": truth, "guess": guess})

    def compute(self):
        self.counts = self.confusion.total()
        return {"accuracy": float(self.accuracy.compute()), "top5_accuracy": float(self.top5.compute())}

    def views(self):
        if self.counts is None:
            return []
        panels = [
            {
                "image": e["image"],
                "title": f"true {self.labels[e['truth']]}, predicted {self.labels[e['guess']]}"
                + ("" if e["truth"] == e["guess"] else " (wrong)"),
            }
            for e in self.examples.items
        ]
        note = "The first eval images as the model saw them, with the true and the predicted class."
        shown = [View("Examples", note, figures=[("example images", picture_grid(panels))])] if panels else []
        return class_views(self.counts, self.labels) + shown


class ImageClassification(TaskSpec["BaseImageProcessor"]):
    name = "image-classification"
    architectures = ("vit", "convnext")
    columns = (
        Column(
            "image",
            "the image: file bytes, a path or URI (relative to the data file), base64 in requests",
            kind="media",
        ),
        Column("label", "the class, a string or an int (an image folder: the sub-folder's name)", training_only=True),
    )
    label_column = "label"
    best_metric = "accuracy"
    best_metric_mode = "max"
    output_columns = {"label": "string", "score": "float64", "top_k": TOP_K_TYPE}
    Options = Options
    media_suffixes = IMAGE_SUFFIXES

    # --- processor and model ----------------------------------------------------------------
    def build_processor(self, model_cfg: ModelConfig, source_dir, train_rows):
        if source_dir:
            return AutoImageProcessor.from_pretrained(source_dir)
        init = model_cfg.init
        side = int(init.overrides.get("image_size", DEFAULT_IMAGE_SIZE[init.size]))
        if init.architecture == "convnext":
            return ConvNextImageProcessorPil(
                size={"shortest_edge": side}, crop_pct=0.875, image_mean=[0.5] * 3, image_std=[0.5] * 3
            )
        return ViTImageProcessorPil(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3)

    def build_model(self, model_cfg: ModelConfig, source_dir, labels, processor):
        id2label, label2id = label_maps(labels)
        if source_dir:
            return AutoModelForImageClassification.from_pretrained(
                source_dir,
                num_labels=len(labels),
                id2label=id2label,
                label2id=label2id,
                ignore_mismatched_sizes=True,  # a new head on a checkpoint trained for other labels
                trust_remote_code=model_cfg.trust_remote_code,
                use_safetensors=True,
            )
        init = model_cfg.init
        overrides = {k: v for k, v in init.overrides.items() if k != "image_size"}
        common = dict(num_labels=len(labels), id2label=id2label, label2id=label2id, num_channels=3)
        if init.architecture == "convnext":
            return ConvNextForImageClassification(
                ConvNextConfig(**{**CONVNEXT_SIZES[init.size], **common, **overrides})
            )
        side = image_size(processor)[0]
        return ViTForImageClassification(
            ViTConfig(**{**VIT_SIZES[init.size], "image_size": side, **common, **overrides})
        )

    def load(self, model_dir):
        model = AutoModelForImageClassification.from_pretrained(model_dir, use_safetensors=True)
        return model, AutoImageProcessor.from_pretrained(model_dir)

    # --- preprocess / collate / postprocess -------------------------------------------------
    def preprocess(self, batch, processor, ctx):
        n = len(batch["image"])
        options = ctx.options or Options()
        max_pixels = ctx.data.max_image_pixels if ctx.data is not None else DEFAULT_MAX_IMAGE_PIXELS
        size = image_size(processor)
        rng = random.Random()
        arrays: dict[str, list] = {"pixels": [None] * n}
        if ctx.labels is not None:
            arrays["labels"] = [None] * n
        errors: list[str | None] = [None] * n
        for i in range(n):
            if ctx.labels is not None:
                label = label_value(batch["label"][i])
                if label is None:
                    errors[i] = "label is null"
                    continue
                if label not in ctx.labels:
                    errors[i] = f"unknown label {label!r} (not in the training split)"
                    continue
                arrays["labels"][i] = ctx.labels[label]
            image, errors[i] = decode_image(batch["image"][i], max_pixels)
            if image is None:
                continue
            if ctx.train and options.random_resized_crop:
                box = random_crop_box(image.width, image.height, options.random_resized_crop, rng=rng)
                pixels = resize(image, size, box=box, resample=processor.resample)
            else:
                pixels = eval_pixels(image, processor)
            if ctx.train and options.horizontal_flip and rng.random() < 0.5:
                pixels = np.ascontiguousarray(pixels[:, ::-1])
            arrays["pixels"][i] = pixels
        lengths = [size[0] * size[1] if e is None else 0 for e in errors]
        return Features(arrays=arrays, lengths=lengths, errors=errors, flags=[None] * n)

    def collate(self, arrays, processor):
        inputs = {"pixel_values": pixel_values(arrays["pixels"], processor)}
        if arrays.get("labels") is not None:
            inputs["labels"] = torch.as_tensor(np.asarray(arrays["labels"], dtype=np.int64))
        return inputs

    def sanitize_parameters(self, parameters, options):
        """`top_k` (1-100): how many labels to list."""
        return sanitize(parameters, {"top_k": TOP_K}, f"parameter of {self.name}")

    def postprocess(self, outputs, inputs, arrays, model, processor, parameters):
        probs = outputs.logits.float().softmax(-1)
        return ranked_labels(probs, model.config.id2label, int(parameters.get("top_k") or 5))

    def to_columns(self, predictions):
        return top_k_columns(predictions)

    def request_inputs(self, inputs):
        return one_field_rows(inputs, "image", "'image' (base64 or a data: URL)")

    def augments(self, options):
        options = options or Options()
        return bool(options.random_resized_crop or options.horizontal_flip)

    def metrics(self, labels, options):
        return AccuracyTop5Metric(labels)

    # --- demo data --------------------------------------------------------------------------
    def demo_data(self, n, seed):
        """Shapes on noise, images of mixed sizes; the shape's colour is the class."""
        rng = random.Random(seed)
        colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230), "yellow": (235, 220, 30)}
        rows = []
        for i in range(n):
            label = rng.choice(sorted(colours))
            rows.append(
                {"id": f"img-{seed}-{i}", "image": encode_png(shape_image(rng, colours[label])), "label": label}
            )
        return rows


def shape_image(rng: random.Random, colour: tuple[int, int, int], size: tuple[int, int] | None = None) -> Image.Image:
    """A random circle, square or triangle in `colour` on grey noise; `size` (w, h) random when None."""
    width, height = size or (rng.randint(40, 72), rng.randint(40, 72))
    noise = np.random.default_rng(rng.randrange(2**32)).integers(60, 180, (height, width, 1), dtype=np.uint8)
    image = Image.fromarray(np.repeat(noise, 3, axis=2))
    side = rng.randint(min(width, height) // 2, min(width, height) * 4 // 5)
    x, y = rng.randint(0, width - side), rng.randint(0, height - side)
    draw, kind = ImageDraw.Draw(image), rng.choice(["circle", "square", "triangle"])
    if kind == "circle":
        draw.ellipse((x, y, x + side, y + side), fill=colour)
    elif kind == "square":
        draw.rectangle((x, y, x + side, y + side), fill=colour)
    else:
        draw.polygon([(x, y + side), (x + side, y + side), (x + side // 2, y)], fill=colour)
    return image


TASK = ImageClassification()
