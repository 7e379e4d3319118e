"""Decoding and windowing that both audio tasks share (models/audio.py): ordinary recordings at any
rate and channel count come out as 16 kHz mono; broken, empty and over-long files give reasons."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from config import DataConfig
from models.audio import AudioError, decode, feature_extractor, read_clip, window_plan, windows


def encoded(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def sine(hz: float, seconds: float, rate: int) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def dominant_hz(samples: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize(
    "rate, channels, fmt",
    [
        (8000, 1, "FLAC"),
        (44100, 2, "WAV"),
        (48000, 1, "WAV"),
        (22050, 2, "OGG"),
        (16000, 1, "FLAC"),
        (32000, 6, "WAV"),
    ],
)
def test_recordings_at_any_rate_and_channel_count_become_16k_mono_with_their_pitch(rate, channels, fmt):
    tone = sine(440, 0.5, rate)
    data = encoded(np.stack([tone] * channels, axis=1) if channels > 1 else tone, rate, fmt)
    out = decode(data, 16000)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 8000) <= 2  # 0.5 s at 16 kHz
    assert abs(dominant_hz(out) - 440) < 5
    assert 0.3 < np.abs(out).max() < 0.6  # channels averaged, not summed


def test_stereo_is_mixed_down_by_averaging_the_channels():
    left, right = sine(300, 0.25, 16000), np.zeros(4000, np.float32)
    out = decode(encoded(np.stack([left, right], axis=1), 16000, "WAV", "FLOAT"), 16000)
    np.testing.assert_allclose(out, left / 2, atol=1e-6)


def test_mp3_decodes_where_libsndfile_reads_it():
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile has no MP3 support")
    out = decode(encoded(sine(440, 0.5, 44100), 44100, "MP3"), 16000)
    assert abs(dominant_hz(out) - 440) < 10


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"RIFF\x00\x00\x00\x00WAVEfmt garbage", "not a readable audio file"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not a readable audio file"),
        (b"", "not a readable audio file"),
    ],
)
def test_corrupt_and_unsupported_files_give_a_reason(data, reason):
    with pytest.raises(AudioError, match=reason):
        decode(data, 16000)


def test_a_zero_length_file_is_empty_audio():
    with pytest.raises(AudioError, match=r"audio is empty \(0 samples\)"):
        decode(encoded(np.zeros(0, np.float32), 16000, "WAV"), 16000)


def test_over_long_clips_are_rejected_before_decoding_or_kept_whole_for_chunking():
    data = encoded(sine(200, 3.0, 8000), 8000, "FLAC")
    samples, why = read_clip(data, 16000, DataConfig(max_audio_seconds=2, long_audio="reject"))
    assert samples is None and why == "audio is 3.0 s long, over data.max_audio_seconds=2 (data.long_audio: reject)"
    samples, why = read_clip(data, 16000, DataConfig(max_audio_seconds=2, long_audio="chunk"))
    assert why is None and len(samples) == 48000


def test_cells_that_are_not_file_bytes_are_errors():
    assert read_clip(None, 16000, DataConfig()) == (None, "audio is missing")
    assert read_clip("clip.wav", 16000, DataConfig())[1] == "audio: expected the file's bytes, got str"


def test_windows_cover_the_clip_with_context_that_is_dropped_again():
    plan = window_plan(100_000, 32_000, 3200, 3200)
    assert plan[0] == (0, 32_000, 0, 3200) and plan[-1][1] == 100_000 and plan[-1][3] == 0
    kept = []  # the samples each window answers for, once its context is dropped
    for start, end, left, right in plan:
        kept.append((start + left, end - right))
    assert kept[0][0] == 0 and kept[-1][1] == 100_000
    assert all(a[1] == b[0] for a, b in zip(kept, kept[1:]))  # no gap, no overlap
    assert window_plan(16_000, 32_000, 3200, 3200) == [(0, 16_000, 0, 0)]


def test_windows_are_normalised_like_the_feature_extractor_does():
    rng = np.random.default_rng(0)
    samples = rng.normal(0.3, 2.0, 5000).astype(np.float32)
    extractor = feature_extractor()
    values, spans = windows(samples, [(0, 5000, 0, 0)], extractor)
    expected = extractor(samples, sampling_rate=16000).input_values[0]
    np.testing.assert_allclose(values[0], expected, atol=1e-5)
    assert spans.tolist() == [[5000, 0, 0]]
