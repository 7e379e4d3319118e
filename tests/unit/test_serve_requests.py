"""The serving HTTP layer without a Ray cluster: what a client sees for good and bad requests, and that no bad
request reaches the model. The backend here is a stand-in that records what it was asked."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from models import get_task
from pipelines.serve_http import RequestError, http_app, parse_body, row_errors


class Backend:
    """Answers like the deployment, without a model: the label is the text's first word."""

    task = get_task("text-classification")
    options = None
    allow_uris: list = []

    def __init__(self, api_key=None, result=None, fail=None):
        self.api_key = api_key
        self.max_request_bytes = 1000
        self.max_items_per_request = 4
        self.result, self.fail = result, fail
        self.calls: list = []
        self.recorded: list = []

    def check_model(self, model_id):
        if model_id not in (None, "alpha"):
            raise RequestError(404, f"unknown model {model_id!r} (served: alpha)")

    async def predict(self, model_id, rows, parameters, is_list):
        self.calls.append((model_id, rows, parameters))
        if self.fail:
            raise self.fail
        if self.result is not None:
            return [self.result] * len(rows), [None] * len(rows)
        return [{"label": r["text"].split()[0], "score": 1.0} for r in rows], [None, "truncated to 64 tokens"][
            : len(rows)
        ]

    def health(self):
        return {"status": "ok"}

    def record(self, status, seconds):
        self.recorded.append(status)


@pytest.fixture
def backend():
    return Backend()


@pytest.fixture
def client(backend):
    return TestClient(http_app(backend))


BAD_REQUESTS = [
    (b"{not json", 400, "body is not valid JSON (line 1 column 2"),
    (b"\xff\xfe", 400, "body is not valid JSON"),
    (b'["a text"]', 422, "body: expected a JSON object with 'inputs', got list"),
    (b'{"text": "a text"}', 422, "body: 'inputs' is missing"),
    (b'{"inputs": "a", "parameter": {}}', 422, "body: unknown field(s) ['parameter']"),
    (b'{"inputs": "a", "parameters": [1]}', 422, "parameters: expected a JSON object, got list"),
    (b'{"inputs": []}', 422, "inputs: the list is empty"),
    (b'{"inputs": ["a", "b", "c", "d", "e"]}', 413, "inputs: 5 items, more than the 4 allowed per request"),
    (b'{"inputs": {"txt": "a"}}', 422, "inputs: unknown field(s) ['txt']"),
    (json.dumps({"inputs": "x" * 2000}).encode(), 413, "more than the 1000 allowed (serve.max_request_bytes)"),
    (
        b'{"inputs": "a", "parameters": {"top_k": 100000}}',
        422,
        "parameters.top_k: must be between 1 and 100, got 100000",
    ),
    (b'{"inputs": "a", "parameters": {"top_k": "many"}}', 422, 'parameters.top_k: expected int, got "many"'),
    (
        b'{"inputs": "a", "parameters": {"temperature": 2}}',
        422,
        "parameters.temperature: not a parameter of text-classification (accepted: top_k)",
    ),
]


