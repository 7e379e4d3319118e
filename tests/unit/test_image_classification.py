"""image-classification task spec without Ray: bad images become error rows, augmentations only in
training, outputs in the pipeline's format, and a saved model loads in `transformers.pipeline`."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from config import ModelConfig
from errors import UserError
from models.image_classification import TASK, Options, shape_image
from models.images import encode_png
from models.spec import Context

LABELS = ["blue", "green", "red", "yellow"]
LABEL_IDS = {name: i for i, name in enumerate(LABELS)}


def jpeg(image: Image.Image, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    (image.convert(mode) if mode else image).save(out, format="JPEG")
    return out.getvalue()


def tiny(architecture: str):
    cfg = ModelConfig(init={"architecture": architecture, "size": "tiny"})
    processor = TASK.build_processor(cfg, None, iter(()))
    torch.manual_seed(0)
    return TASK.build_model(cfg, None, LABELS, processor).eval(), processor


def run(model, processor, images: list, parameters=None) -> list:
    features = TASK.preprocess({"image": images}, processor, Context(labels=None))
    usable = [i for i, e in enumerate(features.errors) if e is None]
    arrays = {k: [v[i] for i in usable] for k, v in features.arrays.items()}
    inputs = TASK.collate(arrays, processor)
    with torch.no_grad():
        outputs = TASK.forward(model, inputs, parameters or {})
    predictions = TASK.postprocess(outputs, inputs, arrays, model, processor, parameters or {})
    out = [None] * len(images)
    for i, p in zip(usable, predictions):
        out[i] = p
    return out, features.errors


@pytest.mark.parametrize("architecture", ["vit", "convnext"])
def test_training_batch_gives_a_loss_and_error_rows(architecture):
    model, processor = tiny(architecture)
    rng = random.Random(0)
    images = [
        encode_png(shape_image(rng, (200, 0, 0))),
        jpeg(shape_image(rng, (0, 0, 200)), "CMYK"),
        b"not an image",
        None,
        encode_png(shape_image(rng, (0, 200, 0))),
    ]
    batch = {"image": images, "label": ["red", "blue", "red", "red", "purple"]}
    features = TASK.preprocess(batch, processor, Context(labels=LABEL_IDS, train=True, options=Options()))
    assert features.errors[:2] == [None, None]
    assert features.errors[2] == "not an image (unrecognised file format)"
    assert features.errors[3] == "image is null"
    assert features.errors[4] == "unknown label 'purple' (not in the training split)"
    assert features.arrays["labels"][:2] == [2, 0]
    assert features.arrays["pixels"][0].shape == (32, 32, 3) and features.arrays["pixels"][0].dtype == np.uint8
    inputs = TASK.collate({k: v[:2] for k, v in features.arrays.items()}, processor)
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    loss = model(**inputs).loss
    assert torch.isfinite(loss)


def test_augmentations_only_in_training():
    _, processor = tiny("vit")
    image = encode_png(shape_image(random.Random(1), (200, 0, 0), size=(64, 48)))
    batch = {"image": [image] * 6, "label": ["red"] * 6}
    train = TASK.preprocess(batch, processor, Context(labels=LABEL_IDS, train=True, options=Options()))
    evaluate = TASK.preprocess(batch, processor, Context(labels=LABEL_IDS, train=False, options=Options()))
    off = TASK.preprocess(
        batch,
        processor,
        Context(labels=LABEL_IDS, train=True, options=Options(random_resized_crop=None, horizontal_flip=False)),
    )
    assert len({a.tobytes() for a in train.arrays["pixels"]}) > 1
    assert len({a.tobytes() for a in evaluate.arrays["pixels"]}) == 1
    assert all(np.array_equal(a, evaluate.arrays["pixels"][0]) for a in off.arrays["pixels"])


def test_oversized_image_is_an_error_row():
    _, processor = tiny("vit")
    data = type("Data", (), {"max_image_pixels": 1000})()
    big = encode_png(Image.new("RGB", (50, 50)))
    features = TASK.preprocess({"image": [big]}, processor, Context(labels=None, data=data))
    assert features.errors == ["image has 2500 pixels (50x50), more than data.max_image_pixels=1000"]


def test_prediction_format_and_columns():
    model, processor = tiny("vit")
    rng = random.Random(2)
    images = [encode_png(shape_image(rng, (200, 0, 0))), b"\x89PNG broken", encode_png(shape_image(rng, (0, 0, 200)))]
    predictions, errors = run(model, processor, images, {"top_k": 3})
    assert errors[1].startswith("not an image") and predictions[1] is None
    assert [len(p) for p in (predictions[0], predictions[2])] == [3, 3]
    assert predictions[0][0]["score"] >= predictions[0][1]["score"] >= predictions[0][2]["score"]
    assert {p["label"] for p in predictions[0]} <= set(LABELS)
    columns = TASK.to_columns(predictions)
    assert columns["label"][1] is None and columns["label"][0] == predictions[0][0]["label"]
    assert columns["top_k"][2] == predictions[2]
    default, _ = run(model, processor, images[:1])
    assert len(default[0]) == 4  # top 5 by default, capped at the label count


def test_request_inputs():
    assert TASK.request_inputs("aGVsbG8=") == [{"image": "aGVsbG8="}]
    assert TASK.request_inputs([{"image": "a"}, "b"]) == [{"image": "a"}, {"image": "b"}]
    with pytest.raises(UserError, match="unknown field"):
        TASK.request_inputs({"img": "a"})


def test_metrics_accuracy_and_top5():
    metric = TASK.metrics(LABELS, None)
    logits = torch.tensor([[5.0, 1, 0, 0], [0, 5.0, 1, 0], [0, 1, 0, 5.0]])
    metric.update(type("Out", (), {"logits": logits})(), {"labels": torch.tensor([0, 2, 3])}, {})
    values = metric.compute()
    assert values["accuracy"] == pytest.approx(2 / 3) and values["top5_accuracy"] == 1.0  # top-4 of four classes


def test_top5_accuracy_misses_an_answer_ranked_sixth():
    metric = TASK.metrics([f"class{i}" for i in range(7)], None)
    logits = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1]] * 3)
    labels = torch.tensor([0, 4, 5])  # first, fifth and sixth most likely
    metric.update(type("Out", (), {"logits": logits})(), {"labels": labels}, {})
    values = metric.compute()
    assert values["accuracy"] == pytest.approx(1 / 3) and values["top5_accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("architecture", ["vit", "convnext"])
def test_saved_model_loads_in_transformers_pipeline(tmp_path, architecture):
    from transformers import pipeline

    model, processor = tiny(architecture)
    model.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = TASK.load(str(tmp_path))
    image = shape_image(random.Random(3), (0, 200, 0), size=(70, 50))
    ours, _ = run(loaded.eval(), loaded_processor, [encode_png(image)], {"top_k": 4})
    theirs = pipeline("image-classification", model=str(tmp_path), device="cpu")(image, top_k=4)
    assert [p["label"] for p in theirs] == [p["label"] for p in ours[0]]
    assert [p["score"] for p in theirs] == pytest.approx([p["score"] for p in ours[0]], abs=2e-3)


def test_a_saved_checkpoint_is_a_source_with_a_new_head(tmp_path):
    model, processor = tiny("convnext")
    model.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    cfg = ModelConfig(source=str(tmp_path))
    loaded_processor = TASK.build_processor(cfg, str(tmp_path), iter(()))
    assert loaded_processor.size == processor.size and loaded_processor.crop_pct == processor.crop_pct
    again = TASK.build_model(cfg, str(tmp_path), ["cat", "dog"], loaded_processor)
    assert again.config.id2label == {0: "cat", 1: "dog"} and again.classifier.out_features == 2
    body = dict(model.named_parameters())
    assert all(torch.equal(p, body[name]) for name, p in again.named_parameters() if not name.startswith("classifier"))
