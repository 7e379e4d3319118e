"""`rayformers serve` end to end on the session's Ray, with the model trained to the loopback S3 server:
the endpoint answers what batch prediction writes, refuses bad requests with 4xx JSON, serves several
models on demand, guards with an API key, replaces a replica whose model breaks, and exports a
config that `serve deploy` accepts. All traffic goes to 127.0.0.1."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import httpx
import pyarrow.parquet as pq
import pytest
import s3fs

from jobs import cli
from tests.conftest import REPO, free_port, job_config, wait_until

pytestmark = pytest.mark.e2e
APP, SECURE = "serve-test", "serve-test-secure"


def replicas(app: str) -> dict:
    """The model deployment's status and replica states (the ingress in front of it is apart)."""
    from ray import serve

    from pipelines.serve import DEPLOYMENT_NAME

    deployment = serve.status().applications[app].deployments[DEPLOYMENT_NAME]
    return {"status": str(deployment.status.value), **deployment.replica_states}


@pytest.fixture(scope="module")
def batch_predictions(ray_session, trained_text_model, session_bucket):
    """`rayformers predict` over a small corpus, run before any replica takes CPUs: {id: row}, texts."""
    from models import get_task
    from pipelines.predict import predict

    rows = [{"id": r["id"], "text": r["text"]} for r in get_task("text-classification").demo_data(40, seed=11)]
    corpus = f"s3://{session_bucket}/serve-corpus/corpus.jsonl"
    with s3fs.S3FileSystem().open(corpus.removeprefix("s3://"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    output = f"s3://{session_bucket}/serve-predictions"
    predict(job_config(predict={"model": trained_text_model["model"], "input": corpus, "output": output, "actors": 1}))
    table = pq.ParquetDataset(output.removeprefix("s3://"), filesystem=s3fs.S3FileSystem()).read()
    return {r["id"]: r for r in table.to_pylist()}, rows


def mirrored_model(model_uri: str, directory) -> str:
    """A second model that answers differently on every input: the trained one with its classifier's rows
    reversed, so it gives the label at the mirrored index with the same score."""
    import torch

    from models import get_task
    from pipelines.storage import Storage

    model, processor = get_task("text-classification").load(Storage().model_path(model_uri))
    with torch.no_grad():
        for parameter in model.classifier.parameters():
            parameter.copy_(parameter.flip(0))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def endpoint(batch_predictions, trained_text_model, tmp_path_factory):
    """The trained model served at http://127.0.0.1:PORT/ (plus, by name, a copy of it and a model that answers
    differently), and a copy behind an API key at /secure."""
    from ray import serve

    from pipelines.serve import app_for

    model = trained_text_model["model"]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = job_config(
        serve={
            "model": model,
            "models": {"alpha": model, "beta": mirrored_model(model, tmp_path_factory.mktemp("mirrored"))},
            "max_models_per_replica": 1,
            "max_request_bytes": 6000,
            "max_items_per_request": 50,
        }
    )
    serve.run(app_for(cfg), name=APP, route_prefix="/")
    serve.run(app_for(job_config(serve={"model": model, "api_key": "s3cret"})), name=SECURE, route_prefix="/secure")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_the_endpoint_answers_what_batch_prediction_wrote(endpoint, batch_predictions):
    written, rows = batch_predictions
    # Same preprocess, model and postprocess; only the batches differ (Serve groups rows by length as
    # they arrive), and float32 sums over other padding shapes may differ in the 8th digit.
    response = httpx.post(f"{endpoint}/predict", json={"inputs": [r["text"] for r in rows]}, timeout=60)
    assert response.status_code == 200, response.text
    served = response.json()
    assert len(served) == len(rows)
    with httpx.Client(timeout=60) as client:
        singles = [client.post(f"{endpoint}/predict", json={"inputs": row["text"]}).json() for row in rows[:10]]
    for row, prediction in [*zip(rows, served), *zip(rows, singles)]:
        assert written[row["id"]]["error"] is None
        assert prediction["label"] == written[row["id"]]["label"]
        assert prediction["score"] == pytest.approx(written[row["id"]]["score"], abs=1e-6)
    top = httpx.post(f"{endpoint}/predict", json={"inputs": rows[0]["text"], "parameters": {"top_k": 4}}).json()
    assert [p["label"] for p in top][0] == written[rows[0]["id"]]["label"]
    assert sorted(p["label"] for p in top) == ["food", "sports", "tech", "travel"]
    assert math.isclose(sum(p["score"] for p in top), 1.0, rel_tol=1e-5)


def test_bad_requests_get_4xx_json_errors_and_the_replica_keeps_serving(endpoint):
    before = replicas(APP)
    cases = [
        (b'{"inputs": ', 400, "body is not valid JSON"),
        (json.dumps({"input": "a text"}).encode(), 422, "body: 'inputs' is missing"),
        (json.dumps({"inputs": 42}).encode(), 422, "inputs: text is not a string (got int)"),
        (json.dumps({"inputs": ["a match", "   ", "chef"]}).encode(), 422, "inputs[1]: text is empty"),
        (json.dumps({"inputs": ["x"] * 51}).encode(), 413, "51 items, more than the 50 allowed"),
        (json.dumps({"inputs": "word " * 1500}).encode(), 413, "serve.max_request_bytes"),
        (
            json.dumps({"inputs": "a", "parameters": {"top_k": "many"}}).encode(),
            422,
            'parameters.top_k: expected int, got "many"',
        ),
    ]
    with httpx.Client(timeout=30) as client:
        for body, status, message in cases:
            response = client.post(f"{endpoint}/predict", content=body)
            assert response.status_code == status, (body[:40], response.text)
            assert message in response.json()["error"], response.text
        listed = client.post(f"{endpoint}/predict", json={"inputs": ["a match", "", 7]}).json()
        assert listed["items"] == [
            {"index": 1, "error": "text is empty"},
            {"index": 2, "error": "text is not a string (got int)"},
        ]
        assert client.post(f"{endpoint}/v1/models/gamma/predict", json={"inputs": "a"}).json() == {
            "error": "unknown model 'gamma' (served: alpha, beta)"
        }
        assert client.post(f"{endpoint}/predict", json={"inputs": "goal match team"}).status_code == 200
    assert replicas(APP) == before == {"status": "HEALTHY", "RUNNING": 1}


def test_named_models_load_on_demand_and_the_least_recently_used_is_evicted(endpoint):
    with httpx.Client(timeout=60) as client:
        assert client.get(f"{endpoint}/healthz").json() == {
            "status": "ok",
            "task": "text-classification",
            "default_model": True,
            "models": ["alpha", "beta"],
            "loaded": [],
        }
        default = client.post(f"{endpoint}/predict", json={"inputs": "pasta oven garlic"}).json()
        alpha = client.post(f"{endpoint}/v1/models/alpha/predict", json={"inputs": "pasta oven garlic"})
        assert alpha.status_code == 200 and alpha.json() == default  # the same weights as the default
        assert client.get(f"{endpoint}/healthz").json()["loaded"] == ["alpha"]
        beta = client.post(f"{endpoint}/v1/models/beta/predict", json={"inputs": ["pasta oven garlic"]})
        # beta answers the mirrored label of the four (food, sports, tech, travel) with the same score
        mirrored = dict(zip(["food", "sports", "tech", "travel"], ["travel", "tech", "sports", "food"]))
        assert beta.status_code == 200 and default["label"] == "food", (beta.text, default)
        assert beta.json() == [{"label": mirrored[default["label"]], "score": pytest.approx(default["score"])}]
        assert client.post(f"{endpoint}/predict", json={"inputs": "pasta oven garlic"}).json() == default
        # serve.max_models_per_replica=1: loading beta evicted alpha
        assert client.get(f"{endpoint}/healthz").json()["loaded"] == ["beta"]


def test_only_requests_bearing_the_api_key_get_predictions(endpoint):
    url = f"{endpoint}/secure/predict"
    with httpx.Client(timeout=30) as client:
        missing = client.post(url, json={"inputs": "a match"})
        assert missing.status_code == 401 and "Bearer" in missing.json()["error"]
        assert client.post(url, json={"inputs": "a match"}, headers={"Authorization": "Bearer nope"}).status_code == 401
        good = client.post(url, json={"inputs": "a match"}, headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200 and set(good.json()) == {"label", "score"}
        assert (
            client.post(f"{endpoint}/predict", json={"inputs": "a match"}).status_code == 200
        )  # the other app is open


def test_docs_and_openapi_are_served(endpoint):
    spec = httpx.get(f"{endpoint}/openapi.json").json()
    assert {"/predict", "/v1/models/{model_id}/predict", "/healthz"} <= set(spec["paths"])
    docs = httpx.get(f"{endpoint}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert httpx.get(f"{endpoint}/secure/openapi.json").json()["info"]["title"] == "rayformers: text-classification"


def test_a_replica_whose_model_breaks_fails_its_health_check_and_is_replaced(endpoint, trained_text_model):
    from ray import serve

    from pipelines.serve import DEPLOYMENT_NAME, PredictorDeployment, app_for

    class Breakable(PredictorDeployment):  # defined here so that Ray ships it by value
        def replica(self) -> str:
            return serve.get_replica_context().replica_id.unique_id

        def break_model(self) -> None:  # what a corrupted weight or a failing device looks like
            for parameter in self.default.model.parameters():
                parameter.data.fill_(float("nan"))

    cfg = job_config(
        serve={"model": trained_text_model["model"], "health_check_period_s": 1, "health_check_timeout_s": 10}
    )
    serve.run(app_for(cfg, Breakable), name="breakable", route_prefix="/breakable")
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, "breakable")  # the models, behind the ingress

    def replica() -> str | None:
        try:
            return handle.replica.remote().result(timeout_s=10)
        except Exception:  # the old replica is going away
            return None

    try:
        first = replica()
        handle.break_model.remote().result()
        broken = httpx.post(f"{endpoint}/breakable/predict", json={"inputs": "goal match"}, timeout=30)
        assert broken.status_code == 500 and "non-finite" in broken.json()["error"]
        wait_until(lambda: replica() not in (None, first), 90, "a new replica")
        wait_until(
            lambda: replicas("breakable") == {"status": "HEALTHY", "RUNNING": 1}, 60, "the deployment to recover"
        )
        healed = httpx.post(f"{endpoint}/breakable/predict", json={"inputs": "goal match"}, timeout=30)
        assert healed.status_code == 200 and 0 < healed.json()["score"] <= 1
    finally:
        serve.delete("breakable")


def test_the_exported_config_deploys_with_serve_deploy(endpoint, trained_text_model, tmp_path):
    import ray
    import yaml
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    port = endpoint.rsplit(":", 1)[1]
    config = tmp_path / "job.yaml"
    config.write_text(f"task: text-classification\nmodel:\n  source: {trained_text_model['model']}\n")
    exported = tmp_path / "serve.yaml"
    assert (
        cli.run(
            [
                "serve",
                str(config),
                "serve.route_prefix=/exported",
                f"serve.port={port}",
                "serve.min_replicas=1",
                "serve.max_replicas=2",
                "serve.api_key=hidden",
                "--export-config",
                str(exported),
            ]
        )
        == 0
    )
    text = exported.read_text()
    assert "hidden" not in text  # the key never lands in a file that gets committed or pasted
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    app, health = schema.applications
    assert app.import_path == "pipelines.serve:build_app" and app.args["config"] == str(config)
    ingress, deployment = app.deployments
    assert ingress.name == "Ingress" and ingress.num_replicas == 1
    assert deployment.name == "Predictor" and deployment.autoscaling_config["max_replicas"] == 2
    assert health.route_prefix == "/exported/healthz" and health.import_path == "pipelines.serve:build_health_app"

    dashboard = "http://" + ray._private.worker.get_dashboard_url()
    deployed = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "serve"), "deploy", str(exported), "-a", dashboard],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deployed.returncode == 0, deployed.stderr
    try:
        wait_until(
            lambda: "rayformers" in serve.status().applications
            and serve.status().applications["rayformers"].status == "RUNNING",
            90,
            "the deployed app",
        )
        response = httpx.post(f"{endpoint}/exported/predict", json={"inputs": "flight hotel"}, timeout=30)
        assert response.status_code == 200 and set(response.json()) == {"label", "score"}
        wait_until(
            lambda: httpx.get(f"{endpoint}/exported/healthz", timeout=10).status_code == 200, 60, "the health app"
        )
    finally:
        serve.delete("rayformers-health")
        serve.delete("rayformers")


def test_rayformers_serve_serves_until_interrupted_and_then_removes_its_app(endpoint, trained_text_model, tmp_path):
    import ray
    from ray import serve

    config = tmp_path / "job.yaml"
    config.write_text(
        f"task: text-classification\nmodel:\n  source: {trained_text_model['model']}\n"
        f"serve:\n  route_prefix: /cli\n  port: {endpoint.rsplit(':', 1)[1]}\n"
    )
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "serve", str(config)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def answering() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        if "serving text-classification at" not in log.read_text():
            return False
        return httpx.post(f"{endpoint}/cli/predict", json={"inputs": "goal"}, timeout=10).status_code == 200

    try:
        wait_until(answering, 120, "rayformers serve to answer")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert f"serving text-classification at {endpoint}/cli/predict" in output
    assert not {"rayformers", "rayformers-health"} & set(serve.status().applications)
    assert replicas(APP)["RUNNING"] == 1  # the cluster's other apps keep running


def test_serving_a_model_that_does_not_exist_stops_with_one_line(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(
        "task: text-classification\nmodel:\n  init: {architecture: bert}\ntrain:\n  output: /nonexistent/run\n"
    )
    with pytest.raises(SystemExit) as exit:
        cli.main(["serve", str(config)])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "rayformers: error: serve.model: /nonexistent/run/model: no such model directory "
        "(train first, or point it at a saved model)"
    ]
