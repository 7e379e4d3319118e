"""The keys that say what a job reads: `model` (a pretrained source or a from-scratch init), `storage`
(the object store) and `data` (splits, columns, labels and the limits on media files)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from config.section import Section

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # data.max_image_pixels unless set: Pillow's own bomb limit


class TokenizerConfig(Section):
    """Only for from-scratch runs: the tokenizer trained on the training split."""

    vocab_size: int = Field(
        4000, ge=100, description="Vocabulary size of the WordPiece/BPE tokenizer trained on the training split."
    )
    lowercase: bool = Field(True, description="Lowercase text before training and applying that tokenizer.")
    max_train_rows: int = Field(
        100_000, ge=1, description="Training rows the tokenizer (or a CTC vocabulary) is built from."
    )


class ModelInit(Section):
    architecture: str = Field(
        description="From-scratch architecture, one the task lists in `rayformers tasks` (bert, vit, detr, ...)."
    )
    size: Literal["tiny", "mini", "small", "base"] = Field("tiny", description="Size preset of the from-scratch model.")
    overrides: dict[str, Any] = Field(
        {}, description="Keys of the transformers config to set on top of the preset (e.g. num_hidden_layers)."
    )


class ModelConfig(Section):
    source: str | None = Field(None, description="Hub id, local HF directory, or s3://… HF directory.")
    init: ModelInit | None = Field(None, description="From-scratch: architecture + size preset.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub id in model.source.")
    trust_remote_code: bool = Field(False, description="Run a hub model's own Python code; off unless asked.")
    max_length: int | None = Field(
        None, ge=8, description="Longest input in tokens (text tasks); longer rows are truncated and flagged."
    )
    tokenizer: TokenizerConfig = Field(
        TokenizerConfig(), description="The tokenizer trained for from-scratch text runs."
    )


class StorageConfig(Section):
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, R2, Ceph); else AWS_ENDPOINT_URL."
    )
    region: str | None = Field(None, description="Object-store region; else the standard AWS chain decides.")
    anonymous: bool = Field(False, description="Read public buckets without credentials.")


class DataConfig(Section):
    train: str | None = Field(None, description="Training split: a file, a folder or a glob, as a URI or a path.")
    eval: str | None = Field(
        None, description="Evaluation split (same forms as data.train); evals and the best checkpoint need it."
    )
    format: str = Field(
        "auto",
        description=(
            "Auto (by file suffix), parquet, jsonl, csv, text (one row per line), folder (imagefolder/audiofolder),"
            " or a format the task adds (coco, squad, conll, ...)"
        ),
    )
    columns: dict[str, str] = Field({}, description="Canonical column -> the user's column name.")
    labels: list[str | int] | None = Field(
        None, description="The label set, in id order; discovered from the training split when absent."
    )
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS, ge=1, description="Larger images get an error row (decompression bombs)"
    )
    max_audio_seconds: float = Field(600, gt=0, description="Longest audio clip; longer ones follow data.long_audio.")
    long_audio: Literal["chunk", "reject"] = Field(
        "chunk", description="What happens to clips over max_audio_seconds: cut into chunks, or an error row."
    )
    id_column: str | None = Field("id", description="Carried into predictions; the row position when absent.")
    preprocess_actors: int = Field(1, ge=1, description="Ray Data actors that read, decode and tokenise for training.")
    preprocess_batch_size: int = Field(256, ge=1, description="Rows each preprocessing call receives.")
    cache_train: bool | None = Field(
        None,
        description=(
            "Keep the preprocessed training split in Ray's object store (spilling to disk) after the first pass, so"
            " later epochs skip reading, decoding and tokenising. null (auto): when the task draws no random "
            "augmentations and the split has at most cache_max_rows rows; true/false force it."
        ),
    )
    cache_max_rows: int = Field(
        100_000, ge=0, description="Largest training split kept in Ray's object store when data.cache_train is auto."
    )
