"""`rayformers submit` without a cluster: what the job ships and runs, which token it sends, and the
one-line errors a user sees before anything reaches Ray."""

from __future__ import annotations

import shlex
import socket
from pathlib import Path

import pytest

from config import load_config
from jobs import submit as submit_module
from jobs.cli import main, run
from jobs.submit import entrypoint, find_token, local_paths, runtime_env, stage, tokens_to_try

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = str(REPO / "jobs/examples/text-classification.yaml")
S3_PATHS = [
    "data.train=s3://b/demo/train",
    "data.eval=s3://b/demo/eval",
    "train.output=s3://b/run",
    "predict.input=s3://b/demo/eval",
    "predict.output=s3://b/predictions",
]


def test_the_job_ships_the_packages_and_the_config_and_nothing_else(tmp_path):
    config = tmp_path / "my-job.yaml"
    config.write_text(Path(EXAMPLE).read_text())
    staging = tmp_path / "staging"
    staging.mkdir()
    shipped = stage(staging, str(config))

    assert shipped == Path("job_config/my-job.yaml")
    assert (staging / shipped).read_text() == config.read_text()
    assert sorted(p.name for p in staging.iterdir()) == [
        "config",
        "errors.py",
        "job_config",
        "jobs",
        "models",
        "pipelines",
    ]
    assert (staging / "jobs/cli.py").is_file() and (staging / "pipelines/train_loop.py").is_file()
    assert (staging / "config/job.py").is_file()
    files = [p for p in staging.rglob("*") if p.is_file()]
    assert not [p for p in files if "__pycache__" in p.parts or p.suffix == ".pyc"]
    assert sum(p.stat().st_size for p in files) < 5 * 2**20  # Ray refuses working_dirs over 100 MiB


def test_the_entrypoint_runs_the_verb_on_the_shipped_config_with_each_override_intact():
    overrides = ["train.lr=3e-5", "data.columns={text: body}", "predict.output=s3://b/it's here"]
    command = entrypoint("predict", Path("job_config/job.yaml"), overrides)
    assert shlex.split(command) == ["python", "-m", "jobs.cli", "predict", "job_config/job.yaml", *overrides]


def test_the_jobs_environment_merges_with_the_one_its_driver_asks_ray_for(monkeypatch, tmp_path):
    # Inside the job, pipelines.cluster.connect calls ray.init(runtime_env=...); Ray refuses to merge
    # it with the job's runtime_env when both set the same variable.
    import ray
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from pipelines import cluster

    asked = {}
    monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # connect sets it; restored afterwards
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: asked.update(kwargs))
    cluster.connect("10.0.0.1:6379")
    ours = runtime_env(tmp_path)
    assert ours["working_dir"] == str(tmp_path)
    assert _merge_runtime_env(ours, asked["runtime_env"]) is not None


@pytest.mark.parametrize(
    "mode, token, expected",
    [
        ("token", "t", ["t"]),  # RAY_AUTH_MODE=token: sent from the first request
        ("TOKEN", None, [None]),  # ... and without one the dashboard's refusal names the problem
        ("disabled", "t", [None]),  # never sent
        (None, "t", [None, "t"]),  # unset: sent only once the dashboard asks for it
        (None, None, [None]),
    ],
)
def test_which_tokens_are_tried_follows_ray_auth_mode(mode, token, expected):
    assert tokens_to_try(mode, token) == expected


def test_the_token_is_looked_up_where_ray_looks(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert find_token() == (None, None)

    home_file = tmp_path / ".ray" / "auth_token"
    home_file.parent.mkdir()
    home_file.write_text("from-home\n")
    assert find_token() == ("from-home", str(home_file))

    path_file = tmp_path / "token"
    path_file.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path_file))
    assert find_token() == ("from-path", str(path_file))

    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_token() == ("from-env", "RAY_AUTH_TOKEN")


def test_paths_on_this_machine_that_the_verb_uses_are_pointed_out():
    cfg = load_config(EXAMPLE)  # the example's paths are local folders under demo-output/
    assert [item.split("=")[0] for item in local_paths(cfg, "train")] == ["data.train", "data.eval", "train.output"]
    assert [item.split("=")[0] for item in local_paths(cfg, "predict")] == [
        "train.output",
        "predict.input",
        "predict.output",
    ]
    assert local_paths(load_config(EXAMPLE, S3_PATHS), "train") == []
    assert local_paths(load_config(EXAMPLE, S3_PATHS), "predict") == []


