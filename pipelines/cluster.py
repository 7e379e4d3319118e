"""Joins the Ray cluster a job runs on: the configured address, RAY_ADDRESS, or a fresh local Ray.

A plain `ray.init()` would silently join whatever cluster `ray start` left on this machine, so
without an address we always start a local instance (`address="local"`).
"""

from __future__ import annotations

import logging
import os

import ray

from models.spec import UserError


def connect(address: str | None, num_cpus: int | None = None, needed_cpus: float = 0) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    address = address or os.environ.get("RAY_ADDRESS")
    # Train V2 routes print() through logging, which shows each progress line twice on a driver.
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    if address and address.startswith(("http://", "https://")):
        raise UserError(f"ray.address: {address} is a dashboard (job submission) address; "
                        "use `rayformers submit --address` with it, or the cluster's GCS address (host:6379 or auto)")
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        # Train workers take their CPUs for the whole run; Ray Data's preprocessing actors need CPUs
        # of their own or they are never scheduled (a known deadlock), so a laptop gets extra logical
        # CPUs, plus one for Ray Data's read tasks. The dashboard serves the State API that Ray
        # Train's placement-group cleaner polls.
        cpus = num_cpus or max(os.cpu_count() or 1, int(needed_cpus + 0.999) + 1)
        ray.init(address="local", num_cpus=cpus, dashboard_host="127.0.0.1", runtime_env=runtime_env,
                 logging_level=logging.WARNING, configure_logging=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
