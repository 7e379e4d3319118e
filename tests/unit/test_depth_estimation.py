"""depth-estimation task spec without Ray: depth maps decode in their units with 0 as invalid, fit their
images or get a reason, the metrics skip invalid pixels, predictions come back at the image's size as a
16-bit millimetre PNG (an array of metres in Parquet), and `transformers.pipeline` loads the saved model."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from config import ModelConfig
from errors import UserError
from models.depth_estimation import TASK, DepthMetric, Options
from models.images import encode_png
from models.spec import Context

DATA = SimpleNamespace(max_image_pixels=100_000)


def tiny(image_size: int = 32):
    cfg = ModelConfig(init={"architecture": "glpn", "size": "tiny", "overrides": {"image_size": image_size}})
    processor = TASK.build_processor(cfg, None, iter(()))
    torch.manual_seed(0)
    return TASK.build_model(cfg, None, [], processor), processor


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def training(options=None):
    return Context(labels={}, train=False, options=options or Options(), data=DATA)


def test_depth_maps_decode_in_their_units_and_bad_ones_get_reasons():
    _, processor = tiny()
    image = encode_png(np.full((20, 40, 3), 128, np.uint8))
    millimetres = np.full((20, 40), 2500, np.uint16)
    millimetres[:5, :5] = 0  # unknown depth
    metres = np.full((20, 40), 1.5, np.float32)
    metres[0, 0] = np.nan
    rows = [
        (image, encode_png(millimetres)),
        (image, npy(metres)),
        (image, encode_png(millimetres[::2, ::2])),  # half resolution, same aspect: resized
        (image, encode_png(np.full((20, 20), 900, np.uint16))),  # another aspect ratio
        (image, encode_png(np.zeros((20, 40), np.uint16))),  # nothing valid
        (image, b"\x93NUMPY garbage"),
        (image, npy(np.zeros((2, 20, 40), np.float32))),
        (image, None),
        (image[: len(image) // 2], encode_png(millimetres)),  # truncated file
    ]
    features = TASK.preprocess({"image": [r[0] for r in rows], "depth": [r[1] for r in rows]}, processor, training())
    e, labels = features.errors, features.arrays["labels"]
    assert e[:3] == [None, None, None]
    assert labels[0].shape == (32, 32) and labels[0].dtype == np.float32
    assert labels[0].max() == pytest.approx(2.5) and labels[0][0, 0] == 0  # mm -> m; invalid stays 0
    assert labels[1].max() == pytest.approx(1.5) and labels[1][0, 0] == 0  # NaN -> invalid
    assert features.flags[2] == "depth resized from 20x10 to 40x20 (nearest)"
    assert e[3] == "depth is 20x20 but the image is 40x20 (another aspect ratio)"
    assert e[4] == "depth has no valid pixel (all 0)"
    assert e[5].startswith("depth is a corrupt .npy file")
    assert e[6] == "depth .npy has shape (2, 20, 40), expected (height, width)"
    assert e[7] == "depth is null"
    assert e[8].startswith("image is corrupt")
    in_cm = TASK.preprocess(
        {"image": [image], "depth": [encode_png(millimetres)]}, processor, training(Options(png_unit="cm"))
    )
    assert in_cm.arrays["labels"][0].max() == pytest.approx(25.0)


def test_metrics_leave_invalid_pixels_out():
    metric = DepthMetric()
    truth = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])
    predicted = torch.tensor([[[1.0, 3.0], [2.0, 9.0]]])  # the last pixel is invalid: its error must not count
    metric.update(SimpleNamespace(predicted_depth=predicted), {"labels": truth}, {})
    result = metric.compute()
    assert result["abs_rel"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert result["rmse"] == pytest.approx(((0 + 1 + 4) / 3) ** 0.5)
    assert result["delta1"] == pytest.approx(1 / 3)


@pytest.mark.slow
def test_training_lowers_abs_rel_on_the_demo_ramp():
    model, processor = tiny()
    rows = TASK.demo_data(12, seed=0)
    features = TASK.preprocess(
        {"image": [r["image"] for r in rows], "depth": [r["depth"] for r in rows]}, processor, training()
    )
    assert features.errors == [None] * 12
    inputs = TASK.collate(features.arrays, processor)

    def abs_rel():
        metric = TASK.metrics([], None)
        model.eval()
        with torch.no_grad():
            metric.update(model(**inputs), inputs, features.arrays)
        model.train()
        return metric.compute()["abs_rel"]

    before = abs_rel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(25):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert abs_rel() < before * 0.5, before


def test_predictions_are_millimetre_pngs_at_the_image_size_and_the_pipeline_loads_the_model(tmp_path):
    from transformers import pipeline

    model, processor = tiny()
    model.eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = TASK.load(str(tmp_path))
    image = encode_png(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8))
    features = TASK.preprocess({"image": [image]}, loaded_processor, Context(data=DATA))
    inputs = TASK.collate(features.arrays, loaded_processor)
    with torch.no_grad():
        predictions = TASK.postprocess(
            TASK.forward(loaded, inputs, {}), inputs, features.arrays, loaded, loaded_processor, {}
        )
    depth_png = Image.open(io.BytesIO(base64.b64decode(predictions[0]["predicted_depth"])))
    assert depth_png.size == (70, 40) and np.asarray(depth_png).dtype == np.uint16 and predictions[0]["unit"] == "mm"
    as_columns = np.asarray(TASK.to_columns(predictions + [None])["predicted_depth"][0])
    assert as_columns.shape == (40, 70)
    assert np.abs(as_columns - np.asarray(depth_png) / 1000).max() < 1e-6
    assert 0 < predictions[0]["min"] <= predictions[0]["max"] <= loaded.config.max_depth
    plain = pipeline("depth-estimation", model=str(tmp_path))(Image.open(io.BytesIO(image)))
    assert tuple(plain["predicted_depth"].shape) == (
        40,
        70,
    )  # it runs GLPN at the image's own size rounded down to 32 (32x64), then resizes back


def test_folder_pairs_and_requests():
    files = ["images/a.jpg", "depth/a.png", "images/b.jpg", "depth/b.npy", "images/c.jpg", "README.md"]
    assert TASK.folder_rows(files) == [
        {"image": "images/a.jpg", "depth": "depth/a.png"},
        {"image": "images/b.jpg", "depth": "depth/b.npy"},
        {"image": "images/c.jpg", "depth": None},
    ]
    assert TASK.request_inputs(["aGk=", {"image": "eA=="}]) == [{"image": "aGk="}, {"image": "eA=="}]
    with pytest.raises(UserError, match="unknown field"):
        TASK.request_inputs({"depth": "x"})
    # a plain folder of images (a corpus to predict): every image is a row, paired where a depth/ folder is beside it
    assert TASK.folder_rows(["a.jpg", "sub/b.png", "depth/a.png"]) == [
        {"image": "a.jpg", "depth": "depth/a.png"},
        {"image": "sub/b.png", "depth": None},
    ]
