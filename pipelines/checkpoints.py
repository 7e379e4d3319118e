"""Training checkpoints in Hugging Face format plus the state needed to resume exactly.

A checkpoint directory holds `model/` (weights as safetensors + config + processor, loadable by
`transformers.pipeline`), `optimizer.safetensors` + `optimizer.json`, `scheduler.json` and
`state.json` (step, epoch, data position, best metric), and `_COMPLETE.json`, which lists every file
with its size: a checkpoint missing a file or holding a truncated one is refused, whatever order the
upload went in. Nothing is ever unpickled.

The best model so far lives apart in `checkpoints/best/` (Ray rotates the step checkpoints). It is
replaced in two commits, through `checkpoints/best.next/`, so that a crash at any moment leaves one
complete copy of it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipelines.adapters import is_adapter_model, load_adapter_weights, save_model
from pipelines.storage import COMPLETE, Storage, commit_dir, is_committed, remove

MODEL_DIR = "model"


@dataclass
class TrainState:
    """Where a training run stands; saved as `state.json` in every checkpoint, and read back on resume.

    `position` is where the epoch stands: with exact data order the batches of the epoch dealt to all
    workers, else the batches this worker took from its own shard. `samples` and `skipped_rows` are totals
    over all workers at the checkpoint (`skipped_rows` is None until a whole epoch has been read). `best`
    is the best eval value of the task's `best_metric` so far, at `best_step`, with `best_loss` breaking
    ties. `resumed_at` lists the steps the run was resumed from.
    """

    step: int = 0
    epoch: int = 0
    position: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    skipped_rows: int | None = None
    best: float | None = None
    best_step: int | None = None
    best_loss: float | None = None
    labels: list | None = None
    resumed_at: list[int] = field(default_factory=list)

    def best_loss_or_inf(self) -> float:
        """The eval loss at the best step; infinite when unknown (checkpoints older than best_loss)."""
        return self.best_loss if self.best_loss is not None else float("inf")

    def to_json(self) -> str:
        """The state.json text; best_loss and resumed_at only once they are set, as earlier versions wrote it."""
        data = asdict(self)
        if data["best_loss"] is None:
            del data["best_loss"]
        if not data["resumed_at"]:
            del data["resumed_at"]
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        """A state.json of this version or an earlier one: keys it lacks take their defaults (a state without
        `position` restarts its epoch)."""
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def read_state(directory: str) -> TrainState:
    """The training state of a checkpoint folder, without loading its weights."""
    return TrainState.from_json((Path(directory) / "state.json").read_text())


def save_checkpoint(directory: str, model, processor, optimizer, scheduler, state: TrainState) -> None:
    d = Path(directory)
    save_model(model, str(d / MODEL_DIR))
    processor.save_pretrained(d / MODEL_DIR)
    tensors, meta = _split_optimizer_state(optimizer.state_dict())
    save_file(tensors, str(d / "optimizer.safetensors"))
    (d / "optimizer.json").write_text(json.dumps(meta))
    (d / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    (d / "state.json").write_text(state.to_json())
    sizes = {
        str(f.relative_to(d)): f.stat().st_size for f in sorted(d.rglob("*")) if f.is_file() and f.name != COMPLETE
    }
    (d / COMPLETE).write_text(json.dumps({"files": sizes}))


def load_checkpoint(directory: str, model, optimizer, scheduler) -> TrainState:
    """Restores model, optimizer and scheduler in place; returns the saved training state."""
    d = Path(directory)
    check_complete(d)
    if is_adapter_model(model):  # train.peft: the checkpoint holds the adapter and the head
        load_adapter_weights(model, str(d / MODEL_DIR))
    else:
        missing, unexpected = model.load_state_dict(_saved_weights(d / MODEL_DIR, model), strict=False)
        tied = {k for k in missing if k.endswith(("decoder.weight", "lm_head.weight", "position_ids"))}
        if unexpected or set(missing) - tied:
            raise RuntimeError(
                f"checkpoint {directory} does not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    meta = json.loads((d / "optimizer.json").read_text())
    optimizer.load_state_dict(_join_optimizer_state(load_file(str(d / "optimizer.safetensors")), meta))
    scheduler.load_state_dict(json.loads((d / "scheduler.json").read_text()))
    return read_state(directory)


def _saved_weights(model_dir: Path, model) -> dict:
    """The checkpoint's weights under the names `model` uses. transformers 5 saves some architectures (ViT, DETR)
    under their older key names (`out_proj`, `conv_encoder`, ...); only `from_pretrained` maps those back."""
    weights = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    if set(weights) <= set(model.state_dict()):
        return weights
    return type(model).from_pretrained(model_dir, use_safetensors=True).state_dict()


def _split_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    tensors, per_param = {}, {}
    for index, values in state_dict["state"].items():
        entry = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}/{key}"] = value.detach().cpu().contiguous()
                entry[key] = {"tensor": f"{index}/{key}"}
            else:
                entry[key] = value
        per_param[str(index)] = entry
    return tensors, {"state": per_param, "param_groups": state_dict["param_groups"]}


def _join_optimizer_state(tensors: dict, meta: dict) -> dict:
    state = {}
    for index, entry in meta["state"].items():
        state[int(index)] = {
            k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in entry.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def check_complete(d: Path) -> None:
    """Refuses a checkpoint folder whose files do not match its `_COMPLETE.json` listing."""
    if not (d / COMPLETE).is_file():
        raise RuntimeError(f"checkpoint {d} has no {COMPLETE}: it was not written completely")
    listed = json.loads((d / COMPLETE).read_text())["files"]
    wrong = [name for name, size in listed.items() if not (d / name).is_file() or (d / name).stat().st_size != size]
    if wrong:
        raise RuntimeError(f"checkpoint {d} is incomplete: {wrong[:5]} missing or truncated")


def save_best(storage: Storage, local_dir: str, best_uri: str) -> None:
    """Replaces the best model: first a complete copy in best.next/, then best/, then best.next/ goes."""
    staged = f"{best_uri}.next"
    commit_dir(storage, local_dir, staged)
    commit_dir(storage, staged, best_uri)
    remove(storage, staged)


def best_model(storage: Storage, best_uri: str) -> str | None:
    """The complete copy of the best model, or None. best.next/ is newer whenever it is complete."""
    for uri in (f"{best_uri}.next", best_uri):
        if is_committed(storage, uri):
            return uri
    return None
