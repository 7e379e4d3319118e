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
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from config import JobConfig
from errors import UserError
from models import get_task
from pipelines.adapters import parameter_counts, point_at_base, save_model, with_lora
from pipelines.checkpoints import TrainState, load_checkpoint, read_state, save_best, save_checkpoint
from pipelines.cluster import quiet_logs
from pipelines.data_order import rounds, window_rows
from pipelines.history import History
from pipelines.predictor import to_device
from pipelines.report import write_views
from pipelines.storage import Storage, commit_dir, is_committed, remove
from pipelines.tracking import Tracker


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


def evaluate(model, task, processor, labels, options, device, autocast) -> tuple[dict, object]:
    """The eval split's loss and metrics, and the metric object (its `views` draw the run report's last eval).
    Every worker reads the whole split in the same order and scores its own batches of it (rank, rank + world, ...):
    together they score each row once."""
    shard = ray.train.get_dataset_shard("eval")
    ctx = ray.train.get_context()
    metric = task.metrics(labels, options).to(device)
    metric.bind(model, processor)
    loss_sum = torch.zeros(2, device=device)
    model.eval()
    with torch.no_grad():
        windows = shard.iter_batches(batch_size=128, batch_format="pyarrow")
        world, rank = ctx.get_world_size(), ctx.get_world_rank()
        for r in rounds(windows, seed=0, epoch=0, batch_size=32, length_buckets=4, world=world, rank=rank, start=0):
            batch = r.batch
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
    return {"loss": float(loss_sum[0] / loss_sum[1].clamp(min=1)), **values}, (metric if values else None)


