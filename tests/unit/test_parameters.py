"""Request parameters are checked by the task before any work: every task refuses keys it does not know,
and every number it accepts has an upper bound, named in the error with the allowed range."""

from __future__ import annotations

import pytest

from errors import UserError
from models import get_task, task_names


@pytest.mark.parametrize("name", task_names())
def test_every_task_refuses_a_parameter_it_does_not_know_and_accepts_none(name):
    task = get_task(name)
    assert task.sanitize_parameters({}, task.Options() if task.Options else None) == {}
    with pytest.raises(UserError, match=r"parameters\.no_such_knob: not a .*parameter of " + name):
        task.sanitize_parameters({"no_such_knob": 1}, None)


OUT_OF_RANGE = [
    ("text-classification", {"top_k": 101}, "parameters.top_k: must be between 1 and 100, got 101"),
    ("image-classification", {"top_k": 0}, "parameters.top_k: must be between 1 and 100, got 0"),
    ("audio-classification", {"top_k": 10**9}, "parameters.top_k: must be between 1 and 100"),
    ("fill-mask", {"top_k": 30522}, "parameters.top_k: must be between 1 and 50, got 30522"),
    ("question-answering", {"top_k": 10_000}, "parameters.top_k: must be between 1 and 20"),
    ("question-answering", {"max_answer_len": 100_000}, "parameters.max_answer_len: must be between 1 and 512"),
    ("object-detection", {"threshold": 2}, "parameters.threshold: must be between 0 and 1, got 2.0"),
    ("image-segmentation", {"mask_threshold": -1}, "parameters.mask_threshold: must be between 0 and 1"),
    (
        "image-segmentation",
        {"subtask": "everything"},
        "parameters.subtask: must be one of semantic, instance, panoptic",
    ),
    ("token-classification", {"ignore_labels": ["O"] * 101}, "parameters.ignore_labels: at most 100 strings"),
    ("text-generation", {"stop": ["x"] * 70_000}, "parameters.stop: at most 16 strings, got 70000"),
    ("text-generation", {"stop": ["x" * 65]}, "parameters.stop: each string at most 64 characters"),
    ("text-generation", {"max_new_tokens": 257}, "parameters.max_new_tokens: 257 is over this model's limit of 256"),
    ("text-generation", {"temperature": 0}, "parameters.temperature: must be above 0 and at most 100, got 0.0"),
    ("text-generation", {"top_k": "many"}, 'parameters.top_k: expected int, got "many"'),
    ("summarization", {"num_beams": 17}, "parameters.num_beams: must be between 1 and 16, got 17"),
    ("translation", {"no_repeat_ngram_size": 1000}, "parameters.no_repeat_ngram_size: must be between 0 and 64"),
    ("translation", {"top_p": 0.5}, "parameters.top_p: not a generation parameter of translation"),
]


@pytest.mark.parametrize("name, parameters, message", OUT_OF_RANGE)
def test_a_parameter_out_of_its_range_is_refused_naming_the_range(name, parameters, message):
    with pytest.raises(UserError) as refused:
        get_task(name).sanitize_parameters(parameters, None)
    assert str(refused.value).startswith(message), refused.value


def test_parameters_come_back_normalised_and_nulls_leave_the_default():
    generation = get_task("text-generation")
    assert generation.sanitize_parameters({"stop": " .", "temperature": 2, "seed": None}, None) == {
        "stop": [" ."],
        "temperature": 2.0,
    }
    options = generation.Options(max_new_tokens=4, max_new_tokens_limit=8)
    with pytest.raises(UserError, match="limit of 8"):
        generation.sanitize_parameters({"max_new_tokens": 9}, options)
    assert get_task("question-answering").sanitize_parameters({"top_k": 3, "handle_impossible_answer": True}, None) == {
        "top_k": 3,
        "handle_impossible_answer": True,
    }


def test_a_bad_predict_parameter_stops_predict_before_ray_starts(monkeypatch, tmp_path):
    import ray

    from config import validate
    from pipelines.predict import predict

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    cfg = validate(
        {
            "task": "fill-mask",
            "model": {"source": str(tmp_path)},
            "predict": {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "parameters": {"top_k": 5000}},
        }
    )
    with pytest.raises(UserError, match="parameters.top_k: must be between 1 and 50"):
        predict(cfg)
