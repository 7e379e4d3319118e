"""The pages a person opens after a job: `train.output/report.html` after `rayformers train`, and
`predict.output/_report.html` after `rayformers predict` (the underscore keeps Parquet readers from
taking it for a data file, as with `_SUCCESS`).

Each page is one self-contained HTML file: plots are drawn with matplotlib's Agg backend and embedded
as PNG data URIs, so it opens offline and can be mailed or copied anywhere. The training page is built
from `history.json` (see history.py) and `metrics.json`, which both survive a resume, so a resumed
run's report shows the whole run, and from `eval_views.json`: what the task's metric shows of the
run's last eval (confusion matrix, examples with predictions; `StreamingMetric.views`), written by the
rank-0 worker that ran it. This page renders those views, whatever they are; it names no task.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections import Counter
from datetime import datetime, timezone

import pyarrow.parquet as pq
import yaml

from errors import UserError
from pipelines.history import read_history
from pipelines.storage import Storage, storage_errors

SECRET = re.compile(r"key|secret|token|password", re.IGNORECASE)
MAX_REASONS = 1000  # distinct error reasons counted by the predict page; later ones count as "other reasons"
MAX_CLASSES = 1000
EVAL_VIEWS = "eval_views.json"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 0.25em 0.8em; text-align: left; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; } td.num { text-align: right; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; } .plots img { width: 520px; border: 1px solid #eee; }
.views img { max-width: 100%; border: 1px solid #eee; } .views td { max-width: 420px; }
figure { margin: 0; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; } .muted { color: #777; }
"""


# --- plots ---------------------------------------------------------------------------------------


def plot(title: str, series: dict[str, tuple[list, list]], ylabel: str = "", marks: list[int] = (), kind="line"):
    """A PNG data URI of one chart: `series` maps a legend name to (x, y); `marks` are steps drawn as
    dashed lines (where the run resumed)."""
    import matplotlib

    matplotlib.use("Agg")  # no display, no GUI toolkit
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.0), dpi=100)
    # fixed margins: matplotlib's tight_layout draws the figure twice, 40% of a report's time
    ax = fig.add_axes((0.3, 0.12, 0.66, 0.78) if kind == "barh" else (0.15, 0.16, 0.81, 0.74))
    for name, (x, y) in series.items():
        if kind == "barh":
            ax.barh([str(v)[:24] for v in x], y, color="#4c72b0")
            ax.invert_yaxis()
        else:
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=name)
    for step in marks:
        ax.axvline(step, color="#999", linestyle="--", linewidth=1)
    ax.set_title(title)
    if kind != "barh":
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)  # 1.3962, not "+1.396" and 0.0002
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def figure(title: str, uri: str) -> str:
    return f'<figure><img alt="{html.escape(title)}" src="{uri}"></figure>'


# --- html pieces ---------------------------------------------------------------------------------


def table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f'<td class="num">{value:.4f}</td>'
        if isinstance(value, int):
            return f'<td class="num">{value}</td>'
        return f"<td>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def facts(rows: list[list]) -> str:
    """A two-column table: what, and its value."""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def page(title: str, sections: list[str]) -> str:
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="muted">written by rayformers, {made}</p>{"".join(sections)}</body></html>'
    )


