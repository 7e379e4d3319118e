"""LoRA adapters (`train.peft`), for any task's model, with the `peft` library.

The task builds its model as for full fine-tuning; `with_lora` freezes it, puts LoRA matrices on the
base model's attention (or all its linear layers) and keeps the task head trained in full. Which
modules are "the head" is read off the model, not named per task: the top-level modules next to the
base model (`model.base_model`) that share no weights with it (of one that does, its sub-modules that do
not). A language model's vocabulary projection stays frozen, tied to the input embeddings or not, and so do
the base's BatchNorm statistics.

An adapter folder holds PEFT's own files (`adapter_config.json`, `adapter_model.safetensors`, whose
`base_model_name_or_path` points at the base model's source), the processor, and `head_config.json`:
the fine-tuned model's config (labels, head sizes), which the base model's own config lacks when it is
a bare encoder. `load_model` rebuilds base + adapter from such a folder for predict and serve. Outside rayformers,
`transformers.pipeline(task, model=<folder>)` loads it as it is when the base's config has the head (a from-scratch
run's base/); over a bare encoder it needs the head's labels, e.g. `model_kwargs={num_labels, id2label, label2id}`
from head_config.json (or `AutoModelFor...from_pretrained(<folder>, config=<folder>/head_config.json)`, or PEFT's
`AutoPeftModelFor...from_pretrained(<folder>, num_labels=..., id2label=..., label2id=...)`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
HEAD_CONFIG = "head_config.json"
PEFT_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors", HEAD_CONFIG, "README.md")


def is_adapter_dir(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, ADAPTER_CONFIG))


def is_adapter_model(model) -> bool:
    peft = sys.modules.get("peft")  # not imported, so no model of it here: importing it costs ~2.6 s a process
    return peft is not None and isinstance(model, peft.PeftModel)


def head_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules that make up the task head: the top-level modules beside the base model, with
    weights of their own. A head that shares weights with the rest (BERT's masked-LM head, whose decoder is the
    input embeddings) gives its sub-modules that do not (the transform before the decoder). The vocabulary
    projection of a language model (`get_output_embeddings`: GPT-2's, BART's and T5's `lm_head`, tied or not)
    stays frozen: it is pretrained for the same vocabulary, and as large as the embeddings."""
    base = model.base_model
    children = dict(model.named_children())
    if base is model:  # models without a separate base module (T5): only their heads are apart
        candidates = {n: c for n, c in children.items() if re.search(r"head|classifier|predictor", n)}
    else:
        candidates = {n: c for n, c in children.items() if c is not base}
    vocabulary = output_embeddings(model)
    others = {id(p) for n, c in children.items() if n not in candidates for p in c.parameters()}
    heads = []

    def take(name: str, module: torch.nn.Module) -> None:
        params = list(module.parameters())
        if not params or module is vocabulary:
            return
        if not any(id(p) in others for p in params):
            heads.append(name)
            return
        for child_name, child in module.named_children():  # its own direct parameters stay frozen (a tied bias)
            take(f"{name}.{child_name}", child)

    for name, child in candidates.items():
        take(name, child)
    return heads


def output_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def inside(name: str, modules: list[str]) -> bool:
    return any(name == m or name.startswith(f"{m}.") for m in modules)


def save_names(model: torch.nn.Module, heads: list[str]) -> list[str]:
    """The heads as PEFT's `modules_to_save` must name them. PEFT takes every module whose dotted name ends
    with one given (plain string suffix): a name that also ends another head's (DistilBERT's `classifier` and
    `pre_classifier`) is fine, but a head called `head` holding a `head` (GLPN) would be wrapped twice. Such a
    name is replaced by its sub-modules' names, down to names that only heads end with."""
    names = [n for n, _ in model.named_modules() if n]
    modules = dict(model.named_modules())
    out, todo = [], list(heads)
    while todo:
        name = todo.pop(0)
        if all(o == name or o in heads or o in out or o in todo for o in names if o.endswith(name)):
            out.append(name)
            continue
        children = [f"{name}.{c}" for c, m in modules[name].named_children() if any(True for _ in m.parameters())]
        if not children or any(True for _ in modules[name].parameters(recurse=False)):
            raise ValueError(f"train.peft: cannot name the head module {name} apart from the others for LoRA")
        todo.extend(children)
    return out


def auto_targets(model: torch.nn.Module, heads: list[str]) -> list[str]:
    """`target_modules: auto`: PEFT's per-architecture choice (query/value, c_attn, q_proj/v_proj, ...),
    else every linear layer of the base model, as module name endings."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as KNOWN

    return list(KNOWN.get(getattr(model.config, "model_type", ""), ())) or linear_suffixes(model, heads)


def target_pattern(suffixes: list[str], heads: list[str]) -> str:
    """The modules whose names end with one of `suffixes`, as PEFT's pattern, never reaching into a head."""
    fence = "|".join(re.escape(h) for h in heads)
    not_head = rf"(?!(?:{fence})(?:\.|$))" if heads else ""
    return rf"{not_head}(?:.*\.)?(?:{'|'.join(re.escape(s) for s in suffixes)})"


