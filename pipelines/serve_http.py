"""The HTTP face of `rayformers serve`: routes, request checks and JSON errors, without Ray.

The FastAPI app built here is the app's ingress. A request a user can get wrong is answered with a 4xx
JSON body `{"error": "<one line naming the problem>"}` before any model sees it (items the task's
preprocess refuses and `parameters` its `sanitize_parameters` refuses included); only parameters a
particular model cannot use (a subtask its head lacks) are found after the forward pass (422 as well).
`backend` is the ingress deployment (`pipelines/serve_ingress.py`); tests hand in a stand-in.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from typing import Any, AsyncIterator, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from errors import UserError
from models.spec import TaskSpec

API_KEY_ENV = "RAYFORMERS_API_KEY"
API_KEY_FILE_ENV = "RAYFORMERS_API_KEY_FILE"  # a file holding the key (what `rayformers submit` ships)
MAX_JSON_DEPTH = 32  # no request format needs more; Python's parser gives up near 1,000
logger = logging.getLogger("ray.serve")
URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class RequestError(Exception):
    """Answered with `status` and `{"error": message, **details}`; the 4xx ones are the client's to fix."""

    def __init__(self, status: int, message: str, headers: dict | None = None, **details: Any):
        super().__init__(message)
        self.status, self.message, self.headers, self.details = status, message, headers, details


class PredictRequest(BaseModel):
    """The body of a prediction request, as the Hugging Face Inference API takes it (for /docs)."""

    inputs: Any = Field(
        ...,
        description="one item or a list of items, e.g. a text or {'text': ..., 'text_pair': ...}; "
        "images and audio as base64 (or send multipart/form-data with file=@<file>)",
        examples=["a sentence to classify"],
    )
    parameters: dict[str, Any] = Field({}, description="postprocessing options, e.g. {'top_k': 3}")
    stream: bool = Field(False, description="answer as server-sent events, piece by piece (text generation)")


class Backend(Protocol):
    task: TaskSpec
    options: Any  # the task's validated task_options, for `task.sanitize_parameters`
    api_key: str | None
    max_request_bytes: int
    max_items_per_request: int
    allow_uris: list[str]  # URI prefixes a media item may name (serve.allow_uris)

    def check_model(self, model_id: str | None) -> None: ...  # RequestError(404) when not served

    async def predict(
        self, model_id: str | None, rows: list[dict], parameters: dict, is_list: bool
    ) -> tuple[list, list]:
        """(one prediction per row, one flag per row); RequestError(422) naming unusable rows, RequestError(503)
        with Retry-After when the models are overloaded."""

    async def stream(self, model_id: str | None, row: dict, parameters: dict) -> AsyncIterator[str]:
        """Checks the row, then returns its prediction's pieces as produced; RequestError(422) when the
        row is unusable or the task does not stream."""

    def health(self) -> dict: ...

    def record(self, status: int, seconds: float) -> None:
        """Counts one prediction request's answer (metrics)."""


# --- request checks (pure functions) --------------------------------------------------------------


def check_api_key(authorization: str | None, api_key: str | None) -> None:
    if not api_key:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")


