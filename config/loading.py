"""Loading a job config: one YAML file plus dotted `key=value` overrides, validated once, and shown back
(`rayformers config`, `--explain`).

Every mistake becomes a `UserError` with one line naming the key (`train.lr: expected a number,
got 'fast'`), with a `did you mean …` for a misspelt one.
"""

from __future__ import annotations

import copy
import difflib
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from config.job import JobConfig
from config.section import Section, describe
from config.tasks import task_names
from errors import UserError


def _suggest(error: dict, data: dict) -> str:
    """`did you mean …` for a misspelt key."""
    if error["type"] != "extra_forbidden":
        return ""
    *parents, key = [str(p) for p in error["loc"]]
    model: Any = JobConfig
    for p in parents:
        field = model.model_fields.get(p)
        model = getattr(field, "annotation", None) if field else None
        if not isinstance(model, type) or not issubclass(model, BaseModel):
            return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    return f" (did you mean {'.'.join(parents + close)}?)" if close else ""


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key=value, e.g. train.lr=3e-5")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def without_api_key(overrides: list[str]) -> list[str]:
    """The overrides with serve.api_key taken out (also from a whole `serve={...}` mapping), for what
    gets written down or shown: an exported Serve config, a submitted job's command line."""
    kept = []
    for item, (key, value) in zip(overrides, parse_overrides(list(overrides))):
        if key == "serve.api_key":
            continue
        if key == "serve" and isinstance(value, dict) and "api_key" in value:
            value = {k: v for k, v in value.items() if k != "api_key"}
            item = "serve=" + yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        kept.append(item)
    return kept


def validate(data: dict) -> JobConfig:
    if not isinstance(data, dict):
        raise UserError("config: expected a mapping of keys at the top level")
    if "task" in data and data["task"] not in task_names():
        raise UserError(f"task: unknown task {data['task']!r} (known: {', '.join(task_names())})")
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UserError(describe(first) + _suggest(first, data)) from None


def load_config(path: str | None, overrides: list[str] = (), base: dict | None = None) -> JobConfig:
    """The validated config from a YAML file (or `base`) with overrides applied on top."""
    data: Any = copy.deepcopy(base or {})
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}:{where} is not valid YAML") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of keys at the top level")
    for key, value in parse_overrides(list(overrides)):
        set_dotted(data, key, value)
        # model.source and model.init exclude each other: the one given on the command line wins
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        for chosen, other in (("model.source", "init"), ("model.init", "source")):
            if (key == chosen or key.startswith(chosen + ".")) and value is not None and model.get(other) is not None:
                model.pop(other)
                print(f"{key} given: model.{other} from {path or 'the config'} is not used", file=sys.stderr)
    return validate(data).with_absolute_paths()


def explain_config(cfg: JobConfig) -> str:
    """Every key of the config: its value here, its default when that differs, and its description."""
    lines = []

    def walk(prefix: str, section: Section) -> None:
        for key, info in type(section).model_fields.items():
            current = getattr(section, key)
            if isinstance(current, Section):
                walk(f"{prefix}.{key}", current)
                continue
            if key == "api_key":
                shown = "'**********'" if current else "null"
            else:
                shown = json.dumps(current, default=str)
            default = info.get_default() if not info.is_required() else current
            differs = "" if default == current else f" (default {json.dumps(default, default=str)})"
            lines.append(f"{prefix}.{key} = {shown}{differs}\n    {info.description or ''}")

    for name in JobConfig.model_fields:
        value = getattr(cfg, name)
        if isinstance(value, Section):
            walk(name, value)
    return "\n".join(lines) + "\n"


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
