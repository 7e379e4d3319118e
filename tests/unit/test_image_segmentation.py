"""image-segmentation task spec without Ray: masks decode and fit their images or get a reason, segments
for Mask2Former follow the subtask, mean IoU and PQ count what they should, predictions come back as
PNG masks at the image's size (RLE in Parquet) exactly as `transformers.pipeline` gives them."""

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
from models.image_maps import rle_decode
from models.image_segmentation import DEMO_LABELS, TASK, Options
from models.segments import SegmentationMetric, segments
from models.images import encode_png
from models.spec import Context

LABEL_IDS = {name: i for i, name in enumerate(DEMO_LABELS)}
DATA = SimpleNamespace(max_image_pixels=100_000)


def tiny(architecture: str, image_size: int | None = None):
    image_size = image_size or (64 if architecture == "mask2former" else 32)
    cfg = ModelConfig(init={"architecture": architecture, "size": "tiny", "overrides": {"image_size": image_size}})
    processor = TASK.build_processor(cfg, None, iter(()))
    torch.manual_seed(0)
    return TASK.build_model(cfg, None, DEMO_LABELS, processor), processor


def training_ctx(subtask="semantic", **options):
    return Context(labels=LABEL_IDS, train=False, options=Options(subtask=subtask, **options), data=DATA)


def columns(rows):
    return {k: [r.get(k) for r in rows] for k in ("image", "mask", "instances")}


