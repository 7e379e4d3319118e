"""`rayformers serve`: the configured model(s) behind a Ray Serve deployment, reached through a light
FastAPI ingress deployment (`serve_ingress`) that answers docs and bad requests itself, with `/healthz` an
application of its own (`run_apps`). Overload is shed by Serve's proxy in front of the ingress
(`ingress_options`).

Each model replica holds the default model (`serve.model`, else `train.output/model`, else `model.source`)
and loads the models of `serve.models` on demand, evicting the least recently used (Serve model
multiplexing). Requests, checked by the ingress, are preprocessed by the task spec on arrival, then grouped
with `@serve.batch` and run through the same `Predictor` as `rayformers predict`, so both give
the same label and score for the same input (to float32 rounding: the rows sharing a forward pass
differ). `check_health` runs every loaded model on a tiny input, so a replica whose model is
broken is replaced. `build_app` is the application builder that `serve deploy` imports (see
`export_config` in jobs/serve.py, where the CLI verb lives).
"""

from __future__ import annotations

import asyncio
import json
import weakref
from dataclasses import dataclass

import transformers
from ray import serve
from ray.serve import metrics

from config import JobConfig, load_config
from errors import UserError
from models import get_task
from models.spec import Features
from pipelines.adapters import AdapterPool, base_source, is_adapter_dir
from pipelines.cluster import verbose
from pipelines.predictor import Predictor
from pipelines.serve_http import URI, RequestError, row_errors
from pipelines.serve_ingress import Health, Ingress, answer_error
from pipelines.storage import Storage, storage_errors

APP_NAME = "rayformers"
DEPLOYMENT_NAME = "Predictor"  # the models; the HTTP ingress in front of them is INGRESS_NAME
INGRESS_NAME = "Ingress"
HEALTH_NAME = "Health"  # `/healthz`, an application of its own (`run_apps`)
IMPORT_PATH = "pipelines.serve:build_app"
HEALTH_IMPORT_PATH = "pipelines.serve:build_health_app"


def serving_limits(cfg: JobConfig):
    """The data settings for decoding request media: images and audio checked against the smaller of the
    data.* and serve.* caps from their headers, before decoding; a long clip is refused, never chunked."""
    d, s = cfg.data, cfg.serve
    return d.model_copy(
        update={
            "max_image_pixels": min(d.max_image_pixels, s.max_image_pixels),
            "max_audio_seconds": min(d.max_audio_seconds, s.max_audio_seconds),
            "long_audio": "reject",
        }
    )


def default_source(cfg: JobConfig) -> str | None:
    if cfg.serve.model:
        return cfg.serve.model
    if cfg.train.output:
        return cfg.train.output.rstrip("/") + "/model"
    return cfg.model.source


def probe_rows(task) -> list[dict]:
    """A tiny input the task accepts, for health checks: one row of its own demo data."""
    row = task.demo_data(1, 0)[0]
    return [{c.name: row[c.name] for c in task.columns if not c.training_only and c.name in row}]


@dataclass
class Pending:
    """One request's rows, preprocessed and checked, waiting for the model."""

    predictor: Predictor
    features: Features
    parameters: dict
    key: str  # requests with the same model, parameters and kind of features run in one batch


# On CPU a forward pass costs what its padded tokens cost, so rows share one only when padding to the
# longest adds at most this much (measured: 8 mixed-length texts run 2x faster cut this way than as one
# batch, and 1.3x faster than one by one). On a GPU a wider batch is nearly free: no bound.
CPU_PADDING_WASTE = 0.25


def similar_lengths(lengths: list[int], batch_size: int, max_waste: float | None) -> list[list[int]]:
    """Row indices in groups of at most `batch_size`, sorted by length, cut where padding would waste too much."""
    groups, group, tokens = [], [], 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        wasteful = max_waste is not None and (len(group) + 1) * lengths[i] > (tokens + lengths[i]) * (1 + max_waste)
        if group and (len(group) == batch_size or wasteful):
            groups.append(group)
            group, tokens = [], 0
        group.append(i)
        tokens += lengths[i]
    return groups + [group] if group else groups


