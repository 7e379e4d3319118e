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
from models.eval_views import EXAMPLES, RightAndWrong, scores_view
from models.image_classification import TASK as IMAGES
from models.spec import Context
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


@pytest.fixture(scope="module")
def tokenizer():
    return TEXTS.build_processor(job_config().model, None, iter(TEXTS.demo_data(200, seed=0)))


def text_inputs(tokenizer, labels: list, truth: list[int], texts: list[str] | None = None, pairs=None) -> dict:
    """A text-classification eval batch as the train loop hands it to the metric: preprocessed, collated."""
    texts = texts or [f"goal match {WORDS[i % len(WORDS)]}" for i in range(len(truth))]
    batch = {"text": texts, "label": [labels[t] for t in truth], **({"text_pair": pairs} if pairs else {})}
    features = TEXTS.preprocess(batch, tokenizer, Context(labels={label: i for i, label in enumerate(labels)}))
    assert features.errors == [None] * len(truth)
    return TEXTS.collate(features.arrays, tokenizer)


def text_metric(tokenizer, labels: list):
    metric = TEXTS.metrics(labels, None)
    metric.bind(None, tokenizer)
    return metric


def test_a_classifiers_confusion_matrix_counts_the_eval_and_gives_each_class_its_precision_and_recall(tokenizer):
    labels = ["food", "sports", "travel"]
    metric = text_metric(tokenizer, labels)
    batches = [([0, 0, 1, 2], [0, 1, 1, 2]), ([2, 2, 0], [2, 1, 0])]  # (truth, predicted)
    for truth, predicted in batches:
        metric.update(SimpleNamespace(logits=logits_for(predicted, 3)), text_inputs(tokenizer, labels, truth), {})
    values = metric.compute()
    assert values["accuracy"] == pytest.approx(5 / 7)
    matrix, table, _ = metric.views()
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


def test_many_classes_give_a_table_of_the_worst_recalls_and_no_picture(tokenizer):
    labels = [f"c{i}" for i in range(60)]
    metric = text_metric(tokenizer, labels)
    truth = torch.arange(60)
    predicted = torch.where(truth < 5, (truth + 1) % 60, truth)  # classes 0-4 always wrong
    inputs = text_inputs(tokenizer, labels, truth.tolist())
    metric.update(SimpleNamespace(logits=logits_for(predicted.tolist(), 60)), inputs, {})
    metric.compute()
    table, _ = metric.views()
    assert len(table.rows) == 50 and {row[0] for row in table.rows[:5]} == {f"c{i}" for i in range(5)}
    assert not table.figures and metric.counts.shape == (3, 60)  # no 60 x 60 matrix kept, none drawn
    rows = {row[0]: row[1:] for row in table.rows}
    assert rows["c0"] == [1, 0, 0.0, 0.0, 0.0] and rows["c5"][:4] == [1, 2, 0.5, 1.0]  # c5: its own and c4's


WORDS = "goal match team coach chip server cloud code pasta recipe oven soup flight hotel beach museum".split()


def test_a_text_classifiers_report_shows_its_first_right_and_wrong_rows_with_text_labels_and_score(tokenizer):
    labels = ["food", "sports", "tech"]
    metric = text_metric(tokenizer, labels)
    for k in range(5):  # 40 rows; rows 3, 4 and 5 of each batch are wrong
        truth = [i % 3 for i in range(8)]
        predicted = [(t + 1) % 3 if i in (3, 4, 5) else t for i, t in enumerate(truth)]
        texts = [f"{WORDS[(8 * k + i) % 16]} {WORDS[k]} {WORDS[i]}" for i in range(8)]
        metric.update(
            SimpleNamespace(logits=logits_for(predicted, 3)), text_inputs(tokenizer, labels, truth, texts), {}
        )
    assert len(metric.examples.right) == len(metric.examples.wrong) == EXAMPLES  # however long the eval
    metric.compute()
    titles = [view.title for view in metric.views()]
    assert titles == ["Confusion matrix", "Per-class precision and recall", "Examples"]
    examples = metric.views()[2]
    assert examples.header == ["text", "true label", "predicted label", "score", "right"]
    score = pytest.approx(float(torch.tensor([5.0, 0.0, 0.0]).softmax(0)[0]))  # the predicted class's probability
    assert examples.rows == [  # the first three right rows, then the first three wrong ones
        ["goal goal goal", "food", "food", score, "yes"],
        ["match goal match", "sports", "sports", score, "yes"],
        ["team goal team", "tech", "tech", score, "yes"],
        ["coach goal coach", "food", "sports", score, "no"],
        ["chip goal chip", "sports", "tech", score, "no"],
        ["server goal server", "tech", "food", score, "no"],
    ]


def test_a_text_pair_is_shown_as_both_texts_and_a_long_text_is_clipped(tokenizer):
    labels = ["food", "sports"]
    metric = text_metric(tokenizer, labels)
    texts, pairs = ["goal match 7", " ".join(["stadium"] * 400)], ["team coach", "oven"]
    metric.update(
        SimpleNamespace(logits=logits_for([0, 0], 2)), text_inputs(tokenizer, labels, [1, 0], texts, pairs), {}
    )
    metric.compute()
    rows = metric.views()[-1].rows
    assert rows[0][0].startswith("stadium stadium") and rows[0][0].endswith("…") and len(rows[0][0]) <= 300
    assert rows[1][:4] == [
        "goal match [UNK] | team coach",  # an unknown word stays visible
        "sports",
        "food",
        pytest.approx(float(logits_for([0], 2).softmax(-1)[0, 0])),
    ]


