"""What the run report shows of a final eval besides its numbers, built from what the task's metric kept:
a confusion matrix whose counts are the eval's, per-class precision and recall, and example pictures
that are real, non-blank PNGs. No Ray: fake eval batches go straight into the metrics."""

from __future__ import annotations

import base64
import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import models  # noqa: F401  (the task registry the config validates against)
from models.eval_views import EXAMPLES, scores_view
from models.image_classification import TASK as IMAGES
from models.text_classification import TASK as TEXTS
from pipelines.report import read_views, render_train, write_views
from pipelines.storage import Storage
from tests.conftest import job_config


def decoded(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return image.convert("RGB")


def non_blank(image: Image.Image) -> bool:
    return len(set(image.getdata())) > 20


def logits_for(predicted: list[int], classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), classes).float() * 5


def test_a_classifiers_confusion_matrix_counts_the_eval_and_gives_each_class_its_precision_and_recall():
    labels = ["food", "sports", "travel"]
    metric = TEXTS.metrics(labels, None)
    batches = [([0, 0, 1, 2], [0, 1, 1, 2]), ([2, 2, 0], [2, 1, 0])]  # (truth, predicted)
    for truth, predicted in batches:
        metric.update(SimpleNamespace(logits=logits_for(predicted, 3)), {"labels": torch.tensor(truth)}, {})
    values = metric.compute()
    assert values["accuracy"] == pytest.approx(5 / 7)
    matrix, table = metric.views()
    assert table.header == ["class", "in eval", "predicted", "precision", "recall", "F1"]
    rows = {row[0]: row[1:] for row in table.rows}
    # food: 3 rows, 2 right, 1 called sports; sports: 1 row, right; travel: 3 rows, 2 right, 1 called sports
    assert rows["food"][:2] == [3, 2] and rows["food"][2:4] == [pytest.approx(1.0), pytest.approx(2 / 3)]
    assert rows["sports"][:2] == [1, 3] and rows["sports"][2:4] == [pytest.approx(1 / 3), pytest.approx(1.0)]
    assert rows["travel"][:2] == [3, 2] and rows["travel"][3] == pytest.approx(2 / 3)
    assert metric.counts.tolist() == [[2, 1, 0], [0, 1, 0], [0, 1, 2]]  # rows: truth, columns: predicted
    [(caption, png)] = matrix.figures
    assert caption == "confusion matrix" and non_blank(decoded(png))


def test_scores_are_zero_not_nan_for_a_class_never_predicted_or_never_present():
    table = scores_view("t", "", "class", ["a", "b", "c"], [2, 0, 0], [3, 0, 1], [2, 1, 0])
    assert [row[1:] for row in table.rows] == [[2, 3, 2 / 3, 1.0, 0.8], [1, 0, 0.0, 0.0, 0.0], [0, 1, 0.0, 0.0, 0.0]]


def test_many_classes_give_a_table_of_the_worst_recalls_and_no_picture():
    labels = [f"c{i}" for i in range(60)]
    metric = TEXTS.metrics(labels, None)
    truth = torch.arange(60)
    predicted = torch.where(truth < 5, (truth + 1) % 60, truth)  # classes 0-4 always wrong
    metric.update(SimpleNamespace(logits=logits_for(predicted.tolist(), 60)), {"labels": truth}, {})
    metric.compute()
    [table] = metric.views()
    assert len(table.rows) == 50 and {row[0] for row in table.rows[:5]} == {f"c{i}" for i in range(5)}
    assert not table.figures and metric.counts.shape == (3, 60)  # no 60 x 60 matrix kept, none drawn
    rows = {row[0]: row[1:] for row in table.rows}
    assert rows["c0"] == [1, 0, 0.0, 0.0, 0.0] and rows["c5"][:4] == [1, 2, 0.5, 1.0]  # c5: its own and c4's


