"""Image decoding as a user sees it: ordinary files of every common mode decode to RGB, bad files
get a one-line reason, and oversized images are refused before their pixels are decoded."""

from __future__ import annotations

import base64
import io
import random

import numpy as np
import pytest
from PIL import Image

from models.images import decode_image, encode_png, image_size, pixel_values, random_crop_box, resize, to_png_base64

RNG = np.random.default_rng(0)
RGB = Image.fromarray(RNG.integers(0, 255, (20, 30, 3), dtype=np.uint8))


def file_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


@pytest.mark.parametrize(
    "name, data",
    [
        ("jpeg", file_bytes(RGB, "JPEG")),
        ("png", file_bytes(RGB, "PNG")),
        ("grayscale", file_bytes(RGB.convert("L"), "PNG")),
        ("palette", file_bytes(RGB.convert("P"), "PNG")),
        ("cmyk jpeg", file_bytes(RGB.convert("CMYK"), "JPEG")),
        ("16-bit png", file_bytes(Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)), "PNG")),
        ("bmp", file_bytes(RGB, "BMP")),
        ("webp", file_bytes(RGB, "WEBP")),
        ("gif", file_bytes(RGB.convert("P"), "GIF")),
    ],
)
def test_ordinary_files_decode_to_rgb_of_their_size(name, data):
    image, why = decode_image(data, max_pixels=10_000)
    assert why is None, why
    assert image.mode == "RGB" and image.size == (30, 20)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image, why = decode_image(file_bytes(rgba, "PNG"), 100)
    assert why is None and np.asarray(image)[0, 0].tolist() == [255, 255, 255]
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] * 256)
    image, why = decode_image(file_bytes(palette, "PNG", transparency=0), 100)
    assert why is None and np.asarray(image)[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_range_maps_onto_eight_bits():
    deep = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    image, why = decode_image(file_bytes(deep, "PNG"), 100)
    assert why is None and np.asarray(image)[0, :, 0].tolist() == [0, 255]


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    image, why = decode_image(file_bytes(RGB, "JPEG", exif=exif), 10_000)
    assert why is None and image.size == (20, 30)


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, "image is null"),
        (b"", "empty"),
        (b"hello, not an image", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"x" * 100, "corrupt"),
        (file_bytes(RGB, "JPEG")[:300], "corrupt"),
        ("some/path.png", "not file bytes"),
    ],
)
def test_unusable_inputs_get_a_one_line_reason(data, reason):
    image, why = decode_image(data, 10_000)
    assert image is None and reason in why and "\n" not in why


def test_oversized_image_is_refused_from_its_header():
    # 30000 x 30000 would need 900 MB decoded; the PNG is tiny and its pixels are never decoded.
    huge = file_bytes(Image.new("1", (30000, 30000)), "PNG")
    assert len(huge) < 1_000_000
    image, why = decode_image(huge, max_pixels=1_000_000)
    assert image is None
    assert why.startswith("image has 900000000 pixels") and why.endswith("more than data.max_image_pixels=1000000")
    small = file_bytes(Image.new("1", (3000, 3000)), "PNG")
    assert (
        decode_image(small, 1_000_000)[1]
        == "image has 9000000 pixels (3000x3000), more than data.max_image_pixels=1000000"
    )
    image, why = decode_image(file_bytes(RGB, "PNG"), max_pixels=599)
    assert image is None and "600 pixels" in why


def test_resize_crop_and_normalise():
    array = resize(RGB, (8, 12))
    assert array.shape == (8, 12, 3) and array.dtype == np.uint8
    left, top, right, bottom = random_crop_box(30, 20, scale=(0.3, 0.6), rng=random.Random(1))
    assert 0 <= left < right <= 30 and 0 <= top < bottom <= 20
    assert 0.2 * 600 <= (right - left) * (bottom - top) <= 0.7 * 600

    class Processor:
        size = {"height": 8, "width": 12}
        image_mean, image_std, rescale_factor = [0.5] * 3, [0.5] * 3, 1 / 255

    assert image_size(Processor) == (8, 12)
    batch = pixel_values([np.zeros((8, 12, 3), np.uint8), np.full((8, 12, 3), 255, np.uint8)], Processor)
    assert batch.shape == (2, 3, 8, 12)
    assert batch[0].unique().tolist() == [-1.0] and batch[1].unique().tolist() == [1.0]


def test_png_round_trip():
    mask = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(mask)))), mask)
    depth = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(depth)))), depth)
    text = to_png_base64(RGB)
    assert Image.open(io.BytesIO(base64.b64decode(text))).size == (30, 20)