def test_a_classifier_shows_as_many_wrong_rows_as_it_has_up_to_half_and_more_when_right_ones_are_few():
    def shown(right: int, wrong: int) -> list[bool]:
        kept = RightAndWrong(limit=6)
        for k in range(right):
            kept.add({"k": k}, True)
        for k in range(wrong):
            kept.add({"k": k}, False)
        assert len(kept.right) <= 6 and len(kept.wrong) <= 6
        return [e["right"] for e in kept.items]

    assert shown(100, 100) == [True] * 3 + [False] * 3
    assert shown(100, 1) == [True] * 5 + [False]
    assert shown(100, 0) == [True] * 6
    assert shown(2, 100) == [True] * 2 + [False] * 4
    assert shown(0, 100) == [False] * 6
    assert shown(1, 1) == [True, False]


def test_an_audio_classifiers_report_shows_each_example_clip_by_its_length_with_the_true_and_predicted_label():
    import wave

    from models.audio import AudioOptions, feature_extractor
    from models.audio_classification import TASK as AUDIO
    from config import DataConfig

    labels = ["beeps", "high", "low", "rising"]
    rows = AUDIO.demo_data(4, seed=1)
    processor = feature_extractor()
    ctx = Context(
        labels={label: i for i, label in enumerate(labels)},
        options=AudioOptions(chunk_length_s=0.25),  # clips of 0.3-0.9 s: two to four windows each
        data=DataConfig(),
    )
    features = AUDIO.preprocess(
        {"audio": [r["audio"] for r in rows], "label": [r["label"] for r in rows]}, processor, ctx
    )
    assert features.errors == [None] * 4
    inputs = AUDIO.collate(features.arrays, processor)
    truth = [labels.index(r["label"]) for r in rows]
    predicted = [truth[0], (truth[1] + 1) % 4, truth[2], truth[3]]
    windows = [len(span) for span in features.arrays["spans"]]
    logits = torch.cat([logits_for([p] * n, 4) for p, n in zip(predicted, windows)])  # every window of a clip
    metric = AUDIO.metrics(labels, None)
    metric.bind(None, processor)
    metric.update(SimpleNamespace(logits=logits), inputs, features.arrays)
    assert metric.compute()["accuracy"] == 0.75
    examples = metric.views()[-1]
    assert examples.title == "Examples" and examples.header[:3] == ["clip", "true label", "predicted label"]
    seconds = []
    for r in rows:
        with wave.open(io.BytesIO(r["audio"])) as clip:
            seconds.append(clip.getnframes() / clip.getframerate())
    assert min(windows) > 1
    expected = [(i, "yes") for i in (0, 2, 3)] + [(1, "no")]
    assert examples.rows == [
        [
            f"{seconds[i]:.2f} s ({windows[i]} windows)",
            labels[truth[i]],
            labels[predicted[i]],
            pytest.approx(float(logits_for([0], 4).softmax(-1)[0, 0])),
            right,
        ]
        for i, right in expected
    ]


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


def test_the_run_report_renders_the_views_the_worker_wrote_and_a_run_without_them_still_renders(tmp_path, tokenizer):
    labels = ["food", "sports"]
    metric = text_metric(tokenizer, labels)
    metric.update(SimpleNamespace(logits=logits_for([0, 1, 1], 2)), text_inputs(tokenizer, labels, [0, 1, 0]), {})
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
    # the example rows: the text, its true label, the predicted one, that one's probability, right or not
    examples = views.split("<h3>Examples</h3>", 1)[1]
    assert "<th>text</th><th>true label</th><th>predicted label</th><th>score</th><th>right</th>" in examples
    score = f"{float(logits_for([0], 2).softmax(-1)[0, 0]):.4f}"
    for text, truth, guess, right in [("goal", "food", "food", "yes"), ("match", "sports", "sports", "yes")]:
        row = f'<tr><td>goal match {text}</td><td>{truth}</td><td>{guess}</td><td class="num">{score}</td>'
        assert f"{row}<td>{right}</td></tr>" in examples, examples
    assert '<tr><td>goal match team</td><td>food</td><td>sports</td><td class="num">' in examples
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


def test_rayformers_report_draws_the_last_eval_again_from_what_the_run_left(tmp_path, tokenizer):
    from pipelines.report import rebuild

    labels = ["food", "sports"]
    metric = text_metric(tokenizer, labels)
    metric.update(SimpleNamespace(logits=logits_for([0, 1, 1], 2)), text_inputs(tokenizer, labels, [0, 1, 0]), {})
    metric.compute()
    output = tmp_path / "run"
    write_views(Storage(), str(output), 30, metric)
    summary = {"final": {"step": 30, "eval_loss": 0.5}, "best": {"step": 30, "eval_loss": 0.5}}
    (output / "metrics.json").write_text(json.dumps(summary))
    cfg = job_config(data={"train": "/data/train", "eval": "/data/eval"}, train={"output": str(output)})
    page = (output / "report.html").read_text() if rebuild(cfg) else ""
    assert "Last eval (step 30)" in page and 'alt="confusion matrix"' in page
