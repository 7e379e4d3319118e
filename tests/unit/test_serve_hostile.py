"""Hostile requests against the serving HTTP layer, without Ray: files outside the allow-list, bodies that
never end, JSON nested to crash the parser, media that decode to gigabytes. Each gets its 4xx before any
model (or file system) is touched, and a 500 says nothing about the server."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import fsspec
import numpy as np
import pytest
from fastapi.testclient import TestClient

from config import validate
from models import get_task
from models.audio import read_clip, wav_bytes
from pipelines.serve import PredictorDeployment, serving_limits
from pipelines.serve_http import RequestError, http_app, parse_form, read_body, refused_uri
from pipelines.serve_ingress import answer_error
from pipelines.storage import Storage

ALLOWED = ["s3://uploads/in/"]


class ImageBackend:
    """A stand-in deployment for an image task: records what reaches it."""

    task = get_task("image-classification")
    options = None
    api_key = None
    max_request_bytes = 200_000
    max_items_per_request = 4

    def __init__(self, allow_uris=ALLOWED, fail=None):
        self.allow_uris, self.fail, self.calls, self.recorded = allow_uris, fail, [], []

    def check_model(self, model_id):
        pass

    async def predict(self, model_id, rows, parameters, is_list):
        self.calls.append(rows)
        if self.fail:
            raise self.fail
        return [{"label": "cat", "score": 1.0}] * len(rows), [None] * len(rows)

    def health(self):
        return {"status": "ok"}

    def record(self, status, seconds):
        self.recorded.append(status)


HOSTILE_URIS = [
    ("file:///etc/passwd", "not under a prefix of serve.allow_uris"),
    ("local:///proc/self/environ", "not under a prefix of serve.allow_uris"),
    ("hf://datasets/secret/x.png", "not under a prefix of serve.allow_uris"),
    ("s3://other-bucket/in/cat.jpg", "not under a prefix of serve.allow_uris"),
    ("s3a://uploads/in/cat.jpg", "not under a prefix of serve.allow_uris"),
    ("s3://uploads/in-secret/cat.jpg", "not under a prefix of serve.allow_uris"),
    ("s3://uploads/in/../private/key.png", "not a plain object key"),
    ("s3://uploads/in/./../x.png", "not a plain object key"),
    ("s3://uploads/in//x.png", "not a plain object key"),
    ("s3://uploads/in/%2e%2e/private/key.png", "not a plain object key"),
    ("s3://uploads/in/*.png", "not a plain object key"),
    ("s3://uploads/in/x.png?versionId=1", "not a plain object key"),
]


@pytest.mark.parametrize("uri, why", HOSTILE_URIS)
def test_a_uri_outside_the_allow_list_is_refused_before_anything_is_read(uri, why):
    backend = ImageBackend()
    client = TestClient(http_app(backend))
    response = client.post("/predict", json={"inputs": ["aGVsbG8=", {"image": uri}]})
    assert response.status_code == 422
    assert response.json()["error"].startswith(f"inputs[1]: image: {uri[:200]}: {why}")
    assert backend.calls == []


def test_without_an_allow_list_no_uri_is_read_and_an_allowed_one_reaches_the_replica():
    off = ImageBackend(allow_uris=[])
    response = TestClient(http_app(off)).post("/predict", json={"inputs": "s3://uploads/in/cat.jpg"})
    assert response.status_code == 422 and "serve.allow_uris is off" in response.json()["error"]
    assert off.calls == []
    on = ImageBackend()
    assert TestClient(http_app(on)).post("/predict", json={"inputs": "s3://uploads/in/cat.jpg"}).status_code == 200
    assert on.calls == [[{"image": "s3://uploads/in/cat.jpg"}]]
    assert refused_uri("s3://uploads/in/a/b c.jpg", ALLOWED) is None  # keys may hold spaces and folders


@pytest.mark.parametrize("value", [True, ["file:///srv/"], ["/srv/uploads"], ["s3://"], ["s3://b/../c"]])
def test_an_allow_list_that_would_open_the_file_system_is_refused_in_the_config(value):
    with pytest.raises(Exception, match="serve.allow_uris"):
        validate({"task": "image-classification", "model": {"source": "x"}, "serve": {"allow_uris": value}})
    ok = validate({"task": "image-classification", "model": {"source": "x"}, "serve": {"allow_uris": ["s3://b/up"]}})
    assert ok.serve.allow_uris == ["s3://b/up/"]  # s3://b/up must not admit s3://b/up-secret/


def fake_deployment(limit: int) -> SimpleNamespace:
    cfg = SimpleNamespace(serve=SimpleNamespace(max_media_bytes=limit))
    return SimpleNamespace(cfg=cfg, media_columns=["image"], storage=Storage())


def test_the_files_one_request_names_share_one_byte_budget():
    fs = fsspec.filesystem("memory")
    for name in ("a", "b", "c"):
        fs.pipe(f"/budget/{name}.png", bytes(600))
    rows = [{"image": f"memory://budget/{name}.png"} for name in ("a", "b")]
    fetched = PredictorDeployment.fetch_uris(fake_deployment(1200), rows, True)
    assert [len(r["image"]) for r in fetched] == [600, 600]
    with pytest.raises(RequestError) as over:
        PredictorDeployment.fetch_uris(fake_deployment(1000), rows, True)
    assert over.value.status == 413 and over.value.message.startswith("inputs[1]: image: ")
    assert "serve.max_media_bytes" in over.value.message
    with pytest.raises(RequestError) as missing:
        PredictorDeployment.fetch_uris(fake_deployment(1000), [{"image": "memory://budget/nowhere.png"}], False)
    assert (missing.value.status, missing.value.message) == (
        422,
        "inputs: image: memory://budget/nowhere.png: no such file or folder",
    )


@pytest.mark.parametrize("depth", [40, 50_000])
def test_json_nested_deeper_than_any_request_needs_is_a_400(depth):
    backend = ImageBackend()
    body = ('{"inputs": ' + "[" * depth + "]" * depth + "}").encode()
    response = TestClient(http_app(backend)).post("/predict", content=body)
    assert response.status_code == 400 and response.json() == {"error": "body: JSON nested more than 32 levels deep"}
    assert backend.calls == []


class EndlessBody:
    """A request whose body never ends (chunked, no content-length); counts what was read of it."""

    def __init__(self, content_type: str = "application/json"):
        self.headers = {"content-type": content_type}
        self.scope = {"type": "http", "headers": [(b"content-type", content_type.encode())]}
        self.read = 0

    async def stream(self):
        while True:
            self.read += 4096
            yield b"x" * 4096


def test_a_body_that_never_ends_is_read_only_to_the_limit_plus_one_chunk():
    endless = EndlessBody()
    with pytest.raises(RequestError) as refused:
        asyncio.run(read_body(endless, 10_000))
    assert refused.value.status == 413 and endless.read <= 10_000 + 4096
    upload = EndlessBody("multipart/form-data; boundary=xyz")
    with pytest.raises(RequestError) as refused:
        asyncio.run(parse_form(upload, ImageBackend.task, 10_000, 4))
    assert refused.value.status == 413 and upload.read <= 10_000 + 4096


def test_a_500_says_internal_error_and_its_request_id_finds_the_traceback_in_the_log(caplog):
    backend = ImageBackend(fail=FileNotFoundError("/srv/models/secret-run/model.safetensors"))
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        response = TestClient(http_app(backend)).post("/predict", json={"inputs": "aGVsbG8="})
    assert response.status_code == 500
    body = response.json()
    assert body == {"error": "internal error", "request_id": body["request_id"]} and "/srv" not in response.text
    logged = [r for r in caplog.records if body["request_id"] in r.getMessage()]
    assert logged and "secret-run" in str(logged[0].exc_info[1])


def test_serving_decodes_no_image_or_clip_over_its_caps_whatever_long_audio_says():
    cfg = validate(
        {
            "task": "audio-classification",
            "model": {"source": "x"},
            "data": {"long_audio": "chunk"},
            "serve": {"max_audio_seconds": 1, "max_image_pixels": 1000},
        }
    )
    limits = serving_limits(cfg)
    assert (limits.long_audio, limits.max_audio_seconds, limits.max_image_pixels) == ("reject", 1, 1000)
    clip = wav_bytes(np.zeros(16_000 * 3, dtype=np.float32))
    samples, error = read_clip(clip, 16_000, limits)
    assert samples is None and error.startswith("audio is 3.0 s long")
    assert read_clip(clip, 16_000, cfg.data)[1] is None  # batch prediction still chunks it
    from models.images import decode_image, encode_png

    image, error = decode_image(encode_png(np.zeros((64, 64, 3), dtype=np.uint8)), limits.max_image_pixels)
    assert image is None and "4096 pixels (64x64), more than" in error


class ModelHandle:
    """A stand-in for the model deployment's DeploymentHandle: each call raises `fail` or answers `answer`."""

    def __init__(self, fail=None, answer=None):
        self.fail, self.answer, self.calls = fail, answer, 0
        self.predict = SimpleNamespace(remote=self.remote)

    def options(self, **_):
        return self

    def remote(self, *args):
        self.calls += 1

        async def result():
            if isinstance(self.fail, list):  # one failure per call, in turn
                if self.fail:
                    raise self.fail.pop(0)
            elif self.fail:
                raise self.fail
            return self.answer

        return result()


