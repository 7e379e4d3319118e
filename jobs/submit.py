"""`rayformers submit`: runs `train`, `predict` or `serve` as a Ray job on a cluster, through the
dashboard's Jobs API, and follows its logs until it ends.

What travels: rayformers' own code (jobs/, pipelines/, models/, config/, errors.py) and the config file,
as the job's working_dir; no virtualenv, data, outputs or caches, so the upload stays far below Ray's 100 MiB
limit. On the cluster the job runs `python -m jobs.cli VERB job_config/NAME.yaml KEY=VALUE ...`: the
code comes from the upload, its dependencies from the nodes' Python (the image in infra/docker
installs them; the nodes of infra/local run the project's venv). Inside a job Ray sets RAY_ADDRESS
to the cluster, so the verb joins it instead of starting a Ray of its own.

Token authentication: the token comes from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names,
else ~/.ray/auth_token (the order Ray uses). RAY_AUTH_MODE=token sends it with every request;
RAY_AUTH_MODE=disabled never sends it; with RAY_AUTH_MODE unset it is sent only once the dashboard
answers that it needs one (HTTP 401), so a cluster without authentication never sees it.

The Serve API key (`serve.api_key=...` among the overrides, or RAYFORMERS_API_KEY here for `--verb
serve`) travels as a file in the working_dir, named by RAYFORMERS_API_KEY_FILE: never in the job's
command line or environment, which `ray job list` and the dashboard show.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import requests
from ray.exceptions import AuthenticationError
from ray.job_submission import JobSubmissionClient

from config import JobConfig, without_api_key
from errors import UserError
from pipelines.serve_http import API_KEY_ENV, API_KEY_FILE_ENV

PROJECT = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "pipelines", "models", "config")  # what the job imports; everything else stays home
MODULES = ("errors.py",)
SKIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
CONFIG_DIR = "job_config"  # the job's YAML (and a Serve API key file); not `config`, which is a package


def stage(directory: Path, config_path: str) -> Path:
    """Fills `directory` with the job's working_dir: the packages and the config file. Returns the
    config's path relative to it."""
    for package in PACKAGES:
        shutil.copytree(PROJECT / package, directory / package, ignore=SKIPPED)
    for module in MODULES:
        shutil.copyfile(PROJECT / module, directory / module)
    shipped = Path(CONFIG_DIR) / Path(config_path).name
    (directory / CONFIG_DIR).mkdir()
    shutil.copyfile(config_path, directory / shipped)
    return shipped


def entrypoint(verb: str, shipped_config: Path, overrides: list[str]) -> str:
    return shlex.join(["python", "-m", "jobs.cli", verb, str(shipped_config), *overrides])