def too_deep(value: Any, limit: int) -> bool:
    """Whether lists and objects nest more than `limit` levels (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def refused_uri(uri: str, allowed: list[str]) -> str | None:
    """Why a request may not name `uri` (None when it may): it must start with one of the `allowed`
    prefixes (each ending in '/') and hold nothing that could step outside it. Nothing is read here."""
    if not allowed:
        return "URIs are not accepted here (serve.allow_uris is off); send the file as base64"
    rest = uri.partition("://")[2]
    segments = rest.split("/")[1:]
    if any(s in ("", ".", "..") for s in segments) or any(c in uri for c in "%\\?#*[]{}") or not uri.isprintable():
        return f"{uri[:200]}: not a plain object key (no '..', '//', '%', '?', '#', wildcards or control characters)"
    if not any(uri.startswith(prefix) for prefix in allowed):
        return f"{uri[:200]}: not under a prefix of serve.allow_uris"
    return None


def check_uris(task: TaskSpec, rows: list[dict], allowed: list[str], is_list: bool) -> None:
    """Every media item that names a URI names one the server may read: 422 naming the item otherwise."""
    media = [c.name for c in task.columns if c.kind == "media"]
    for i, row in enumerate(rows):
        for column in media:
            value = row.get(column)
            if isinstance(value, str) and URI.match(value):
                why = refused_uri(value, allowed)
                if why:
                    where = f"inputs[{i}]" if is_list else "inputs"
                    raise RequestError(422, f"{where}: {column}: {why}")


def parse_body(body: bytes, limit: int) -> tuple[Any, dict, bool]:
    """A request body -> (inputs, parameters, stream)."""
    if len(body) > limit:
        raise RequestError(413, f"body is {len(body)} bytes, more than the {limit} allowed (serve.max_request_bytes)")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" (line {exc.lineno} column {exc.colno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise RequestError(400, f"body is not valid JSON{where}") from None
    except RecursionError:
        raise RequestError(400, f"body: JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
    if too_deep(data, MAX_JSON_DEPTH):
        raise RequestError(400, f"body: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    if not isinstance(data, dict):
        raise RequestError(422, f"body: expected a JSON object with 'inputs', got {type(data).__name__}")
    if "inputs" not in data:
        raise RequestError(422, "body: 'inputs' is missing")
    unknown = set(data) - {
        "inputs",
        "parameters",
        "options",
        "stream",
    }  # `options` as the Inference API sends it; ignored
    if unknown:
        raise RequestError(
            422, f"body: unknown field(s) {sorted(unknown)}; expected 'inputs', 'parameters' and 'stream'"
        )
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError(422, f"parameters: expected a JSON object, got {type(parameters).__name__}")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(422, f"stream: expected true or false, got {json.dumps(stream)}")
    return data["inputs"], parameters, stream


async def parse_form(request: Request, task: TaskSpec, limit: int, max_items: int) -> tuple[list[dict], dict, bool]:
    """A multipart upload -> (rows, parameters, is_list). Files go to the task's media column of their
    field name, else to its first media column (`file=@cat.jpg`); one row per file of that column;
    a `parameters` field holds JSON."""
    media = [c.name for c in task.columns if c.kind == "media"]
    if not media:
        raise RequestError(415, f"{task.name} takes JSON bodies, not multipart uploads")
    body = await read_body(request, limit)  # at most the limit plus one chunk, whatever the body declares

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_files=max_items, max_fields=max_items + 8)
    except HTTPException as exc:  # starlette: too many files/fields, or a malformed body
        raise RequestError(400, f"multipart body: {exc.detail}") from None
    files: dict[str, list[bytes]] = {}
    parameters: dict = {}
    size = 0
    for field, value in form.multi_items():
        if isinstance(value, str):
            if field == "parameters":
                try:
                    parameters = json.loads(value) if value.strip() else {}
                except json.JSONDecodeError:
                    raise RequestError(400, "parameters: the multipart field is not valid JSON") from None
                if not isinstance(parameters, dict):
                    raise RequestError(422, f"parameters: expected a JSON object, got {type(parameters).__name__}")
                continue
            raise RequestError(422, f"multipart field {field!r}: expected a file (or 'parameters')")
        data = await value.read()
        size += len(data)
        if size > limit:
            raise RequestError(413, f"uploads are more than the {limit} bytes allowed (serve.max_request_bytes)")
        files.setdefault(field if field in media else media[0], []).append(data)
    if media[0] not in files:
        raise RequestError(422, f"multipart body: no file; upload one as {media[0]}=@<file> (or file=@<file>)")
    main = files.pop(media[0])
    if len(main) > max_items:
        raise RequestError(
            413, f"{len(main)} files, more than the {max_items} allowed per request (serve.max_items_per_request)"
        )
    rows = [{media[0]: data} for data in main]
    for name, values in files.items():
        if len(values) != len(rows):
            raise RequestError(422, f"multipart body: {len(values)} {name} file(s) for {len(rows)} {media[0]} file(s)")
        for row, data in zip(rows, values):
            row[name] = data
    return rows, parameters, len(rows) > 1


def check_parameters(task: TaskSpec, parameters: dict, options: Any) -> dict:
    """The request's parameters checked and normalised by the task, before any work: 422 naming the
    parameter and its allowed range."""
    try:
        return task.sanitize_parameters(parameters, options)
    except UserError as exc:
        raise RequestError(422, str(exc)) from None


def request_rows(task: TaskSpec, inputs: Any, max_items: int) -> list[dict]:
    """The `inputs` value -> rows in the task's canonical columns."""
    if isinstance(inputs, list):
        if not inputs:
            raise RequestError(422, "inputs: the list is empty")
        if len(inputs) > max_items:
            raise RequestError(
                413,
                f"inputs: {len(inputs)} items, more than the {max_items} allowed per request "
                "(serve.max_items_per_request); split the list",
            )
    try:
        return task.request_inputs(inputs)
    except UserError as exc:
        raise RequestError(422, str(exc)) from None


def row_errors(errors: list[str | None], is_list: bool) -> RequestError | None:
    """One 422 for every unusable item; for a list it names each item's index and reason."""
    bad = [(i, why) for i, why in enumerate(errors) if why is not None]
    if not bad:
        return None
    if not is_list:
        return RequestError(422, f"inputs: {bad[0][1]}")
    first = f"inputs[{bad[0][0]}]: {bad[0][1]}"
    more = f" (and {len(bad) - 1} more item(s))" if len(bad) > 1 else ""
    return RequestError(422, first + more, items=[{"index": i, "error": why} for i, why in bad])


