"""The keys of each runtime: `train` (Ray Train workers, optimisation, checkpoints, data order),
`predict` (Ray Data actors, batching), `serve` (Ray Serve replicas, autoscaling, request limits) and `ray`
(which cluster)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from config.section import Section


class PeftConfig(Section):
    method: Literal["lora"] = Field("lora", description="The adapter kind (LoRA, with the peft library).")
    r: int = Field(8, ge=1, le=1024, description="LoRA rank: the inner size of each adapter's two matrices.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: Literal["auto"] | list[str] = Field(
        "auto",
        description=(
            "Module names (suffixes) that get adapters. auto: PEFT's choice for known architectures (BERT "
            "query/value, GPT-2 c_attn, T5 q/v, BART q_proj/v_proj, ...), else every linear layer of the base model"
        ),
    )


class TrainConfig(Section):
    output: str | None = Field(
        None, description="Where checkpoints, prepared/, model/ and metrics.json go (URI or path)."
    )
    num_workers: int | tuple[int, int] = Field(
        1,
        description=(
            "Ray Train workers (DDP ranks), or [min, max] for Ray Train's elastic training: the run starts with "
            "as many as the cluster can place and is resized (from its latest checkpoint) as nodes come and go. "
            "Data order stays exact across any change."
        ),
    )
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs Ray reserves per worker; on CPU a worker uses at least this many torch threads."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description=(
            "Ray placement group strategy for the workers: PACK fills a node first, STRICT_SPREAD puts each on its "
            "own node."
        ),
    )
    epochs: float = Field(
        3.0, gt=0, description="Passes over the training split (fractions allowed); train.max_steps wins when set."
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to train for, instead of epochs.")
    batch_size: int = Field(16, ge=1, description="Rows per step on each worker.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate of AdamW (linear warm-up, then linear decay).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Share of the steps spent warming the learning rate up.")
    max_grad_norm: float | None = Field(1.0, description="Gradient norm clipping (null: none).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Auto: bf16 autocast on GPUs that support it, else fp32."
    )
    eval_every: int = Field(100, ge=1, description="Steps; each eval also writes a checkpoint.")
    log_every: int = Field(10, ge=1, description="Steps between two progress lines.")
    keep_checkpoints: int = Field(
        2, ge=1, description="Step checkpoints kept (the newest ones); the best model is kept apart."
    )
    max_failures: int = Field(
        3,
        ge=-1,
        description=(
            "How many times a run restarts from its latest checkpoint after a worker or node dies or raises "
            "(-1: without limit, 0: never). Preemptions are counted apart (max_preemption_failures)."
        ),
    )
    max_preemption_failures: int = Field(
        -1,
        ge=-1,
        description=(
            "How many node preemptions (spot reclaims) a run survives by restarting from its latest checkpoint "
            "(-1: without limit). Workers also save a checkpoint as soon as Ray Train announces a preemption."
        ),
    )
    preemption_check_every: int = Field(
        10,
        ge=1,
        description=(
            "Optimizer steps between two checks for a preemption notice. Each check waits for every worker: "
            "1.5-4.4 ms with 1-2 local workers, under 1% of a tiny model's steps at the default 10."
        ),
    )
    fresh: bool = Field(
        False,
        description=(
            "Start over although train.output holds an earlier run: its checkpoints, prepared/, model/ and "
            "metrics.json are removed first. Without it a re-run resumes, and refuses a changed config or data."
        ),
    )
    seed: int = Field(42, description="Seed of the model's initialisation and of the data order.")
    length_buckets: int = Field(
        8, ge=1, description="Batches whose rows are sorted together by length (1: no length bucketing)."
    )
    shuffle_rows: int = Field(
        1024,
        ge=0,
        description=(
            "Rows shuffled together every epoch (a window of the training split in file order); batches of "
            "similar length are cut from each window and shuffled within it"
        ),
    )
    data_order: Literal["exact", "streaming"] = Field(
        "exact",
        description=(
            "exact: the rows of an epoch reach the workers in an order fixed by (seed, epoch, the files), and a "
            "resumed run, also with another num_workers, trains every row of the epoch exactly once. Every "
            "worker reads the whole split (cached: from Ray's object store; not cached: each worker preprocesses "
            "it). streaming: Ray Data's streaming split, each worker preprocesses a share; a resume skips the "
            "number of batches already trained, so rows near the resume point may repeat or be missed"
        ),
    )
    log_rows: bool = Field(
        False,
        description=(
            "Record the key (file, row) of every trained row under train.output/rows/, one file per worker and "
            "checkpoint, written with the checkpoint: an audit of what each epoch trained on"
        ),
    )
    stop_after_steps: int | None = Field(None, ge=1, description="End this run early (the next run resumes)")
    peft: PeftConfig | None = Field(
        None,
        description=(
            "Parameter-efficient fine-tuning, e.g. {method: lora, r: 8}: the model is frozen and LoRA adapters are "
            "trained, with the task head trained in full. model/ then holds the adapter (PEFT's format) and points "
            "at the base model; from-scratch (model.init) runs keep their base under train.output/base/"
        ),
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _worker_count_or_range(cls, value):
        """One line for a wrong value, not one per member of the int | [min, max] union."""
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"expected [min, max] of two integers, got {list(value)!r}")
            return tuple(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value

    @field_validator("num_workers", mode="after")
    @classmethod
    def _worker_range(cls, value):
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError(f"expected a count >= 1 or [min, max] with 1 <= min <= max, got {value}")
        return value

    @property
    def max_workers(self) -> int:
        """The most workers the run may have (`num_workers`, or the top of its range)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]


