"""Generation settings shared by the tasks that generate text (text-generation, summarization,
translation): the task_options defaults, `predict.parameters` and a request's `parameters` merged
into one checked set of `model.generate` arguments, bounded by `task_options.max_new_tokens_limit`.

A request that asks for more than the limit is refused with a clear error (Serve answers 422), not
silently capped: the caller learns why the answer would be shorter than asked.
"""

from __future__ import annotations

from models.parameters import Flag, Number, ParameterError, Strings, sanitize

__all__ = ["ParameterError", "check_parameters", "merge_settings", "generate_kwargs", "cut_at_stop", "held_back"]

# Bounds on what one request may ask for: beams and new tokens multiply the work of generating, and each
# stop string is searched for after every streamed token (70k of them cost 0.15 s of CPU per token).
RULES = {
    "max_new_tokens": Number(int, 1, 4096),  # and at most task_options.max_new_tokens_limit
    "min_new_tokens": Number(int, 0, 4096),  # likewise
    "num_beams": Number(int, 1, 16),
    "length_penalty": Number(float, -10, 10),
    "no_repeat_ngram_size": Number(int, 0, 64),
    "early_stopping": Flag(),
    "do_sample": Flag(),
    "temperature": Number(float, 0, 100, above=True),
    "top_p": Number(float, 0, 1, above=True),
    "top_k": Number(int, 0, 1000),
    "repetition_penalty": Number(float, 0, 100, above=True),
    "seed": Number(int, 0, 2**32 - 1),
    "return_full_text": Flag(),
    "stop": Strings(max_items=16, max_length=64),
}
SAMPLING = ("temperature", "top_p", "top_k")  # only passed to generate() when do_sample is on
NOT_FOR_GENERATE = ("seed", "return_full_text", "stop")


def check_parameters(parameters: dict, accepted: tuple[str, ...], limit: int, task: str) -> dict:
    """A request's (or predict.parameters') generation parameters, checked and normalised."""
    checked = sanitize(parameters, {key: RULES[key] for key in accepted}, f"generation parameter of {task}")
    for key in ("max_new_tokens", "min_new_tokens"):
        if checked.get(key, 0) > limit:
            raise ParameterError(
                f"parameters.{key}: {checked[key]} is over this model's limit of {limit} "
                "(task_options.max_new_tokens_limit)"
            )
    return checked


def merge_settings(defaults: dict, parameters: dict, accepted: tuple[str, ...], limit: int) -> dict:
    """`defaults` (from task_options) updated by `parameters`, each checked; unknown keys refused."""
    return {**defaults, **check_parameters(parameters, accepted, limit, "this task")}


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