def train_loop(config: dict) -> None:
    quiet_logs()
    cfg = JobConfig.model_validate(config["job"])
    task, labels, options = get_task(cfg.task), config["labels"], cfg.options()
    processor = ray.get(config["processor"])
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
        # the node's cores shared by the workers on it (one worker alone on a 2-core laptop gets both),
        # at least the CPUs each worker asked Ray for
        on_node = max(1, worker_nodes.count(node))
        torch.set_num_threads(max(1, int(t.cpus_per_worker), (os.cpu_count() or 1) // on_node))

    try:
        source_dir = Storage.from_config(cfg.storage).model_path(cfg.model.source) if cfg.model.source else None
        model = task.build_model(cfg.model, source_dir, labels, processor)
        if t.peft:
            model = lora_model(cfg, task, model, labels, processor, config["output"], rank)
    except UserError as exc:  # the same on every worker: reported to the driver, since Ray would retry an error
        ray.train.report({"user_error": str(exc)})
        return
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay) and p.requires_grad],
            "weight_decay": t.weight_decay,
        },
        {
            "params": [p for n, p in model.named_parameters() if n.endswith(no_decay) and p.requires_grad],
            "weight_decay": 0.0,
        },
    ]
    optimizer = torch.optim.AdamW(groups, lr=t.lr)
    exact = t.data_order == "exact"
    state = TrainState(labels=labels)
    # `seen` is what this worker added to state.samples and state.skipped_rows since the last checkpoint
    seen = {"samples": 0, "skipped_in_epoch": 0}
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext() as d:
        if d:
            state = read_state(d)
        # the schedule covers what is left: after an elastic resume, more or fewer steps than first planned
        batches_per_epoch = max(1, math.ceil(config["train_rows"] / t.batch_size))
        done = state.epoch * batches_per_epoch + state.position * (1 if exact else world)
        left = max(1, math.ceil((t.epochs * batches_per_epoch - done) / (world * t.grad_accum)))
        total_steps = t.max_steps or state.step + left
        scheduler = linear_schedule_with_warmup(optimizer, int(t.warmup_ratio * total_steps), total_steps)
        if d:
            state = load_checkpoint(d, model, optimizer, scheduler)
            state.resumed_at.append(state.step)
            if rank == 0:
                print(
                    f"resuming from step {state.step} (epoch {state.epoch}, batch {state.position})",
                    flush=True,
                )
    storage = Storage.from_config(cfg.storage)
    output = config["output"]
    rows_log = RowsLog(storage, f"{output}/rows", rank, state.step if checkpoint else 0) if t.log_rows else None
    # what the run report draws (train.output/history.json), kept by rank 0
    history = History(storage, output, state.step if checkpoint else None) if rank == 0 else None
    # track: MLflow and TensorBoard, fed by rank 0 (a thread sends to MLflow; a failure only warns)
    tracker = Tracker(cfg, storage, output, state.step if checkpoint else None) if rank == 0 else None
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    has_eval = config["has_eval"]
    sign = 1 if task.best_metric_mode == "max" else -1

    def totals() -> dict:
        """Samples and rows with errors over every worker (a collective: every rank calls it)."""
        samples = state.samples + reduced(seen["samples"], dist.ReduceOp.SUM, device)
        epoch_skipped = reduced(seen["skipped_in_epoch"], dist.ReduceOp.SUM, device)
        return {
            "samples": samples,
            "skipped_rows": state.skipped_rows if state.skipped_rows is not None else epoch_skipped,
        }

    def report(metrics: dict, with_checkpoint: bool) -> None:
        counts = totals()
        metrics = {
            **metrics,
            **counts,
            "samples_per_s": counts["samples"] / max(state.train_seconds, 1e-9),
            "step": state.step,
            "epoch": state.epoch,
        }
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        if rows_log:  # before the checkpoint: a registered checkpoint has every worker's rows on record
            rows_log.write(state.step)
        if history:
            history.write()
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                # the saved skipped_rows stays None until an epoch is read whole: a resume recounts that epoch
                saved = replace(state, samples=counts["samples"])
                save_checkpoint(d, core, processor, optimizer, scheduler, saved)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None,
                checkpoint_dir_name=f"step-{state.step:08d}",
            )

    def checkpoint_now(metrics: dict) -> None:
        report(
            {
                **metrics,
                "best": state.best,
                "best_step": state.best_step,
                "resumed_at": list(state.resumed_at),
                "worker_nodes": worker_nodes,
                "parameters": dict(zip(("trainable", "total"), parameter_counts(core))),
            },
            True,
        )

    last_eval = {"metric": None}  # the latest eval's metric: what the run report shows of it (rank 0)

    def eval_and_checkpoint() -> None:
        metrics = {}
        if has_eval:
            values, last_eval["metric"] = evaluate(core, task, processor, labels, options, device, autocast)
            last_eval["step"] = state.step
            metrics = {f"eval_{k}": v for k, v in values.items()}
            score = metrics.get(f"eval_{task.best_metric}")
            loss = metrics["eval_loss"]
            better = score is not None and (
                state.best is None
                or sign * score > sign * state.best
                or (score == state.best and loss < state.best_loss_or_inf())
            )  # ties go to the lower loss
            if better:
                state.best, state.best_step, state.best_loss = score, state.step, loss
                if rank == 0:  # the best model so far, kept apart from the rotating checkpoints
                    with tempfile.TemporaryDirectory() as d:
                        save_model(core, d)
                        processor.save_pretrained(d)
                        Path(d, "eval_metrics.json").write_text(json.dumps({**metrics, "step": state.step}))
                        save_best(storage, d, f"{output}/checkpoints/best")
            if rank == 0:
                history.add("eval", state.step, **metrics)
                tracker.log("eval", state.step, metrics)
                shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                print(
                    f"eval step {state.step}: {shown} (best {task.best_metric}={state.best:.4f} at step "
                    f"{state.best_step})",
                    flush=True,
                )
        checkpoint_now(metrics)

    model.train()
    window = window_rows(t.batch_size, t.length_buckets, t.shuffle_rows)
    window_loss, window_samples, window_start = 0.0, 0, time.perf_counter()
    tick = time.perf_counter()  # train_seconds: wall time of training, waits for data included, evals left out
    last_eval_step = state.step if checkpoint else -1
    stop_at = min(total_steps, state.step + t.stop_after_steps) if t.stop_after_steps else total_steps
    saved_for_preemption = False
    run_start, first_step = time.perf_counter(), state.step
    # a run of whole epochs ends with its last epoch (rows with errors make the planned steps an estimate)
    while state.step < stop_at and (t.max_steps or state.epoch < t.epochs):
        # exact: every worker reads the whole split in file order and takes its batches by number; streaming:
        # each reads its own shard (see data_order.py)
        windows = ray.train.get_dataset_shard("train").iter_batches(batch_size=window, batch_format="pyarrow")
        epoch_rounds = rounds(
            windows,
            seed=t.seed,
            epoch=state.epoch,
            batch_size=t.batch_size,
            length_buckets=t.length_buckets,
            world=world if exact else 1,
            rank=rank if exact else 0,
            start=state.position,
        )
        micro = 0
        exhausted = False  # streaming: some worker ran out of data, so this epoch ends for everyone
        seen["skipped_in_epoch"] = 0
        for r in epoch_rounds:
            if rank == 0 or not exact:  # with exact order every worker reads every row: rank 0 counts
                seen["skipped_in_epoch"] += r.skipped
            if (r.batch is None and r.spare is None) or exhausted:
                continue  # only rows with errors left; or draining the shard so the next epoch starts cleanly
            if state.step >= stop_at:
                break
            if not exact and not all_have(True, device):
                exhausted = True
                continue
            # a worker without a batch in a short last round trains the round's first with weight 0
            batch, weight = (r.batch, 1.0) if r.batch is not None else (r.spare, 0.0)
            inputs = to_device(task.collate(batch, processor), device)
            with autocast():
                loss = model(**inputs).loss / t.grad_accum
            (loss * weight).backward()
            micro += 1
            state.position = r.position
            if r.batch is not None:
                n = len(r.keys) or len(next(iter(batch.values())))
                window_loss += float(loss.detach()) * t.grad_accum * n
                window_samples += n
                seen["samples"] += n
                if rows_log:
                    rows_log.add(state.epoch, r.keys)
            if micro % t.grad_accum:
                state.train_seconds += time.perf_counter() - tick
                tick = time.perf_counter()
                continue
            if t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.train_seconds += time.perf_counter() - tick
            tick = time.perf_counter()
            step = state.step
            if step % t.log_every == 0 and rank == 0:
                now = time.perf_counter()
                eta = (total_steps - step) * (now - run_start) / max(step - first_step, 1)  # evals included
                mean_loss, lr = window_loss / max(window_samples, 1), scheduler.get_last_lr()[0]
                speed = window_samples * world / (now - window_start)
                print(
                    f"step {step}/{total_steps} epoch {state.epoch} loss {mean_loss:.4f} samples/s {speed:.1f} "
                    f"lr {lr:.2e} elapsed {clock(now - run_start)} ETA {clock(eta)}",
                    flush=True,
                )
                history.add(
                    "train",
                    step,
                    epoch=state.epoch,
                    loss=mean_loss,
                    lr=lr,
                    samples_per_s=speed,
                    train_seconds=state.train_seconds,
                    total_steps=total_steps,
                )
                tracker.log("train", step, dict(loss=mean_loss, lr=lr, samples_per_s=speed, epoch=state.epoch))
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
        if not exact and not exhausted and state.step < stop_at:
            all_have(False, device)  # this worker ran out: release workers waiting in `all_have`
        if state.step < stop_at:  # the epoch ended, not the run
            if state.skipped_rows is None:  # the first epoch read whole: its rows with errors, over all workers
                state.skipped_rows = reduced(seen["skipped_in_epoch"], dist.ReduceOp.SUM, device)
            state.epoch += 1
            state.position = 0
    if state.step != last_eval_step:
        eval_and_checkpoint()
    if tracker:
        tracker.close()
    if rank == 0 and last_eval["metric"] is not None:
        write_views(storage, output, last_eval["step"], last_eval["metric"])


