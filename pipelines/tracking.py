"""Experiment tracking (`track`): one MLflow run per `rayformers train`, TensorBoard event files beside it, and
a small MLflow run per `rayformers predict`, so that runs can be compared in MLflow's or TensorBoard's UI.

Rank 0 of the training run holds a `Tracker`. The loop hands it the scalars of each logged step and each eval;
TensorBoard's writer takes them at once (it writes in a thread of its own) and a background thread sends them
to MLflow, so a slow or dead tracking server never holds a training step. A tracking failure is warned about
once and turns that kind of tracking off for the rest of the run; the run goes on.

A training run and its MLflow run are tied by `train.output/tracking.json` (the MLflow run id). A resumed
run continues that MLflow run: steps the MLflow run already holds (trained before a crash, after the
checkpoint the run resumes from) are not sent again, and TensorBoard's reader drops the events of those steps
from the earlier files (the writer's `purge_step`). At the end the driver adds the figures of metrics.json
and the model's URI (or the model itself, `track.log_model: artifact`) and closes the MLflow run.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import tempfile
import threading
import time
from importlib import import_module
from urllib.parse import urlparse

from config import JobConfig
from errors import UserError
from pipelines.cluster import verbose
from pipelines.storage import Storage, storage_errors

TRACKING = "tracking.json"  # under train.output: the MLflow run this training run writes to
TENSORBOARD = "tensorboard"
CLOSE_WAIT_S = 60.0  # at the end of a run, the longest wait for the backlog (the import alone took 30 s once)
PARAMS_PER_CALL = 100  # MLflow's limits for one log_batch call
METRICS_PER_CALL = 1000


def warn(what: str, exc: BaseException | str) -> None:
    reason = exc if isinstance(exc, str) else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print(f"warning: {what}: {reason}; the run goes on without it", flush=True)


# --- where runs go ------------------------------------------------------------------------------------------
def mlflow_uri(cfg: JobConfig) -> str | None:
    """The MLflow tracking URI of this job (None when MLflow tracking is off). `true` and a folder mean an
    SQLite store in that folder (MLflow 3 refuses its file store); a bad choice is a UserError, raised by
    the driver before Ray starts."""
    value = cfg.track.mlflow
    if value is False:
        return None
    if value is True:
        out = cfg.train.output
        if not out:
            raise UserError(
                "track.mlflow: true keeps runs under train.output, which is not set; set it, or give track.mlflow "
                "a folder or a tracking URI"
            )
        if not Storage().resolve(out).is_local:
            raise UserError(
                f"track.mlflow: true keeps runs under train.output, which is not a local folder ({out}); give "
                "track.mlflow a tracking server URI or a local folder"
            )
        return store_in(os.path.join(Storage().resolve(out).path, "mlflow"))
    if value.startswith("file:"):
        return store_in(urlparse(value).path)
    if cfg.track.mlflow_is_folder():
        return store_in(value)
    return value


def store_in(folder: str) -> str:
    return f"sqlite:///{os.path.abspath(folder)}/mlflow.db"


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside an SQLite store we chose (MLflow's default is a
    folder in the current directory); a server decides for itself."""
    if uri.startswith("sqlite:///") and uri.endswith("/mlflow.db"):
        return "file://" + os.path.join(os.path.dirname(uri.removeprefix("sqlite:///")), "artifacts")
    return None


def check_tracking(cfg: JobConfig) -> None:
    """Fails early, in one line, on a `track` setting that cannot work. With MLflow on, its import (~5 s
    on 2 busy cores) starts now, in a thread, while Ray starts: the end of the run then does not wait for it."""
    if mlflow_uri(cfg):
        threading.Thread(target=import_module, args=("mlflow.client",), daemon=True).start()


def open_experiment(cfg: JobConfig) -> None:
    """The MLflow store and experiment that several runs are about to share (a search's trials), made once
    before they start: two trials that created an SQLite store's tables at the same time left one untracked."""
    uri = mlflow_uri(cfg)
    if uri is None:
        return

    def work() -> None:
        experiment_id(client_for(uri, cfg.track.timeout_s), cfg.track.experiment or cfg.task, uri)

    in_background(work, CLOSE_WAIT_S, f"track.mlflow: {cfg.track.mlflow}")


