"""Generation settings shared by the tasks that generate text (text-generation, summarization,
translation): the task_options defaults, `predict.parameters` and a request's `parameters` merged
into one checked set of `model.generate` arguments, bounded by `task_options.max_new_tokens_limit`.

A request that asks for more than the limit is refused with a clear error (Serve answers 422), not
silently capped: the caller learns why the answer would be shorter than asked.
"""

from __future__ import annotations

import json

from models.spec import UserError

# parameter -> (type, check, what the check demands)
CHECKS = {
    "max_new_tokens": (int, lambda v: v >= 1, "at least 1"),
    "min_new_tokens": (int, lambda v: v >= 0, "at least 0"),
    "num_beams": (int, lambda v: 1 <= v <= 16, "between 1 and 16"),
    "length_penalty": (float, lambda v: True, ""),
    "no_repeat_ngram_size": (int, lambda v: v >= 0, "at least 0"),
    "early_stopping": (bool, lambda v: True, ""),
    "do_sample": (bool, lambda v: True, ""),
    "temperature": (float, lambda v: v > 0, "above 0"),
    "top_p": (float, lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (int, lambda v: v >= 0, "at least 0"),
    "repetition_penalty": (float, lambda v: v > 0, "above 0"),
    "seed": (int, lambda v: v >= 0, "at least 0"),
    "return_full_text": (bool, lambda v: True, ""),
    "stop": (list, lambda v: all(isinstance(s, str) and s for s in v), "non-empty strings"),
}
SAMPLING = ("temperature", "top_p", "top_k")  # only passed to generate() when do_sample is on
NOT_FOR_GENERATE = ("seed", "return_full_text", "stop")


class ParameterError(UserError, ValueError):
    """A generation parameter that cannot be used: a user error, and a 422 answer from Serve."""


def _checked(key: str, value, kind):
    if kind is list and isinstance(value, str):
        value = [value]  # `stop` may be one string
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ParameterError(f"parameters.{key}: expected {kind.__name__}, got {json.dumps(value)}")
    return value


def merge_settings(defaults: dict, parameters: dict, accepted: tuple[str, ...], limit: int) -> dict:
    """`defaults` (from task_options) updated by `parameters`, each checked; unknown keys refused."""
    settings = dict(defaults)
    for key, value in parameters.items():
        if key not in accepted:
            raise ParameterError(f"parameters.{key}: not a generation parameter of this task (accepted: {', '.join(accepted)})")
        if value is None:
            continue
        kind, ok, demand = CHECKS[key]
        value = _checked(key, value, kind)
        if not ok(value):
            raise ParameterError(f"parameters.{key}: must be {demand}, got {json.dumps(value)}")
        settings[key] = value
    if settings["max_new_tokens"] > limit:
        raise ParameterError(f"parameters.max_new_tokens: {settings['max_new_tokens']} is over this model's limit of "
                             f"{limit} (task_options.max_new_tokens_limit)")
    return settings


def generate_kwargs(settings: dict) -> dict:
    """The settings `model.generate` takes (sampling knobs only when sampling)."""
    out = {k: v for k, v in settings.items() if k not in NOT_FOR_GENERATE and v is not None}
    if not out.get("do_sample"):
        for key in SAMPLING:
            out.pop(key, None)
    return out


def cut_at_stop(text: str, stops: list[str] | None) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops or ()) if i >= 0), default=-1)
    return text[:cut] if cut >= 0 else text


def held_back(text: str, stops: list[str] | None) -> int:
    """How many trailing characters of `text` could be the start of a stop string (not yet safe to stream)."""
    longest = 0
    for stop in stops or ():
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
