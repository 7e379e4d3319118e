"""The base of every config section (unknown keys refused, assigned values validated too), and how a
validation error becomes one line that names the key."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def describe(error: dict) -> str:
    """A pydantic error as one line naming the key: `train.lr: expected a number, got 'fast'`."""
    loc = ".".join(str(p) for p in error["loc"])
    kind, given = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    if kind == "missing":
        return f"{loc}: required key is missing"
    if kind in ("float_parsing", "float_type"):
        return f"{loc}: expected a number, got {given!r}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"{loc}: expected an integer, got {given!r}"
    if kind in ("bool_parsing", "bool_type"):
        return f"{loc}: expected true or false, got {given!r}"
    if kind == "literal_error":
        return f"{loc}: expected {error['ctx']['expected']}, got {given!r}"
    if kind in ("string_type",):
        return f"{loc}: expected a string, got {given!r}"
    if kind in ("dict_type", "model_type"):
        return f"{loc}: expected a mapping of keys, got {given!r}"
    message = error["msg"].removeprefix("Value error, ")
    if message.startswith(("model", "serve.", "task:", "task_options", "data.format")) or loc == "":
        return message
    return f"{loc}: {message}"