def runtime_env(working_dir: Path, key_file: str | None = None) -> dict:
    # Set before any process of the job starts, so Ray Data's progress bars stay out of the logs as
    # they do in local runs. env_vars must not repeat a key that pipelines.cluster.connect passes to
    # ray.init inside the job: Ray refuses to merge a job's and a driver's runtime_env that do.
    env = {"PYTHONUNBUFFERED": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    if key_file:  # the file's path, not the key: `ray job list` shows every env_var
        env[API_KEY_FILE_ENV] = key_file
    return {"working_dir": str(working_dir), "env_vars": env}


def ship_api_key(directory: Path, cfg: JobConfig, overrides: list[str], verb: str) -> str | None:
    """The Serve API key given in the overrides (or, for `--verb serve`, in RAYFORMERS_API_KEY here) as a
    file in the working_dir: its path relative to it, or None when there is no key to ship. The job's
    command line and environment, which the dashboard and `ray job list` show, never hold the key."""
    if verb != "serve":
        return None
    given = without_api_key(overrides) != list(overrides)
    key = cfg.serve.api_key.get_secret_value() if given and cfg.serve.api_key else os.environ.get(API_KEY_ENV)
    if not key:
        return None
    path = Path(CONFIG_DIR) / "serve_api_key"
    (directory / path).write_text(key)
    (directory / path).chmod(0o600)
    return str(path)


def local_paths(cfg: JobConfig, verb: str) -> list[str]:
    """`key=value` for each path the verb uses that lives on this machine, which the cluster's nodes
    cannot see (the config holds them absolute; a hub id or a URI is not one)."""
    if verb in ("train", "tune"):
        keys = ["model.source", "data.train", "data.eval", "train.output"] + (["tune.output"] if verb == "tune" else [])
    elif verb == "predict":
        model = "predict.model" if cfg.predict.model else "train.output" if cfg.train.output else "model.source"
        keys = [model, "predict.input", "predict.output"]
    else:
        keys = ["serve.model", "model.source"]
    found = []
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and value.startswith(("/", "file://")):
            found.append(f"{key}={value}")
    return found


# --- authentication ----------------------------------------------------------------------------


def find_token() -> tuple[str | None, str | None]:
    """The Ray auth token and where it came from, looked up where Ray looks."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
        if path and os.path.isfile(path):
            token = Path(path).read_text().strip()
            if token:
                return token, path
    return None, None


def tokens_to_try(mode: str | None, token: str | None) -> list[str | None]:
    """The tokens to send, in order, for the RAY_AUTH_MODE in effect (None: send none)."""
    mode = (mode or "").lower()
    if mode == "disabled":
        return [None]
    if mode == "token":
        return [token]
    return [None, token] if token else [None]


def connect_and_submit(address: str, **job) -> tuple[JobSubmissionClient, str, str | None]:
    """Submits the job; returns the client, the job id and the token that worked. Each way of failing
    to reach or to satisfy the dashboard is one UserError naming the address."""
    token, source = find_token()
    for sent in tokens_to_try(os.environ.get("RAY_AUTH_MODE"), token):
        try:
            # An explicit Authorization header also keeps Ray from adding its own.
            client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {sent}"} if sent else None)
            return client, client.submit_job(**job), sent
        except AuthenticationError:
            continue  # the next try, if any, sends the token
        except (ConnectionError, requests.exceptions.ConnectionError):
            raise UserError(
                f"{address}: no Ray dashboard answers there (is the cluster up, and is this its "
                "dashboard address, by default port 8265?)"
            ) from None
        except RuntimeError as exc:  # an HTTP error from something that is not a Ray 2.x dashboard
            raise UserError(f"{address}: {str(exc).splitlines()[0]}") from None
    if sent:
        raise UserError(f"{address}: the cluster refused the Ray auth token from {source}")
    raise UserError(
        f"{address}: the cluster requires a Ray auth token and none was found "
        "(set RAY_AUTH_TOKEN, or put the head node's token in ~/.ray/auth_token)"
    )


# --- the verb ----------------------------------------------------------------------------------


def submit(config_path: str, overrides: list[str], cfg: JobConfig, address: str, verb: str, wait: bool = True) -> int:
    """Submits `rayformers VERB CONFIG OVERRIDES` as a Ray job; with `wait`, prints its logs until it
    ends. Returns the exit code: 0 when the job succeeded (or was only submitted), 1 when it failed
    or was stopped."""
    address = address.rstrip("/")
    if not address.startswith(("http://", "https://")):
        raise UserError(f"--address: {address} is not the dashboard's URL (e.g. http://HOST:8265)")
    for item in local_paths(cfg, verb):
        print(
            f"rayformers: warning: {item} is a path on this machine; the job runs on the cluster's nodes, "
            "which need an s3:// URI or a path they all share",
            file=sys.stderr,
        )

    with tempfile.TemporaryDirectory(prefix="rayformers-job-") as staging:
        shipped = stage(Path(staging), config_path)
        key_file = ship_api_key(Path(staging), cfg, overrides, verb)
        client, job_id, token = connect_and_submit(
            address,
            entrypoint=entrypoint(verb, shipped, without_api_key(overrides)),
            runtime_env=runtime_env(Path(staging), key_file),
            metadata={"rayformers_verb": verb, "rayformers_config": Path(config_path).name},
        )  # the working_dir is uploaded by now; the staging copy can go

    ray_cli = ("RAY_AUTH_MODE=token " if token and os.environ.get("RAY_AUTH_MODE") != "token" else "") + "ray job"
    print(f"submitted {verb} job {job_id} to {address}", flush=True)
    if not wait:
        print(f"  follow: {ray_cli} logs --address {address} --follow {job_id}")
        print(f"  status: {ray_cli} status --address {address} {job_id}")
        print(f"  stop:   {ray_cli} stop --address {address} {job_id}", flush=True)
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\nrayformers: stopped following; job {job_id} goes on (stop it: {ray_cli} stop --address {address} "
            f"{job_id})",
            file=sys.stderr,
        )
        return 130
    except (ConnectionError, requests.exceptions.ConnectionError, aiohttp.ClientError):  # the cluster went away
        raise UserError(f"{address}: lost the connection to the cluster while following job {job_id}") from None
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED", flush=True)
        return 0
    # e.g. "Job entrypoint command failed with exit code 2, last available logs (...):" and the logs again
    message = (client.get_job_info(job_id).message or "").strip().split(", last available logs")[0].splitlines()
    print(f"rayformers: job {job_id} {status}" + (f": {message[0]}" if message else ""), file=sys.stderr)
    return 1


def follow(client: JobSubmissionClient, job_id: str) -> str:
    """Prints the job's logs as they come until it ends; returns its final status."""
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed ..."

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the log stream broke off; the job itself goes on
        print(f"rayformers: the log stream ended early ({exc}); waiting for job {job_id} to end", file=sys.stderr)
    status = client.get_job_status(job_id)
    while not status.is_terminal():  # the stream closes as the job ends; its status may lag a moment
        time.sleep(1)
        status = client.get_job_status(job_id)
    return str(status.value)