def linear_suffixes(model: torch.nn.Module, heads: list[str]) -> list[str]:
    """The names that pick every linear layer of the model outside its heads and nothing else: each layer's
    shortest dotted name ending that no other module has (Mask2Former's MLP layers are `layers.0`, `layers.1`,
    and so are its Swin stages, so these take their parent's name too). The vocabulary projection is no target."""
    vocabulary = output_embeddings(model)
    named = [(n, m) for n, m in model.named_modules() if n and not inside(n, heads)]
    others = [n for n, m in named if not is_linear(m) or m is vocabulary]
    suffixes = set()
    for name, module in named:
        if not is_linear(module) or module is vocabulary:
            continue
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o == suffix or o.endswith(f".{suffix}") for o in others):
                suffixes.add(suffix)
                break
    return sorted(suffixes)


@contextmanager
def peft_quietly():
    """peft asks transformers a deprecated question (`is_gradient_checkpointing`): nothing for the user to do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")  # the pool switches per call
        yield


def is_linear(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def with_lora(model: torch.nn.Module, peft_cfg) -> tuple[torch.nn.Module, str]:
    """The model wrapped for LoRA training, and a line saying what is trained."""
    from peft import LoraConfig, get_peft_model

    heads = head_modules(model)
    for name, module in model.named_modules():
        # a frozen base keeps its normalisation statistics too (they are not part of the adapter), and normalises
        # with them in training as at inference (DETR's ResNet sees 2-4 images a batch: their statistics are noise)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not inside(name, heads):
            module.register_forward_pre_hook(running_statistics)
    auto = peft_cfg.target_modules == "auto"
    suffixes = auto_targets(model, heads) if auto else list(peft_cfg.target_modules)
    lora = LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=target_pattern(suffixes, heads) if auto else suffixes,
        modules_to_save=save_names(model, heads) or None,
    )
    try:
        with peft_quietly():
            wrapped = get_peft_model(model, lora)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        from errors import UserError

        raise UserError(f"train.peft.target_modules: {exc}") from None
    adapted = [name for name, m in wrapped.named_modules() if hasattr(m, "lora_A")]
    adapted = [s for s in suffixes if any(n.endswith(f".{s}") for n in adapted)]
    trainable, total = parameter_counts(wrapped)
    line = (
        f"LoRA r={peft_cfg.r} on {', '.join(adapted)}; trained in full: {', '.join(heads) or 'nothing'}; "
        f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / max(total, 1):.2f}%)"
    )
    return wrapped, line


def running_statistics(module: torch.nn.Module, args) -> None:
    """A BatchNorm layer of the frozen base normalises with its running statistics, also in training mode."""
    module.training = False


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; the copies PEFT keeps of the head count once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if "original_module" not in n)
    return trainable, total


def point_at_base(model, base_source: str) -> None:
    """Records where the base model lives (a URI, hub id or folder): saved adapters point there."""
    for adapter in model.peft_config.values():
        adapter.base_model_name_or_path = base_source


def save_model(model, directory: str) -> None:
    """`save_pretrained`, and for an adapter also the fine-tuned model's config (labels, head sizes)."""
    model.save_pretrained(directory)
    if is_adapter_model(model):
        Path(directory, HEAD_CONFIG).write_text(model.get_base_model().config.to_json_string())


def load_adapter_weights(model, adapter_dir: str) -> None:
    """Restores a checkpoint's adapter (and head) weights into the wrapped `model` in place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise RuntimeError(f"adapter {adapter_dir} does not fit the model: unexpected {result.unexpected_keys[:5]}")


def base_source(adapter_dir: str) -> str:
    return json.loads(Path(adapter_dir, ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def load_model(task, model_dir: str, base_dir: str, merge: bool = False, adapter_name: str = "default"):
    """An adapter folder -> (model, processor): the base model's weights under the fine-tuned config,
    loaded by the task as any saved model, then the adapter on top (merged into the weights if asked).
    `base_dir` is the base model's local folder (or hub id)."""
    from peft import PeftModel

    if not os.path.isdir(base_dir):  # a hub id
        from huggingface_hub import snapshot_download

        base_dir = snapshot_download(base_dir, allow_patterns=["*.safetensors", "*.safetensors.index.json"])
    with tempfile.TemporaryDirectory() as view:
        # a folder that looks like the fine-tuned model: the base's weights, the adapter's config and processor
        for f in Path(base_dir).glob("*.safetensors"):
            os.symlink(f.resolve(), Path(view, f.name))
        index = Path(base_dir, "model.safetensors.index.json")
        if index.is_file():
            shutil.copy(index, view)
        for f in Path(model_dir).iterdir():
            if f.is_file() and f.name not in PEFT_FILES:
                shutil.copy(f, view)
        shutil.copy(Path(model_dir, HEAD_CONFIG), Path(view, "config.json"))
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the head is missing from the base on purpose: the adapter brings it
        try:
            base, processor = task.load(view)
        finally:
            hf_logging.set_verbosity(verbosity)
    with peft_quietly():
        model = PeftModel.from_pretrained(base, model_dir, adapter_name=adapter_name)
    return (model.merge_and_unload() if merge else model), processor


