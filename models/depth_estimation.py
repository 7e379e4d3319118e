"""depth-estimation: a depth in metres for every pixel of an image, GLPN (hierarchical encoder + depth head).

Inputs `image` and, for training, `depth`: a 16-bit PNG (millimetres by default) or a `.npy` array
(metres by default; `task_options.png_unit` / `npy_unit` say otherwise). Pixels with depth 0 (or not
finite) are invalid: GLPN's SiLog loss and every metric leave them out. A depth map of another size
than its image is resized (nearest, so valid and invalid pixels never blend) when the aspect ratio
matches, and rejected when it does not. Output as `transformers.pipeline("depth-estimation")`,
resized to the input's size: over HTTP `predicted_depth` is a 16-bit PNG in millimetres (base64),
`depth` an 8-bit visualisation PNG; in Parquet `predicted_depth` is an array (rows of float metres).
Metrics: AbsRel, RMSE (metres), δ<1.25.
"""

from __future__ import annotations

import base64
import io
import random
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict
from transformers import AutoImageProcessor, GLPNConfig, GLPNForDepthEstimation, GLPNImageProcessorPil

from config import DEFAULT_MAX_IMAGE_PIXELS, ModelConfig
from models.eval_views import Examples, picture_grid
from models.image_maps import decode_map, fit_to, flip, folder_pairs, resize_nearest
from models.images import (
    IMAGE_SUFFIXES,
    decode_image,
    encode_png,
    image_size,
    pixel_values,
    resize,
    to_png_base64,
)
from models.parameters import sanitize
from models.spec import Column, Features, StreamingMetric, TaskSpec, View, one_field_rows

if TYPE_CHECKING:
    from transformers import BaseImageProcessor  # noqa: F401  (named in the TaskSpec base below)

METRES = {"mm": 0.001, "cm": 0.01, "m": 1.0}

# From-scratch sizes: GLPN's encoder is SegFormer's MiT; "tiny" trains on 64 px images in a minute on a CPU.
GLPN_SIZES = {
    "tiny": dict(
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 2, 4],
        decoder_hidden_size=32,
        image_size=64,
    ),
    "mini": dict(
        hidden_sizes=[32, 64, 160, 256],
        depths=[2, 2, 2, 2],
        num_attention_heads=[1, 2, 5, 8],
        decoder_hidden_size=64,
        image_size=256,
    ),
    "small": dict(
        hidden_sizes=[64, 128, 320, 512],
        depths=[2, 2, 2, 2],
        num_attention_heads=[1, 2, 5, 8],
        decoder_hidden_size=64,
        image_size=480,
    ),
    "base": dict(
        hidden_sizes=[64, 128, 320, 512],
        depths=[3, 8, 27, 3],
        num_attention_heads=[1, 2, 5, 8],
        decoder_hidden_size=64,
        image_size=480,
    ),
}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    png_unit: Literal["mm", "cm", "m"] = "mm"  # what one step of a 16-bit PNG depth map is
    npy_unit: Literal["mm", "cm", "m"] = "m"  # the unit of .npy depth maps
    augment: bool = True  # random horizontal flips of the training split


class DepthMetric(StreamingMetric):
    """AbsRel, RMSE and δ<1.25 over valid pixels (true depth > 0), from running sums; the report shows
    a few eval images beside their true and predicted depth maps."""

    def __init__(self):
        self.sums = torch.zeros(4, dtype=torch.float64)  # |d - d*| / d*, (d - d*)^2, δ < 1.25, pixel count
        self.examples = Examples(limit=3)

    def to(self, device):
        self.sums = self.sums.to(device)
        return self

    def update(self, outputs, inputs, arrays):
        truth = inputs["labels"].to(self.sums.device).double()
        predicted = outputs.predicted_depth.double()
        if predicted.shape[-2:] != truth.shape[-2:]:
            predicted = F.interpolate(predicted[:, None], size=truth.shape[-2:], mode="bilinear", align_corners=False)[
                :, 0
            ]
        valid = truth > 0
        for i in range(min(self.examples.room(), len(arrays.get("pixels", [])))):
            shown = {"truth": truth[i].where(valid[i], torch.nan), "found": predicted[i]}
            self.examples.add({"image": arrays["pixels"][i], **{k: v.float().cpu().numpy() for k, v in shown.items()}})
        d, t = predicted[valid].clamp(min=1e-6), truth[valid]
        ratio = torch.maximum(d / t, t / d)
        self.sums += torch.stack(
            [
                ((d - t).abs() / t).sum(),
                ((d - t) ** 2).sum(),
                (ratio < 1.25).sum().double(),
                torch.tensor(float(valid.sum()), dtype=torch.float64, device=d.device),
            ]
        )

    def compute(self):
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
        count = float(sums[3]) or 1.0
        return {
            "abs_rel": float(sums[0]) / count,
            "rmse": (float(sums[1]) / count) ** 0.5,
            "delta1": float(sums[2]) / count,
        }

    def views(self):
        panels = []
        for k, e in enumerate(self.examples.items):
            scale = {"cmap": "magma", "vmin": 0.0, "vmax": float(np.nanmax([np.nanmax(e["truth"]), e["found"].max()]))}
            panels.append({"image": np.asarray(e["image"]), "title": f"image {k + 1}"})
            panels.append({"image": e["truth"], "title": "true depth (blank: unknown)", **scale})
            panels.append({"image": e["found"], "title": "predicted depth", **scale})
        if not panels:
            return []
        note = "The first eval images beside their true and predicted depth maps (bright: far)."
        return [View("Examples", note, figures=[("example depth maps", picture_grid(panels))])]