def ingress(handle):
    from pipelines.serve_ingress import Ingress

    cfg = validate({"task": "image-classification", "model": {"source": "x"}, "serve": {"retry_after_s": 1.5}})
    backend = Ingress(cfg, handle, True)
    backend.recorded = []
    backend.record = lambda status, seconds: backend.recorded.append(status)
    return backend


def test_the_ingress_takes_what_the_model_replicas_run_and_serves_proxy_queues_and_refuses_the_rest():
    from pipelines.serve import deployment_options, health_route, ingress_options

    serve_cfg = {"min_replicas": 1, "max_replicas": 3, "max_ongoing_requests": 8, "max_queued_requests": 5}
    cfg = validate(
        {"task": "image-classification", "model": {"source": "x"}, "serve": {**serve_cfg, "retry_after_s": 1.5}}
    )
    ingress, model = ingress_options(cfg), deployment_options(cfg)
    assert ingress["max_ongoing_requests"] == 8 * 3  # as many as all the model replicas run at once
    assert ingress["max_queued_requests"] == 5  # then waiting in Serve's proxy, and past it 503 from the proxy
    assert ingress["backpressure_config"] == model["backpressure_config"] == {"status_code": 503, "retry_after_s": 1.5}
    assert health_route("/") == "/healthz" and health_route("/text") == "/text/healthz"  # an app of its own


