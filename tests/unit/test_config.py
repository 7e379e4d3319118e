"""A job config is validated before Ray starts; each mistake reads as one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import load_config, validate
from errors import UserError

BASE = {"task": "text-classification", "model": {"init": {"architecture": "bert"}}}


def error_of(data=None, overrides=()):
    with pytest.raises(UserError) as info:
        load_config(None, list(overrides), base=data or BASE)
    return str(info.value)


def test_a_word_where_a_number_belongs_names_the_key_and_the_value():
    assert error_of(overrides=["train.lr=fast"]) == "train.lr: expected a number, got 'fast'"


def test_an_unknown_key_is_named_with_a_suggestion():
    assert error_of(overrides=["train.lrr=0.1"]) == "train.lrr: unknown key (did you mean train.lr?)"


def test_an_unknown_task_lists_the_known_ones():
    message = error_of({**BASE, "task": "summarise"})
    assert message.startswith("task: unknown task 'summarise' (known: ") and "text-classification" in message


def test_a_missing_task_is_a_missing_key():
    assert error_of({"model": {"init": {"architecture": "bert"}}}) == "task: required key is missing"


def test_model_needs_exactly_one_of_source_or_init():
    assert "exactly one of model.source" in error_of({"task": "text-classification"})


def test_an_architecture_the_task_lacks_is_refused():
    assert error_of(overrides=["model.init.architecture=gpt2"]).startswith(
        "model.init.architecture: 'gpt2' is not one of bert"
    )


def test_a_column_mapping_for_a_column_the_task_does_not_have():
    assert error_of(overrides=["data.columns.image=img"]).startswith(
        "data.columns.image: text-classification has no column 'image'"
    )


def test_serve_batching_must_fit_in_ongoing_requests():
    assert "max_ongoing_requests" in error_of(overrides=["serve.max_batch_size=64", "serve.max_ongoing_requests=8"])


def test_an_override_without_equals_sign():
    assert "expected key=value" in error_of(overrides=["train.lr"])


def test_overrides_are_typed_and_paths_made_absolute(tmp_path):
    cfg = load_config(
        None, ["train.lr=3e-5", "train.num_workers=2", "train.output=runs/a", "model.init.size=mini"], base=BASE
    )
    assert cfg.train.lr == 3e-5 and cfg.train.num_workers == 2 and cfg.model.init.size == "mini"
    assert cfg.train.output.startswith("/") and cfg.train.output.endswith("runs/a")


def test_uris_and_hub_ids_are_left_alone():
    cfg = load_config(None, ["model.init=null", "model.source=bert-base-uncased", "data.train=s3://b/train"], base=BASE)
    assert cfg.model.source == "bert-base-uncased" and cfg.data.train == "s3://b/train"


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(UserError, match="job.yaml: line 1 is not valid YAML|job.yaml:.* is not valid YAML"):
        load_config(str(bad))
    with pytest.raises(UserError, match="no such config file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_the_example_config_is_valid():
    cfg = load_config("jobs/examples/text-classification.yaml")
    assert cfg.task == "text-classification" and cfg.model.init.architecture == "bert"


EXAMPLES = sorted(Path(__file__).resolve().parents[2].joinpath("jobs/examples").glob("*.yaml"))


def test_there_is_one_example_per_task():
    from models import task_names

    assert sorted(p.stem for p in EXAMPLES) == sorted(task_names())


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_shipped_example_loads_and_validates(example):
    from models import get_task

    cfg = load_config(str(example))
    assert cfg.task == example.stem  # jobs/examples/<task>.yaml describes <task>
    task = get_task(cfg.task)
    assert (cfg.model.source is None) != (cfg.model.init is None)
    if cfg.model.init is not None:
        assert cfg.model.init.architecture in task.architectures
    cfg.options()  # the example's task_options are valid for its task
    assert cfg.data.train and cfg.predict.input and cfg.predict.output


def test_defaults_are_filled_in():
    cfg = validate(BASE)
    assert cfg.train.keep_checkpoints == 2 and cfg.predict.quantize == "none" and cfg.serve.max_batch_size == 8


@pytest.mark.parametrize(
    "task, options, overrides, rows, cached",
    [
        ("text-classification", {}, [], 1000, True),  # deterministic preprocessing, a small split: cached
        ("text-classification", {}, [], 100_001, False),  # past data.cache_max_rows: streamed every epoch
        ("text-classification", {}, ["data.cache_train=false"], 10, False),
        ("image-classification", {}, [], 10, False),  # random crops and flips are drawn afresh each epoch
        ("image-classification", {"random_resized_crop": None, "horizontal_flip": False}, [], 10, True),
        ("image-classification", {}, ["data.cache_train=true"], 10, True),
        ("image-segmentation", {"augment": False}, [], 10, True),
        ("depth-estimation", {}, [], 10, False),
        ("automatic-speech-recognition", {}, [], 10, True),  # decoding audio once is the point
    ],
)
def test_the_training_split_is_cached_only_where_each_epoch_would_preprocess_the_same(
    task, options, overrides, rows, cached
):
    from models import get_task
    from pipelines.train import cache_train

    architecture = {
        "image-classification": "vit",
        "image-segmentation": "segformer",
        "depth-estimation": "glpn",
        "automatic-speech-recognition": "wav2vec2",
    }.get(task, "bert")
    cfg = load_config(
        None, overrides, base={"task": task, "model": {"init": {"architecture": architecture}}, "task_options": options}
    )
    assert cache_train(cfg, get_task(task), rows) is cached


def test_a_model_source_given_on_the_command_line_replaces_the_examples_model_init(capsys):
    from config import load_config

    example = str(EXAMPLES[0].parent / "text-classification.yaml")
    cfg = load_config(example, ["model.source=s3://models/minilm"])
    assert cfg.model.source == "s3://models/minilm" and cfg.model.init is None
    assert f"model.source given: model.init from {example} is not used" in capsys.readouterr().err
    cfg = load_config(
        None, ["model.init.architecture=bert"], base={"task": "text-classification", "model": {"source": "x/y"}}
    )
    assert cfg.model.init.architecture == "bert" and cfg.model.source is None
    # both in one file is still the user's mistake to fix
    with pytest.raises(UserError, match="set exactly one of model.source"):
        load_config(
            None, [], base={"task": "text-classification", "model": {"source": "x/y", "init": {"architecture": "bert"}}}
        )


def test_every_key_explains_itself():
    from config import JobConfig, Section, explain_config

    def keys(prefix, model):
        for name, info in model.model_fields.items():
            nested = (
                info.annotation if isinstance(info.annotation, type) and issubclass(info.annotation, Section) else None
            )
            yield from keys(f"{prefix}.{name}", nested) if nested else [(f"{prefix}.{name}", info.description)]

    undocumented = [
        key
        for name, info in JobConfig.model_fields.items()
        if isinstance(info.annotation, type) and issubclass(info.annotation, Section)
        for key, text in keys(name, info.annotation)
        if not text
    ]
    assert undocumented == []
    cfg = load_config(str(EXAMPLES[0].parent / "text-classification.yaml"), ["train.lr=0.001", "serve.api_key=s3cret"])
    text = explain_config(cfg)
    assert "train.lr = 0.001 (default 5e-05)\n    Peak learning rate of AdamW" in text
    assert "serve.api_key = '**********'" in text and "s3cret" not in text


def test_num_workers_takes_a_count_or_an_elastic_range():
    base = {"task": "text-classification", "model": {"source": "x/y"}}
    assert load_config(None, ["train.num_workers=[1, 4]"], base=base).train.max_workers == 4
    assert load_config(None, ["train.num_workers=2"], base=base).train.max_workers == 2
    with pytest.raises(UserError, match=r"train.num_workers: .*1 <= min <= max, got \(3, 2\)"):
        load_config(None, ["train.num_workers=[3, 2]"], base=base)


def test_a_serve_queue_of_zero_is_refused_as_ray_serve_would():
    base = {"task": "text-classification", "model": {"source": "x/y"}}
    with pytest.raises(UserError, match=r"serve.max_queued_requests: expected -1 \(no limit\) or a count >= 1, got 0"):
        load_config(None, ["serve.max_queued_requests=0"], base=base)
    assert load_config(None, ["serve.max_queued_requests=-1"], base=base).serve.max_queued_requests == -1