def test_an_image_classifier_keeps_a_few_example_images_however_long_the_eval_and_draws_them():
    labels = ["blue", "green", "red", "yellow"]
    metric = IMAGES.metrics(labels, None)
    rng = np.random.default_rng(0)
    for _ in range(5):  # 40 rows: only the first EXAMPLES are kept
        truth = rng.integers(0, 4, 8)
        pixels = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(8)]
        outputs = SimpleNamespace(logits=logits_for(truth.tolist(), 4))
        metric.update(outputs, {"labels": torch.as_tensor(truth)}, {"pixels": pixels})
    assert len(metric.examples.items) == EXAMPLES
    assert metric.compute()["accuracy"] == 1.0 and int(metric.counts.sum()) == 40
    titles = [view.title for view in metric.views()]
    assert titles == ["Confusion matrix", "Per-class precision and recall", "Examples"]
    [(_, png)] = metric.views()[2].figures
    grid = decoded(png)
    assert grid.size[0] > 500 and non_blank(grid)


def test_the_run_report_renders_the_views_the_worker_wrote_and_a_run_without_them_still_renders(tmp_path):
    labels = ["food", "sports"]
    metric = TEXTS.metrics(labels, None)
    metric.update(SimpleNamespace(logits=logits_for([0, 1, 1], 2)), {"labels": torch.tensor([0, 1, 0])}, {})
    metric.compute()
    storage, output = Storage(), str(tmp_path / "run")
    write_views(storage, output, 30, metric)
    record = read_views(storage, output)
    assert record["step"] == 30 and json.dumps(record)  # plain JSON: `rayformers report` draws it again
    cfg = job_config(data={"train": "/data/train", "eval": "/data/eval"}, train={"output": output})
    summary = {"final": {"step": 30, "eval_loss": 0.5}, "best": {"step": 30, "eval_loss": 0.5}}
    page = render_train(cfg, [], summary, f"{output}/model", record)
    views = page.split('<div id="eval-views"', 1)[1]
    assert "Last eval (step 30)" in page and "<h3>Confusion matrix</h3>" in views
    assert '<td>sports</td><td class="num">1</td><td class="num">2</td><td class="num">0.5000</td>' in views
    [png] = re.findall(r'alt="confusion matrix" src="data:image/png;base64,([^"]+)"', views)
    assert non_blank(decoded(base64.b64decode(png)))
    assert 'id="eval-views"' not in render_train(cfg, [], summary, f"{output}/model", None)


def test_a_view_that_fails_to_draw_is_left_out_with_one_line_and_the_run_goes_on(tmp_path, capsys):
    class Broken:
        def views(self):
            raise ValueError("no colour map")

    storage, output = Storage(), str(tmp_path / "run")
    write_views(storage, output, 10, Broken())
    assert read_views(storage, output) == {"step": 10, "views": []}
    assert "views were not drawn (ValueError: no colour map)" in capsys.readouterr().out


