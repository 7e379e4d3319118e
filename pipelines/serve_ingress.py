"""The HTTP ingress of `rayformers serve`: a light Serve deployment apart from the models, and `/healthz`.

`Ingress` answers `/docs`, the API key and every check that needs no model (`serve_http`), and hands
predictions to the model deployment (`pipelines/serve.py`) through a DeploymentHandle. It takes at once
only as many requests as the model replicas can run (`pipelines.serve.ingress_options`): the rest wait in Serve's
proxy (serve.max_queued_requests) and past that the proxy itself answers 503 + Retry-After, before this
replica or the models do any work (a refusal there costs ~1.3 ms of CPU; one answered here cost ~13 ms:
tests/benchmarks/RESULTS.md). `Health` answers `/healthz` as an application of its own, so that a full
ingress never delays a health probe.
"""

from __future__ import annotations

import json
import math
import os

from ray.exceptions import RayActorError
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.requests import Request
from starlette.responses import Response

from config import JobConfig
from errors import UserError
from models import get_task
from pipelines.serve_http import API_KEY_ENV, API_KEY_FILE_ENV, RequestError, http_app


def api_key(cfg: JobConfig) -> str | None:
    """The key prediction routes require: serve.api_key, else RAYFORMERS_API_KEY, else the file that
    RAYFORMERS_API_KEY_FILE names (how `rayformers submit` ships it: never in the job's command line).
    Read where the ingress replica runs, as the RayService example's pods set it."""
    if cfg.serve.api_key:
        return cfg.serve.api_key.get_secret_value()
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    path = os.environ.get(API_KEY_FILE_ENV)
    if path:
        try:
            with open(path) as f:
                return f.read().strip() or None
        except OSError as exc:
            raise UserError(f"{API_KEY_FILE_ENV}: {path}: cannot read the API key ({exc.strerror})") from None
    return None


def answer_error(exc: RequestError) -> dict:
    """A RequestError as plain data: it crosses the handle as a value (its constructor does not unpickle)."""
    return {"error": {"status": exc.status, "message": exc.message, "headers": exc.headers, "details": exc.details}}


def raise_error(answer: dict) -> None:
    if "error" in answer:
        e = answer["error"]
        raise RequestError(e["status"], e["message"], e["headers"], **e["details"])


QUEUE_FULL = "every model replica is busy and the queue is full (serve.max_queued_requests)"


def health_answer(task: str, has_default: bool, models: list[str]) -> dict:
    return {"status": "ok", "task": task, "default_model": has_default, "models": models}


class Health:
    """`GET <route_prefix>/healthz`, deployed as an application of its own at that route (Serve's proxy sends
    a path to the longest route prefix it matches): it answers while the ingress is full and the proxy
    sheds predictions. It does not see predictions, so it cannot say which named models are loaded."""

    def __init__(self, cfg: JobConfig, has_default: bool):
        self.body = json.dumps(health_answer(cfg.task, has_default, sorted(cfg.serve.models))).encode()

    async def __call__(self, request: Request) -> Response:
        if request.method == "GET" and request.scope["path"].rstrip("/") == request.scope["root_path"]:
            return Response(self.body, media_type="application/json")
        return Response(b'{"error": "Not Found"}', status_code=404, media_type="application/json")


class Ingress:
    """One ingress replica: the `serve_http.Backend` that `http_app` calls, forwarding predictions to `model`."""

    def __init__(self, cfg: JobConfig, model, has_default: bool):
        s = cfg.serve
        self.task = get_task(cfg.task)
        self.options = cfg.options()
        self.api_key = api_key(cfg)
        self.max_request_bytes, self.max_items_per_request = s.max_request_bytes, s.max_items_per_request
        self.retry_after_s = s.retry_after_s
        self.allow_uris = s.allow_uris
        self.models, self.has_default = sorted(s.models), has_default
        self.model = model  # the DeploymentHandle of the model deployment
        self.loaded: list[str] = []  # the named models the replica that answered last holds
        # The app's own metrics, next to Serve's (serve_num_http_requests, serve_http_request_latency_ms, ...),
        # on Ray's Prometheus endpoint; Serve adds the deployment, replica and application tags.
        self.responses = metrics.Counter(
            "rayformers_responses",
            "prediction requests answered, by HTTP status " "(503: shed for overload)",
            tag_keys=("status",),
        )
        self.latency = metrics.Histogram(
            "rayformers_request_seconds",
            "time to answer a prediction request",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
        )

    def __serve_build_asgi_app__(self):
        return http_app(self)

    def check_model(self, model_id: str | None) -> None:
        if model_id is None and not self.has_default:
            raise RequestError(
                404, f"no default model is served; use /v1/models/<id>/predict with one of " f"{self.models}"
            )
        if model_id is not None and model_id not in self.models:
            served = (
                f"served: {', '.join(self.models)}"
                if self.models
                else "no named models are served (serve.models); use /predict"
            )
            raise RequestError(404, f"unknown model {model_id!r} ({served})")

    def health(self) -> dict:
        """Answered here (where `Health` does not stand in front), never by the models: Serve's health check
        runs them (`check_health`)."""
        return {**health_answer(self.task.name, self.has_default, self.models), "loaded": self.loaded}

    def record(self, status: int, seconds: float) -> None:
        self.responses.inc(tags={"status": str(status)})
        self.latency.observe(seconds)

    def overloaded(self, what: str) -> RequestError:
        """503 + Retry-After: the client may send the same request again shortly."""
        return RequestError(
            503, f"overloaded: {what}; retry shortly", headers={"Retry-After": str(math.ceil(self.retry_after_s))}
        )

    def to_model(self, model_id: str | None, stream: bool = False):
        handle = self.model.options(stream=True) if stream else self.model
        return handle.options(multiplexed_model_id=model_id) if model_id else handle

    async def predict(
        self, model_id: str | None, rows: list[dict], parameters: dict, is_list: bool
    ) -> tuple[list, list]:
        # A prediction has no side effect, so one lost with its replica (killed, preempted) is sent once more:
        # the router has then marked that replica dead and picks a live one.
        for attempt in (1, 2):
            try:
                answer = await self.to_model(model_id).predict.remote(model_id, rows, parameters, is_list)
                break
            except BackPressureError:
                raise self.overloaded(QUEUE_FULL) from None
            except DeploymentUnavailableError:
                raise self.overloaded("the model deployment is not available") from None
            except RayActorError:
                if attempt == 2:
                    raise self.overloaded("the model replica was lost") from None
        raise_error(answer)
        self.loaded = answer["loaded"]
        return answer["predictions"], answer["flags"]

    async def stream(self, model_id: str | None, row: dict, parameters: dict):
        pieces = self.to_model(model_id, stream=True).stream.remote(model_id, row, parameters)
        try:
            raise_error(await pieces.__anext__())  # the row checked, or why not, before any piece
        except BackPressureError:
            raise self.overloaded(QUEUE_FULL) from None
        except (DeploymentUnavailableError, RayActorError):
            raise self.overloaded("the model deployment is not available") from None

        async def produced():
            async for piece in pieces:
                yield piece

        return produced()