def merge(features: list[Features]) -> Features:
    names = features[0].arrays.keys()
    return Features(
        arrays={n: [v for f in features for v in f.arrays[n]] for n in names},
        lengths=[n for f in features for n in f.lengths],
        errors=[e for f in features for e in f.errors],
    )


class PredictorDeployment:
    """One model replica: the models, the batching, the health check. The ingress (`serve_ingress`) calls
    `predict` and `stream` through a DeploymentHandle with requests it has checked; a request error comes
    back as a value (`answer_error`)."""

    def __init__(self, cfg: JobConfig):
        transformers.utils.logging.disable_progress_bar()  # one bar per model load would flood the replica logs
        s = cfg.serve
        self.cfg = cfg
        self.task = get_task(cfg.task)
        self.options = cfg.options()
        self.storage = Storage.from_config(cfg.storage)
        self.allow_uris = s.allow_uris
        self.media_columns = [c.name for c in self.task.columns if c.kind == "media"]
        self.probe = probe_rows(self.task)
        self.loaded: weakref.WeakValueDictionary[str, Predictor] = weakref.WeakValueDictionary()  # named models
        source = default_source(cfg)
        self.default = self.load("the default model", source) if source else None

        self.adapters = AdapterPool()  # LoRA adapters among serve.models: one copy of each base model

        async def load_named(model_id: str) -> Predictor:
            predictor = await asyncio.to_thread(self.load, f"model {model_id!r}", s.models[model_id], model_id)
            self.loaded[model_id] = predictor  # until the multiplexer evicts it
            return predictor

        # Set up here rather than as decorators so that the limits come from the config.
        self.load_model = serve.multiplexed(max_num_models_per_replica=s.max_models_per_replica)(load_named)
        self.batching = s.max_batch_size > 1
        # Next to the ingress's rayformers_responses and rayformers_request_seconds, on Ray's Prometheus endpoint.
        self.batch_rows = metrics.Histogram(
            "rayformers_batch_rows", "rows in one forward-pass group", boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256]
        )
        self.one_at_a_time = asyncio.Lock()
        self.predict_batch.set_max_batch_size(s.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

    # --- models ---------------------------------------------------------------------------------
    def load(self, name: str, source: str, model_id: str | None = None) -> Predictor:
        s, p = self.cfg.serve, self.cfg.predict
        local, loaded, base = self.storage.model_path(source), None, None
        if model_id is not None and is_adapter_dir(local):  # loaded onto its base, which adapters share
            base = self.storage.model_path(base_source(local))
            loaded = self.adapters.view(
                self.task, model_id, local, base, lambda d: self.task.build_processor(self.cfg.model, d, iter(()))
            )
        predictor = Predictor(
            self.cfg.task,
            local,
            batch_size=p.batch_size,
            use_gpu=s.use_gpu,
            quantize=p.quantize,
            threads=s.threads_per_replica,
            parameters=p.parameters,
            options=self.options,
            data=serving_limits(self.cfg),
            max_batch_cost=p.max_batch_cost,
            loaded=loaded,
            storage=self.storage,
        )
        if loaded is not None:  # Serve's multiplexer calls it when it evicts the model: the adapter goes
            predictor.__del__ = lambda: self.adapters.release(model_id, base)
        self.check(name, predictor)  # a model that cannot answer never takes traffic
        return predictor

    def check(self, name: str, predictor: Predictor) -> None:
        predictions, errors, _ = predictor.predict_rows(self.probe)
        if errors[0] is not None or predictions[0] is None:
            raise RuntimeError(f"{name} refused the health-check input: {errors[0]}")
        try:
            json.dumps(predictions, allow_nan=False)
        except ValueError:
            raise RuntimeError(f"{name} answered the health-check input with NaN or infinity") from None

    async def check_health(self) -> None:
        """Serve calls this every serve.health_check_period_s; raising gets the replica replaced."""
        if self.default is not None:
            self.check("the default model", self.default)
        for model_id, predictor in list(self.loaded.items()):
            self.check(f"model {model_id!r}", predictor)

    # --- prediction -----------------------------------------------------------------------------
    async def predictor_for(self, model_id: str | None) -> Predictor:
        if model_id is None:
            return self.default
        return await self.load_model(model_id)  # a failure is a 500 whose request id finds it in the log

    def in_serve_terms(self, errors: list[str | None]) -> list[str | None]:
        """Row errors naming the serve.* cap that refused the item where that is the one in force (the
        tasks name the data.* keys that batch prediction uses)."""
        d, s = self.cfg.data, self.cfg.serve
        swaps = []
        if s.max_image_pixels < d.max_image_pixels:
            swaps.append(("data.max_image_pixels=", "serve.max_image_pixels="))
        if s.max_audio_seconds < d.max_audio_seconds:
            swaps.append(("data.max_audio_seconds=", "serve.max_audio_seconds="))
        if s.max_audio_seconds < d.max_audio_seconds or d.long_audio == "chunk":  # serving never chunks
            swaps.append((" (data.long_audio: reject)", ""))
        for old, new in swaps:
            errors = [e.replace(old, new) if e else e for e in errors]
        return errors

    def fetch_uris(self, rows: list[dict], is_list: bool) -> list[dict]:
        """Media items that name a URI (already checked against serve.allow_uris) replaced by the file's
        bytes, all of a request's fetches together within serve.max_media_bytes (413 past it)."""
        budget, limit, out = self.cfg.serve.max_media_bytes, self.cfg.serve.max_media_bytes, []
        for i, row in enumerate(rows):
            row = dict(row)
            for column in self.media_columns:
                uri = row.get(column)
                if not (isinstance(uri, str) and URI.match(uri)):
                    continue
                where = f"inputs[{i}]" if is_list else "inputs"
                loc = self.storage.resolve(uri)
                try:
                    with storage_errors(uri):  # one ranged read: a byte past the budget means too much
                        data = loc.fs.cat_file(loc.path, start=0, end=budget + 1)
                except UserError as exc:  # not found, access denied: named without the endpoint's details
                    raise RequestError(422, f"{where}: {column}: {str(exc).split(' (')[0]}") from None
                budget -= len(data)
                if budget < 0:
                    raise RequestError(
                        413,
                        f"{where}: {column}: the files this request names pass the {limit} bytes "
                        "allowed (serve.max_media_bytes)",
                    )
                row[column] = data
            out.append(row)
        return out

    async def stream(self, model_id: str | None, row: dict, parameters: dict):
        """Streamed through the handle: first {} (or the request's error), then the prediction's pieces."""
        try:
            pieces = await self.checked_pieces(model_id, row, parameters)
        except RequestError as exc:
            yield answer_error(exc)
            return
        yield {}
        # The model makes each piece in a worker thread, so the replica keeps working while it does.
        done, it = object(), iter(pieces)
        while (piece := await asyncio.to_thread(next, it, done)) is not done:
            yield piece

    async def checked_pieces(self, model_id: str | None, row: dict, parameters: dict):
        predictor = await self.predictor_for(model_id)
        if self.allow_uris:
            row = (await asyncio.to_thread(self.fetch_uris, [row], False))[0]
        features = predictor.preprocess_rows([row])
        problem = row_errors(self.in_serve_terms(features.errors), False)
        if problem:
            raise problem
        try:
            pieces = predictor.task.stream(
                predictor.model, predictor.processor, features.arrays, {**predictor.parameters, **parameters}
            )
        except (ValueError, TypeError, KeyError) as exc:  # parameters the task refuses, before the first piece
            raise RequestError(422, f"parameters: {json.dumps(parameters)} cannot be used ({exc})") from None
        if pieces is None:
            raise RequestError(422, f"stream: {self.task.name} answers whole predictions; leave 'stream' out")
        return pieces

    async def predict(self, model_id: str | None, rows: list[dict], parameters: dict, is_list: bool) -> dict:
        """{"predictions": one per row, "flags": one per row, "loaded": the named models held here}, or the
        request's error (422 naming unusable rows)."""
        try:
            predictions, flags = await self.predictions(model_id, rows, parameters, is_list)
        except RequestError as exc:
            return answer_error(exc)
        return {"predictions": predictions, "flags": flags, "loaded": sorted(self.loaded.keys())}

    async def predictions(
        self, model_id: str | None, rows: list[dict], parameters: dict, is_list: bool
    ) -> tuple[list, list]:
        predictor = await self.predictor_for(model_id)
        if self.allow_uris:
            rows = await asyncio.to_thread(self.fetch_uris, rows, is_list)
        features = predictor.preprocess_rows(rows)
        problem = row_errors(self.in_serve_terms(features.errors), is_list)
        if problem:
            raise problem
        key = f"{id(predictor)}:{sorted(features.arrays)}:{json.dumps(parameters, sort_keys=True, default=str)}"
        pending = Pending(predictor, features, parameters, key)
        if self.batching:
            result = await self.predict_batch(pending)
        else:
            async with self.one_at_a_time:  # as @serve.batch runs one batch at a time
                result = (await asyncio.to_thread(self.run, [pending]))[0]
        if isinstance(result, Exception):
            raise result
        return result, features.flags or [None] * len(rows)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)  # replaced from the config in __init__
    async def predict_batch(self, batch: list[Pending]) -> list:
        # In a worker thread (torch releases the GIL), so the replica's loop takes in and preprocesses the
        # next requests during a forward pass instead of after it: one hand-off per batch, not per request.
        return await asyncio.to_thread(self.run, batch)

    def run(self, batch: list[Pending]) -> list:
        """Predictions for each request of a batch (or the exception that its group raised)."""
        groups: dict[str, list[int]] = {}
        for i, pending in enumerate(batch):
            groups.setdefault(pending.key, []).append(i)
        results: list = [None] * len(batch)
        for members in groups.values():
            first = batch[members[0]]
            self.batch_rows.observe(sum(len(batch[i].features.errors) for i in members))
            try:
                predictions = self.predict_features(
                    first.predictor, merge([batch[i].features for i in members]), first.parameters
                )
            except Exception as exc:  # only this group's requests fail; the replica keeps serving
                if first.parameters and isinstance(exc, (ValueError, TypeError, KeyError)):
                    exc = RequestError(
                        422,
                        f"parameters: {json.dumps(first.parameters)} cannot be used with this model "
                        f"({type(exc).__name__}: {exc})",
                    )
                for i in members:
                    results[i] = exc
                continue
            start = 0
            for i in members:
                n = len(batch[i].features.errors)
                results[i], start = predictions[start : start + n], start + n
        return results

    @staticmethod
    def predict_features(predictor: Predictor, features: Features, parameters: dict) -> list:
        waste = CPU_PADDING_WASTE if predictor.device.type == "cpu" else None
        predictions: list = [None] * len(features.lengths)
        for rows in similar_lengths(features.lengths, predictor.batch_size, waste):
            arrays = {name: [values[i] for i in rows] for name, values in features.arrays.items()}
            out = predictor.predict_arrays(arrays, [features.lengths[i] for i in rows], [None] * len(rows), parameters)
            for i, prediction in zip(rows, out):
                predictions[i] = prediction
        return predictions