# --- talking to MLflow --------------------------------------------------------------------------------------
def client_for(uri: str, timeout_s: float):
    """An MlflowClient for `uri`, after a quick check that a server there listens at all (MLflow's own
    retries would wait minutes on a dead one)."""
    # HTTP calls: `timeout_s` each, two retries a second or two apart (a default is only set, never replaced)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            pass
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri.removeprefix("sqlite:///")), exist_ok=True)
    from mlflow import MlflowClient

    if not verbose():  # MLflow's and alembic's info lines (creating the tables, ...) stay out of the console
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(uri))
    except Exception:  # another run created it meanwhile (a search's trials start together)
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def flat_params(cfg: JobConfig) -> dict[str, str]:
    """The resolved config as MLflow params, one per dotted key (secrets left out)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
            return
        if re.search(r"api_key|secret|password|token$", prefix):
            return
        text = value if isinstance(value, str) else json.dumps(value)
        out[re.sub(r"[^\w\-. /:]", "_", prefix)[:250]] = text[:6000]

    walk("", cfg.model_dump(mode="json"))
    return out


def run_tags(cfg: JobConfig, verb: str) -> dict[str, str]:
    model = cfg.model.source or (f"init:{cfg.model.init.architecture}" if cfg.model.init else "")
    tags = {"rayformers.verb": verb, "rayformers.task": cfg.task, "rayformers.model_source": model}
    for key in ("data.train", "data.eval", "train.output") if verb == "train" else ("predict.input", "predict.output"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name):
            tags[f"rayformers.{key}"] = getattr(getattr(cfg, section), name)
    return tags


def numbers(values: dict, prefix: str = "") -> dict[str, float]:
    """The numeric entries of `values` (nested ones with dotted names), as floats."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def in_background(work, seconds: float | None, what: str) -> None:
    """Runs `work` in a daemon thread and waits at most `seconds` for it (None: until done); a failure or a
    wait cut short is a warning."""

    def guarded() -> None:
        try:
            work()
        except Exception as exc:  # tracking never fails a run
            warn(what, exc)

    thread = threading.Thread(target=guarded, daemon=True, name="rayformers-tracking")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        warn(what, f"no answer within {seconds:.0f}s")


# --- during training (rank 0) -------------------------------------------------------------------------------
class Tracker:
    """Rank 0's tracking of one training run: `log` at each logged step and eval, `close` at the end. Does
    nothing when `track` asks for nothing."""

    def __init__(self, cfg: JobConfig, storage: Storage, output: str, resumed_step: int | None):
        self.events: Events | None = None
        self.queue: queue.SimpleQueue | None = None
        if cfg.track.tensorboard:
            try:
                self.events = Events(storage, output, resumed_step)
            except Exception as exc:
                warn("track.tensorboard", exc)
        if cfg.track.mlflow is not False:
            self.queue = queue.SimpleQueue()
            self.thread = threading.Thread(
                target=self._send, args=(cfg, storage, output, resumed_step), daemon=True, name="rayformers-mlflow"
            )
            self.thread.start()

    def log(self, kind: str, step: int, values: dict) -> None:
        """kind: "train" (loss, lr, samples_per_s, ...) or "eval" (eval_* metrics); scalars are named
        train/loss, eval/accuracy, ... in both MLflow and TensorBoard."""
        scalars = {f"{kind}/{k.removeprefix('eval_')}": v for k, v in numbers(values).items()}
        wall = time.time()
        if self.events:
            try:
                self.events.add(step, scalars, wall)
                if kind == "eval":
                    self.events.sync()
            except Exception as exc:
                warn("track.tensorboard", exc)
                self.events = None
        if self.queue is not None:
            self.queue.put((step, wall, scalars))

    def close(self) -> None:
        if self.queue is not None:
            self.queue.put(None)
            self.thread.join(CLOSE_WAIT_S)
            if self.thread.is_alive():
                warn("track.mlflow", f"the tracking server took over {CLOSE_WAIT_S:.0f}s for the last steps")
        if self.events:
            try:
                self.events.close()
            except Exception as exc:
                warn("track.tensorboard", exc)

    def _send(self, cfg: JobConfig, storage: Storage, output: str, resumed_step: int | None) -> None:
        try:
            run = TrainRun(cfg, storage, output, resumed_step)
        except Exception as exc:
            warn(f"track.mlflow: {cfg.track.mlflow}", exc)
            run = None
        done = False
        while not done:  # what has queued up since the last call goes in one call
            items = [self.queue.get()]
            while len(items) < 200 and not self.queue.empty():
                items.append(self.queue.get())
            done, items = None in items, [i for i in items if i is not None]
            try:
                if run is not None and items:
                    run.log(items)
            except Exception as exc:
                warn(f"track.mlflow: {cfg.track.mlflow}", exc)
                run = None


