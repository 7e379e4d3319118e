"""audio-classification task spec without Ray: error rows, windows of long clips, padding that does
not change a clip's scores, and the saved model in `transformers.pipeline`."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from config import DataConfig
from errors import UserError
from models.audio import AudioOptions, decode, wav_bytes
from models.audio_classification import TASK
from models.spec import Context
from pipelines.media import decode_request_value

LABELS = ["beeps", "high", "low", "rising"]
MODEL_CFG = SimpleNamespace(
    init=SimpleNamespace(architecture="wav2vec2", size="tiny", overrides={}), trust_remote_code=False
)


@pytest.fixture(scope="module")
def model_and_processor():
    torch.manual_seed(0)
    processor = TASK.build_processor(MODEL_CFG, None, iter([]))
    model = TASK.build_model(MODEL_CFG, None, LABELS, processor).eval()
    return model, processor


def predict(model, processor, rows, ctx=None, parameters=None):
    features = TASK.preprocess({"audio": rows}, processor, ctx or Context(data=DataConfig()))
    ok = [i for i, e in enumerate(features.errors) if e is None]
    arrays = {k: [v[i] for i in ok] for k, v in features.arrays.items()}
    inputs = TASK.collate(arrays, processor)
    with torch.inference_mode():
        outputs = TASK.forward(model, inputs, parameters or {})
    return TASK.postprocess(outputs, inputs, arrays, model, processor, parameters or {}), features


def test_demo_clips_are_wav_files_with_four_balanced_labels():
    rows = TASK.demo_data(80, seed=3)
    assert {r["label"] for r in rows} == set(LABELS)
    assert all(0.3 <= len(decode(r["audio"], 16000)) / 16000 <= 0.9 for r in rows)
    assert TASK.demo_data(5, seed=3)[0]["audio"] == rows[0]["audio"]  # same seed, same data


def test_bad_rows_get_reasons_and_good_rows_get_features(model_and_processor):
    _, processor = model_and_processor
    good = TASK.demo_data(1, seed=0)[0]
    batch = {
        "audio": [good["audio"], b"not audio", None, good["audio"], good["audio"], wav_bytes(np.zeros(0))],
        "label": [good["label"], "low", "low", None, "purple", "high"],
    }
    ctx = Context(labels={label: i for i, label in enumerate(LABELS)}, train=True, data=DataConfig())
    features = TASK.preprocess(batch, processor, ctx)
    assert features.errors[0] is None and features.arrays["label_id"][0] == LABELS.index(good["label"])
    assert features.errors[1].startswith("not a readable audio file")
    assert features.errors[2] == "audio is missing"
    assert features.errors[3] == "label is null"
    assert features.errors[4] == "unknown label 'purple' (not in the training split)"
    assert features.errors[5] == "audio is empty (0 samples)"
    assert features.lengths[0] == len(decode(good["audio"], 16000))


def test_a_long_clip_is_scored_in_windows_and_each_window_learns_the_clip_label(model_and_processor):
    model, processor = model_and_processor
    rng = np.random.default_rng(0)
    long = wav_bytes(rng.normal(0, 0.1, 16000 * 5))
    ctx = Context(
        labels={label: i for i, label in enumerate(LABELS)}, options=AudioOptions(chunk_length_s=2.0), data=DataConfig()
    )
    features = TASK.preprocess({"audio": [long], "label": ["low"]}, processor, ctx)
    assert features.arrays["input_values"][0].shape == (3, 32000)  # 2 s + 2 s + 1 s
    inputs = TASK.collate(features.arrays, processor)
    assert inputs["input_values"].shape == (3, 32000) and inputs["labels"].tolist() == [2, 2, 2]
    assert inputs["attention_mask"][2].sum() == 16000
    assert model(**inputs).loss.isfinite()


def test_a_clip_scores_the_same_alone_and_padded_in_a_batch(model_and_processor):
    model, processor = model_and_processor
    rows = [r["audio"] for r in TASK.demo_data(4, seed=1)]
    together, _ = predict(model, processor, rows, parameters={"top_k": 4})
    for row, expected in zip(rows, together):
        alone, _ = predict(model, processor, [row], parameters={"top_k": 4})
        assert [p["label"] for p in alone[0]] == [p["label"] for p in expected]
        assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(alone[0], expected))


def test_predictions_take_the_pipeline_format_and_top_k(model_and_processor):
    model, processor = model_and_processor
    rows = [r["audio"] for r in TASK.demo_data(2, seed=2)]
    ranked, _ = predict(model, processor, rows)
    assert len(ranked[0]) == 4 and set(ranked[0][0]) == {"label", "score"}  # top 5 of 4 labels
    assert abs(sum(p["score"] for p in ranked[0]) - 1) < 1e-5
    assert [p["score"] for p in ranked[0]] == sorted((p["score"] for p in ranked[0]), reverse=True)
    two, _ = predict(model, processor, rows, parameters={"top_k": 2})
    assert two[1] == ranked[1][:2]
    columns = TASK.to_columns([ranked[0], None, two[1]])
    assert columns == {
        "label": [ranked[0][0]["label"], None, two[1][0]["label"]],
        "score": [ranked[0][0]["score"], None, two[1][0]["score"]],
        "top_k": [ranked[0], None, two[1]],
    }


def test_requests_take_base64_strings_or_audio_fields():
    assert TASK.request_inputs("UklGRg==") == [{"audio": "UklGRg=="}]
    assert TASK.request_inputs([{"audio": "a"}, "b"]) == [{"audio": "a"}, {"audio": "b"}]
    with pytest.raises(UserError, match="unknown field"):
        TASK.request_inputs({"wave": "a"})
    # a value that is not base64 text passes through; the runtime refuses that row with a reason (422 over HTTP)
    assert TASK.request_inputs(12) == [{"audio": 12}]
    with pytest.raises(UserError, match="expected base64 file content, got int"):
        decode_request_value(12, None, "audio")


def test_the_saved_model_answers_the_same_in_a_transformers_pipeline(model_and_processor, tmp_path):
    from transformers import pipeline

    model, processor = model_and_processor
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = TASK.load(str(tmp_path))
    rows = [r["audio"] for r in TASK.demo_data(3, seed=4)]
    ours, _ = predict(loaded.eval(), loaded_processor, rows, parameters={"top_k": 4})
    classify = pipeline("audio-classification", model=str(tmp_path))
    for row, mine in zip(rows, ours):
        theirs = classify({"raw": decode(row, 16000), "sampling_rate": 16000}, top_k=4)
        assert [p["label"] for p in theirs] == [p["label"] for p in mine]
        assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(theirs, mine))
