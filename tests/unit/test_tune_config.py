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
