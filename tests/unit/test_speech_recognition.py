"""automatic-speech-recognition task spec without Ray: the character vocabulary built from
transcripts, error rows, long clips transcribed in strided windows with bounded memory and the same
text as one pass, and the saved model in `transformers.pipeline`."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from config import DataConfig
from errors import UserError
from models.audio import WINDOWS_PER_FORWARD, decode, wav_bytes
from models.automatic_speech_recognition import LETTERS, TASK, SpeechOptions, build_tokenizer
from models.spec import Context

MODEL_CFG = SimpleNamespace(
    init=SimpleNamespace(architecture="wav2vec2", size="tiny", overrides={}),
    tokenizer=SimpleNamespace(max_train_rows=1000),
    trust_remote_code=False,
)
LOCAL = {"num_hidden_layers": 0}  # no attention: each frame sees only ~0.2 s around it


def build(overrides=None, seed=0):
    torch.manual_seed(seed)
    cfg = SimpleNamespace(
        **{**vars(MODEL_CFG), "init": SimpleNamespace(architecture="wav2vec2", size="tiny", overrides=overrides or {})}
    )
    processor = TASK.build_processor(cfg, None, iter(TASK.demo_data(50, seed=0)))
    return TASK.build_model(cfg, None, [], processor).eval(), processor


def transcribe(model, processor, clips, options=None, calls=None):
    ctx = Context(options=options or SpeechOptions(), data=DataConfig())
    features = TASK.preprocess({"audio": clips}, processor, ctx)
    assert features.errors == [None] * len(clips)
    inputs = TASK.collate(features.arrays, processor)
    runner = model if calls is None else Recording(model, calls)
    with torch.inference_mode():
        outputs = TASK.forward(runner, inputs, {})
    return [p["text"] for p in TASK.postprocess(outputs, inputs, features.arrays, model, processor, {})], features


class Recording:
    """The model, noting how many samples each call hands it."""

    def __init__(self, model, calls: list):
        self.model, self.calls = model, calls

    def __call__(self, **inputs):
        self.calls.append(tuple(inputs["input_values"].shape))
        return self.model(**inputs)


def test_the_vocabulary_holds_every_transcript_character_plus_blank_unknown_and_delimiter(tmp_path):
    from transformers import AutoProcessor

    tokenizer = build_tokenizer(["ab  cd", "Éa b", None, 7], max_rows=100)
    assert tokenizer.get_vocab() == {"[PAD]": 0, "[UNK]": 1, "|": 2, "a": 3, "b": 4, "c": 5, "d": 6, "É": 7}
    assert tokenizer("ab cx").input_ids == [3, 4, 2, 5, 1]  # unseen 'x' -> [UNK]
    _, processor = build()
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert (
        again.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
        and again.feature_extractor.sampling_rate == 16000
    )
    assert again.tokenizer.decode([0, 4, 4, 0, 3, 2, 2, 5]) == "bba c".replace(
        "bb", "b"
    )  # CTC: repeats merge, blanks go
    with pytest.raises(UserError, match="no transcripts"):
        build_tokenizer([None, ""], max_rows=10)


def test_demo_letters_are_distinct_tones_and_transcripts_are_short_words():
    rows = TASK.demo_data(40, seed=1)
    assert all(set(r["text"]) <= set(LETTERS) | {" "} and 2 <= len(r["text"].split()[0]) <= 4 for r in rows)
    assert all(len(decode(r["audio"], 16000)) <= 16000 * 1.1 for r in rows)


def test_bad_rows_get_reasons_and_training_keeps_long_clips_whole():
    _, processor = build()
    good = TASK.demo_data(1, seed=0)[0]
    long = wav_bytes(np.random.default_rng(0).normal(0, 0.1, 16000 * 3))
    batch = {
        "audio": [good["audio"], good["audio"], good["audio"], b"junk", long],
        "text": [good["text"], None, "   ", "ab", "abc  de"],
    }
    ctx = Context(labels={}, train=True, options=SpeechOptions(chunk_length_s=1.0), data=DataConfig())
    features = TASK.preprocess(batch, processor, ctx)
    assert features.errors[:3] == [None, "text is null", "text is empty"]
    assert features.errors[3].startswith("not a readable audio file") and features.errors[4] is None
    assert processor.tokenizer.decode(features.arrays["labels"][0]) == good["text"]
    assert features.arrays["reference"][4] == "abc de" and features.arrays["input_values"][4].shape == (1, 48000)
    inputs = TASK.collate({k: [v[i] for i in (0, 4)] for k, v in features.arrays.items()}, processor)
    assert inputs["labels"].shape == (2, 6) and inputs["labels"][0, len(features.arrays["labels"][0]) :].eq(-100).all()


def test_a_clip_longer_than_a_window_gives_the_same_text_as_one_pass():
    model, processor = build(LOCAL)
    processor.feature_extractor.do_normalize = False  # normalising per window would differ from one pass
    rng = np.random.default_rng(5)
    clip = wav_bytes(
        np.concatenate([0.5 * np.sin(2 * np.pi * rng.uniform(300, 3000) * np.arange(1600) / 16000) for _ in range(40)])
    )  # 4 s of 0.1 s tones
    whole, _ = transcribe(model, processor, [clip], SpeechOptions(chunk_length_s=10))
    calls = []
    windowed, features = transcribe(
        model, processor, [clip], SpeechOptions(chunk_length_s=1.0, stride_length_s=0.2), calls
    )
    assert features.arrays["input_values"][0].shape[0] == 6  # 4 s in 1 s windows starting every 0.6 s
    assert len(whole[0]) > 20  # a random model still says something to compare
    assert windowed == whole


def test_a_ten_minute_file_is_transcribed_a_few_windows_at_a_time():
    model, processor = build({**LOCAL, "hidden_size": 16, "conv_dim": (16, 16, 16, 16)})
    ten_minutes = wav_bytes(np.random.default_rng(0).normal(0, 0.2, 16000 * 600).astype(np.float32))
    calls = []
    texts, features = transcribe(
        model, processor, [ten_minutes], SpeechOptions(chunk_length_s=20, stride_length_s=2), calls
    )
    values = features.arrays["input_values"][0]
    assert values.shape == (38, 320000) and features.lengths == [16000 * 600]
    assert len(calls) == 5 and max(n * width for n, width in calls) <= WINDOWS_PER_FORWARD * 320000
    assert len(texts[0]) > 1000  # 30,000 frames of a random model: a long, non-empty transcript


def test_the_saved_model_transcribes_the_same_in_a_transformers_pipeline_windowed_or_not(tmp_path):
    from transformers import pipeline

    model, processor = build()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = TASK.load(str(tmp_path))
    clips = [r["audio"] for r in TASK.demo_data(3, seed=7)]
    ours, _ = transcribe(loaded.eval(), loaded_processor, clips)
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path))
    assert [asr({"raw": decode(c, 16000), "sampling_rate": 16000})["text"] for c in clips] == ours
    assert any(ours)
    long = np.concatenate([decode(r["audio"], 16000) for r in TASK.demo_data(6, seed=8)])  # a few seconds
    windowed, features = transcribe(
        loaded.eval(), loaded_processor, [wav_bytes(long)], SpeechOptions(chunk_length_s=1.0, stride_length_s=0.2)
    )
    assert features.arrays["input_values"][0].shape[0] >= 3
    assert windowed[0] == asr({"raw": long, "sampling_rate": 16000}, chunk_length_s=1.0, stride_length_s=0.2)["text"]
