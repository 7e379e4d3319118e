"""The task contract enforces itself: a task module missing a hook fails when it is imported."""

from __future__ import annotations

import pytest

from models import get_task, task_names
from models.spec import StreamingMetric, TaskSpec


def test_every_registered_task_implements_the_whole_contract():
    for name in task_names():
        task = get_task(name)
        assert isinstance(task, TaskSpec) and task.name == name
        assert not getattr(type(task), "__abstractmethods__", None)


def test_a_task_missing_a_hook_cannot_be_built():
    text = type(get_task("text-classification"))
    incomplete = type("NoCollate", (TaskSpec,), {k: v for k, v in vars(text).items() if k != "collate"})
    incomplete.collate = TaskSpec.collate  # the abstract declaration only
    with pytest.raises(TypeError, match="collate"):
        incomplete()


def test_a_metric_must_update_and_compute():
    class Half(StreamingMetric):
        def update(self, outputs, inputs, arrays):
            pass

    with pytest.raises(TypeError, match="compute"):
        Half()
