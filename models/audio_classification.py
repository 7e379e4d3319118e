"""audio-classification: one label per clip, Wav2Vec2 with a pooled sequence-classification head.

Input `audio` (a WAV/FLAC/OGG/MP3 file: bytes, a path or URI; an audio folder with one sub-folder per
class), training label `label`. Clips are decoded, mixed to mono and resampled to the model's rate in
`preprocess`; a clip longer than `task_options.chunk_length_s` is scored in windows whose class
probabilities are averaged (training sees each window with the clip's label). Output as
`transformers.pipeline("audio-classification")`: the top-k `{label, score}` list (`parameters.top_k`,
default 5); Parquet gets `label`, `score` and `top_k`. Metrics: accuracy and macro-F1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoModelForAudioClassification, Wav2Vec2ForSequenceClassification

from config import ModelConfig
from models.audio import (
    ALIGN,
    AUDIO_SUFFIXES,
    AudioOptions,
    aligned,
    collate_windows,
    feature_extractor,
    forward_in_groups,
    read_clip,
    tone,
    wav2vec2_config,
    wav_bytes,
    window_plan,
    windows,
    with_noise,
)
from models.classification import (
    TOP_K_TYPE,
    ClassificationMetric,
    label_maps,
    label_value,
    ranked_labels,
    top_k_columns,
)
from models.parameters import TOP_K, sanitize
from models.spec import Column, Features, TaskSpec, one_field_rows

if TYPE_CHECKING:
    from transformers import SequenceFeatureExtractor  # noqa: F401  (named in the TaskSpec base below)


def clip_probabilities(logits: torch.Tensor, spans: list[np.ndarray]) -> torch.Tensor:
    """Per-window logits -> per-clip class probabilities (the mean over a clip's windows)."""
    probs = logits.float().softmax(-1)
    counts = [len(s) for s in spans]
    return torch.stack([part.mean(0) for part in probs.split(counts)])


class ClipClassificationMetric(ClassificationMetric):
    """Accuracy and macro-F1 per clip, not per window: a long clip is scored once. The report's examples
    show each clip by its length (its bytes and name stay with the data, not with the eval's features)."""

    example_column = "clip"
    example_note = "A clip is shown by its length, and by its windows when longer than task_options.chunk_length_s."

    def update(self, outputs, inputs, arrays):
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        probs = clip_probabilities(logits, arrays["spans"])
        truth = torch.as_tensor(np.asarray(arrays["label_id"], dtype=np.int64), device=probs.device)
        self.add(probs, truth, inputs, arrays)

    def example(self, i, inputs, arrays):
        span = np.asarray(arrays["spans"][i])  # one (samples, left, right) row per window; windows do not overlap
        return int(span[:, 0].sum()), len(span)

    def described(self, kept):
        samples, windows = kept
        return f"{samples / self.processor.sampling_rate:.2f} s" + (f" ({windows} windows)" if windows > 1 else "")


class AudioClassification(TaskSpec["SequenceFeatureExtractor"]):
    name = "audio-classification"
    architectures = ("wav2vec2",)
    columns = (
        Column("audio", "the clip: WAV, FLAC, OGG or MP3 (bytes, a path or URI; base64 in requests)", kind="media"),
        Column(
            "label", "the class, a string or an int (in an audio folder: the sub-folder's name)", training_only=True
        ),
    )
    label_column = "label"
    best_metric = "accuracy"
    best_metric_mode = "max"
    output_columns = {"label": "string", "score": "float64", "top_k": TOP_K_TYPE}
    Options = AudioOptions
    media_suffixes = AUDIO_SUFFIXES

    # --- processor and model ----------------------------------------------------------------
    def build_processor(self, model_cfg: ModelConfig, source_dir, train_rows):
        if source_dir:
            return AutoFeatureExtractor.from_pretrained(source_dir)
        return feature_extractor()

    def build_model(self, model_cfg: ModelConfig, source_dir, labels, processor):
        id2label, label2id = label_maps(labels)
        if source_dir:
            return AutoModelForAudioClassification.from_pretrained(
                source_dir,
                num_labels=len(labels),
                id2label=id2label,
                label2id=label2id,
                ignore_mismatched_sizes=True,  # a new head on a checkpoint trained for other labels
                trust_remote_code=model_cfg.trust_remote_code,
                use_safetensors=True,
            )
        init = model_cfg.init
        config = wav2vec2_config(
            init.size, init.overrides, num_labels=len(labels), id2label=id2label, label2id=label2id
        )
        return Wav2Vec2ForSequenceClassification(config)

    def load(self, model_dir):
        model = AutoModelForAudioClassification.from_pretrained(model_dir, use_safetensors=True)
        return model, AutoFeatureExtractor.from_pretrained(model_dir)

    # --- preprocess / collate / postprocess -------------------------------------------------
    def preprocess(self, batch, processor, ctx):
        options = ctx.options or AudioOptions()
        rate = processor.sampling_rate
        window = aligned(options.chunk_length_s, rate, ALIGN)
        n = len(batch["audio"])
        arrays: dict[str, list] = {"input_values": [None] * n, "spans": [None] * n}
        if ctx.labels is not None:
            arrays["label_id"] = [None] * n
        lengths, errors = [0] * n, [None] * n
        for i in range(n):
            if ctx.labels is not None:
                label = label_value(batch["label"][i]) if "label" in batch else None
                if label is None:
                    errors[i] = "label is null"
                    continue
                if label not in ctx.labels:
                    errors[i] = f"unknown label {label!r} (not in the training split)"
                    continue
                arrays["label_id"][i] = ctx.labels[label]
            samples, errors[i] = read_clip(batch["audio"][i], rate, ctx.data)
            if samples is None:
                continue
            arrays["input_values"][i], arrays["spans"][i] = windows(
                samples, window_plan(len(samples), window, 0, 0), processor
            )
            lengths[i] = len(samples)
        return Features(arrays=arrays, lengths=lengths, errors=errors, flags=[None] * n)

    def collate(self, arrays, processor):
        inputs = collate_windows(arrays["input_values"], arrays["spans"], processor)
        if arrays.get("label_id") is not None:  # every window of a clip learns the clip's label
            inputs["labels"] = torch.as_tensor(
                [label for label, span in zip(arrays["label_id"], arrays["spans"]) for _ in range(len(span))],
                dtype=torch.long,
            )
        return inputs

    def forward(self, model, inputs, parameters):
        return forward_in_groups(model, inputs)

    def sanitize_parameters(self, parameters, options):
        """`top_k` (1-100): how many labels to list."""
        return sanitize(parameters, {"top_k": TOP_K}, f"parameter of {self.name}")

    def postprocess(self, outputs, inputs, arrays, model, processor, parameters):
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        probs = clip_probabilities(logits, arrays["spans"])
        return ranked_labels(probs, model.config.id2label, int(parameters.get("top_k") or 5))

    def to_columns(self, predictions):
        return top_k_columns(predictions)

    def metrics(self, labels, options):
        return ClipClassificationMetric(labels)

    def request_inputs(self, inputs):
        return one_field_rows(inputs, "audio", "'audio' (base64 or a data: URL)")

    # --- demo data --------------------------------------------------------------------------
    def demo_data(self, n, seed):
        """Four sound shapes with jittered pitch, length, loudness and noise: steady low, steady
        high, a rising chirp, and beeps. Clips of 0.3-0.9 s as 16 kHz WAV bytes."""
        rng = np.random.default_rng(seed)
        rows = []
        for i in range(n):
            label = ["low", "high", "rising", "beeps"][int(rng.integers(4))]
            length = rng.uniform(0.3, 0.9)
            jitter = rng.uniform(0.85, 1.15)
            if label == "low":
                wave = tone(rng, length, 400 * jitter)
            elif label == "high":
                wave = tone(rng, length, 2400 * jitter)
            elif label == "rising":
                wave = tone(rng, length, 500 * jitter, 2500 * jitter)
            else:
                wave = tone(rng, length, 1000 * jitter)
                gate = (np.arange(len(wave)) // int(0.06 * 16000)) % 2 == 0
                wave = wave * gate
            rows.append({"id": f"clip-{seed}-{i}", "audio": wav_bytes(with_noise(rng, wave)), "label": label})
        return rows


TASK = AudioClassification()