MAIN_LOOP = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def deployment_options(cfg: JobConfig) -> dict:
    """The model deployment's Serve options for the config (also written by `export_config`)."""
    s = cfg.serve
    # Serve runs user code on an event loop of its own thread by default. A replica that holds the GIL
    # through a forward pass pays for every hand-off between the two threads: on its main loop it served
    # 1.6-1.8x the requests/s at 32 clients, with a lower p99 (2 cores; tests/benchmarks/serve_latency.py).
    actor = {"num_cpus": s.threads_per_replica, "runtime_env": {"env_vars": MAIN_LOOP}}
    if s.use_gpu:
        actor["num_gpus"] = 1
    # Each replica takes serve.max_ongoing_requests predictions. The ingress admits no more than all the
    # replicas take (`ingress_options`), so the queue below is used only while an autoscaled deployment runs
    # fewer than serve.max_replicas; past it the ingress's handle raises BackPressureError (503 + Retry-After).
    options = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": s.retry_after_s},
        "ray_actor_options": actor,
        "health_check_period_s": s.health_check_period_s,
        "health_check_timeout_s": s.health_check_timeout_s,
    }
    if s.min_replicas == s.max_replicas:
        options["num_replicas"] = s.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
            "look_back_period_s": s.look_back_period_s,
        }
        if s.metrics_interval_s != 10:  # Serve's default; other values are allowed but warned about
            options["autoscaling_config"]["metrics_interval_s"] = s.metrics_interval_s
    return options


