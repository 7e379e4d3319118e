"""`rayformers serve`: the CLI verb. Checks that the configured models exist, joins or starts Ray, and runs
the Serve application that pipelines/serve.py builds until Ctrl-C; or, with --export-config, writes a Serve
config YAML for `serve deploy` (or a KubeRay RayService) instead.
"""

from __future__ import annotations

import copy
import os
import time

import ray
import yaml
from ray import serve

from config import JobConfig, without_api_key
from errors import UserError
from models import get_task
from pipelines.cluster import connect, verbose
from pipelines.serve import (
    APP_NAME,
    HEALTH_IMPORT_PATH,
    IMPORT_PATH,
    default_source,
    deployment_options,
    health_options,
    health_route,
    ingress_options,
    run_apps,
)
from pipelines.serve_ingress import api_key
from pipelines.storage import Storage


def check_sources(cfg: JobConfig) -> None:
    """predict.parameters are usable and every model location exists, checked before Ray starts (hub ids
    are left to `from_pretrained`)."""
    get_task(cfg.task).sanitize_parameters(cfg.predict.parameters, cfg.options())  # the defaults every request gets
    storage = Storage.from_config(cfg.storage)
    sources = {f"serve.models.{k}": v for k, v in cfg.serve.models.items()}
    default = default_source(cfg)
    if default:
        sources["serve.model"] = default
    elif not sources:
        raise UserError("serve.model: say which model to serve (or set train.output, model.source or serve.models)")
    for key, source in sources.items():
        is_path = "://" in source or source.startswith((".", "/", "~")) or os.path.exists(source)
        if is_path and not storage.exists(source):
            raise UserError(f"{key}: {source}: no such model directory (train first, or point it at a saved model)")


def run_serve(cfg: JobConfig) -> None:
    check_sources(cfg)
    s = cfg.serve
    local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    connect(cfg.ray.address, cfg.ray.num_cpus, s.max_replicas * s.threads_per_replica)
    if s.use_gpu and ray.cluster_resources().get("GPU", 0) == 0:
        raise UserError("serve.use_gpu: the Ray cluster has no GPUs")
    key = api_key(cfg)
    if key and not s.api_key:  # replicas on other machines do not see this shell's environment or files
        cfg = cfg.model_copy(deep=True)
        cfg.serve.api_key = key
    # without -v, Serve's controller, proxy and replicas log warnings and errors only (500s keep their traceback)
    logs = None if verbose() else {"log_level": "WARNING"}
    serve.start(http_options={"host": s.host, "port": s.port}, logging_config=logs)
    try:
        run_apps(cfg, APP_NAME, s.route_prefix, logs)
        url = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
        print(
            f"serving {cfg.task} at {url}/predict (health {url}/healthz, API docs {url}/docs); Ctrl-C stops", flush=True
        )
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.delete(f"{APP_NAME}-health")
        serve.delete(APP_NAME)
        if local:  # the local Ray ends with Serve's controller and proxy in it (serve.shutdown() first had the
            ray.shutdown()  # raylet print "Task ServeController.graceful_shutdown failed" on the console)


def export_config(cfg: JobConfig, config_path: str, overrides: list[str], out_file: str) -> None:
    """Writes a Serve config YAML for `serve deploy` (or a KubeRay RayService's serveConfigV2)."""
    from ray.serve.schema import ServeDeploySchema

    s = cfg.serve
    kept = without_api_key(overrides)
    args: dict = {"config": os.path.abspath(config_path)}
    if kept:
        args["overrides"] = kept
    applications = [
        {
            "name": APP_NAME,
            "route_prefix": s.route_prefix,
            "import_path": IMPORT_PATH,
            "args": args,
            "deployments": [ingress_options(cfg), deployment_options(cfg)],
        },
        {
            "name": f"{APP_NAME}-health",
            "route_prefix": health_route(s.route_prefix),
            "import_path": HEALTH_IMPORT_PATH,
            "args": copy.deepcopy(args),  # not a YAML alias of the first app's
            "deployments": [health_options(cfg)],
        },
    ]
    config = {"http_options": {"host": s.host, "port": s.port}, "applications": applications}
    ServeDeploySchema.model_validate(config)
    text = yaml.safe_dump(config, sort_keys=False)
    if s.api_key and s.api_key.get_secret_value() in text:  # a last guard: the key never lands in this file
        raise UserError(
            "serve.api_key: it would appear in the exported Serve config; set RAYFORMERS_API_KEY on the "
            "cluster instead of passing the key in overrides"
        )
    try:
        with open(out_file, "w") as f:
            f.write(text)
    except OSError as exc:
        raise UserError(f"{out_file}: cannot write the Serve config ({exc.strerror})") from None
    note = " (serve.api_key left out: set RAYFORMERS_API_KEY on the cluster)" if kept != list(overrides) else ""
    print(f"wrote {out_file}{note}; deploy it with: serve deploy {out_file}", flush=True)