class TrainRun:
    """The MLflow run of a training run: found again through train.output/tracking.json, else created with
    the config as params and the task, model and data as tags."""

    def __init__(self, cfg: JobConfig, storage: Storage, output: str, resumed_step: int | None):
        from mlflow.entities import Param

        uri = mlflow_uri(cfg)
        self.client = client = client_for(uri, cfg.track.timeout_s)
        self.sent: dict[str, int] = {}  # the last step the MLflow run holds, by metric
        saved = read_tracking(storage, output)
        if saved and saved.get("mlflow_uri") == uri and resumed_step is not None:
            self.run_id = saved["mlflow_run_id"]
            client.update_run(self.run_id, status="RUNNING")
            for key in client.get_run(self.run_id).data.metrics:
                self.sent[key] = max(m.step for m in client.get_metric_history(self.run_id, key))
            return
        name = cfg.track.experiment or cfg.task
        run = client.create_run(
            experiment_id(client, name, uri),
            run_name=cfg.track.run_name or output.rstrip("/").rsplit("/", 1)[-1],
            tags=run_tags(cfg, "train"),
        )
        self.run_id = run.info.run_id
        storage.write_text(
            f"{output.rstrip('/')}/{TRACKING}",
            json.dumps({"mlflow_uri": uri, "mlflow_run_id": self.run_id, "experiment": name}),
        )
        params = [Param(k, v) for k, v in flat_params(cfg).items()]
        for i in range(0, len(params), PARAMS_PER_CALL):
            client.log_batch(self.run_id, params=params[i : i + PARAMS_PER_CALL])

    def log(self, items: list[tuple[int, float, dict]]) -> None:
        from mlflow.entities import Metric

        metrics = []
        for step, wall, scalars in items:
            for key, value in scalars.items():
                if step > self.sent.get(key, -1):
                    metrics.append(Metric(key, value, int(wall * 1000), step))
                    self.sent[key] = step
        for i in range(0, len(metrics), METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + METRICS_PER_CALL])


def read_tracking(storage: Storage, output: str) -> dict | None:
    uri = f"{output.rstrip('/')}/{TRACKING}"
    try:
        return json.loads(storage.read_text(uri)) if storage.exists(uri) else None
    except (UserError, ValueError):
        return None


class Events:
    """TensorBoard event files under train.output/tensorboard/ (torch's SummaryWriter). For an object store
    they are written to a local folder and copied up at each eval and at the end."""

    def __init__(self, storage: Storage, output: str, resumed_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.storage, self.uri = storage, f"{output.rstrip('/')}/{TENSORBOARD}"
        loc = storage.resolve(self.uri)
        self.remote = not loc.is_local
        self.dir = tempfile.mkdtemp(prefix="rayformers-tensorboard-") if self.remote else loc.path
        # a resumed run: TensorBoard's reader drops earlier files' events from this step on (trained again)
        purge = resumed_step + 1 if resumed_step is not None else None
        self.writer = SummaryWriter(self.dir, purge_step=purge)

    def add(self, step: int, scalars: dict, wall: float) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step, walltime=wall)

    def sync(self) -> None:
        self.writer.flush()
        if self.remote:
            loc = self.storage.resolve(self.uri)
            with storage_errors(self.uri):
                for name in os.listdir(self.dir):
                    loc.fs.put_file(os.path.join(self.dir, name), loc.join(name).path)

    def close(self) -> None:
        self.writer.close()
        self.sync()