def ingress_options(cfg: JobConfig) -> dict:
    """The HTTP ingress's Serve options: one replica that reserves no CPU (its work per request is parsing
    and checking, as the proxy's is) and takes at once as many requests as all the model replicas run.

    Overload is shed by Serve's proxy, before any work: requests past that wait in the proxy
    (serve.max_queued_requests, Ray Serve's own limit) and past both the proxy answers 503 with
    `Retry-After: serve.retry_after_s` at once. A refusal there costs ~1.3 ms of CPU; one answered by this
    replica cost ~13 ms (the proxy's call to it, its ASGI app), which at 4x the models' capacity took
    a third of 2 cores from the models (tests/benchmarks/RESULTS.md)."""
    s = cfg.serve
    # It runs as Serve's throughput-optimised mode does: the handle's router on the replica's own loop, no
    # access log (the proxy writes one per request).
    env = {**MAIN_LOOP, "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
    return {
        "name": INGRESS_NAME,
        "num_replicas": 1,
        "max_ongoing_requests": s.max_ongoing_requests * s.max_replicas,
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": s.retry_after_s},
        "logging_config": quiet_logging(),
        "ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": env}},
    }


def quiet_logging() -> dict:
    """The small deployments' logging: no access log (the proxy writes one per request), and without -v their
    warnings and errors only. A deployment's logging_config replaces the application's as a whole, so the
    level is set here too (else Serve's INFO lines, "Started <...SharedRouterLongPollClient ...>", reach the
    console of `rayformers serve`)."""
    return {"enable_access_log": False, "log_level": "INFO" if verbose() else "WARNING"}


