"""automatic-speech-recognition: clip -> transcript, Wav2Vec2 with a CTC head over characters.

Input `audio` (WAV/FLAC/OGG/MP3: bytes, a path or URI; an audio folder with a metadata.csv/jsonl),
training transcript `text`. From-scratch runs build a character vocabulary from the training
transcripts (`|` between words, `[UNK]`, `[PAD]` as the CTC blank) and save it with the processor;
pretrained sources keep their own. Prediction cuts a clip longer than `task_options.chunk_length_s`
into windows with `stride_length_s` of context on each side (as the transformers pipeline does),
runs them a few at a time, and stitches the CTC frames back before decoding, so a ten-minute file
needs no more memory than a few windows. Output as `transformers.pipeline("automatic-speech-recognition")`:
`{"text"}`. Metrics: WER and CER.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import TYPE_CHECKING

import numpy as np
import torch
from pydantic import Field
from transformers import (
    AutoFeatureExtractor,
    AutoModelForCTC,
    AutoProcessor,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2ForCTC,
    Wav2Vec2Processor,
)

from config import ModelConfig
from errors import UserError
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
from models.eval_views import Examples, clipped
from models.parameters import sanitize
from models.spec import Column, Features, StreamingMetric, TaskSpec, View, one_field_rows

if TYPE_CHECKING:
    from transformers import ProcessorMixin  # noqa: F401  (named in the TaskSpec base below)

PAD, UNK, DELIMITER = "[PAD]", "[UNK]", "|"


class SpeechOptions(AudioOptions):
    stride_length_s: float | None = Field(None, ge=0)  # context on each side of a window; default chunk_length_s/6


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def build_tokenizer(transcripts, max_rows: int) -> Wav2Vec2CTCTokenizer:
    """A character vocabulary from the training transcripts: [PAD] (the CTC blank), [UNK], | then
    every character seen, in a stable order."""
    chars: set[str] = set()
    for k, text in enumerate(transcripts):
        if k >= max_rows:
            break
        if isinstance(text, str):
            chars.update(normalise(text).replace(" ", DELIMITER))
    chars.discard(DELIMITER)
    if not chars:
        raise UserError("data.train: no transcripts in column 'text' to build the character vocabulary from")
    vocab = {PAD: 0, UNK: 1, DELIMITER: 2, **{c: i + 3 for i, c in enumerate(sorted(chars))}}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "vocab.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        return Wav2Vec2CTCTokenizer(
            path, bos_token=None, eos_token=None, unk_token=UNK, pad_token=PAD, word_delimiter_token=DELIMITER
        )


def kept_frames(n_samples: int, left: int, right: int, frames: int) -> slice:
    """The CTC frames of one window that belong to it, its context strides dropped (the transformers
    pipeline's `rescale_stride`, capped at the frames the convolutions really produced)."""
    token_n = int(round(n_samples / ALIGN))
    start = int(round(left / n_samples * token_n))
    return slice(start, min(token_n - int(round(right / n_samples * token_n)), frames))


def transcripts(logits: torch.Tensor, spans: list[np.ndarray], model, tokenizer) -> list[str]:
    """Per-window CTC logits -> one transcript per row: stitched frames, greedy CTC decoding."""
    lengths = torch.as_tensor([int(n) for s in spans for n in s[:, 0]])
    frames = model._get_feat_extract_output_lengths(lengths).tolist()
    ids = logits.argmax(-1)
    texts, k = [], 0
    for span in spans:
        pieces = []
        for n, left, right in span.tolist():
            pieces.append(ids[k, kept_frames(n, left, right, frames[k])])
            k += 1
        texts.append(tokenizer.decode(torch.cat(pieces).tolist()))
    return texts


class ErrorRates(StreamingMetric):
    """Word and character error rates over the eval split; the report shows a few transcripts."""

    def __init__(self):
        from torchmetrics.text import CharErrorRate, WordErrorRate  # only where metrics are computed

        self.wer, self.cer = WordErrorRate(), CharErrorRate()
        self.model = self.tokenizer = None
        self.examples = Examples()

    def bind(self, model, processor):
        self.model, self.tokenizer = model, processor.tokenizer

    def to(self, device):
        self.wer, self.cer = self.wer.to(device), self.cer.to(device)
        return self

    def update(self, outputs, inputs, arrays):
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        predicted = transcripts(logits, arrays["spans"], self.model, self.tokenizer)
        self.wer.update(predicted, list(arrays["reference"]))
        self.cer.update(predicted, list(arrays["reference"]))
        for reference, transcript in list(zip(arrays["reference"], predicted))[: self.examples.room()]:
            self.examples.add({"reference": str(reference), "transcript": transcript})

    def compute(self):
        return {"wer": float(self.wer.compute()), "cer": float(self.cer.compute())}

    def views(self):
        if not self.examples.items:
            return []
        from torchmetrics.functional.text import word_error_rate

        rows = [
            [clipped(e["reference"]), clipped(e["transcript"]), float(word_error_rate(e["transcript"], e["reference"]))]
            for e in self.examples.items
        ]
        note = "The first eval clips: what was said, what the model wrote (greedy CTC decoding), and its WER."
        return [View("Examples", note, ["reference", "transcript", "WER"], rows)]


class SpeechRecognition(TaskSpec["ProcessorMixin"]):
    name = "automatic-speech-recognition"
    architectures = ("wav2vec2",)
    columns = (
        Column("audio", "the clip: WAV, FLAC, OGG or MP3 (bytes, a path or URI; base64 in requests)", kind="media"),
        Column("text", "the transcript", training_only=True),
    )
    label_column = None
    best_metric = "wer"
    best_metric_mode = "min"
    output_columns = {"text": "string"}
    Options = SpeechOptions
    media_suffixes = AUDIO_SUFFIXES

    # --- processor and model ----------------------------------------------------------------
    def build_processor(self, model_cfg: ModelConfig, source_dir, train_rows):
        if source_dir and os.path.exists(os.path.join(source_dir, "vocab.json")):
            return AutoProcessor.from_pretrained(source_dir)  # a fine-tuned checkpoint: its own vocabulary
        extractor = AutoFeatureExtractor.from_pretrained(source_dir) if source_dir else feature_extractor()
        tokenizer = build_tokenizer((row.get("text") for row in train_rows), model_cfg.tokenizer.max_train_rows)
        return Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)

    def build_model(self, model_cfg: ModelConfig, source_dir, labels, processor):
        head = dict(
            vocab_size=len(processor.tokenizer),
            pad_token_id=processor.tokenizer.pad_token_id,
            ctc_loss_reduction="mean",
            ctc_zero_infinity=True,
        )
        if source_dir:
            return AutoModelForCTC.from_pretrained(
                source_dir,
                **head,
                ignore_mismatched_sizes=True,  # a new head for a new vocabulary
                trust_remote_code=model_cfg.trust_remote_code,
                use_safetensors=True,
            )
        init = model_cfg.init
        return Wav2Vec2ForCTC(wav2vec2_config(init.size, init.overrides, **head))

    def load(self, model_dir):
        return AutoModelForCTC.from_pretrained(model_dir, use_safetensors=True), AutoProcessor.from_pretrained(
            model_dir
        )

    # --- preprocess / collate / postprocess -------------------------------------------------
    def preprocess(self, batch, processor, ctx):
        options = ctx.options or SpeechOptions()
        extractor, tokenizer = processor.feature_extractor, processor.tokenizer
        rate = extractor.sampling_rate
        window = aligned(options.chunk_length_s, rate, ALIGN)
        stride = options.stride_length_s if options.stride_length_s is not None else options.chunk_length_s / 6
        context = min(aligned(stride, rate, ALIGN), (window - ALIGN) // 2 // ALIGN * ALIGN)
        supervised = ctx.labels is not None  # training and eval: transcripts are targets
        n = len(batch["audio"])
        arrays: dict[str, list] = {"input_values": [None] * n, "spans": [None] * n}
        if supervised:
            arrays["labels"], arrays["reference"] = [None] * n, [None] * n
        lengths, errors = [0] * n, [None] * n
        for i in range(n):
            if supervised:
                text = batch["text"][i] if "text" in batch else None
                if not isinstance(text, str) or not text.strip():
                    errors[i] = (
                        "text is null"
                        if text is None
                        else "text is empty"
                        if isinstance(text, str)
                        else f"text is not a string (got {type(text).__name__})"
                    )
                    continue
                arrays["reference"][i] = normalise(text)
                arrays["labels"][i] = tokenizer(arrays["reference"][i]).input_ids
            samples, errors[i] = read_clip(batch["audio"][i], rate, ctx.data)
            if samples is None:
                continue
            # targets cannot be split between windows, so training and eval see whole clips
            plan = [(0, len(samples), 0, 0)] if supervised else window_plan(len(samples), window, context, context)
            arrays["input_values"][i], arrays["spans"][i] = windows(samples, plan, extractor)
            lengths[i] = len(samples)
        return Features(arrays=arrays, lengths=lengths, errors=errors, flags=[None] * n)

    def collate(self, arrays, processor):
        inputs = collate_windows(arrays["input_values"], arrays["spans"], processor.feature_extractor)
        if arrays.get("labels") is not None:
            width = max(len(ids) for ids in arrays["labels"])
            labels = torch.full((len(arrays["labels"]), width), -100, dtype=torch.long)
            for i, ids in enumerate(arrays["labels"]):
                labels[i, : len(ids)] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
            inputs["labels"] = labels
        return inputs

    def forward(self, model, inputs, parameters):
        return forward_in_groups(model, inputs)

    def sanitize_parameters(self, parameters, options):
        """No parameters: any key is refused."""
        return sanitize(parameters, {}, f"parameter of {self.name}")

    def postprocess(self, outputs, inputs, arrays, model, processor, parameters):
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        return [{"text": text} for text in transcripts(logits, arrays["spans"], model, processor.tokenizer)]

    def to_columns(self, predictions):
        return {"text": [p["text"] if p else None for p in predictions]}

    def metrics(self, labels, options):
        return ErrorRates()

    def request_inputs(self, inputs):
        return one_field_rows(inputs, "audio", "'audio' (base64 or a data: URL)")

    # --- demo data --------------------------------------------------------------------------
    def demo_data(self, n, seed):
        """Spoken words of a made-up alphabet: each letter is a tone burst of its own pitch (6 letters,
        350-3670 Hz), 60-80 ms long, 15 ms apart, words 150 ms apart; 1-2 words of 2-4 letters per clip."""
        rng = np.random.default_rng(seed)
        rows = []
        for i in range(n):
            words = []
            for _ in range(int(rng.integers(1, 3))):
                word = ""
                for _ in range(int(rng.integers(2, 5))):
                    word += str(rng.choice([c for c in LETTERS if not word or c != word[-1]]))
                words.append(word)
            pieces = [np.zeros(int(rng.uniform(0.02, 0.08) * 16000))]
            for w, word in enumerate(words):
                if w:
                    pieces.append(np.zeros(int(0.15 * 16000)))
                for letter in word:
                    pieces.append(tone(rng, rng.uniform(*LETTER_SECONDS), LETTERS[letter] * rng.uniform(0.97, 1.03)))
                    pieces.append(np.zeros(int(0.015 * 16000)))
            wave = with_noise(rng, np.concatenate(pieces), level=0.02)
            rows.append({"id": f"utt-{seed}-{i}", "audio": wav_bytes(wave), "text": " ".join(words)})
        return rows


LETTERS = {c: 350 * 1.6**k for k, c in enumerate("abcdef")}  # 350-3670 Hz, far enough apart to learn fast
LETTER_SECONDS = (0.06, 0.08)
TASK = SpeechRecognition()