@pytest.mark.parametrize("body,status,message", BAD_REQUESTS)
def test_a_bad_request_gets_a_json_error_naming_the_problem_and_never_reaches_the_model(
    client, backend, body, status, message
):
    response = client.post("/predict", content=body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    assert backend.calls == []


def test_a_body_over_the_limit_is_refused_even_without_a_content_length(client, backend):
    def chunks():  # sent chunked: the size is only known while reading
        for _ in range(30):
            yield b" " * 100

    response = client.post("/predict", content=chunks())
    assert response.status_code == 413
    assert "serve.max_request_bytes" in response.json()["error"]
    assert backend.calls == []


def test_one_input_gets_one_prediction_and_a_list_gets_a_list(client, backend):
    one = client.post("/predict", json={"inputs": "sports news"})
    assert one.status_code == 200 and one.json() == {"label": "sports", "score": 1.0}
    many = client.post("/predict", json={"inputs": ["tech a", {"text": "food b"}], "parameters": {"top_k": 2}})
    assert many.status_code == 200
    assert [p["label"] for p in many.json()] == ["tech", "food"]
    assert backend.calls[-1] == (None, [{"text": "tech a"}, {"text": "food b"}], {"top_k": 2})
    assert many.headers["x-rayformers-warnings"] == "inputs[1]: truncated to 64 tokens"


def test_no_content_type_is_needed_and_inference_api_options_are_accepted(client):
    # curl -d sends application/x-www-form-urlencoded; the Inference API sends "options"
    response = client.post(
        "/predict",
        content=b'{"inputs": "travel x", "options": {"wait_for_model": true}}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200 and response.json()["label"] == "travel"


def test_named_models_are_routed_and_an_unknown_id_is_404(client, backend):
    assert client.post("/v1/models/alpha/predict", json={"inputs": "food x"}).status_code == 200
    assert backend.calls[-1][0] == "alpha"
    response = client.post("/v1/models/gamma/predict", json={"inputs": "food x"})
    assert response.status_code == 404
    assert response.json() == {"error": "unknown model 'gamma' (served: alpha)"}
    assert len(backend.calls) == 1


def test_with_an_api_key_only_requests_bearing_it_get_predictions():
    backend = Backend(api_key="s3cret")
    client = TestClient(http_app(backend))
    missing = client.post("/predict", json={"inputs": "a b"})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["error"]
    wrong = client.post("/predict", json={"inputs": "a b"}, headers={"Authorization": "Bearer guess"})
    assert wrong.status_code == 401
    assert client.post("/v1/models/alpha/predict", json={"inputs": "a b"}).status_code == 401
    assert backend.calls == []
    right = client.post("/predict", json={"inputs": "a b"}, headers={"Authorization": "Bearer s3cret"})
    assert right.status_code == 200
    assert client.get("/healthz").status_code == 200  # load balancers probe without the key


def test_a_non_finite_prediction_is_a_500_not_invalid_json():
    client = TestClient(http_app(Backend(result={"label": "x", "score": float("nan")})))
    response = client.post("/predict", json={"inputs": "a"})
    assert response.status_code == 500
    assert "non-finite" in response.json()["error"]


def test_a_failing_model_gets_a_500_and_the_next_request_is_served(backend, client):
    backend.fail = RuntimeError("CUDA error: device-side assert")
    response = client.post("/predict", json={"inputs": "a"})
    assert response.status_code == 500
    assert response.json() == {"error": "internal error", "request_id": response.json()["request_id"]}
    backend.fail = None
    assert client.post("/predict", json={"inputs": "tech a"}).json()["label"] == "tech"


def test_unknown_routes_and_methods_answer_json(client):
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    response = client.get("/predict")
    assert response.status_code == 405 and response.json() == {"error": "Method Not Allowed"}


def test_the_api_is_documented_in_openapi(client):
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/v1/models/{model_id}/predict", "/healthz"} <= set(spec["paths"])
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["inputs"] and "parameters" in body["properties"]
    assert client.get("/docs").status_code == 200


def test_row_errors_name_the_item_or_each_index():
    assert row_errors([None, None], True) is None
    single = row_errors(["text is empty"], False)
    assert (single.status, single.message) == (422, "inputs: text is empty")
    many = row_errors([None, "text is empty", None, "text is not a string (got int)"], True)
    assert many.status == 422
    assert many.message == "inputs[1]: text is empty (and 1 more item(s))"
    assert many.details["items"] == [
        {"index": 1, "error": "text is empty"},
        {"index": 3, "error": "text is not a string (got int)"},
    ]


def test_parse_body_returns_inputs_and_parameters():
    assert parse_body(b'{"inputs": ["a"], "parameters": {"top_k": 2}}', 100) == (["a"], {"top_k": 2}, False)
    assert parse_body(b'{"inputs": "a", "parameters": null}', 100) == ("a", {}, False)


def test_rows_share_a_forward_pass_only_when_padding_wastes_little():
    from pipelines.serve import similar_lengths

    lengths = [10, 11, 12, 30, 31, 5, 100]
    assert similar_lengths(lengths, 8, 0.25) == [[5], [0, 1, 2], [3, 4], [6]]
    assert similar_lengths([10] * 10, 8, 0.25) == [list(range(8)), [8, 9]]  # and never more than batch_size
    assert similar_lengths(lengths, 8, None) == [[5, 0, 1, 2, 3, 4, 6]]  # unbounded (GPU): sorted batches only


def test_generation_parameters_that_would_cost_minutes_are_refused_before_the_model(backend):
    backend.task = get_task("text-generation")
    client = TestClient(http_app(backend))
    stops = client.post("/predict", json={"inputs": "a", "parameters": {"stop": ["x"] * 100}})
    assert stops.status_code == 422 and stops.json()["error"] == "parameters.stop: at most 16 strings, got 100"
    long = client.post("/predict", json={"inputs": "a", "parameters": {"max_new_tokens": 100000}, "stream": True})
    assert long.status_code == 422 and "parameters.max_new_tokens: must be between 1 and 4096" in long.json()["error"]
    assert backend.calls == []
    client.post("/predict", json={"inputs": "go on", "parameters": {"stop": " .", "seed": None}})
    assert backend.calls[-1][2] == {"stop": [" ."]}  # the model gets the normalised parameters


def test_every_prediction_request_is_counted_by_status_and_probes_are_not(client, backend):
    client.post("/predict", json={"inputs": "a b"})
    client.post("/predict", content=b"{")
    client.post("/v1/models/gamma/predict", json={"inputs": "a"})
    client.get("/healthz")
    assert backend.recorded == [200, 400, 404]