class DepthEstimation(TaskSpec["BaseImageProcessor"]):
    name = "depth-estimation"
    architectures = ("glpn",)
    columns = (
        Column("image", "the image: file bytes, or a path/URI to a JPEG/PNG/... file", kind="media"),
        Column(
            "depth", "the depth map: 16-bit PNG (mm) or .npy (metres); 0 = unknown", training_only=True, kind="media"
        ),
    )
    label_column = None
    best_metric = "abs_rel"
    best_metric_mode = "min"
    output_columns = {"predicted_depth": pa.list_(pa.list_(pa.float32()))}  # metres, rows of the image
    Options = Options
    media_suffixes = IMAGE_SUFFIXES

    def folder_rows(self, files):
        """Folder pairs: `images/x.jpg` with `depth/x.png` or `depth/x.npy`, at any depth."""
        return folder_pairs(files, {"depth": "depth"}, IMAGE_SUFFIXES)

    # --- processor and model ----------------------------------------------------------------
    def build_processor(self, model_cfg: ModelConfig, source_dir, train_rows):
        if source_dir:
            return AutoImageProcessor.from_pretrained(source_dir)
        init = model_cfg.init
        side = int(init.overrides.get("image_size", GLPN_SIZES[init.size]["image_size"]))
        # GLPN's processor keeps the image's size (rounded down to 32); `size` is the one we train and predict at.
        return GLPNImageProcessorPil(size={"height": side, "width": side})

    def build_model(self, model_cfg: ModelConfig, source_dir, labels, processor):
        if source_dir:
            return GLPNForDepthEstimation.from_pretrained(
                source_dir, trust_remote_code=model_cfg.trust_remote_code, use_safetensors=True
            )
        init = model_cfg.init
        size = {k: v for k, v in GLPN_SIZES[init.size].items() if k != "image_size"}
        overrides = {k: v for k, v in init.overrides.items() if k != "image_size"}
        return GLPNForDepthEstimation(GLPNConfig(**size, **overrides))

    def load(self, model_dir):
        return GLPNForDepthEstimation.from_pretrained(
            model_dir, use_safetensors=True
        ), AutoImageProcessor.from_pretrained(model_dir)

    # --- preprocess / collate / postprocess -------------------------------------------------
    def preprocess(self, batch, processor, ctx):
        n = len(batch["image"])
        options = ctx.options or Options()
        training = ctx.labels is not None
        height, width = input_size(processor)
        max_pixels = ctx.data.max_image_pixels if ctx.data is not None else DEFAULT_MAX_IMAGE_PIXELS
        arrays = {"pixels": [None] * n, "size": [None] * n, **({"labels": [None] * n} if training else {})}
        errors, flags, lengths = [None] * n, [None] * n, [0] * n
        rng = random.Random()
        for i in range(n):
            image, why = decode_image(batch["image"][i], max_pixels)
            note = None
            if why is None and training:
                depth, note, why = self.depth_map(batch["depth"][i], image.size, options, max_pixels)
            if why is not None:
                errors[i] = why
                continue
            pixels = resize(image, (height, width))
            mirror = ctx.train and options.augment and rng.random() < 0.5
            arrays["pixels"][i] = np.ascontiguousarray(pixels[:, ::-1]) if mirror else pixels
            arrays["size"][i] = [image.size[1], image.size[0]]
            if training:
                depth = resize_nearest(depth, height, width)
                arrays["labels"][i] = flip(depth) if mirror else depth
            lengths[i], flags[i] = height * width, note
        return Features(arrays=arrays, lengths=lengths, errors=errors, flags=flags)

    def depth_map(self, data, size, options, max_pixels):
        """(float32 metres with 0 = invalid, note, None) or (None, None, reason)."""
        width, height = size
        depth, why = decode_map(data, "depth", max_pixels)
        if why:
            return None, None, why
        is_npy = bytes(data[:6]) == b"\x93NUMPY"
        depth = depth.astype(np.float64) * METRES[options.npy_unit if is_npy else options.png_unit]
        depth[~np.isfinite(depth) | (depth < 0)] = 0.0
        if not (depth > 0).any():
            return None, None, "depth has no valid pixel (all 0)"
        depth, note, why = fit_to(depth.astype(np.float32), height, width, "depth")
        return depth, note, why

    def collate(self, arrays, processor):
        inputs = {"pixel_values": pixel_values(arrays["pixels"], processor)}
        if arrays.get("labels") is not None:
            inputs["labels"] = torch.from_numpy(np.stack(arrays["labels"]))
        return inputs

    def sanitize_parameters(self, parameters, options):
        """No parameters: any key is refused."""
        return sanitize(parameters, {}, f"parameter of {self.name}")

    def postprocess(self, outputs, inputs, arrays, model, processor, parameters):
        sizes = [tuple(int(s) for s in size) for size in arrays["size"]]
        results = []
        for found in processor.post_process_depth_estimation(outputs, target_sizes=sizes):
            metres = found["predicted_depth"].float().clamp(min=0).cpu().numpy()
            millimetres = np.clip(np.round(metres * 1000), 0, 65535).astype(np.uint16)
            low, high = float(metres.min()), float(metres.max())
            view = ((metres - low) / (high - low) * 255 if high > low else np.zeros_like(metres)).astype(np.uint8)
            results.append(
                {
                    "predicted_depth": to_png_base64(millimetres),
                    "depth": to_png_base64(view),
                    "unit": "mm",
                    "min": low,
                    "max": high,
                }
            )
        return results

    def to_columns(self, predictions):
        def metres(p):
            return (
                np.asarray(Image.open(io.BytesIO(base64.b64decode(p["predicted_depth"])))).astype(np.float32) / 1000
            ).tolist()

        return {"predicted_depth": [metres(p) if p is not None else None for p in predictions]}

    def augments(self, options):
        options = options or Options()
        return options.augment

    def metrics(self, labels, options):
        return DepthMetric()

    def request_inputs(self, inputs):
        return one_field_rows(inputs, "image", "'image' (base64 or a data: URL)")

    # --- demo data --------------------------------------------------------------------------
    def demo_data(self, n, seed):
        """A depth ramp (0.5..8 m, random direction) with the image's colour telling the depth, on a little
        noise, plus a rectangle of invalid (0) depth the loss must ignore. Depth as 16-bit PNG in mm."""
        rng = random.Random(seed)
        nprng = np.random.default_rng(seed)
        rows = []
        for i in range(n):
            w, h = rng.randint(40, 72), rng.randint(40, 72)
            yy, xx = np.mgrid[0:h, 0:w]
            a, b = rng.uniform(-1, 1), rng.uniform(-1, 1)
            ramp = a * xx / w + b * yy / h
            ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
            near, far = rng.uniform(0.5, 3.0), rng.uniform(4.0, 8.0)
            metres = near + (far - near) * ramp
            shade = 1 - metres / 8.0
            image = np.stack([shade * 230, shade * 160 + 40, 220 - shade * 200], -1) + nprng.normal(0, 8, (h, w, 3))
            depth = np.round(metres * 1000).astype(np.uint16)
            x0, y0 = rng.randint(0, w - 10), rng.randint(0, h - 10)
            depth[y0 : y0 + rng.randint(4, 10), x0 : x0 + rng.randint(4, 10)] = 0
            rows.append(
                {
                    "id": f"depth-{seed}-{i}",
                    "image": encode_png(np.clip(image, 0, 255).astype(np.uint8)),
                    "depth": encode_png(depth),
                }
            )
        return rows


def input_size(processor) -> tuple[int, int]:
    """(height, width) images are resized to: the processor's `size`, or 480 px for GLPN checkpoints that
    keep the image's own size (they round it down to 32, which would make every batch ragged)."""
    try:
        return image_size(processor)
    except (ValueError, AttributeError, TypeError):
        return 480, 640


TASK = DepthEstimation()
