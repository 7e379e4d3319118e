"""Many LoRA adapters behind one endpoint: `serve.models` entries that are adapters over one base model share a
single copy of it in the replica, and a request for one adapter never gets another's answer, also when
requests for both arrive in the same batch window."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from tests.adapters import save_adapters_that_disagree
from tests.conftest import job_config, served

pytestmark = pytest.mark.e2e

TEXTS = ["the striker scored a goal", "bake the pasta in the oven", "deploy the server code", "a beach hotel flight"]


def adapters_that_disagree(base_uri: str, tmp_path) -> dict:
    """Two adapters over the trained model at `base_uri` (`tests/adapters.py`): `b` answers the mirrored label."""
    from models import get_task
    from pipelines.adapters import point_at_base, with_lora
    from pipelines.storage import Storage

    model, processor = get_task("text-classification").load(Storage().model_path(base_uri))
    wrapped, _ = with_lora(model, SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules="auto"))
    point_at_base(wrapped, base_uri)
    dirs = save_adapters_that_disagree(wrapped, processor, tmp_path, seed=0, scale=0.05)
    return {name: str(path) for name, path in dirs.items()}


def test_two_adapters_share_one_base_and_each_request_gets_its_own_adapters_answer(
    ray_session, trained_text_model, tmp_path
):
    from pipelines.predictor import Predictor
    from pipelines.storage import Storage

    dirs = adapters_that_disagree(trained_text_model["model"], tmp_path)
    alone = {  # each adapter alone, merged into its base, in this process
        n: [
            p["label"]
            for p in Predictor("text-classification", d, storage=Storage()).predict_rows([{"text": t} for t in TEXTS])[
                0
            ]
        ]
        for n, d in dirs.items()
    }
    assert all(x != y for x, y in zip(alone["a"], alone["b"])), alone  # they disagree on every text

    cfg = job_config(
        serve={"model": trained_text_model["model"], "models": dirs, "max_batch_size": 16, "batch_wait_timeout_s": 0.05}
    )
    with served(cfg, "adapters") as url, httpx.Client(timeout=60) as client:

        def ask(i: int):
            name = "ab"[i % 2]
            text = TEXTS[i % len(TEXTS)]
            answer = client.post(f"{url}/v1/models/{name}/predict", json={"inputs": text})
            return name, text, answer

        for name in dirs:  # both loaded, so that the requests below meet in the same batch windows
            assert client.post(f"{url}/v1/models/{name}/predict", json={"inputs": TEXTS[0]}).status_code == 200
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(64)))
    for name, text, answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["label"] == alone[name][TEXTS.index(text)], (name, text)
