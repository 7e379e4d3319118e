"""What a user sees when the config or the storage is wrong: exit code 2 and one line naming the
key or the URI, before Ray starts, with no traceback (the CLI run as a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, start_s3_server

EXAMPLE = str(REPO / "jobs/examples/text-classification.yaml")


def rayformers(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
    )


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("train.num_workers=two", "train.num_workers: expected an integer, got 'two'"),
        ("train.epochz=3", "train.epochz: unknown key (did you mean train.epochs?)"),
        ("predict.quantize=int4", "predict.quantize: expected 'none' or 'int8', got 'int4'"),
    ],
)
def test_config_mistakes_name_the_key(override, message):
    assert one_line_error(rayformers("train", EXAMPLE, override)) == f"rayformers: error: {message}"


def test_an_unknown_task_and_a_missing_file(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("task: text-summarisation\nmodel: {source: x}\n")
    assert one_line_error(rayformers("config", str(job))).startswith(
        "rayformers: error: task: unknown task 'text-summarisation'"
    )
    assert (
        one_line_error(rayformers("train", str(tmp_path / "nope.yaml")))
        == f"rayformers: error: {tmp_path}/nope.yaml: no such config file"
    )


def test_a_missing_local_path_is_named(tmp_path):
    line = one_line_error(rayformers("train", EXAMPLE, f"data.train={tmp_path}/absent", f"train.output={tmp_path}/run"))
    assert line == f"rayformers: error: {tmp_path}/absent: no such file or folder"


@pytest.mark.e2e
def test_a_missing_bucket_and_a_missing_key_are_named(s3_endpoint, bucket, tmp_path):
    line = one_line_error(
        rayformers("train", EXAMPLE, "data.train=s3://no-such-bucket/train", f"train.output={tmp_path}/run")
    )
    assert line == "rayformers: error: s3://no-such-bucket/train: bucket 'no-such-bucket' does not exist"
    line = one_line_error(
        rayformers("predict", EXAMPLE, f"predict.model=s3://{bucket}/models/none", f"predict.output={tmp_path}/p")
    )
    assert line == f"rayformers: error: s3://{bucket}/models/none: no such model directory"


@pytest.mark.e2e
def test_refused_credentials_are_named_without_printing_them(tmp_path):
    # a second S3 server that checks credentials: every key is unknown to it
    url, proc = start_s3_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "AKIAWRONGKEY", "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
        result = rayformers("train", EXAMPLE, "data.train=s3://data/train", f"train.output={tmp_path}/run", env=env)
        line = one_line_error(result)
        assert (
            line
            == "rayformers: error: s3://data/train: access denied (the credentials were refused or lack permission)"
        )
        assert (
            "wrong-secret" not in result.stderr + result.stdout and "AKIAWRONGKEY" not in result.stderr + result.stdout
        )
        # data that exists (the example's own demo-output/ folders exist only after `make demo`), so that the
        # output is the first thing checked against the refusing server
        for split in ("train", "eval"):
            (tmp_path / "data" / split).mkdir(parents=True)
            (tmp_path / "data" / split / "part.jsonl").write_text('{"text": "a match", "label": "sports"}\n')
        data = [f"data.train={tmp_path}/data/train", f"data.eval={tmp_path}/data/eval"]
        result = rayformers("train", EXAMPLE, *data, "train.output=s3://out/run", env=env)
        assert (
            one_line_error(result)
            == "rayformers: error: s3://out/run: access denied (the credentials were refused or lack permission)"
        )
    finally:
        proc.terminate()
        proc.wait(10)
