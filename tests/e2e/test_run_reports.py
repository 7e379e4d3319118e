"""The run report a person opens after `rayformers train`, rendered in a real headless Chromium: built
from the text-classification run that tests/conftest.py trains once per session (no training of its own).
The predict page is checked beside the predict run in test_text_classification_runs.py."""

from __future__ import annotations

import json
import re

import pytest
import s3fs

from tests.e2e.browser import class_rows, open_in_browser, plotted_pixels

pytestmark = pytest.mark.e2e


def test_the_run_report_opens_in_a_browser_with_its_curves_drawn_and_the_runs_own_numbers(trained_text_model, tmp_path):
    from pipelines.report import rebuild
    from tests.conftest import job_config

    fs = s3fs.S3FileSystem()
    out = trained_text_model["output"].removeprefix("s3://")
    metrics = json.loads(fs.cat(f"{out}/metrics.json"))
    logs = fs.ls(f"{out}/logs")
    assert len(logs) == 1 and "Starting execution of Dataset" in fs.cat(logs[0]).decode()  # Ray Data's, in the file
    page = fs.cat(f"{out}/report.html").decode()
    images, dom, screenshot = open_in_browser(page, tmp_path)
    assert set(images) == {
        "training loss",
        "learning rate",
        "throughput",
        "eval_loss",
        "eval_accuracy",
        "eval_macro_f1",
        "confusion matrix",
    }, images
    assert all(w >= 300 and h >= 200 for w, h in images.values()), images  # each image decoded in the browser
    assert plotted_pixels(screenshot) > 500  # the curves are on screen, not blank boxes
    table = dom.split('<div id="metrics">', 1)[1].split("</div>", 1)[0]
    best = metrics["best"]
    assert f"best model (step {best['step']})" in table
    for name in ("accuracy", "macro_f1", "loss"):
        assert f'<td>{name}</td><td class="num">{best["eval_" + name]:.4f}</td>' in table, table
    assert trained_text_model["model"] in dom and "text-classification" in dom
    # the last eval's confusion matrix, and per-class recalls that add up to the run's accuracy
    final = metrics["final"]
    assert f"Last eval (step {final['step']})" in dom
    classes = class_rows(dom)
    assert set(classes) == {"food", "sports", "tech", "travel"}, classes
    hits = sum(rows * recall for rows, _, _, recall in classes.values())
    assert hits / sum(rows for rows, *_ in classes.values()) == pytest.approx(final["eval_accuracy"], abs=1e-3)
    # a few eval rows: the text, its true label, the predicted one with its probability, right or not
    examples = dom.split("<h3>Examples</h3>", 1)[1].split("</table>", 1)[0]
    cells = r'<tr><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td><td class="num">([\d.]+)</td><td>(yes|no)</td></tr>'
    rows = re.findall(cells, examples)
    assert 1 <= len(rows) <= 6, examples
    for text, truth, guess, score, right in rows:
        assert text.strip() and truth in classes and guess in classes, rows
        assert (truth == guess) == (right == "yes") and 0 < float(score) <= 1, rows

    # `rayformers report` draws it again from what the run left
    fs.rm(f"{out}/report.html")
    output = trained_text_model["output"]
    assert rebuild(job_config(train={"output": output})) == f"{output}/report.html"
    metrics_div = page.split('<div id="metrics">', 1)[1].split("</div>", 1)[0]
    assert metrics_div in fs.cat(f"{out}/report.html").decode()