def render(result: Any, flags: list[str | None], is_list: bool) -> Response:
    try:
        body = json.dumps(result, allow_nan=False, separators=(",", ":"))
    except ValueError:
        raise RequestError(500, "the model produced a non-finite value (NaN or infinity); it may be broken") from None
    headers = {}
    notes = [f"inputs[{i}]: {f}" if is_list else f"inputs: {f}" for i, f in enumerate(flags) if f]
    if notes:
        headers["x-rayformers-warnings"] = "; ".join(notes)[:2000]
    return Response(body, media_type="application/json", headers=headers)


async def sse_events(pieces: AsyncIterator[str]) -> AsyncIterator[str]:
    """Server-sent events: `data: {"token": piece}` per piece, then `data: {"generated_text": all}`
    and `data: [DONE]`; a failure midway ends the stream with `event: error`."""
    text = ""
    try:
        async for piece in pieces:
            text += piece
            yield f"data: {json.dumps({'token': piece})}\n\n"
        yield f"data: {json.dumps({'generated_text': text})}\n\n"
        yield "data: [DONE]\n\n"
    except RequestError as exc:
        yield f"event: error\ndata: {json.dumps({'error': exc.message})}\n\n"
    except Exception:  # headers are gone already: the error travels as an event
        request_id = uuid.uuid4().hex
        logger.exception("streaming failed (request id %s)", request_id)
        yield f"event: error\ndata: {json.dumps({'error': 'internal error', 'request_id': request_id})}\n\n"


def internal_error(what: str) -> JSONResponse:
    """A 500 that tells the client nothing about the server (no paths, URIs or messages): the request id
    finds the traceback in the replica's log."""
    request_id = uuid.uuid4().hex
    logger.exception("%s (request id %s)", what, request_id)
    return JSONResponse({"error": "internal error", "request_id": request_id}, status_code=500)


def error_response(exc: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers
    return JSONResponse({"error": exc.message, **exc.details}, status_code=exc.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit` bytes (it is never read in full)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body is {declared} bytes, more than the {limit} allowed (serve.max_request_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body is more than the {limit} bytes allowed (serve.max_request_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


# --- the app ----------------------------------------------------------------------------------------


def http_app(backend: Backend) -> FastAPI:
    app = FastAPI(
        title=f"rayformers: {backend.task.name}",
        description="Predictions in the `transformers.pipeline` output format. Send "
        '`{"inputs": ..., "parameters": {...}}` as the Hugging Face Inference API takes it.',
    )
    body_doc = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
        }
    }

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):  # unknown routes and methods, as JSON like the rest
        return JSONResponse(
            {"error": f"{exc.detail}"}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    async def answer(request: Request, model_id: str | None) -> Response:
        started = time.monotonic()
        response = await checked_answer(request, model_id)
        backend.record(response.status_code, time.monotonic() - started)
        return response

    async def checked_answer(request: Request, model_id: str | None) -> Response:
        try:
            check_api_key(request.headers.get("authorization"), backend.api_key)
            backend.check_model(model_id)
            limit = backend.max_request_bytes
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                rows, parameters, is_list = await parse_form(
                    request, backend.task, limit, backend.max_items_per_request
                )
                stream = False
            else:
                inputs, parameters, stream = parse_body(await read_body(request, limit), limit)
                rows, is_list = (
                    request_rows(backend.task, inputs, backend.max_items_per_request),
                    isinstance(inputs, list),
                )
                check_uris(backend.task, rows, backend.allow_uris, is_list)
            parameters = check_parameters(backend.task, parameters, backend.options)
            if stream:
                if is_list or len(rows) != 1:
                    raise RequestError(422, "stream: streaming answers one input at a time; send one item, not a list")
                return StreamingResponse(
                    sse_events(await backend.stream(model_id, rows[0], parameters)),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            predictions, flags = await backend.predict(model_id, rows, parameters, is_list)
            return render(predictions if is_list else predictions[0], flags, is_list)
        except RequestError as exc:
            return error_response(exc)
        except ClientDisconnect:  # gone before its body arrived: nobody reads the answer
            return Response(status_code=499)
        except Exception:  # a bug or a broken model: answer 500, keep the replica serving
            return internal_error("prediction failed")

    @app.post("/predict", openapi_extra=body_doc, summary="Predict with the served model")
    async def predict(request: Request):
        return await answer(request, None)

    @app.post("/v1/models/{model_id}/predict", openapi_extra=body_doc, summary="Predict with one of serve.models")
    async def predict_with(model_id: str, request: Request):
        return await answer(request, model_id)

    @app.get("/healthz", summary="Liveness: the ingress answers (the models are probed by Serve's health check)")
    async def healthz():
        return backend.health()

    return app