def masked(value):
    if isinstance(value, dict):
        return {k: ("***" if SECRET.search(k) and v else masked(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def config_section(cfg) -> str:
    text = yaml.safe_dump(masked(cfg.model_dump(mode="json")), sort_keys=False)
    return f"<h2>Config</h2><details><summary>the resolved config</summary><pre>{html.escape(text)}</pre></details>"


def model_name(cfg) -> str:
    if cfg.model.source:
        return cfg.model.source
    init = cfg.model.init
    return f"{init.architecture} {init.size} (from scratch)" if init else "?"


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def write_page(storage: Storage, uri: str, text: str) -> None:
    with storage_errors(uri):
        storage.write_text(uri, text)


# --- rayformers train ----------------------------------------------------------------------------


def train_report(cfg, storage: Storage, summary: dict) -> str:
    """Writes train.output/report.html from history.json and `summary` (metrics.json); returns its URI."""
    out = cfg.train.output.rstrip("/")
    uri = f"{out}/report.html"
    views = read_views(storage, out)
    write_page(storage, uri, render_train(cfg, read_history(storage, out), summary, f"{out}/model", views))
    return uri


def write_views(storage: Storage, output: str, step: int, metric) -> None:
    """train.output/eval_views.json: the views of the eval at `step` (called by the rank-0 worker). A
    view that fails to draw is left out with one line saying why: the trained model matters more."""
    try:
        views = metric.views()
    except Exception as exc:  # noqa: BLE001  (a drawing bug must not fail a finished run)
        print(f"run report: the last eval's views were not drawn ({type(exc).__name__}: {exc})", flush=True)
        views = []
    record = {
        "step": step,
        "views": [
            {
                "title": v.title,
                "note": v.note,
                "header": list(v.header),
                "rows": [list(row) for row in v.rows],
                "figures": [[caption, base64.b64encode(data).decode()] for caption, data in v.figures],
            }
            for v in views
        ],
    }
    with storage_errors(output):
        storage.write_text(f"{output.rstrip('/')}/{EVAL_VIEWS}", json.dumps(record))


def read_views(storage: Storage, output: str) -> dict | None:
    """What `write_views` wrote for the run in `output`; None for a run without (no eval, an older version)."""
    uri = f"{output.rstrip('/')}/{EVAL_VIEWS}"
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def views_section(record: dict | None) -> str:
    """The last eval's views (see `write_views`): each a heading, a note, figures and a table."""
    if not record or not record["views"]:
        return ""
    parts = [f'<h2>Last eval (step {record["step"]})</h2><div id="eval-views" class="views">']
    for view in record["views"]:
        parts.append(f"<h3>{html.escape(view['title'])}</h3>")
        if view["note"]:
            parts.append(f"<p>{html.escape(view['note'])}</p>")
        for caption, data in view["figures"]:
            parts.append(figure(caption, "data:image/png;base64," + data))
        if view["header"]:
            parts.append(table(view["header"], view["rows"]))
    return "".join(parts) + "</div>"


def render_train(cfg, records: list[dict], summary: dict, model_uri: str, views: dict | None = None) -> str:
    steps = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    resumes = [r["step"] for r in records if r["kind"] == "resume"]
    final = summary.get("final", {})
    header = [
        ["task", cfg.task],
        ["model", model_name(cfg)],
        ["training data", cfg.data.train],
        ["eval data", cfg.data.eval or "none"],
        ["workers", str(cfg.train.num_workers)],
        ["steps", f"{final.get('step', '?')} (epoch {final.get('epoch', '?')})"],
        ["time", clock(summary.get("wall_seconds")) + (f", resumed at steps {resumes}" if resumes else "")],
        ["samples trained", summary.get("samples", "?")],
        ["rows with errors (skipped)", summary.get("skipped_rows", "?")],
        ["throughput", f"{summary.get('throughput_samples_per_s') or 0:.1f} samples/s"],
        ["the trained model", model_uri],
    ]
    if summary.get("parameters"):  # train.peft trains a part of them
        counts = summary["parameters"]
        header.insert(2, ["parameters", f"{counts['trainable']:,} trained of {counts['total']:,}"])
    sections = ['<h2>Run</h2><div id="run">' + facts(header) + "</div>"]
    sections.append(metrics_section(summary))
    curves = []
    if steps:
        x = [r["step"] for r in steps]
        curves.append(("training loss", plot("training loss", {"loss": (x, [r["loss"] for r in steps])}, "", resumes)))
        curves.append(("learning rate", plot("learning rate", {"lr": (x, [r["lr"] for r in steps])}, "", resumes)))
        speed = {"samples/s": (x, [r["samples_per_s"] for r in steps])}
        curves.append(("throughput", plot("throughput (samples/s)", speed, "", resumes)))
    names = sorted({k for r in evals for k in r if k.startswith("eval_")}, key=lambda k: (k != "eval_loss", k))
    for name in names:
        points = [(r["step"], r[name]) for r in evals if isinstance(r.get(name), (int, float))]
        if points:
            x, y = zip(*points)
            curves.append((name, plot(name, {name: (list(x), list(y))}, "", resumes)))
    if curves:
        sections.append("<h2>Curves</h2><div class='plots'>" + "".join(figure(t, u) for t, u in curves) + "</div>")
    else:
        sections.append("<h2>Curves</h2><p>No step was logged (train.log_every is larger than the run).</p>")
    sections.append(views_section(views))
    sections.append(config_section(cfg))
    return page(f"rayformers train: {cfg.task}", sections)


def metrics_section(summary: dict) -> str:
    best, final = summary.get("best") or {}, summary.get("final") or {}
    names = sorted({k for k in (*best, *final) if k.startswith("eval_")}, key=lambda k: (k != "eval_loss", k))
    if not names:
        return "<h2>Final metrics</h2><p>No eval split (data.eval) was given.</p>"
    rows = [[name.removeprefix("eval_"), best.get(name, ""), final.get(name, "")] for name in names]
    header = ["metric", f"best model (step {best.get('step', '?')})", f"last eval (step {final.get('step', '?')})"]
    return '<h2>Final metrics</h2><div id="metrics">' + table(header, rows) + "</div>"


def rebuild(cfg) -> str:
    """`rayformers report`: train.output/report.html again, from the run's history.json and metrics.json."""
    if not cfg.train.output:
        raise UserError("train.output: required by `rayformers report` (the run to draw)")
    storage = Storage.from_config(cfg.storage)
    out = cfg.train.output.rstrip("/")
    if not storage.exists(f"{out}/metrics.json"):
        raise UserError(f"train.output: {out} holds no finished run (no metrics.json); `rayformers train` writes one")
    return train_report(cfg, storage, json.loads(storage.read_text(f"{out}/metrics.json")))


# --- rayformers predict --------------------------------------------------------------------------


def predict_report(cfg, task, storage: Storage, root, parts: list[str], model_uri: str, summary: dict) -> str:
    """Writes predict.output/_report.html: counts, error reasons, throughput and, when the task predicts
    classes (its label column is one of its prediction columns), how often each class came out. Reads
    only those columns, one part at a time."""
    counted = task.label_column if task.label_column in task.output_columns else None
    reasons, examples, classes = Counter(), {}, Counter()
    for name in parts:
        with storage_errors(root.uri), root.fs.open(root.join(name).path, "rb") as f:
            file = pq.ParquetFile(f)
            columns = [c for c in ("error", counted) if c and c in file.schema_arrow.names]
            for batch in file.iter_batches(columns=columns, batch_size=8192):
                values = batch.to_pydict()
                for error in values.get("error", []):
                    if error:
                        reason = reason_of(error)
                        reason = reason if reason in reasons or len(reasons) < MAX_REASONS else "other reasons"
                        reasons[reason] += 1
                        examples.setdefault(reason, error)
                for label in values.get(counted, []) if counted else []:
                    if label is not None and (label in classes or len(classes) < MAX_CLASSES):
                        classes[str(label)] += 1
    uri = root.join("_report.html").uri
    write_page(storage, uri, render_predict(cfg, model_uri, summary, reasons, examples, classes, counted))
    return uri


def reason_of(error: str) -> str:
    """An error row's reason without what differs from row to row: the file it names and numbers."""
    reason = re.sub(r"^\S*/\S*: ", "", error)
    return re.sub(r"\d+", "N", reason)


def render_predict(cfg, model_uri, summary, reasons: Counter, examples: dict, classes: Counter, counted) -> str:
    s = summary
    header = [
        ["task", cfg.task],
        ["model", model_uri],
        ["input", cfg.predict.input],
        ["output", s["output"]],
        ["rows", s["rows"]],
        ["rows with errors", s["errors"]],
        ["rows flagged", s["flagged"]],
        ["units (files or slices)", f"{s['units']} ({s['units_resumed']} from an earlier run)"],
        ["time", clock(s["seconds"])],
        ["throughput", f"{s['rows_per_s']} rows/s ({s['pipeline_rows_per_s']} rows/s once Ray was up)"],
        ["predictor actors", s["actors"]],
    ]
    sections = ['<h2>Run</h2><div id="run">' + facts(header) + "</div>"]
    if reasons:
        rows = [[reason, n, examples[reason]] for reason, n in reasons.most_common(20)]
        sections.append('<h2>Errors by reason</h2><div id="errors">' + table(["reason", "rows", "example"], rows))
        sections.append("</div>")
    else:
        sections.append("<h2>Errors by reason</h2><p>No row has an error.</p>")
    if classes:
        top = classes.most_common(30)
        chart = plot(f"predicted {counted}", {counted: ([k for k, _ in top], [n for _, n in top])}, "", kind="barh")
        rows = [[label, n, n / max(s["rows"] - s["errors"], 1)] for label, n in top]
        sections.append(
            f"<h2>Predicted {html.escape(counted)}</h2><div class='plots'>{figure('predicted ' + counted, chart)}"
            f"</div>" + table([counted, "rows", "share"], rows)
        )
    sections.append(config_section(cfg))
    return page(f"rayformers predict: {cfg.task}", sections)