def test_with_the_models_busy_and_their_queue_full_the_ingress_answers_503_and_healthz_still_answers():
    from ray.serve.exceptions import BackPressureError

    backend = ingress(ModelHandle(fail=BackPressureError(num_queued_requests=16, max_queued_requests=16)))
    client = TestClient(http_app(backend))
    response = client.post("/predict", json={"inputs": "aGVsbG8="})
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert "serve.max_queued_requests" in response.json()["error"]
    assert client.get("/healthz").json()["status"] == "ok"
    assert backend.recorded == [503]  # counted: rayformers_responses{status="503"}


def test_a_prediction_lost_with_its_replica_is_sent_once_more_and_a_row_error_comes_back_as_its_4xx():
    from ray.exceptions import ActorDiedError

    answer = {"predictions": [{"label": "cat", "score": 1.0}], "flags": [None], "loaded": []}
    handle = ModelHandle(fail=[ActorDiedError()], answer=answer)
    client = TestClient(http_app(ingress(handle)))
    assert client.post("/predict", json={"inputs": "aGVsbG8="}).json() == {"label": "cat", "score": 1.0}
    assert handle.calls == 2
    lost_twice = ModelHandle(fail=[ActorDiedError(), ActorDiedError()], answer=answer)
    response = TestClient(http_app(ingress(lost_twice))).post("/predict", json={"inputs": "aGVsbG8="})
    assert response.status_code == 503 and "replica was lost" in response.json()["error"]
    refused = ModelHandle(answer=answer_error(RequestError(422, "inputs: image is not an image", items=[1])))
    response = TestClient(http_app(ingress(refused))).post("/predict", json={"inputs": "aGVsbG8="})
    assert response.status_code == 422 and response.json() == {"error": "inputs: image is not an image", "items": [1]}


def test_a_refused_image_or_clip_names_the_serve_cap_in_force():
    cfg = validate(
        {
            "task": "audio-classification",
            "model": {"source": "x"},
            "serve": {"max_audio_seconds": 1, "max_image_pixels": 1000},
        }
    )
    deployment = SimpleNamespace(cfg=cfg)
    errors = [
        None,
        "image has 4096 pixels (64x64), more than data.max_image_pixels=1000",
        "audio is 3.0 s long, over data.max_audio_seconds=1 (data.long_audio: reject)",
    ]
    assert PredictorDeployment.in_serve_terms(deployment, errors) == [
        None,
        "image has 4096 pixels (64x64), more than serve.max_image_pixels=1000",
        "audio is 3.0 s long, over serve.max_audio_seconds=1",
    ]