def test_token_classification_scores_each_entity_type_as_seqeval_does_and_shows_the_found_entities():
    from seqeval.metrics import classification_report

    from models.token_classification import TASK as NER

    labels = ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]
    ids = {label: i for i, label in enumerate(labels)}
    sentences = [("Bob Smith left Oslo", ["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "O", "O", "B-LOC"])]
    sentences.append(("Acme hired Eve", ["B-ORG", "O", "B-PER"], ["B-ORG", "O", "B-LOC"]))
    metric = NER.metrics(labels, None)
    for text, true, guess in sentences:
        logits = torch.zeros(1, len(true) + 2, len(labels))
        for w, tag in enumerate(guess):
            logits[0, w + 1, ids[tag]] = 1.0
        arrays = {"tags": [[ids[t] for t in true]], "first_piece": [np.arange(1, len(true) + 1)], "text": [text]}
        metric.update(SimpleNamespace(logits=logits), {}, arrays)
    metric.compute()
    table, examples = metric.views()
    expected = classification_report([s[1] for s in sentences], [s[2] for s in sentences], output_dict=True)
    for name, support, predicted, precision, recall, _ in table.rows:
        assert support == expected[name]["support"] and precision == pytest.approx(expected[name]["precision"])
        assert recall == pytest.approx(expected[name]["recall"])
    assert [row[:3] for row in table.rows] == [["LOC", 1, 2], ["ORG", 1, 1], ["PER", 2, 1]]
    assert examples.rows[0] == ["Bob Smith left Oslo", "PER: Bob Smith; LOC: Oslo", "PER: Bob; LOC: Oslo"]


def test_speech_recognition_shows_the_first_transcripts_beside_their_references_with_each_wer(monkeypatch):
    import models.automatic_speech_recognition as asr

    said = ["the cat sat", "a red door", "go home now"] * 3
    heard = iter(["the cat sat", "a red dog", "no"] * 3)
    monkeypatch.setattr(asr, "transcripts", lambda logits, spans, model, tokenizer: [next(heard) for _ in spans])
    metric = asr.TASK.metrics([], None)
    for k in range(3):
        metric.update(torch.zeros(3, 4, 5), {}, {"spans": [None] * 3, "reference": said[3 * k : 3 * k + 3]})
    assert metric.compute()["wer"] == pytest.approx((0 + 1 + 3) / 9)
    [examples] = metric.views()
    assert examples.header == ["reference", "transcript", "WER"] and len(examples.rows) == EXAMPLES
    assert examples.rows[:3] == [
        ["the cat sat", "the cat sat", 0.0],
        ["a red door", "a red dog", pytest.approx(1 / 3)],
        ["go home now", "no", 1.0],
    ]


def test_segmentation_shows_each_class_iou_and_the_true_and_predicted_classes_over_the_image():
    from models.segments import SegmentationMetric

    metric = SegmentationMetric(3, panoptic=False, threshold=0.8, labels=["sky", "road", "car"])
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 255]], np.uint8)
    logits = torch.zeros(1, 3, 2, 4)
    for y, row in enumerate([[0, 1, 1, 1], [2, 0, 0, 0]]):
        for x, c in enumerate(row):
            logits[0, c, y, x] = 5.0
    pixels = np.random.default_rng(0).integers(0, 255, (2, 4, 3), dtype=np.uint8)
    metric.update(SimpleNamespace(logits=logits), {}, {"labels": [target], "pixels": [pixels]})
    metric.compute()
    table, examples = metric.views()
    assert table.rows == [
        ["sky", 2, 2, pytest.approx(1 / 3)],
        ["road", 2, 3, pytest.approx(2 / 3)],
        ["car", 2, 1, pytest.approx(1 / 2)],
    ]
    assert metric.examples.items[0]["truth"].tolist() == [[0, 0, 1, 1], [2, 2, -1, -1]]  # ignored: left clear
    grid = decoded(examples.figures[0][1])
    assert grid.size[0] > 500 and non_blank(grid)


def test_depth_estimation_draws_a_few_images_beside_their_true_and_predicted_depth_on_one_scale():
    from models.depth_estimation import TASK as DEPTH

    metric = DEPTH.metrics([], None)
    rng = np.random.default_rng(0)
    ramp = torch.linspace(1.0, 5.0, 32).repeat(32, 1)
    for _ in range(2):  # 8 images: 3 examples are kept
        truth = ramp.repeat(4, 1, 1)
        truth[:, :4, :4] = 0.0  # unknown depth
        pixels = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
        metric.update(SimpleNamespace(predicted_depth=truth.flip(-1)), {"labels": truth}, {"pixels": pixels})
    metric.compute()
    assert len(metric.examples.items) == 3 and np.isnan(metric.examples.items[0]["truth"][:4, :4]).all()
    [examples] = metric.views()
    grid = decoded(examples.figures[0][1])
    assert grid.size[1] > 600 and non_blank(grid)  # three rows: image, true depth, predicted depth


def test_rayformers_report_draws_the_last_eval_again_from_what_the_run_left(tmp_path):
    from pipelines.report import rebuild

    labels = ["food", "sports"]
    metric = TEXTS.metrics(labels, None)
    metric.update(SimpleNamespace(logits=logits_for([0, 1, 1], 2)), {"labels": torch.tensor([0, 1, 0])}, {})
    metric.compute()
    output = tmp_path / "run"
    write_views(Storage(), str(output), 30, metric)
    summary = {"final": {"step": 30, "eval_loss": 0.5}, "best": {"step": 30, "eval_loss": 0.5}}
    (output / "metrics.json").write_text(json.dumps(summary))
    cfg = job_config(data={"train": "/data/train", "eval": "/data/eval"}, train={"output": str(output)})
    page = (output / "report.html").read_text() if rebuild(cfg) else ""
    assert "Last eval (step 30)" in page and 'alt="confusion matrix"' in page