# --- at the end (the driver) --------------------------------------------------------------------------------
def finish_train(cfg: JobConfig, storage: Storage, summary: dict) -> None:
    """The figures of metrics.json, the model (its URI, or its files) and the run report added to the run's
    MLflow run, which is then closed."""
    uri = mlflow_uri(cfg)
    if uri is None:
        return
    out = cfg.train.output.rstrip("/")

    def work() -> None:
        from mlflow.entities import Metric, RunTag

        saved = read_tracking(storage, out)
        if not saved or saved.get("mlflow_uri") != uri:
            return  # the training run opened no MLflow run here, and its worker said why
        client, run_id = client_for(uri, cfg.track.timeout_s), saved["mlflow_run_id"]
        step = int((summary.get("final") or {}).get("step") or 0)
        figures = {k.replace("/eval_", "/"): v for k, v in numbers(summary).items() if not k.startswith("worker")}
        now = int(time.time() * 1000)
        tags = {
            "rayformers.model": f"{out}/model",
            "rayformers.resumed_at_steps": json.dumps(summary.get("resumed_at_steps")),
        }
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, step) for k, v in figures.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        with tempfile.TemporaryDirectory() as d:
            for name in ("metrics.json", "report.html"):
                if storage.exists(f"{out}/{name}"):
                    with open(os.path.join(d, name), "w") as f:
                        f.write(storage.read_text(f"{out}/{name}"))
                    client.log_artifact(run_id, os.path.join(d, name))
        if cfg.track.log_model == "artifact":
            client.log_artifacts(run_id, storage.local_copy(f"{out}/model"), "model")
        client.set_terminated(run_id, "FINISHED")

    # copying the model as artifacts takes what it takes (the user asked for it); the rest is small
    in_background(
        work, None if cfg.track.log_model == "artifact" else CLOSE_WAIT_S, f"track.mlflow: {cfg.track.mlflow}"
    )


def end_run(cfg: JobConfig, storage: Storage, output: str, status: str = "KILLED") -> None:
    """A training run that will not finish (a trial that ASHA stopped): its MLflow run is closed as `status`."""
    uri = mlflow_uri(cfg)
    saved = read_tracking(storage, output) if uri else None
    if saved and saved.get("mlflow_uri") == uri:
        close = lambda: client_for(uri, cfg.track.timeout_s).set_terminated(saved["mlflow_run_id"], status)  # noqa: E731
        in_background(close, CLOSE_WAIT_S, f"track.mlflow: {cfg.track.mlflow}")


def track_predict(cfg: JobConfig, storage: Storage, summary: dict, model: str) -> None:
    """`rayformers predict`: one MLflow run in the job's experiment with the summary (rows, errors, rows/s)
    as metrics, the predict settings as params, the model as a tag (and the training run's MLflow run id
    when the model is that run's)."""
    uri = mlflow_uri(cfg)
    if uri is None:
        return

    def work() -> None:
        from mlflow.entities import Metric, Param

        client = client_for(uri, cfg.track.timeout_s)
        tags = {**run_tags(cfg, "predict"), "rayformers.model": model}
        if cfg.train.output and model.rstrip("/") == f"{cfg.train.output.rstrip('/')}/model":
            saved = read_tracking(storage, cfg.train.output)
            if saved and saved.get("mlflow_uri") == uri:
                tags["rayformers.train_run_id"] = saved["mlflow_run_id"]
        name = cfg.track.run_name or (cfg.predict.output or "predict").rstrip("/").rsplit("/", 1)[-1]
        run = client.create_run(experiment_id(client, cfg.track.experiment or cfg.task, uri), run_name=name, tags=tags)
        params = [Param(k, v) for k, v in flat_params(cfg).items() if k.startswith(("predict.", "task", "model."))]
        now = int(time.time() * 1000)
        metrics = [Metric(f"predict/{k}", v, now, 0) for k, v in numbers(summary).items()]
        client.log_batch(run.info.run_id, metrics=metrics, params=params[:PARAMS_PER_CALL])
        client.set_terminated(run.info.run_id, "FINISHED")

    in_background(work, CLOSE_WAIT_S, f"track.mlflow: {cfg.track.mlflow}")
