"""The training loop every Ray Train worker runs, for every task, readable top to bottom.

Workers receive ready features from Ray Data (tokenised / decoded by preprocessing actors),
batch them by similar length, and run AdamW with warm-up and linear decay, gradient
accumulation and bf16 autocast where the device supports it. Every `eval_every` steps they
evaluate with streaming metrics and report a checkpoint; a restarted run continues from it. Every
`preemption_check_every` steps they ask Ray Train whether a node is about to be reclaimed, and
checkpoint at once when one is.

Counts survive restarts: a checkpoint holds the totals over all workers (samples, rows with errors),
each worker adds only what it saw since, and the sum over workers is what gets reported.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers import get_linear_schedule_with_warmup

from jobs.config import JobConfig
from models import get_task
from models.spec import UserError
from pipelines.checkpoints import load_checkpoint, save_best, save_checkpoint
from pipelines.predictor import ERROR, FLAG, LENGTH, column_values, to_device
from pipelines.storage import Storage


def length_bucketed(shard, batch_size: int, buckets: int, rng: random.Random, shuffle_rows: int = 0, seed: int = 0):
    """Batches of rows with similar lengths, in shuffled order; rows with errors are left out. Rows are
    first shuffled across blocks through a buffer of `shuffle_rows` (seeded: a resumed epoch replays)."""
    for block in shard.iter_batches(batch_size=batch_size * buckets, batch_format="pyarrow",
                                    local_shuffle_buffer_size=shuffle_rows or None, local_shuffle_seed=seed if shuffle_rows else None):
        usable = block.filter(pa.compute.is_null(block.column(ERROR)))
        skipped = block.num_rows - usable.num_rows
        order = sorted(range(usable.num_rows), key=usable.column(LENGTH).to_pylist().__getitem__)
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(chunks)
        names = [n for n in usable.column_names if n not in (ERROR, FLAG, LENGTH)]
        columns = {n: column_values(usable, n) for n in names}
        for n, rows in enumerate(chunks):
            yield {name: [values[i] for i in rows] for name, values in columns.items()}, (skipped if n == 0 else 0)
        if not chunks and skipped:
            yield None, skipped


def reduced(value: int, op, device) -> int:
    """`value` combined over every worker with `op` (every rank calls this at the same point)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=op)
    return int(t.item())


def all_have(flag: bool, device) -> bool:
    """True when every worker has a batch: keeps DDP steps in lockstep when shards differ."""
    return bool(reduced(int(flag), dist.ReduceOp.MIN, device))


def evaluate(model, task, processor, labels, options, device, autocast) -> dict:
    shard = ray.train.get_dataset_shard("eval")
    metric = task.metrics(labels, options).to(device)
    metric.bind(model, processor)
    loss_sum = torch.zeros(2, device=device)
    model.eval()
    with torch.no_grad():
        for batch, _ in length_bucketed(shard, 32, 4, random.Random(0)):
            if batch is None:
                continue
            inputs = to_device(task.collate(batch, processor), device)
            with autocast():
                outputs = model(**inputs)
            n = len(next(iter(batch.values())))
            loss_sum += torch.tensor([float(outputs.loss) * n, n], device=device)
            metric.update(outputs, inputs, batch)
    model.train()
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
    values = metric.compute() if loss_sum[1] > 0 else {}
    return {"loss": float(loss_sum[0] / loss_sum[1].clamp(min=1)), **values}


