"""Joins the Ray cluster a job runs on: the configured address, RAY_ADDRESS, or a fresh local Ray.

A plain `ray.init()` would silently join whatever cluster `ray start` left on this machine, so
without an address we always start a local instance (`address="local"`).
"""

from __future__ import annotations

import logging
import os
import time

import ray

from errors import UserError
from pipelines.console import attach_log_handlers

# Without -v: Ray Data's and Ray Train's info lines (plans, "Reporting training result", checkpoint paths)
# and transformers' progress bars stay in Ray's log files under /tmp/ray/session_latest/logs; the console
# shows our own lines and warnings.
QUIET_ENV = {
    "RAY_DATA_LOG_LEVEL": "ERROR",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}  # Ray's internal actors use its deprecated options


def verbose() -> bool:
    """Whether the user asked for Ray's own log lines (`-v`, or RAYFORMERS_LOG_LEVEL=INFO/DEBUG)."""
    return os.environ.get("RAYFORMERS_LOG_LEVEL", "WARNING").upper() in ("INFO", "DEBUG")


def quiet_logs() -> None:
    """In this process (the driver, a train worker), Ray's and transformers' info lines go to Ray's log
    files only, unless verbose. Ray Train logs each report under a logger named by its file path, so
    only the root logger's level catches it; Ray Data set its levels when it was imported."""
    if verbose():
        return
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def ray_log_level() -> int:
    """For `ray.init`: its own notices (token authentication is on, ...) only when verbose."""
    return logging.INFO if verbose() else logging.ERROR


def train_log_level() -> str:
    """For Ray Train's `RunConfig(logging_config=...)`: its console lines only when verbose."""
    return "INFO" if verbose() else "WARNING"


def reenter(path: str, wait_s: float = 30) -> None:
    """Enters the driver's working folder `path` again when it was replaced. In a job that `rayformers submit`
    started, the driver stands in the job's working_dir, which Ray unpacks under the node's temp dir. Where
    nodes share a temp dir (Ray's default for a worker node on the head's machine, or one on a shared disk),
    another node setting up the job's working_dir removes that folder and unpacks it again at the same path
    (`overwrite=True` in ray/_private/runtime_env/working_dir.py): the driver's cwd is gone (os.getcwd fails)
    and, for a moment, so is the path. infra/local gives each node a temp dir of its own; this covers the
    rest, waiting up to `wait_s` for the fresh copy."""
    try:
        os.getcwd()
        return
    except FileNotFoundError:
        pass
    deadline = time.monotonic() + wait_s
    while not os.path.isdir(path) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.chdir(path)


def connect(address: str | None, num_cpus: int | None = None, needed_cpus: float = 0) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    address = address or os.environ.get("RAY_ADDRESS")
    # Train V2 routes print() through logging, which shows each progress line twice on a driver.
    env_vars = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    # Ray Train's controller polls its workers every 2 s by default, and waits for a poll at each phase (group
    # started, training done, worker lost): at 0.5 s a tiny run's fit() took 18.5 s instead of 23 s on 2 cores,
    # for one small status call per worker per poll.
    env_vars["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if verbose():
        env_vars["RAYFORMERS_LOG_LEVEL"] = os.environ["RAYFORMERS_LOG_LEVEL"]  # train workers read it
    else:
        env_vars.update(QUIET_ENV)
        quiet_logs()
    runtime_env = {"env_vars": env_vars}
    if address and address.startswith(("http://", "https://")):
        raise UserError(
            f"ray.address: {address} is a dashboard (job submission) address; "
            "use `rayformers submit --address` with it, or the cluster's GCS address (host:6379 or auto)"
        )
    if address:
        cwd = os.getcwd()
        ray.init(address=address, runtime_env=runtime_env, logging_level=ray_log_level())
        reenter(cwd)  # where nodes share a temp dir, joining can replace the folder a submitted driver stands in
    else:
        # Train workers take their CPUs for the whole run; Ray Data's preprocessing actors need CPUs
        # of their own or they are never scheduled (a known deadlock), so a laptop gets extra logical
        # CPUs, plus one for Ray Data's read tasks. The dashboard serves the State API that Ray
        # Train's placement-group cleaner polls.
        cpus = num_cpus or max(os.cpu_count() or 1, int(needed_cpus + 0.999) + 1)
        ray.init(
            address="local",
            num_cpus=cpus,
            dashboard_host="127.0.0.1",
            runtime_env=runtime_env,
            logging_level=ray_log_level(),
            configure_logging=True,
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    attach_log_handlers()  # ray.init set up Ray's loggers anew