def lora_model(cfg: JobConfig, task, model, labels, processor, output: str, rank: int):
    """train.peft: the model wrapped for LoRA, pointing at its base model (the source, or for from-scratch runs
    a copy of the initialised model).
    A from-scratch model's base is kept under train.output/base/, written once by rank 0 and read back by
    every later attempt (DDP gives all ranks rank 0's weights at the start)."""
    base = cfg.model.source
    if not base:
        storage = Storage.from_config(cfg.storage)
        base = f"{output}/base"
        if is_committed(storage, base):
            model = task.build_model(cfg.model, storage.model_path(base), labels, processor)
        elif rank == 0:
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                processor.save_pretrained(d)
                commit_dir(storage, d, base)
    model, line = with_lora(model, cfg.train.peft)
    point_at_base(model, base)
    if rank == 0:
        print(line, flush=True)
    return model


def clock(seconds: float) -> str:
    """12:34, or 1:02:03 past an hour."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RowsLog:
    """train.log_rows: the (file, row) keys this worker trained on, written as
    rows/step-<step>-rank-<rank>.tsv (epoch, file, row per line) just before each checkpoint. A run
    that starts from the checkpoint of step S first removes the files of later steps: an attempt that
    died wrote them for steps it never checkpointed, and those steps are trained again."""

    def __init__(self, storage: Storage, uri: str, rank: int, resumed_step: int):
        self.storage, self.uri, self.rank, self.lines = storage, uri, rank, []
        if rank == 0 and storage.exists(uri):
            # the other ranks write only after DDP steps, which wait for rank 0 to get past this
            loc = storage.resolve(uri)
            loc.fs.invalidate_cache()
            for path in loc.fs.ls(loc.path, detail=False):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                if name.startswith("step-") and int(name.split("-")[1]) > resumed_step:
                    remove(storage, f"{uri}/{name}")

    def add(self, epoch: int, keys: list) -> None:
        self.lines += [f"{epoch}\t{source}\t{row}" for source, row in keys]

    def write(self, step: int) -> None:
        if self.lines:
            self.storage.write_text(
                f"{self.uri}/step-{step:08d}-rank-{self.rank:03d}.tsv", "\n".join(self.lines) + "\n"
            )
        self.lines = []


def linear_schedule_with_warmup(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' get_linear_schedule_with_warmup, the same factors: importing it from `transformers.optimization`
    imports its Trainer's utilities and peft (~2.4 CPU-s in the driver and in every train worker)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