class PredictConfig(Section):
    model: str | None = Field(None, description="Defaults to train.output/model, then model.source.")
    input: str | None = Field(None, description="The corpus to score: a file, a folder or a glob.")
    output: str | None = Field(None, description="Folder of the Parquet predictions (with _manifest/ and _SUCCESS).")
    batch_size: int = Field(8, ge=1, description="Rows per forward pass.")
    max_batch_cost: int | None = Field(
        None,
        ge=1,
        description="At most this many padded length units per batch (rows x longest row: tokens, pixels, samples)",
    )
    sort_window: int = Field(
        256, ge=1, description="Rows sorted by length together; smaller windows spread over more actors."
    )
    actors: int | None = Field(None, ge=1, description="Default: one per CPU (one per GPU with use_gpu)")
    threads_per_actor: int = Field(1, ge=1, description="Torch threads per predictor actor.")
    use_gpu: bool = Field(False, description="One GPU per predictor actor.")
    quantize: Literal["none", "int8"] = Field(
        "none", description="Int8: dynamic int8 quantisation of the Linear layers (CPU)."
    )
    fuse_preprocessing: bool | None = Field(
        None,
        description=(
            "Predictor actors preprocess each window of rows inline (default on CPU: no extra work on the same "
            "cores); false (default with use_gpu): a thread in each predictor actor preprocesses the next window "
            "while the model runs on the current one."
        ),
    )
    parameters: dict[str, Any] = Field(
        {}, description="Prediction parameters, as a request's `parameters` (e.g. top_k)."
    )
    overwrite: bool = Field(
        False,
        description=(
            "Replace a complete earlier output in predict.output (one with a _SUCCESS marker), or restart a "
            "partial one made with another model, input or settings. The earlier output stays intact until "
            "the new one is complete. Without it such a run is refused; a partial run of the same job resumes."
        ),
    )


