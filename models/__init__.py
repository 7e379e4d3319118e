"""The task registry: every task family rayformers knows, by its Hugging Face pipeline name.

Adding a task is one module here with a `TASK` object (a `models.spec.TaskSpec`) and one line
in `TASK_MODULES`. Modules are imported on first use, so the CLI starts fast.
"""

from __future__ import annotations

import importlib

from config import tasks as config_tasks
from errors import UserError
from models.spec import TaskSpec

TASK_MODULES = {
    "audio-classification": "models.audio_classification",
    "automatic-speech-recognition": "models.automatic_speech_recognition",
    "text-classification": "models.text_classification",
    "text-generation": "models.text_generation",
    "summarization": "models.summarization",
    "translation": "models.translation",
    "token-classification": "models.token_classification",
    "question-answering": "models.question_answering",
    "fill-mask": "models.fill_mask",
    "image-classification": "models.image_classification",
    "object-detection": "models.object_detection",
    "image-segmentation": "models.image_segmentation",
    "depth-estimation": "models.depth_estimation",
}


def task_names() -> list[str]:
    return sorted(TASK_MODULES)


def get_task(name: str) -> TaskSpec:
    if name not in TASK_MODULES:
        raise UserError(f"task: unknown task {name!r} (known: {', '.join(task_names())})")
    return importlib.import_module(TASK_MODULES[name]).TASK


config_tasks.install(get_task, task_names)  # the config schema checks a job against its task through these
