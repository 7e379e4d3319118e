"""object-detection task spec without Ray: COCO files become rows, boxes survive resizing, cropping and
flipping, bad rows get reasons, predictions come back in original pixels as the HF pipeline gives them."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from config import ModelConfig
from errors import UserError
from models.images import encode_png
from models.object_detection import TASK, Options, parse_coco, shapes_scene, transform_boxes
from models.spec import Context

LABELS = ["circle", "square", "triangle"]
LABEL_IDS = {name: i for i, name in enumerate(LABELS)}


def tiny(image_size: int = 64):
    cfg = ModelConfig(init={"architecture": "detr", "size": "tiny", "overrides": {"image_size": image_size}})
    processor = TASK.build_processor(cfg, None, iter(()))
    torch.manual_seed(0)
    return TASK.build_model(cfg, None, LABELS, processor).eval(), processor


def usable(features):
    keep = [i for i, e in enumerate(features.errors) if e is None]
    return {k: [v[i] for i in keep] for k, v in features.arrays.items()}


def test_coco_json_becomes_one_row_per_image():
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}, {"id": 2, "file_name": "sub/b.png"}],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4], "category_id": 7},
            {"id": 2, "image_id": 1, "bbox": [0, 0, 5, 5], "category_id": 8},
            {"id": 3, "image_id": 1, "bbox": [0, 0, 9, 9], "category_id": 7, "iscrowd": 1},
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 8, "name": "dog"}],
    }
    rows = list(parse_coco(json.dumps(coco).encode(), "data/train.json"))
    assert rows == [
        {
            "id": 1,
            "image": "a.jpg",
            "boxes": [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 5.0, 5.0]],
            "categories": ["cat", "dog"],
        },
        {"id": 2, "image": "sub/b.png", "boxes": [], "categories": []},
    ]
    with pytest.raises(UserError, match="data/bad.json: not a COCO detection file"):
        list(parse_coco(b'{"images": 3}', "data/bad.json"))
    assert TASK.labels_in([["cat", "dog"], [], None, ["cat"]]) == {"cat", "dog"}


def test_boxes_follow_crop_resize_and_flip():
    xyxy = np.array([[10, 10, 30, 20], [2, 2, 10, 10], [35, 35, 40, 40]], dtype=np.float32)
    # crop (5,5)-(45,45) of a 50x50 image, resized to 20x20 (scale 0.5), mirrored
    boxes, kept = transform_boxes(xyxy, (5, 5, 45, 45), (20, 20), flip=True)
    assert kept.tolist() == [True, True, True]
    assert boxes.tolist() == [[7.5, 2.5, 17.5, 7.5], [17.5, 0.0, 20.0, 2.5], [2.5, 15.0, 5.0, 17.5]]
    # a box mostly outside the crop is dropped
    boxes, kept = transform_boxes(xyxy, (7, 7, 50, 50), (43, 43), flip=False)
    assert kept.tolist() == [True, False, True]


def test_flipped_training_image_and_its_box_stay_together():
    _, processor = tiny(64)
    image = Image.new("RGB", (128, 64), (0, 0, 0))
    image.paste((255, 255, 255), (8, 16, 40, 48))  # white block at x 8..40, y 16..48
    # flips are drawn at random: 32 rows see both outcomes but once in 2**31 runs
    batch = {"image": [encode_png(image)] * 32, "boxes": [[[8, 16, 32, 32]]] * 32, "categories": [["square"]] * 32}
    features = TASK.preprocess(batch, processor, Context(labels=LABEL_IDS, train=True, options=Options()))
    seen = set()
    for pixels, boxes in zip(features.arrays["pixels"], features.arrays["boxes"]):
        x0, y0, x1, y1 = boxes[0]
        seen.add(x0 < 32)
        inside = pixels[int(y0) + 1 : int(y1) - 1, int(x0) + 1 : int(x1) - 1]
        assert inside.min() > 200, "the box no longer covers the white block"
    assert seen == {True, False}, "both flipped and unflipped rows expected in 32 tries"


def test_bad_rows_get_reasons():
    _, processor = tiny()
    good = shapes_scene(random.Random(0))
    batch = {
        "image": [good["image"], good["image"], good["image"], b"junk", good["image"]],
        "boxes": [good["boxes"], [[1, 2, 3]], [[1, 2, 3, 4]], good["boxes"], [[1, 1, 4, 4]]],
        "categories": [good["categories"], ["circle"], ["hexagon"], good["categories"], None],
    }
    features = TASK.preprocess(batch, processor, Context(labels=LABEL_IDS, train=False))
    assert features.errors == [
        None,
        "boxes[0] is not 4 numbers [x, y, width, height]",
        "unknown category 'hexagon' (not in the training split)",
        "not an image (unrecognised file format)",
        "categories is null",
    ]


def test_training_batch_has_detr_targets_and_a_loss():
    model, processor = tiny()
    rows = [shapes_scene(random.Random(i), size=(80, 60)) for i in range(3)]
    batch = {k: [r[k] for r in rows] for k in ("image", "boxes", "categories")}
    features = TASK.preprocess(batch, processor, Context(labels=LABEL_IDS, train=False))
    inputs = TASK.collate(usable(features), processor)
    assert inputs["pixel_values"].shape == (3, 3, 64, 64) and inputs["pixel_mask"].all()
    target = inputs["labels"][0]
    x, y, w, h = rows[0]["boxes"][0]
    expected = [(x + w / 2) / 80, (y + h / 2) / 60, w / 80, h / 60]  # centre/size relative to the image
    assert target["boxes"][0].tolist() == pytest.approx(expected, abs=1e-5)
    assert target["class_labels"].tolist() == [LABEL_IDS[c] for c in rows[0]["categories"]]
    model.train()
    assert torch.isfinite(model(**inputs).loss)
    assert all(p.requires_grad for p in model.model.backbone.parameters())


def test_predictions_match_the_transformers_pipeline(tmp_path):
    from transformers import pipeline

    model, processor = tiny()
    model.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = TASK.load(str(tmp_path))
    scene = shapes_scene(random.Random(5), size=(90, 70))
    features = TASK.preprocess({"image": [scene["image"]]}, loaded_processor, Context(labels=None))
    arrays = usable(features)
    inputs = TASK.collate(arrays, loaded_processor)
    with torch.no_grad():
        outputs = TASK.forward(loaded.eval(), inputs, {})
    ours = TASK.postprocess(outputs, inputs, arrays, loaded, loaded_processor, {"threshold": 0.0})[0]
    theirs = pipeline("object-detection", model=str(tmp_path), device="cpu")(
        Image.open(io.BytesIO(scene["image"])), threshold=0.0
    )
    assert len(ours) == len(theirs) == loaded.config.num_queries
    assert [d["label"] for d in ours] == [d["label"] for d in theirs]
    assert [d["score"] for d in ours] == pytest.approx([d["score"] for d in theirs], abs=2e-3)
    for a, b in zip(ours, theirs):
        assert all(abs(a["box"][k] - b["box"][k]) <= 1 for k in a["box"])
    assert TASK.to_columns([ours, None]) == {"detections": [ours, None]}


def test_padded_batches_map_boxes_back_to_each_image():
    """With a shortest-edge processor (pretrained DETRs) images of one batch differ in size and are padded;
    a box predicted on the canvas must land on the same pixels of each original image."""
    from transformers import DetrImageProcessorPil

    processor = DetrImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 64})
    images = [encode_png(Image.new("RGB", (64, 32))), encode_png(Image.new("RGB", (32, 32)))]
    features = TASK.preprocess({"image": images}, processor, Context(labels=None))
    arrays = usable(features)
    assert [p.shape[:2] for p in arrays["pixels"]] == [(32, 64), (32, 32)]
    inputs = TASK.collate(arrays, processor)
    assert inputs["pixel_values"].shape == (2, 3, 32, 64)
    assert inputs["pixel_mask"][1, :, 32:].sum() == 0 and inputs["pixel_mask"][1, :, :32].all()
    # one query covering the canvas' left half = the whole second image
    logits = torch.tensor([[[0.0, 0.0, 9.0, 0.0]], [[0.0, 0.0, 9.0, 0.0]]])
    outputs = type("Out", (), {"logits": logits, "pred_boxes": torch.tensor([[[0.25, 0.5, 0.5, 1.0]]] * 2)})()
    model = type("Model", (), {"config": type("C", (), {"id2label": dict(enumerate(LABELS))})()})()
    found = TASK.postprocess(outputs, inputs, arrays, model, processor, {})
    assert found[0][0]["box"] == {"xmin": 0, "ymin": 0, "xmax": 32, "ymax": 32}
    assert found[1][0]["box"] == {"xmin": 0, "ymin": 0, "xmax": 32, "ymax": 32}
    assert found[0][0]["label"] == "triangle"


def test_map_rewards_right_boxes():
    processor = tiny()[1]
    scene = shapes_scene(random.Random(3), size=(64, 64))
    batch = {k: [scene[k]] for k in ("image", "boxes", "categories")}
    arrays = usable(TASK.preprocess(batch, processor, Context(labels=LABEL_IDS, train=False)))
    inputs = TASK.collate(arrays, processor)
    target = inputs["labels"][0]
    k = len(target["class_labels"])

    def outputs(boxes, classes):
        logits = torch.full((1, k, len(LABELS) + 1), -5.0)
        logits[0, torch.arange(k), classes] = 5.0
        return type("Out", (), {"logits": logits, "pred_boxes": boxes[None]})()

    perfect, wrong = TASK.metrics(LABELS, None), TASK.metrics(LABELS, None)
    perfect.update(outputs(target["boxes"], target["class_labels"]), inputs, arrays)
    wrong.update(outputs(torch.tensor([[0.9, 0.9, 0.05, 0.05]] * k), target["class_labels"]), inputs, arrays)
    assert perfect.compute()["map"] > 0.99 and perfect.compute()["map_50"] > 0.99
    assert wrong.compute() == {"map": 0.0, "map_50": 0.0}
    # the run report's example: the boxes found are drawn where the true ones are, on the image the model saw
    [example] = perfect.examples.items
    found, truth = [f[:4] for f in example["found"]], [box for box, _ in example["truth"]]
    assert len(found) == k and np.allclose(found, truth, atol=0.5), (found, truth)
    [view] = perfect.views()
    drawn = Image.open(io.BytesIO(view.figures[0][1]))
    assert drawn.format == "PNG" and len(set(drawn.convert("RGB").getdata())) > 20


def test_a_saved_detr_is_a_source_with_a_new_class_head(tmp_path):
    model, processor = tiny()
    model.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    cfg = ModelConfig(source=str(tmp_path))
    loaded_processor = TASK.build_processor(cfg, str(tmp_path), iter(()))
    again = TASK.build_model(cfg, str(tmp_path), ["car", "person"], loaded_processor)
    assert again.config.id2label == {0: "car", 1: "person"} and again.class_labels_classifier.out_features == 3
    queries = again.model.query_position_embeddings.weight
    assert torch.equal(queries, model.model.query_position_embeddings.weight)  # the checkpoint's, not re-drawn
