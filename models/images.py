"""Image helpers shared by the vision tasks: safe decoding, resizing, augmentation boxes, PNG encoding.

Everything a vision `preprocess` does to a file before it becomes an array lives here, so every task
rejects the same bad files with the same one-line reasons: null, not an image or corrupt, more pixels
than `data.max_image_pixels` (checked from the header, before any pixel is decoded), unusable modes.
Images are kept as uint8 HWC arrays between stages (compact); `pixel_values` normalises a batch in
`collate`, the way the Hugging Face image processors do (rescale by 1/255, then (x - mean) / std).
"""

from __future__ import annotations

import base64
import io
import math
import random
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def decode_image(data: bytes | None, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """File bytes -> (an RGB image, None), or (None, a one-line reason it cannot be used).

    Palette, grayscale, CMYK and 16-bit images are converted to 8-bit RGB; transparency is
    composited on white; EXIF orientation is applied. Multi-frame files give their first frame.
    """
    if data is None:
        return None, "image is null"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return None, f"image is not file bytes (got {type(data).__name__})"
    if len(data) == 0:
        return None, "image is empty (0 bytes)"
    try:
        with warnings.catch_warnings():
            # Our own limit decides below; PIL's is only a backstop for absurd headers (> 2x its limit).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(data)))  # lazy: reads the header only
    except Image.DecompressionBombError as e:  # PIL refused the header before we saw it
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        count = pixels.group(1) if pixels else "too many"
        return None, f"image has {count} pixels, more than data.max_image_pixels={max_pixels}"
    except UnidentifiedImageError:
        return None, "not an image (unrecognised file format)"
    except (OSError, ValueError, SyntaxError) as e:
        return None, f"image is corrupt ({one_line(e)})"
    width, height = image.size
    if width * height > max_pixels:
        return (
            None,
            f"image has {width * height} pixels ({width}x{height}), more than data.max_image_pixels={max_pixels}",
        )
    if width == 0 or height == 0:
        return None, f"image has no pixels ({width}x{height})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        return None, f"image is corrupt or truncated ({one_line(e)})"


def to_rgb(image: Image.Image) -> tuple[Image.Image | None, str | None]:
    """Any decoded PIL image -> 8-bit RGB, or a reason when its mode has no sensible RGB meaning."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16/32-bit grayscale (scans, medical, depth-like PNGs): 0..65535 onto 0..255 (values that fit in
        # 8 bits are taken as 8-bit); float images are read as 0..1, or scaled by their maximum.
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            return None, f"image mode {mode} holds non-finite values"
        if mode == "F":
            top = 1.0 if values.min() >= 0.0 and values.max() <= 1.0 else max(float(values.max()), 1e-12)
        else:
            top = 65535.0 if values.max() > 255 else 255.0
        gray = np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB"), None
    if mode == "P":
        if "transparency" not in image.info:
            return image.convert("RGB"), None
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), None
    if mode in ("1", "L", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        try:
            return image.convert("RGB"), None
        except (ValueError, OSError) as e:
            return None, f"image mode {mode} cannot be converted to RGB ({one_line(e)})"
    return None, f"unsupported image mode {mode}"


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text and text[0] else type(error).__name__


# --- resizing and augmentation -------------------------------------------------------------------


def resize(
    image: Image.Image,
    size: tuple[int, int],
    box: tuple[float, float, float, float] | None = None,
    resample: int = Image.Resampling.BILINEAR,
) -> np.ndarray:
    """The image (or its `box` region: left, top, right, bottom) resized to `size` (height, width), uint8 HWC."""
    height, width = size
    return np.asarray(image.resize((width, height), resample=resample, box=box), dtype=np.uint8)


def random_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: random.Random | None = None,
) -> tuple[int, int, int, int]:
    """A random-resized-crop region (left, top, right, bottom) as torchvision picks it: an area fraction
    in `scale` and an aspect ratio in `ratio`; the whole image when ten tries fail. Return it so masks
    and boxes follow the same crop as the image."""
    rng = rng or random
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    return 0, 0, width, height


def image_size(processor) -> tuple[int, int]:
    """(height, width) an HF image processor resizes to; a shortest-edge size gives a square."""
    size = processor.size
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    if get("shortest_edge"):
        return int(get("shortest_edge")), int(get("shortest_edge"))
    raise ValueError(f"image processor size {size!r} has neither height/width nor shortest_edge")


def pixel_values(images: list[np.ndarray], processor) -> torch.Tensor:
    """uint8 HWC arrays of one size -> float NCHW, rescaled and normalised as the processor says."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    if getattr(processor, "do_rescale", True):
        batch = batch * float(getattr(processor, "rescale_factor", 1 / 255))
    if getattr(processor, "do_normalize", True):
        mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        batch = (batch - mean) / std
    return batch


# --- encoding ------------------------------------------------------------------------------------


def encode_png(array_or_image) -> bytes:
    """A PIL image or a numpy array (HW or HWC uint8, HW uint16) -> PNG file bytes."""
    image = array_or_image
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint16:
            image = Image.fromarray(image)  # 16-bit grayscale PNG
        else:
            image = Image.fromarray(np.ascontiguousarray(image.astype(np.uint8)))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def to_png_base64(array_or_image) -> str:
    """A PIL image or numpy array -> base64 text of its PNG (for JSON outputs: masks, depth maps)."""
    return base64.b64encode(encode_png(array_or_image)).decode("ascii")
