"""What the config schema knows of a task, and how it finds out without importing the task modules.

The schema sits below the tasks (`jobs → pipelines → models → config`), yet a job must fit its task:
a data format the task reads, `task_options` its `Options` accept, an architecture it builds, columns
it has. The task registry (`models/__init__.py`) installs its lookup here when it is imported, so any
process that runs a task (the CLI, a Ray worker) has it; the schema asks at validation time.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from pydantic import BaseModel


class TaskInfo(Protocol):
    """The parts of a `models.spec.TaskSpec` the config is checked against."""

    formats: dict[str, Any]  # data formats the task adds to the generic ones
    Options: type[BaseModel] | None  # the schema of `task_options`, or None
    architectures: tuple[str, ...]  # what model.init.architecture accepts
    columns: tuple[Any, ...]  # canonical input columns (each has a `name`)


_lookup: Callable[[str], TaskInfo] | None = None
_names: Callable[[], list[str]] | None = None


def install(lookup: Callable[[str], TaskInfo], names: Callable[[], list[str]]) -> None:
    """Called by the task registry: `lookup(name)` gives a task (UserError for an unknown one), `names()`
    lists them."""
    global _lookup, _names
    _lookup, _names = lookup, names


def task_info(name: str) -> TaskInfo:
    if _lookup is None:
        raise RuntimeError("no task registry installed: import models before validating a job config")
    return _lookup(name)


def task_names() -> list[str]:
    if _names is None:
        raise RuntimeError("no task registry installed: import models before validating a job config")
    return _names()
