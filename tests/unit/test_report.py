"""The run report a person opens after `rayformers train`, built from the step history and metrics.json:
one self-contained page whose plots are real images, whose tables hold the run's numbers, and which
shows a resumed run whole."""

from __future__ import annotations

import base64
import io
import re

import models  # noqa: F401  (the task registry the config validates against)
from PIL import Image

from pipelines.history import History
from pipelines.report import reason_of, render_train
from pipelines.storage import Storage
from tests.conftest import job_config


def images(page: str) -> list[Image.Image]:
    found = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB") for data in found]


def colours(image: Image.Image) -> int:
    return len(set(image.getdata()))


def test_a_resumed_runs_history_keeps_what_came_before_the_checkpoint_and_the_report_draws_it_all(tmp_path):
    storage, output = Storage(), str(tmp_path / "run")
    first = History(storage, output, None)
    for step in (10, 20, 30):
        first.add("train", step, epoch=0, loss=1 / step, lr=1e-3, samples_per_s=50.0)
    first.add("eval", 20, eval_loss=0.4, eval_accuracy=0.7)
    first.write()  # the checkpoint of step 20 registered; the run died after step 30
    second = History(storage, output, resumed_step=20)
    assert [r["step"] for r in second.records] == [10, 20, 20, 20]  # step 30 is trained again
    for step in (30, 40):
        second.add("train", step, epoch=1, loss=0.5 / step, lr=5e-4, samples_per_s=60.0)
    second.add("eval", 40, eval_loss=0.2, eval_accuracy=0.875)
    second.write()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name != "history.json"]  # no temporary left

    cfg = job_config(data={"train": "/data/train", "eval": "/data/eval"}, train={"output": output})
    summary = {
        "final": {"step": 40, "epoch": 1, "eval_loss": 0.2, "eval_accuracy": 0.875},
        "best": {"step": 40, "eval_loss": 0.2, "eval_accuracy": 0.875},
        "wall_seconds": 75.0,
        "samples": 1280,
        "throughput_samples_per_s": 55.5,
        "skipped_rows": 3,
    }
    page = render_train(cfg, second.records, summary, f"{output}/model")
    plots = images(page)
    # loss, learning rate, throughput, eval_loss, eval_accuracy: each a real, non-blank picture
    assert len(plots) == 5 and all(p.size[0] > 300 and colours(p) > 20 for p in plots)
    assert re.findall(r'<img alt="([^"]+)"', page) == [
        "training loss",
        "learning rate",
        "throughput",
        "eval_loss",
        "eval_accuracy",
    ]
    assert '<td>accuracy</td><td class="num">0.8750</td>' in page and "1:15, resumed at steps [20]" in page
    assert f"{output}/model" in page and "http" not in page.replace("http://127.0.0.1", "")  # nothing to fetch


def test_error_reasons_are_grouped_without_the_file_and_the_numbers_that_differ_per_row():
    assert (
        reason_of("line 7: not a JSON object") == reason_of("line 12: not a JSON object") == "line N: not a JSON object"
    )
    assert reason_of("bucket/in/a.jsonl: could not read the file after 3 tries (OSError: x)") == (
        "could not read the file after N tries (OSError: x)"
    )
    assert reason_of("text is empty") == "text is empty"