def health_options(cfg: JobConfig) -> dict:
    """The `/healthz` application's Serve options: one replica that reserves no CPU and writes no access log."""
    return {
        "name": HEALTH_NAME,
        "num_replicas": 1,
        "max_ongoing_requests": 32,
        "logging_config": quiet_logging(),
        "ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": dict(MAIN_LOOP)}},
    }


def app_for(cfg: JobConfig, cls: type = PredictorDeployment):
    """The Serve application: the ingress, bound to a handle of the model deployment (`cls`). Without the
    `health_app_for` application that `run_apps` puts in front, its ingress answers `/healthz` itself, and a
    probe then waits in the proxy's queue while the ingress is full."""
    model = serve.deployment(cls).options(**deployment_options(cfg)).bind(cfg)
    ingress = serve.deployment(serve.ingress()(Ingress)).options(**ingress_options(cfg))
    return ingress.bind(cfg, model, default_source(cfg) is not None)


def health_app_for(cfg: JobConfig):
    """The application that answers `<route_prefix>/healthz` in front of `app_for`'s ingress."""
    return serve.deployment(Health).options(**health_options(cfg)).bind(cfg, default_source(cfg) is not None)


def health_route(route_prefix: str) -> str:
    return route_prefix.rstrip("/") + "/healthz"


def run_apps(cfg: JobConfig, name: str, route_prefix: str, logging_config: dict | None = None) -> None:
    """Deploys the model app as `name` at `route_prefix`, and its `/healthz` app as `name`-health."""
    serve.run(app_for(cfg), name=name, route_prefix=route_prefix, logging_config=logging_config)
    serve.run(
        health_app_for(cfg),
        name=f"{name}-health",
        route_prefix=health_route(route_prefix),
        logging_config=logging_config,
    )


def build_app(args: dict):
    """The application builder `serve deploy` imports: args {"config": YAML path, "overrides": [k=v, ...]}."""
    cfg = app_config(args)
    get_task(cfg.task).sanitize_parameters(cfg.predict.parameters, cfg.options())
    return app_for(cfg)


def build_health_app(args: dict):
    """The builder of the `/healthz` application (HEALTH_IMPORT_PATH), with the same args."""
    return health_app_for(app_config(args))


def app_config(args: dict) -> JobConfig:
    if "config" not in args:
        raise UserError(f"{IMPORT_PATH}: args.config is required (the job YAML)")
    unknown = set(args) - {"config", "overrides"}
    if unknown:
        raise UserError(f"{IMPORT_PATH}: unknown args {sorted(unknown)}; expected config and overrides")
    return load_config(args["config"], list(args.get("overrides") or []))
