"""What the audio tasks share: decoding clips (WAV, FLAC, OGG, MP3 via libsndfile) to mono float32 at
the model's rate, cutting long clips into strided windows, tiny Wav2Vec2 configs, and demo sounds.

Both tasks keep each row's audio as a 2-D array of windows `[n_windows, window_samples]` (one window
for a clip that fits), so collate can flatten the windows of a batch and postprocess can stitch
them back per row. Nothing here imports Ray.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au")
RATE = 16_000  # what from-scratch models and their feature extractors use
ALIGN = 320  # input samples per output frame of every Wav2Vec2 size here (and of hub checkpoints)
WINDOWS_PER_FORWARD = 8  # windows the model sees at once in prediction: bounds memory on long clips

# Sizes for from-scratch runs. "tiny" learns the demo data in a few hundred small steps on a laptop CPU:
# no SpecAugment, dropout or layer drop, since masking 10 of a 1 s clip's 50 frames hides whole letters.
QUIET = dict(
    mask_time_prob=0.0,
    layerdrop=0.0,
    hidden_dropout=0.0,
    activation_dropout=0.0,
    attention_dropout=0.0,
    final_dropout=0.0,
)
WAV2VEC2_SIZES = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        conv_dim=(64, 64, 64, 64),
        conv_stride=(5, 4, 4, 4),
        conv_kernel=(10, 4, 4, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        classifier_proj_size=64,
        **QUIET,
    ),
    "mini": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        conv_dim=(128, 128, 128, 128, 128),
        conv_stride=(5, 4, 2, 2, 4),
        conv_kernel=(10, 4, 3, 3, 4),
        num_conv_pos_embeddings=32,
        num_conv_pos_embedding_groups=8,
        classifier_proj_size=128,
    ),
    "small": dict(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=1536,
        conv_dim=(256,) * 7,
        num_conv_pos_embeddings=64,
        num_conv_pos_embedding_groups=16,
    ),
    "base": dict(),  # Wav2Vec2Config's own defaults: wav2vec2-base
}
# Layer-norm conv features and stable layer norm make a padded batch give the same result as one
# clip alone (group norm would mix the padding into the statistics).
STABLE = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)


class AudioOptions(BaseModel):
    """`task_options` of the audio tasks: how long clips are cut into windows for the model."""

    model_config = ConfigDict(extra="forbid")

    chunk_length_s: float = Field(20.0, gt=0)  # clips longer than this run in windows of this length


class AudioError(ValueError):
    """Why a clip cannot be used, in the words an error row shows."""


def wav2vec2_config(size: str, overrides: dict, **head) -> Wav2Vec2Config:
    return Wav2Vec2Config(**{**WAV2VEC2_SIZES[size], **STABLE, **head, **overrides})


def feature_extractor() -> Wav2Vec2FeatureExtractor:
    """The from-scratch processor: 16 kHz, zero-mean unit-variance per clip, attention masks on."""
    return Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=RATE, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )


def decode(data: bytes, rate: int, max_seconds: float | None = None) -> np.ndarray:
    """A file's bytes -> mono float32 samples at `rate`. Raises AudioError when the file is corrupt,
    empty, in a format libsndfile does not read, or (with `max_seconds`) longer than that."""
    try:
        info = sf.info(io.BytesIO(data))
        if max_seconds is not None and info.frames / info.samplerate > max_seconds:
            raise AudioError(
                f"audio is {info.frames / info.samplerate:.1f} s long, over data.max_audio_seconds="
                f"{max_seconds:g} (data.long_audio: reject)"
            )
        samples, source_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        reason = getattr(exc, "error_string", None) or str(exc).splitlines()[0][:160]  # not the BytesIO's repr
        raise AudioError(f"not a readable audio file ({reason})") from None
    if samples.shape[0] == 0:
        raise AudioError("audio is empty (0 samples)")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if source_rate != rate:
        mono = soxr.resample(mono, source_rate, rate, quality="HQ")
    if not np.isfinite(mono).all():
        raise AudioError("audio holds NaN or infinite samples")
    return np.ascontiguousarray(mono, dtype=np.float32)


def read_clip(value, rate: int, data_cfg) -> tuple[np.ndarray | None, str | None]:
    """A media cell (bytes from the runtime, or None when it could not be fetched) -> (samples, error)."""
    if value is None:
        return None, "audio is missing"
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes):
        return None, f"audio: expected the file's bytes, got {type(value).__name__}"
    reject = data_cfg is not None and data_cfg.long_audio == "reject"
    try:
        return decode(value, rate, data_cfg.max_audio_seconds if reject else None), None
    except AudioError as exc:
        return None, str(exc)


# --- windows ------------------------------------------------------------------------------------


def window_plan(n: int, window: int, left: int, right: int) -> list[tuple[int, int, int, int]]:
    """(start, end, left_context, right_context) windows over `n` samples, as the transformers ASR
    pipeline cuts them with `chunk_length_s`/`stride_length_s`: each window overlaps its neighbours
    by the context, whose frames are dropped again when stitching. One window when it all fits."""
    if n <= window:
        return [(0, n, 0, 0)]
    step = window - left - right
    plan = []
    for start in range(0, n, step):
        end = min(start + window, n)
        last = end >= n
        if end - start > (left if start else 0):
            plan.append((start, end, left if start else 0, 0 if last else right))
        if last:
            break
    return plan


def windows(samples: np.ndarray, plan, processor) -> tuple[np.ndarray, np.ndarray]:
    """Normalised windows as one `[n, longest]` float32 array (zero-padded) and their `[n, 3]`
    (samples, left, right) table."""
    pieces = [samples[s:e] for s, e, _, _ in plan]
    if getattr(processor, "do_normalize", False):
        pieces = [(p - p.mean()) / np.sqrt(p.var() + 1e-7) for p in pieces]  # Wav2Vec2FeatureExtractor's formula
    out = np.zeros((len(pieces), max(len(p) for p in pieces)), dtype=np.float32)
    for i, p in enumerate(pieces):
        out[i, : len(p)] = p
    spans = np.asarray([(e - s, left, right) for s, e, left, right in plan], dtype=np.int64)
    return out, spans


def aligned(seconds: float, rate: int, align: int) -> int:
    return max(align, int(round(seconds * rate / align)) * align)


def collate_windows(rows: list[np.ndarray], spans: list[np.ndarray], processor) -> dict[str, torch.Tensor]:
    """Every window of every row, in order, padded to the longest: `input_values`, and
    `attention_mask` when the processor asks for one (checkpoints with group-norm features do not)."""
    lengths = [int(n) for s in spans for n in s[:, 0]]
    values = torch.zeros((len(lengths), max(lengths)), dtype=torch.float32)
    mask = torch.zeros((len(lengths), max(lengths)), dtype=torch.long)
    k = 0
    for row, span in zip(rows, spans):
        for j in range(len(span)):
            n = int(span[j, 0])
            values[k, :n] = torch.from_numpy(np.asarray(row[j, :n], dtype=np.float32))
            mask[k, :n] = 1
            k += 1
    if getattr(processor, "return_attention_mask", True):
        return {"input_values": values, "attention_mask": mask}
    return {"input_values": values}


def forward_in_groups(model, inputs: dict) -> torch.Tensor:
    """The logits of `model` over at most WINDOWS_PER_FORWARD windows at a time, concatenated
    (padded along time to the longest group), so a ten-minute clip never meets the model at once."""
    values, mask = inputs["input_values"], inputs.get("attention_mask")
    logits = []
    for start in range(0, values.shape[0], WINDOWS_PER_FORWARD):
        part = slice(start, start + WINDOWS_PER_FORWARD)
        width = int(mask[part].sum(-1).max()) if mask is not None else values.shape[1]  # this group's longest
        group = {key: value[part, :width] for key, value in inputs.items() if key != "labels"}
        logits.append(model(**group).logits)
    if logits[0].dim() == 2:
        return torch.cat(logits)
    longest = max(x.shape[1] for x in logits)
    return torch.cat([torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[1])) for x in logits])


# --- demo sounds ----------------------------------------------------------------------------------


def tone(
    rng: np.random.Generator, seconds: float, start_hz: float, end_hz: float | None = None, rate: int = RATE
) -> np.ndarray:
    """A sine (or a linear chirp to `end_hz`) with 5 ms fades, at a random phase."""
    n = max(1, int(seconds * rate))
    hz = np.linspace(start_hz, end_hz if end_hz is not None else start_hz, n)
    phase = 2 * np.pi * np.cumsum(hz) / rate + rng.uniform(0, 2 * np.pi)
    wave = np.sin(phase)
    fade = min(n // 2, int(0.005 * rate))
    if fade:
        ramp = np.linspace(0, 1, fade)
        wave[:fade] *= ramp
        wave[-fade:] *= ramp[::-1]
    return wave


def wav_bytes(samples: np.ndarray, rate: int = RATE, fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(samples, -1, 1).astype(np.float32), rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


def with_noise(rng: np.random.Generator, wave: np.ndarray, level: float = 0.05) -> np.ndarray:
    return wave * rng.uniform(0.3, 0.9) + rng.normal(0, level, wave.shape)