def png_mask(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def test_demo_data_has_exact_masks_for_every_shape():
    rows = TASK.demo_data(6, seed=3)
    for row in rows:
        image = np.asarray(Image.open(io.BytesIO(row["image"])))
        mask = np.asarray(Image.open(io.BytesIO(row["mask"])))
        instances = np.asarray(Image.open(io.BytesIO(row["instances"])))
        assert mask.shape == instances.shape == image.shape[:2]
        assert set(np.unique(mask)) <= {0, 1, 2, 3} and mask.max() > 0
        assert ((instances > 0) == (mask > 0)).all()  # every shape pixel belongs to an instance
        red = image[mask == 1][:, 0].mean() if (mask == 1).any() else 255
        assert red > 150  # circles are drawn red: the colour is the cue the model learns


def test_bad_rows_get_reasons_and_good_rows_become_arrays():
    _, processor = tiny("segformer")
    good = TASK.demo_data(1, seed=0)[0]
    h, w = np.asarray(Image.open(io.BytesIO(good["mask"]))).shape
    mask = np.asarray(Image.open(io.BytesIO(good["mask"])))
    half = (
        encode_png(mask[::2, ::2])
        if h % 2 == 0 and w % 2 == 0
        else encode_png(np.asarray(Image.fromarray(mask).resize((w // 2, h // 2), Image.NEAREST)))
    )
    rows = [
        good,
        {**good, "image": b"not an image"},
        {**good, "mask": None},
        {**good, "mask": encode_png(np.zeros((h, w, 3), np.uint8))},  # RGB: colours are not class ids
        {**good, "mask": encode_png(np.full((h, w), 7, np.uint8))},  # id 7 with 4 labels
        {**good, "mask": encode_png(np.zeros((h, w * 2), np.uint8))},  # another aspect ratio
        {**good, "mask": half},
        {**good, "image": encode_png(np.zeros((400, 400, 3), np.uint8))},  # 160,000 pixels > 100,000
        {**good, "mask": encode_png(np.where(mask == 0, 255, mask).astype(np.uint8))},  # background ignored
    ]
    features = TASK.preprocess(columns(rows), processor, training_ctx())
    e = features.errors
    assert e[0] is None and features.arrays["pixels"][0].shape == (32, 32, 3) and features.arrays["size"][0] == [h, w]
    assert e[1] == "not an image (unrecognised file format)"
    assert e[2] == "mask is null"
    assert e[3].startswith("mask has mode RGB; expected one channel")
    assert e[4] == "mask has class id(s) [7] outside data.labels (4 classes: 0..3; 255 = ignore)"
    assert e[5] == f"mask is {w * 2}x{h} but the image is {w}x{h} (another aspect ratio)"
    assert e[6] is None and features.flags[6].startswith("mask resized from")
    assert e[7].startswith("image has 160000 pixels (400x400), more than data.max_image_pixels=100000")
    assert e[8] is None and 255 in features.arrays["labels"][8] and 0 not in features.arrays["labels"][8]
    assert (
        features.arrays["labels"][0].shape == (32, 32) and "segment_masks" not in features.arrays
    )  # SegFormer: per-pixel labels

    predicting = TASK.preprocess({"image": [good["image"], None]}, processor, Context(data=DATA))
    assert predicting.errors == [None, "image is null"] and "labels" not in predicting.arrays


def test_panoptic_segments_are_instances_plus_one_stuff_segment_per_class():
    semantic = np.array([[0, 0, 1, 1], [0, 2, 1, 1], [255, 2, 0, 0]], np.uint8)
    instances = np.array([[0, 0, 1, 1], [0, 2, 1, 1], [0, 2, 0, 0]])
    masks, classes = segments(semantic, instances, "panoptic")
    assert classes.tolist() == [1, 2, 0]  # instance 1 (class 1), instance 2 (class 2), background stuff
    assert masks[0].sum() == 4 and masks[1].sum() == 2 and masks[2].sum() == 5  # the ignored pixel is in none
    masks, classes = segments(semantic, instances, "instance")
    assert classes.tolist() == [1, 2]
    masks, classes = segments(semantic, None, "semantic")
    assert classes.tolist() == [0, 1, 2] and masks.sum() == 11


def test_instance_training_without_instance_maps_is_refused_row_by_row():
    _, processor = tiny("mask2former")
    row = TASK.demo_data(1, seed=1)[0]
    features = TASK.preprocess(columns([row, {**row, "instances": None}]), processor, training_ctx("panoptic"))
    assert features.errors == [None, "instances is null (panoptic training needs an instance id map per image)"]
    assert features.arrays["segment_masks"][0].shape[1:] == (64, 64)
    _, segformer_processor = tiny("segformer")
    with pytest.raises(UserError, match="needs a Mask2Former model"):
        TASK.preprocess(columns([row]), segformer_processor, training_ctx("panoptic"))


def test_mean_iou_and_pixel_accuracy_from_the_confusion_matrix():
    metric = SegmentationMetric(3, panoptic=False, threshold=0.8)
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 255]], np.uint8)
    logits = torch.zeros(1, 3, 2, 4)
    predicted = [[0, 1, 1, 1], [2, 0, 0, 0]]  # 4 of 6 scored pixels right; the ignored ones do not count
    for y, row in enumerate(predicted):
        for x, c in enumerate(row):
            logits[0, c, y, x] = 5.0
    metric.update(SimpleNamespace(logits=logits), {}, {"labels": [target]})
    result = metric.compute()
    # IoU: class 0: 1/3, class 1: 2/3, class 2: 1/2
    assert result["pixel_accuracy"] == pytest.approx(4 / 6)
    assert result["mean_iou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_panoptic_quality_matches_segments_of_the_same_class_above_half_iou():
    metric = SegmentationMetric(3, panoptic=True, threshold=0.8)
    truth = np.zeros((3, 4, 4), np.uint8)
    truth[0, :2], truth[1, 2:, :2], truth[2, 2:, 2:] = 1, 1, 1
    classes = np.array([0, 1, 2])
    seg = torch.zeros(4, 4, dtype=torch.long)
    seg[2:, :2] = 1  # exact instance of class 1
    seg[2:, 3] = 2  # half of the class-2 segment: IoU 0.5, not a match
    result = {"segmentation": seg, "segments_info": [{"id": 1, "label_id": 1}, {"id": 2, "label_id": 2}]}
    metric.match(result, torch.from_numpy(truth).bool(), classes, torch.zeros(4, 4, dtype=torch.bool))
    tp, fp, fn, iou = metric.pq
    assert tp.tolist() == [0, 1, 0] and fp.tolist() == [0, 0, 1] and fn.tolist() == [1, 0, 1] and iou[1] == 1.0
    metric.confusion[0, 0] = 1  # mIoU needs a pixel; PQ is what is checked
    assert metric.compute()["pq"] == pytest.approx((0 + 1 + 0) / 3)


@pytest.mark.slow
def test_mask2former_learns_panoptic_targets_and_answers_with_segments(tmp_path):
    model, processor = tiny("mask2former")
    rows = TASK.demo_data(8, seed=0)
    features = TASK.preprocess(columns(rows), processor, training_ctx("panoptic"))
    inputs = TASK.collate(features.arrays, processor)
    assert isinstance(inputs["mask_labels"], list) and inputs["mask_labels"][0].dtype == torch.float32
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.85, losses

    model.eval()
    with (
        torch.no_grad()
    ):  # 12 steps leave "no object" winning every query and faint masks: lower the bars to see segments
        model.class_predictor.bias[-1] = -20.0
    arrays = {k: v for k, v in features.arrays.items() if k != "labels"}
    inputs = TASK.collate(arrays, processor)
    with torch.no_grad():
        outputs = TASK.forward(model, inputs, {})
    predictions = TASK.postprocess(
        outputs,
        inputs,
        arrays,
        model,
        processor,
        {"threshold": 0.0, "mask_threshold": 0.0, "overlap_mask_area_threshold": 0.0},
    )
    h, w = arrays["size"][0]
    assert predictions[0] and {s["label"] for s in predictions[0]} <= set(DEMO_LABELS)
    assert all(png_mask(s["mask"]).shape == (h, w) and 0 <= s["score"] <= 1 for s in predictions[0])
    semantic = TASK.postprocess(outputs, inputs, arrays, model, processor, {"subtask": "semantic"})
    assert all(s["score"] is None for s in semantic[0])
    columns_out = TASK.to_columns(predictions + [None])
    first = columns_out["segments"][0][0]
    assert (rle_decode(first["mask"]) == (png_mask(predictions[0][0]["mask"]) > 0)).all()
    assert columns_out["segments"][-1] is None


def test_segformer_predictions_equal_the_transformers_pipeline_on_the_saved_model(tmp_path):
    from transformers import pipeline

    model, processor = tiny("segformer")
    model.eval()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = TASK.load(str(tmp_path))
    rows = TASK.demo_data(3, seed=5)
    features = TASK.preprocess({"image": [r["image"] for r in rows]}, loaded_processor, Context(data=DATA))
    inputs = TASK.collate(features.arrays, loaded_processor)
    with torch.no_grad():
        ours = TASK.postprocess(TASK.forward(loaded, inputs, {}), inputs, features.arrays, loaded, loaded_processor, {})
    plain = pipeline("image-segmentation", model=str(tmp_path))
    for row, mine in zip(rows, ours):
        theirs = plain(Image.open(io.BytesIO(row["image"])))
        assert [s["label"] for s in theirs] == [s["label"] for s in mine]
        for a, b in zip(theirs, mine):
            assert (np.asarray(a["mask"]) == png_mask(b["mask"])).mean() > 0.99


def test_folder_pairs_images_with_masks_by_name():
    files = [
        "train/images/a.jpg",
        "train/masks/a.png",
        "train/instances/a.png",
        "train/images/b.png",
        "val/images/a.jpg",
        "val/masks/a.png",
        "notes.txt",
    ]
    assert TASK.folder_rows(files) == [
        {"image": "train/images/a.jpg", "mask": "train/masks/a.png", "instances": "train/instances/a.png"},
        {"image": "train/images/b.png", "mask": None, "instances": None},
        {"image": "val/images/a.jpg", "mask": "val/masks/a.png", "instances": None},
    ]


def test_from_scratch_needs_class_names_and_requests_take_base64_images():
    cfg = ModelConfig(init={"architecture": "segformer", "size": "tiny"})
    with pytest.raises(UserError, match="data.labels"):
        TASK.build_model(cfg, None, [], TASK.build_processor(cfg, None, iter(())))
    small = ModelConfig(init={"architecture": "mask2former", "size": "tiny", "overrides": {"image_size": 32}})
    with pytest.raises(UserError, match="Mask2Former needs at least 64 px, got 32"):
        TASK.build_processor(small, None, iter(()))
    assert TASK.request_inputs("aGk=") == [{"image": "aGk="}]
    assert TASK.request_inputs([{"image": "aGk="}, "eA=="]) == [{"image": "aGk="}, {"image": "eA=="}]
    with pytest.raises(UserError, match="unknown field"):
        TASK.request_inputs({"img": "x"})
