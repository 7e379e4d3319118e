"""Per-pixel maps that go with an image: segmentation masks (class or instance ids) and depth maps.

Shared by image-segmentation and depth-estimation: decoding a map file into a numpy array with a
one-line reason when it cannot be used, fitting it to its image's size, and the output encodings
(run-length encoding for Parquet, PNG for HTTP). Map files are single-channel PNG (8- or 16-bit,
palette PNGs give their indices, not their colours), TIFF, or `.npy` arrays.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as coco_mask

from models.images import one_line

NPY_MAGIC = b"\x93NUMPY"
MAP_SUFFIXES = (".png", ".npy", ".tif", ".tiff", ".bmp")
# A map whose aspect ratio differs from its image's by more than this is rejected, not stretched.
ASPECT_TOLERANCE = 0.02


def decode_map(data: bytes | None, name: str, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    """Map file bytes -> (a 2-D array: integers for PNG/TIFF, as stored for .npy, None), or (None, reason)."""
    if data is None:
        return None, f"{name} is null"
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        return None, f"{name} is empty or not file bytes"
    data = bytes(data)
    if data.startswith(NPY_MAGIC):
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            return None, f"{name} is a corrupt .npy file ({one_line(e)})"
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 2:
            return None, f"{name} .npy has shape {array.shape}, expected (height, width)"
        if array.size > max_pixels:
            return None, f"{name} has {array.size} pixels, more than data.max_image_pixels={max_pixels}"
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            return None, f"{name} .npy holds {array.dtype}, expected numbers"
        return array, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                return (
                    None,
                    f"{name} has {width * height} pixels ({width}x{height}), more than "
                    f"data.max_image_pixels={max_pixels}",
                )
            image.load()
    except Image.DecompressionBombError:
        return None, f"{name} has more pixels than data.max_image_pixels={max_pixels}"
    except UnidentifiedImageError:
        return None, f"{name} is not an image or .npy file (unrecognised format)"
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        return None, f"{name} is corrupt or truncated ({one_line(e)})"
    if image.mode in ("L", "P", "1", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return np.asarray(image), None
    if image.mode == "LA":
        return np.asarray(image.getchannel("L")), None
    return (
        None,
        f"{name} has mode {image.mode}; expected one channel of ids or depths (8/16-bit grayscale or palette PNG, or "
        ".npy)",
    )


def fit_to(array: np.ndarray, height: int, width: int, name: str) -> tuple[np.ndarray | None, str | None, str | None]:
    """`array` at (height, width): (array, note, None) or (None, None, reason).

    A map of another size but the same aspect ratio (a half-resolution label map) is resized with
    nearest neighbour, which never invents class ids and never blends valid depths with invalid zeros;
    a map with another aspect ratio belongs to another image and is rejected.
    """
    h, w = array.shape
    if (h, w) == (height, width):
        return array, None, None
    if abs((w / h) / (width / height) - 1) > ASPECT_TOLERANCE:
        return None, None, f"{name} is {w}x{h} but the image is {width}x{height} (another aspect ratio)"
    return resize_nearest(array, height, width), f"{name} resized from {w}x{h} to {width}x{height} (nearest)", None


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D (or HxWxC) array, pixel centres aligned as PIL aligns them."""
    h, w = array.shape[:2]
    rows = np.minimum((np.arange(height) + 0.5) * h / height, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(width) + 0.5) * w / width, w - 1).astype(np.int64)
    return array[rows][:, cols]


def flip(array: np.ndarray) -> np.ndarray:
    """A map mirrored left-right along with its image (augmentation)."""
    return np.ascontiguousarray(array[:, ::-1])


def folder_pairs(files: list[str], maps: dict[str, str], image_suffixes: tuple[str, ...]) -> list[dict]:
    """The folder layout of image + map pairs: `images/x.jpg` with `<folder>/x.png|.npy` beside `images/`
    for each map folder in `maps` (folder name -> column), at any depth; a missing map is None. A folder
    without `images/` (a plain corpus to predict) gives every image file outside the map folders."""

    def split(path):
        folder, _, name = path.rpartition("/")
        parent, _, kind = folder.rpartition("/")
        return parent, kind, name, name.rsplit(".", 1)[0]

    found = {}
    for path in files:
        parent, kind, name, stem = split(path)
        if kind in maps and name.lower().endswith(MAP_SUFFIXES):
            found[(parent, kind, stem)] = path
    images = [p for p in sorted(files) if p.lower().endswith(image_suffixes) and split(p)[1] not in maps]
    if any(split(p)[1] == "images" for p in images):
        images = [p for p in images if split(p)[1] == "images"]
    rows = []
    for path in images:
        parent, _, _, stem = split(path)
        rows.append({"image": path, **{column: found.get((parent, folder, stem)) for folder, column in maps.items()}})
    return rows


# --- output encodings --------------------------------------------------------------------------


def rle_encode(mask: np.ndarray) -> dict:
    """A boolean HxW mask -> COCO run-length encoding {"size": [h, w], "counts": str}."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: dict) -> np.ndarray:
    """COCO run-length encoding as `rle_encode` writes it -> boolean HxW mask."""
    counts = rle["counts"]
    return coco_mask.decode(
        {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    ).astype(bool)
