"""`rayformers tune`'s config without Ray: the search space is checked key by key before anything starts, and a
trial's config is the job's with the sampled values, its own train.output and no tune section."""

from __future__ import annotations

import pytest

from errors import UserError
from pipelines.tune import check_space, trial_config
from tests.conftest import job_config


def test_a_search_space_names_its_distribution_and_arguments():
    with pytest.raises(UserError, match=r"tune.space: train.lr: expected one distribution \(loguniform, uniform"):
        job_config(tune={"space": {"train.lr": {"normal": [0, 1]}}})
    with pytest.raises(UserError, match=r"tune.space: train.lr: loguniform takes \[low, high\], got \[1e-05\]"):
        job_config(tune={"space": {"train.lr": {"loguniform": [1e-5]}}})
    with pytest.raises(UserError, match="tune.space: train.output: cannot be searched"):
        job_config(tune={"space": {"train.output": {"choice": ["a", "b"]}}})


def test_a_searched_key_must_exist_and_take_the_values_given():
    with pytest.raises(UserError, match=r"tune.space.train.lrr: train.lrr: unknown key"):
        check_space(job_config(tune={"space": {"train.lrr": {"loguniform": [1e-5, 1e-3]}}}))
    with pytest.raises(UserError, match=r"tune.space.train.batch_size: train.batch_size: expected an integer"):
        check_space(job_config(tune={"space": {"train.batch_size": {"choice": [16, "many"]}}}))
    check_space(
        job_config(tune={"space": {"train.lr": {"loguniform": [1e-5, 1e-3]}, "train.warmup_ratio": {"grid": [0, 0.1]}}})
    )


def test_a_trial_is_the_job_with_its_values_its_own_output_and_no_search(tmp_path):
    cfg = job_config(
        train={"output": str(tmp_path / "search")},
        serve={"api_key": "s3cret"},
        tune={"space": {"train.lr": {"loguniform": [1e-5, 1e-3]}}, "num_samples": 8},
    )
    trial = trial_config(cfg, {"train.lr": 3e-4}, str(tmp_path / "search/trials/abc"), "abc")
    assert trial.train.lr == 3e-4 and trial.train.output == str(tmp_path / "search/trials/abc")
    assert trial.track.run_name == "abc" and trial.tune.space == {} and trial.tune.num_samples == 4
    assert trial.serve.api_key.get_secret_value() == "s3cret"  # not the masked text of a dump


def test_the_console_gets_one_line_per_trial_event_and_a_failure_names_its_error(tmp_path, capsys):
    from types import SimpleNamespace

    from pipelines.storage import Storage
    from pipelines.tune import trial_lines

    def trial(trial_id, lr, step, error=""):
        return SimpleNamespace(
            trial_id=trial_id, config={"train.lr": lr}, last_result={"step": step}, get_error=lambda: error
        )

    lines = trial_lines(["train.lr"], "eval_loss", Storage(), str(tmp_path))
    done, stopped = trial("t_0", 0.01, 8), trial("t_1", 1.0, 4)
    failed = trial("t_2", 0.1, None, "Traceback (most recent call last):\n  ...\nValueError: labels out of range\n\n")
    (tmp_path / "trials" / "t_0").mkdir(parents=True)
    (tmp_path / "trials" / "t_0" / "metrics.json").write_text("{}")  # what a run that ends writes
    lines.on_trial_start(0, [], done)
    lines.on_trial_result(0, [], done, {"step": 4, "eval_loss": 1.23456})
    lines.on_trial_result(0, [], done, {"step": 5})  # a report without the metric: no line
    lines.on_trial_complete(0, [], done)
    lines.on_trial_complete(0, [], stopped)
    lines.on_trial_error(0, [], failed)
    assert capsys.readouterr().out.splitlines() == [
        "trial t_0 (train.lr=0.01): started",
        "trial t_0 (train.lr=0.01): step 4 eval_loss=1.2346",
        "trial t_0 (train.lr=0.01): finished at step 8",
        "trial t_1 (train.lr=1): stopped early at step 4",
        "trial t_2 (train.lr=0.1): failed: ValueError: labels out of range",
    ]