class AdapterView(torch.nn.Module):
    """One adapter of a shared base model, as a model of its own: its forward passes (and `generate`) run with
    it as the base's active adapter, under the base's lock, so requests for another adapter never get its
    weights, whatever batches or threads they share. `config` is the adapter's own (its labels)."""

    def __init__(self, shared: SharedBase, name: str, config):
        super().__init__()
        self.shared, self.name, self.config = shared, name, config
        self.peft = shared.model  # registered as a sub-module: .to(), .eval() reach the shared model

    def forward(self, *args, **kwargs):
        with self.shared.lock:
            self.activate()
            return self.peft(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.shared.lock:
            self.activate()
            return self.peft.generate(*args, **kwargs)

    def activate(self) -> None:
        """Makes this adapter the active one; a walk over every module, so only when another one is."""
        if self.peft.active_adapter != self.name:
            self.peft.set_adapter(self.name)

    @property
    def device(self):
        return next(self.peft.parameters()).device

    @property
    def dtype(self):
        return next(self.peft.parameters()).dtype

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.peft.get_base_model(), name)


class SharedBase:
    """A base model loaded once, with the adapters of its users loaded onto it (PEFT's multi-adapter model)."""

    def __init__(self, model):
        import threading

        self.model, self.lock, self.adapters = model, threading.RLock(), set()
        self.unused: str | None = None  # PEFT keeps at least one adapter: the last one released stays loaded


class AdapterPool:
    """The adapters a Serve replica holds, over base models it loads once each. `view` loads one adapter onto
    its base (loading the base the first time); `release` drops the adapter, the base stays. Adapters over one
    base must share its head's shape (e.g. the same number of labels)."""

    def __init__(self):
        self.bases: dict[str, SharedBase] = {}

    def view(self, task, model_id: str, adapter_dir: str, base_dir: str, load_processor):
        """(the adapter as a model, its processor); `load_processor(folder)` reads a saved processor."""
        from transformers import AutoConfig

        name = peft_name(model_id)
        shared = self.bases.get(base_dir)
        if shared is None:
            model, processor = load_model(task, adapter_dir, base_dir, merge=False, adapter_name=name)
            shared = self.bases[base_dir] = SharedBase(model.eval())
        elif shared.unused == name:  # released last, still loaded
            shared.unused = None
            processor = load_processor(adapter_dir)
        else:
            with shared.lock, peft_quietly():
                shared.model.load_adapter(adapter_dir, adapter_name=name)
                shared.model.eval()
                if shared.unused is not None:
                    shared.model.delete_adapter(shared.unused)
                    shared.unused = None
            processor = load_processor(adapter_dir)
        shared.adapters.add(name)
        return AdapterView(shared, name, AutoConfig.from_pretrained(Path(adapter_dir, HEAD_CONFIG))), processor

    def release(self, model_id: str, base_dir: str) -> None:
        name = peft_name(model_id)
        shared = self.bases.get(base_dir)
        if shared is None or name not in shared.adapters:
            return
        with shared.lock:
            shared.adapters.discard(name)
            if shared.adapters:
                shared.model.delete_adapter(name)
            else:
                shared.unused = name


def peft_name(model_id: str) -> str:
    """The adapter's name inside PEFT's model: one per model id (hex spells it out: `a-b` and `a_b` stay apart),
    a Python identifier, and never a part of PEFT's own `lora_` prefix (a model called `a` would be, and PEFT
    may then re-initialise its weights on loading)."""
    return "adapter_" + model_id.encode().hex()


def merge_adapter(cfg, output: str) -> str:
    """`rayformers merge-adapter`: the adapter of `predict.model` (else train.output/model) merged into its base,
    written to `output` as a full model (with its processor) that any `from_pretrained` loads."""
    from errors import UserError
    from models import get_task
    from pipelines.storage import Storage, commit_dir

    storage = Storage.from_config(cfg.storage)
    source = cfg.predict.model or (f"{cfg.train.output.rstrip('/')}/model" if cfg.train.output else None)
    if not source:
        raise UserError("predict.model: set it to the adapter to merge (or set train.output, whose model/ it is)")
    local = storage.model_path(source)
    if not is_adapter_dir(local):
        raise UserError(f"predict.model: {source} is a full model already, not a LoRA adapter (no {ADAPTER_CONFIG})")
    if storage.exists(output):
        raise UserError(f"{output}: exists already; merge into a new folder (nothing is overwritten)")
    model, processor = load_model(get_task(cfg.task), local, storage.model_path(base_source(local)), merge=True)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        processor.save_pretrained(d)
        commit_dir(storage, d, output)
    return output