def train_loop(config: dict) -> None:
    cfg = JobConfig.model_validate(config["job"])
    task, processor, labels, options = get_task(cfg.task), config["processor"], config["labels"], cfg.options()
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    node = ray.get_runtime_context().get_node_id()
    print(f"worker rank {rank} on node {node}", flush=True)
    worker_nodes = [None] * world if dist.is_initialized() else [node]  # metrics.json records where workers ran
    if dist.is_initialized():
        dist.all_gather_object(worker_nodes, node)
    torch.manual_seed(t.seed)
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))

    try:
        source_dir = Storage.from_config(cfg.storage).model_path(cfg.model.source) if cfg.model.source else None
        model = task.build_model(cfg.model, source_dir, labels, processor)
    except UserError as exc:  # the same on every worker: reported to the driver, since Ray would retry an error
        ray.train.report({"user_error": str(exc)})
        return
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": t.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=t.lr)
    steps_per_epoch = max(1, math.ceil(config["train_rows"] / world / t.batch_size / t.grad_accum))
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(t.warmup_ratio * total_steps), total_steps)

    # samples and skipped_rows in `state` are totals over all workers at the last checkpoint (or None
    # for skipped_rows until a whole epoch has been read); `seen` is what this worker added since.
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "samples": 0, "train_seconds": 0.0,
             "skipped_rows": None, "best": None, "best_step": None, "labels": labels}
    seen = {"samples": 0, "skipped_in_epoch": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, model, optimizer, scheduler)
        state["resumed_at"] = state.get("resumed_at", []) + [state["step"]]
        if rank == 0:
            print(f"resuming from step {state['step']} (epoch {state['epoch']}, batch {state['batches_in_epoch']})", flush=True)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    has_eval = config["has_eval"]
    sign = 1 if task.best_metric_mode == "max" else -1
    storage = Storage.from_config(cfg.storage)
    output = config["output"]

    def totals() -> dict:
        """Samples and rows with errors over every worker (a collective: every rank calls it)."""
        samples = state["samples"] + reduced(seen["samples"], dist.ReduceOp.SUM, device)
        epoch_skipped = reduced(seen["skipped_in_epoch"], dist.ReduceOp.SUM, device)
        return {"samples": samples, "skipped_rows": state["skipped_rows"] if state["skipped_rows"] is not None else epoch_skipped}

    def report(metrics: dict, with_checkpoint: bool) -> None:
        counts = totals()
        metrics = {**metrics, **counts, "samples_per_s": counts["samples"] / max(state["train_seconds"], 1e-9),
                   "step": state["step"], "epoch": state["epoch"]}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                # the saved skipped_rows stays None until an epoch is read whole: a resume recounts that epoch
                saved = {**state, "samples": counts["samples"]}
                save_checkpoint(d, core, processor, optimizer, scheduler, saved)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None,
                             checkpoint_dir_name=f"step-{state['step']:08d}")

    def checkpoint_now(metrics: dict) -> None:
        report({**metrics, "best": state["best"], "best_step": state["best_step"],
                "resumed_at": state.get("resumed_at", []), "worker_nodes": worker_nodes}, True)

    def eval_and_checkpoint() -> None:
        metrics = {}
        if has_eval:
            metrics = {f"eval_{k}": v for k, v in evaluate(core, task, processor, labels, options, device, autocast).items()}
            score = metrics.get(f"eval_{task.best_metric}")
            loss = metrics["eval_loss"]
            better = score is not None and (state["best"] is None or sign * score > sign * state["best"] or (
                score == state["best"] and loss < state.get("best_loss", float("inf"))))  # ties go to the lower loss
            if better:
                state["best"], state["best_step"], state["best_loss"] = score, state["step"], loss
                if rank == 0:  # the best model so far, kept apart from the rotating checkpoints
                    with tempfile.TemporaryDirectory() as d:
                        core.save_pretrained(d)
                        processor.save_pretrained(d)
                        Path(d, "eval_metrics.json").write_text(json.dumps({**metrics, "step": state["step"]}))
                        save_best(storage, d, f"{output}/checkpoints/best")
            if rank == 0:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                print(f"eval step {state['step']}: {shown} (best {task.best_metric}={state['best']:.4f} at step {state['best_step']})", flush=True)
        checkpoint_now(metrics)

    model.train()
    rng = random.Random(t.seed)
    window_loss, window_samples, window_start = 0.0, 0, time.perf_counter()
    tick = time.perf_counter()  # train_seconds: wall time of training, waits for data included, evals left out
    last_eval_step = state["step"] if checkpoint else -1
    stop_at = min(total_steps, state["step"] + t.stop_after_steps) if t.stop_after_steps else total_steps
    saved_for_preemption = False
    while state["step"] < stop_at:
        rng.seed(t.seed + state["epoch"])
        batches = length_bucketed(ray.train.get_dataset_shard("train"), t.batch_size, t.length_buckets, rng,
                                  t.shuffle_rows, t.seed + state["epoch"])
        to_skip, micro = state["batches_in_epoch"], 0
        exhausted = False  # some worker ran out of data: this epoch ends for everyone
        seen["skipped_in_epoch"] = 0
        for batch, skipped in batches:
            seen["skipped_in_epoch"] += skipped  # also in the batches a resume skips: the epoch is counted whole
            if batch is None or micro < to_skip:  # resuming: skip what the checkpoint already saw
                micro += batch is not None
                continue
            if state["step"] >= stop_at:
                break
            if exhausted:
                continue  # drain the shard so that the next epoch starts cleanly
            if not all_have(True, device):
                exhausted = True
                continue
            inputs = to_device(task.collate(batch, processor), device)
            with autocast():
                loss = model(**inputs).loss / t.grad_accum
            loss.backward()
            micro += 1
            n = len(next(iter(batch.values())))
            window_loss += float(loss.detach()) * t.grad_accum * n
            window_samples += n
            seen["samples"] += n
            state["batches_in_epoch"] = micro
            if micro % t.grad_accum:
                state["train_seconds"] += time.perf_counter() - tick
                tick = time.perf_counter()
                continue
            if t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["train_seconds"] += time.perf_counter() - tick
            tick = time.perf_counter()
            step = state["step"]
            if step % t.log_every == 0 and rank == 0:
                elapsed = time.perf_counter() - window_start
                print(f"step {step}/{total_steps} epoch {state['epoch']} loss {window_loss / max(window_samples, 1):.4f} "
                      f"samples/s {window_samples * world / elapsed:.1f} lr {scheduler.get_last_lr()[0]:.2e}", flush=True)
                window_loss, window_samples, window_start = 0.0, 0, time.perf_counter()
            if step % t.eval_every == 0:
                eval_and_checkpoint()
                last_eval_step = step
                tick = time.perf_counter()
            elif step % t.preemption_check_every == 0 and not saved_for_preemption:
                # a barrier: every rank reaches it at the same steps, since steps are taken in lockstep
                if ray.train.get_preemption_info() is not None:
                    if rank == 0:
                        print(f"step {step}: a worker's node is being preempted; saving a checkpoint now", flush=True)
                    checkpoint_now({})
                    saved_for_preemption = True
                    tick = time.perf_counter()
        if not exhausted and state["step"] < stop_at:
            all_have(False, device)  # this worker ran out: release workers waiting in `all_have`
        if state["step"] < stop_at:  # the epoch ended, not the run
            if state["skipped_rows"] is None:  # the first epoch read whole: its rows with errors, over all workers
                state["skipped_rows"] = reduced(seen["skipped_in_epoch"], dist.ReduceOp.SUM, device)
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
    if state["step"] != last_eval_step:
        eval_and_checkpoint()