class ServeConfig(Section):
    model: str | None = Field(None, description="The default model; else train.output/model, else model.source.")
    models: dict[str, str] = Field({}, description="Model id -> source, for /v1/models/<id>/predict.")
    route_prefix: str = Field("/", description="Path under which /predict, /healthz and /docs are served.")
    host: str = Field("127.0.0.1", description="Interface the HTTP proxy listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the HTTP proxy listens on.")
    min_replicas: int = Field(1, ge=0, description="Fewest model replicas the autoscaler keeps.")
    max_replicas: int = Field(1, ge=1, description="Most model replicas the autoscaler starts.")
    target_ongoing_requests: float = Field(4, gt=0, description="Ongoing requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(5, ge=0, description="Seconds of high load before a replica is added.")
    downscale_delay_s: float = Field(30, ge=0, description="Seconds of low load before a replica is removed.")
    look_back_period_s: float = Field(30, gt=0, description="Window the autoscaler averages load over.")
    metrics_interval_s: float = Field(10, gt=0, description="How often load is reported to the autoscaler.")
    health_check_period_s: float = Field(10, gt=0, description="Each check runs the model on a tiny input.")
    health_check_timeout_s: float = Field(
        30, gt=0, description="Seconds a health check may take before the replica is replaced."
    )
    max_batch_size: int = Field(8, ge=1, description="Requests' rows batched into one forward pass (@serve.batch).")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="Seconds a batch waits to fill up.")
    # Under overload a request waits for what the replicas and the proxy hold: (max_ongoing_requests x replicas +
    # max_queued_requests) / throughput. The defaults hold two batches per replica (one running, the next being
    # preprocessed meanwhile) and four more in the proxy; 32 and 64 held ~5 s of work on a 2-core CPU replica.
    # A queue of 8 dropped requests of 16 closed-loop clients on one replica (16 ongoing): Serve's count of a
    # replica's requests lags the answers, so clients at capacity need some queue.
    max_ongoing_requests: int = Field(
        16,
        ge=1,
        description=(
            "Requests a replica works on at once (at least max_batch_size; twice it lets the next batch be "
            "preprocessed during a forward pass)."
        ),
    )
    max_queued_requests: int = Field(
        32,
        ge=-1,
        description=(
            "Requests each proxy holds waiting for a replica (Ray Serve's max_queued_requests); past it a request "
            "is answered 503 with Retry-After at once instead of waiting behind all the others (-1: no limit). "
            "What waits is what an admitted request waits for: size it to a batch or two, not seconds of work."
        ),
    )
    retry_after_s: float = Field(1, ge=0, description="The Retry-After a request refused for overload is given.")
    max_models_per_replica: int = Field(
        3, ge=1, description="Models of serve.models a replica keeps loaded (least recently used go)."
    )
    use_gpu: bool = Field(False, description="One GPU per replica.")
    threads_per_replica: int = Field(1, ge=1, description="Torch threads per replica.")
    api_key: SecretStr | None = Field(
        None,
        description=(
            "Bearer key prediction routes require. Printed masked, never exported or submitted in a command line; "
            "on a cluster set RAYFORMERS_API_KEY on the nodes instead (see infra/k8s/rayservice.yaml)."
        ),
    )
    max_request_bytes: int = Field(1_000_000, ge=1, description="Largest request body (413 past it).")
    max_items_per_request: int = Field(64, ge=1, description="Most inputs in one request.")
    allow_uris: list[str] | bool = Field(
        False,
        description=(
            "URI prefixes a request may name instead of sending a file's bytes, e.g. [s3://bucket/uploads/] "
            "(false or []: none). Local paths, file://, '..' and any scheme or bucket not listed are refused."
        ),
    )
    max_media_bytes: int = Field(
        16_000_000,
        ge=1,
        description=("Bytes a request may make a replica fetch from allow_uris, all its items together (413 past it)."),
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description=(
            "Pixels of an image a request may send (checked from its header, before decoding; also "
            "data.max_image_pixels)."
        ),
    )
    max_audio_seconds: float = Field(
        60,
        gt=0,
        description=(
            "Seconds of audio a request may send (checked from its header, before decoding, whatever data.long_audio "
            "says)."
        ),
    )

    @field_validator("max_queued_requests", mode="after")
    @classmethod
    def _queue_bound(cls, value):
        if value == 0:  # Ray Serve takes -1 (no limit) or a count >= 1
            raise ValueError("expected -1 (no limit) or a count >= 1, got 0")
        return value

    @field_validator("allow_uris", mode="after")
    @classmethod
    def _uri_prefixes(cls, value):
        if value is True:
            raise ValueError(
                "serve.allow_uris: list the URI prefixes requests may name, e.g. [s3://bucket/uploads/] "
                "(true would let a request read any file the replica can)"
            )
        prefixes = []
        for prefix in value or []:
            scheme, sep, rest = prefix.partition("://")
            bucket = rest.split("/", 1)[0]
            if not sep or scheme.lower() in ("file", "local", "memory") or not bucket or ".." in rest.split("/"):
                raise ValueError(
                    f"serve.allow_uris: {prefix!r} is not an object-storage prefix like s3://bucket/uploads/ "
                    "(local paths and file:// are never served)"
                )
            prefixes.append(
                prefix if prefix.endswith("/") else prefix + "/"
            )  # s3://b/up must not admit s3://b/up-secret
        return prefixes

    @model_validator(mode="after")
    def _batching_fits(self):
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("serve.max_ongoing_requests must be at least serve.max_batch_size")
        if self.max_replicas < max(self.min_replicas, 1):
            raise ValueError("serve.max_replicas must be at least serve.min_replicas")
        return self


class RayConfig(Section):
    address: str | None = Field(
        None, description="Ray cluster to join (host:6379 or auto); else RAY_ADDRESS, else a local Ray."
    )
    num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs of a local Ray (default: enough for the workers and data actors)."
    )
