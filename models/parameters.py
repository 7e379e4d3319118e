"""Request `parameters`: what each task accepts and within which bounds, checked before any work.

Each task's `TaskSpec.sanitize_parameters` hands its table of rules to `sanitize` (as Hugging Face
pipelines sort their keyword arguments in `_sanitize_parameters`). Serve calls it on a request before
batching (422 naming the parameter and its allowed range), `predict` on `predict.parameters` before Ray
starts. Every number has an upper bound, so no parameter can make one request cost more than a bounded
amount of work; an unknown parameter is refused rather than silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from errors import UserError


class ParameterError(UserError, ValueError):
    """A parameter that cannot be used: a user error (exit 2 in the CLI, 422 from Serve)."""


@dataclass(frozen=True)
class Number:
    """An int or float in [low, high] (or (low, high] with `above`)."""

    kind: type
    low: float
    high: float
    above: bool = False  # low itself is excluded

    def demand(self) -> str:
        if self.above:
            return f"above {self.low:g} and at most {self.high:g}"
        return f"between {self.low:g} and {self.high:g}"

    def check(self, key: str, value: Any) -> Any:
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind) or isinstance(value, bool):
            raise ParameterError(f"parameters.{key}: expected {self.kind.__name__}, got {json.dumps(value)}")
        if value < self.low or value > self.high or (self.above and value == self.low):
            raise ParameterError(f"parameters.{key}: must be {self.demand()}, got {json.dumps(value)}")
        return value


@dataclass(frozen=True)
class Flag:
    def check(self, key: str, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ParameterError(f"parameters.{key}: expected true or false, got {json.dumps(value)}")
        return value


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]

    def check(self, key: str, value: Any) -> Any:
        if value not in self.values:
            raise ParameterError(f"parameters.{key}: must be one of {', '.join(self.values)}, got {json.dumps(value)}")
        return value


@dataclass(frozen=True)
class Strings:
    """A list of non-empty strings (one string counts as a list of one), bounded in count and length."""

    max_items: int
    max_length: int

    def check(self, key: str, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise ParameterError(
                f"parameters.{key}: expected a list of non-empty strings, got {json.dumps(value)[:80]}"
            )
        if len(value) > self.max_items:
            raise ParameterError(f"parameters.{key}: at most {self.max_items} strings, got {len(value)}")
        longest = max((len(s) for s in value), default=0)
        if longest > self.max_length:
            raise ParameterError(
                f"parameters.{key}: each string at most {self.max_length} characters, got one of {longest}"
            )
        return value


# Shared bounds. A classifier's top_k is capped by its label count anyway; the bound stops a request
# from asking a fill-mask model for its whole vocabulary at every mask.
TOP_K = Number(int, 1, 100)
THRESHOLD = Number(float, 0, 1)


def sanitize(parameters: dict, rules: dict[str, Any], owner: str) -> dict:
    """`parameters` checked against `rules` (name -> Number/Flag/Choice/Strings) and normalised; None
    values are left out (the task's default applies). `owner` completes "not a ...": "parameter of fill-mask"."""
    if not isinstance(parameters, dict):
        raise ParameterError(f"parameters: expected a mapping, got {type(parameters).__name__}")
    out = {}
    for key, value in parameters.items():
        if key not in rules:
            accepted = ", ".join(rules) if rules else "none"
            raise ParameterError(f"parameters.{key}: not a {owner} (accepted: {accepted})")
        if value is not None:
            out[key] = rules[key].check(key, value)
    return out