def test_overrides_after_the_options_reach_the_job(monkeypatch):
    seen = {}
    monkeypatch.setattr(submit_module, "submit", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs) or 0)
    code = run(
        ["submit", EXAMPLE, "train.lr=0.25", "--address", "http://h:8265", "train.epochs=1", "--verb", "predict"]
    )
    config_path, overrides, cfg, address, verb = seen["args"]
    assert code == 0 and (config_path, address, verb) == (EXAMPLE, "http://h:8265", "predict")
    assert overrides == ["train.lr=0.25", "train.epochs=1"]
    assert (cfg.train.lr, cfg.train.epochs) == (0.25, 1)
    assert seen["kwargs"] == {"wait": True}


def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_dashboard_nobody_answers_at_is_one_line_naming_the_address(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    address = f"http://127.0.0.1:{port}"
    err = one_line_error(["submit", EXAMPLE, *S3_PATHS, "--address", address], capsys)
    assert err.startswith(f"rayformers: error: {address}: no Ray dashboard answers there")


def test_an_address_that_is_not_a_url_is_refused(capsys):
    err = one_line_error(["submit", EXAMPLE, *S3_PATHS, "--address", "10.0.0.1:6379"], capsys)
    assert err == "rayformers: error: --address: 10.0.0.1:6379 is not the dashboard's URL (e.g. http://HOST:8265)"


def test_a_config_mistake_stops_before_anything_is_sent(capsys):
    # The address is unreachable: reaching it would be a different error.
    err = one_line_error(["submit", EXAMPLE, "train.lrr=1", "--address", "http://127.0.0.1:9"], capsys)
    assert err == "rayformers: error: train.lrr: unknown key (did you mean train.lr?)"


# --- the Serve API key stays secret ----------------------------------------------------------------


def test_the_api_key_is_printed_masked_by_rayformers_config(capsys):
    assert run(["config", EXAMPLE, "serve.api_key=s3cret-key"]) == 0
    printed = capsys.readouterr().out
    assert "s3cret-key" not in printed and "api_key: '**********'" in printed


@pytest.mark.parametrize("override", ["serve.api_key=s3cret-key", "serve={api_key: s3cret-key, port: 9001}"])
def test_the_api_key_is_never_written_to_an_exported_serve_config(tmp_path, override, capsys):
    exported = tmp_path / "serve.yaml"
    assert run(["serve", EXAMPLE, override, "--export-config", str(exported)]) == 0
    text = exported.read_text()
    assert "s3cret-key" not in text and "api_key" not in text
    assert "left out: set RAYFORMERS_API_KEY on the cluster" in capsys.readouterr().out
    if "port" in override:
        assert "port: 9001" in text and "serve={port: 9001}" in text  # the rest of the mapping survives


def test_a_submitted_serve_job_gets_the_api_key_in_a_file_never_in_its_command_line_or_environment(monkeypatch, capsys):
    seen = {}

    def fake_submit(address, **job):
        env = job["runtime_env"]["env_vars"]
        seen.update(job, key=(Path(job["runtime_env"]["working_dir"]) / env["RAYFORMERS_API_KEY_FILE"]).read_text())
        return None, "job-1", None

    monkeypatch.setattr(submit_module, "connect_and_submit", fake_submit)
    assert (
        run(
            [
                "submit",
                EXAMPLE,
                *S3_PATHS,
                "serve.api_key=s3cret-key",
                "--address",
                "http://h:8265",
                "--verb",
                "serve",
                "--no-wait",
            ]
        )
        == 0
    )
    assert seen["key"] == "s3cret-key"
    assert "s3cret-key" not in seen["entrypoint"] and "api_key" not in seen["entrypoint"]
    assert "s3cret-key" not in repr(seen["runtime_env"]) and "s3cret-key" not in repr(seen["metadata"])
    assert "s3cret-key" not in capsys.readouterr().out


def test_replicas_read_the_api_key_from_the_file_a_submitted_job_names(monkeypatch, tmp_path):
    from pipelines.serve_ingress import api_key

    monkeypatch.delenv("RAYFORMERS_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("RAYFORMERS_API_KEY_FILE", str(key_file))
    assert api_key(load_config(EXAMPLE)) == "from-file"
    assert api_key(load_config(EXAMPLE, ["serve.api_key=given"])) == "given"
    monkeypatch.setenv("RAYFORMERS_API_KEY", "from-env")
    assert api_key(load_config(EXAMPLE)) == "from-env"


def test_the_rayservice_example_gives_every_ray_container_the_api_key_from_a_secret():
    import yaml

    manifest = yaml.safe_load((REPO / "infra/k8s/rayservice.yaml").read_text())
    secret = yaml.safe_load((REPO / "infra/k8s/serve-secret-example.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {v["name"]: v for v in container["env"]}
            reference = env["RAYFORMERS_API_KEY"]["valueFrom"]["secretKeyRef"]
            assert reference == {"name": secret["metadata"]["name"], "key": "RAYFORMERS_API_KEY"}
    assert "RAYFORMERS_API_KEY" in secret["stringData"]
    assert "api_key" not in manifest["spec"]["serveConfigV2"]
