"""`rayformers tune`: a hyper-parameter search with Ray Tune over `rayformers train` runs.

Each trial is a Tune function trainable that runs a whole training run (Ray Data preprocessing, a
`TorchTrainer` of `train.num_workers` workers) as Ray Train V2 asks: the trainer's `fit()` inside the trial,
with Tune's `TuneReportCallback` handing each report of the workers (the eval metrics, the step) to Tune.
ASHA compares trials at the same step and stops those that trail. A trial is a normal run in
`tune.output/trials/<trial id>/` (checkpoints, model/, metrics.json, tracked in MLflow when `track` says so)
and resumes like one. Tune's own state is in `tune.output/search/`: running the same command again
restores the search, and finished or stopped trials are not run again.

At the end: a table of the trials, `tune.output/best.yaml` (the best trial's resolved config, for
`rayformers train`) and `tune.output/best/` (its model).
"""

from __future__ import annotations

import json
import os

import yaml

from config import JobConfig, set_dotted, validate
from errors import UserError
from models import get_task
from pipelines.cluster import connect, reenter
from pipelines.console import flush_held_worker_lines, job_console
from pipelines.storage import Storage, commit_dir
from pipelines.tracking import check_tracking, end_run, open_experiment
from pipelines.train import Inputs, check_same_run, data_plan, fine_tune, prepared_inputs


TRIAL_CPUS = 0.1  # what the Tune actor that drives one trial asks for


def search_space(cfg: JobConfig) -> dict:
    from ray import tune

    kinds = {
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
        "randint": lambda v: tune.randint(*v),
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    return {key: kinds[kind](values) for key, spec in cfg.tune.space.items() for kind, values in spec.items()}


def trial_config(cfg: JobConfig, params: dict, output: str, name: str) -> JobConfig:
    """The config of one trial: the job's, with the sampled values set, its own train.output, no tune section."""
    data = cfg.model_dump(mode="json", exclude={"tune"})
    data["serve"]["api_key"] = cfg.serve.api_key.get_secret_value() if cfg.serve.api_key else None
    for key, value in params.items():
        set_dotted(data, key, value)
    data["train"]["output"], data["train"]["fresh"] = output, False
    data["track"]["run_name"] = name
    search = cfg.tune.output or cfg.train.output
    if data["track"]["mlflow"] is True and search and Storage().resolve(search).is_local:
        data["track"]["mlflow"] = f"{search}/mlflow"  # one store for the whole search, not one per trial
    return validate(data).with_absolute_paths()


def check_space(cfg: JobConfig) -> None:
    """Each searched key names a config key that takes the values it is given (one line naming it)."""
    for key, spec in cfg.tune.space.items():
        for kind, values in spec.items():
            for value in values if kind in ("choice", "grid") else values[:1]:
                try:
                    trial_config(cfg, {key: value}, "/tmp/check", "check")
                except UserError as exc:
                    raise UserError(f"tune.space.{key}: {exc}") from None


def concurrent_trials(wanted: int, per_trial: float) -> int:
    """How many trials run at once: `wanted`, or as many as the cluster's CPUs hold now, with a line why."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    fits = max(1, int(cpus // per_trial))
    if fits >= wanted:
        return wanted
    print(
        f"tune.max_concurrent_trials={wanted}: the cluster's {cpus:g} CPUs hold {fits} trial(s) at once (up to "
        f"{per_trial:g} CPUs each: train workers, preprocessing actors); running {fits} at a time",
        flush=True,
    )
    return fits


# train.* keys that change what preprocessing makes of the data (how many actors, whether order is kept)
PREPROCESSING_TRAIN_KEYS = ("train.data_order", "train.num_workers")


def shares_inputs(cfg: JobConfig) -> bool:
    """Whether the trials can train on one preprocessing of the data: no searched key changes it (the
    model, the data, the task's options; the few train.* keys above)."""
    return all(key.startswith("train.") and key not in PREPROCESSING_TRAIN_KEYS for key in cfg.tune.space)


def shared_inputs(cfg: JobConfig, output: str) -> Inputs:
    """The labels, processor and preprocessed splits of the search's own config, in `output/prepared`: built
    once for all trials (a trial otherwise starts two preprocessing actor pools of its own)."""
    storage = Storage.from_config(cfg.storage)
    base, train_files, eval_files, run = data_plan(trial_config(cfg, {}, output, "prepared"), storage)
    check_same_run(base, storage, output, run)  # a search restored on changed data is refused
    print(f"preprocessing the data once for all trials (in {output}/prepared)", flush=True)
    return prepared_inputs(base, storage, run, train_files, eval_files)


def run_trial(params: dict, job: dict, output: str, shared: Inputs | None = None) -> None:
    """One trial, in its Tune actor: a training run whose reports go to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = JobConfig.model_validate(job)
    trial = tune.get_context().get_trial_id()
    trial_cfg = trial_config(cfg, params, f"{output}/trials/{trial}", trial)
    fine_tune(trial_cfg, callbacks=(TuneReportCallback(),), shared=shared)


def trial_lines(keys: list[str], metric: str, storage: Storage, output: str):
    """A Tune callback that prints each trial's start, its eval figures and its end, one line each: the console
    of a search shows these instead of the lines of several runs' workers at once (those go to the log file)."""
    from ray import tune

    def name(trial) -> str:
        params = ", ".join(f"{k}={format_value(trial.config.get(k))}" for k in keys)
        return f"trial {trial.trial_id} ({params})"

    class TrialLines(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            print(f"{name(trial)}: started", flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get(metric) is not None:
                print(f"{name(trial)}: step {result.get('step')} {metric}={result[metric]:.4f}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            step = (trial.last_result or {}).get("step")
            # a run that ends writes metrics.json; one the scheduler stopped never does
            finished = storage.exists(f"{output}/trials/{trial.trial_id}/metrics.json")
            print(f"{name(trial)}: {'finished' if finished else 'stopped early'} at step {step}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            try:
                lines = [line for line in (trial.get_error() or "").splitlines() if line.strip()]
            except Exception:  # the line is for the person watching; the summary names the failure too
                lines = []
            print(f"{name(trial)}: failed: {lines[-1].strip() if lines else 'see the log'}", flush=True)

    return TrialLines()


def working_dir_keeper(path: str):
    """A Tune callback that calls `reenter` after each step of the search's loop."""
    from ray import tune

    class KeepWorkingDir(tune.Callback):
        def on_step_end(self, iteration, trials, **info):
            reenter(path)

    return KeepWorkingDir()


def tune_search(cfg: JobConfig) -> dict:
    task, t, s = get_task(cfg.task), cfg.train, cfg.tune
    output = (s.output or t.output or "").rstrip("/")
    if not output:
        raise UserError("tune.output: required by `rayformers tune` (or train.output): where the trials go")
    if not cfg.data.train or not cfg.data.eval:
        raise UserError("data.eval: required by `rayformers tune` (trials are compared on eval metrics)")
    if not s.space:
        raise UserError("tune.space: nothing to search (map dotted keys to distributions, e.g. train.lr)")
    metric, mode = s.metric or f"eval_{task.best_metric}", s.mode or task.best_metric_mode
    check_space(cfg)
    if cfg.track.mlflow is True and not Storage().resolve(output).is_local:
        raise UserError(
            f"track.mlflow: true keeps the trials' runs under tune.output (default: train.output), which is not a "
            f"local folder ({output}); give track.mlflow a tracking server URI or a local folder"
        )
    tracked = trial_config(cfg, {}, f"{output}/trials/check", "check")  # what a trial tracks to
    check_tracking(tracked)
    Storage.from_config(cfg.storage).check_writable(output)
    import ray

    cwd = os.getcwd()  # before Ray starts: see reenter
    owns_ray = not ray.is_initialized()  # the CLI's search starts or joins Ray itself; a caller's Ray stays up
    with job_console(cfg, "tune", output):
        try:
            return search(cfg, output, tracked, metric, mode, cwd)
        finally:
            if owns_ray:
                # the workers of a trial the scheduler stopped still print for a moment, and Ray's driver prints what
                # arrives after the console closed as it came ("(RayTrainWorker pid=...) step 4/8 ..." under the
                # summary, seen once): what it holds goes through the console, then Ray disconnects
                flush_held_worker_lines()
                ray.shutdown()


def search(cfg: JobConfig, output: str, tracked: JobConfig, metric: str, mode: str, cwd: str) -> dict:
    """The search itself, once its config is checked: Ray, the shared preprocessing, Tune, the summary."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t, s = cfg.train, cfg.tune
    storage = Storage.from_config(cfg.storage)
    loc = storage.resolve(output)
    # a trial's CPUs at most: its workers, the train and eval preprocessing pools (started together, one CPU
    # per actor) and a read task. Trials that do not all fit starve each other's pools: two at once on 4 CPUs
    # hung in their first data pass (Ray Data waits for an actor's CPU without a time limit).
    per_trial = TRIAL_CPUS + t.max_workers * t.cpus_per_worker + 2 * cfg.data.preprocess_actors + 1
    connect(cfg.ray.address, cfg.ray.num_cpus, s.max_concurrent_trials * per_trial)
    open_experiment(tracked)

    job = cfg.model_dump(mode="json")
    job["serve"]["api_key"] = cfg.serve.api_key.get_secret_value() if cfg.serve.api_key else None
    shared = shared_inputs(cfg, output) if shares_inputs(cfg) else None
    if shared:  # a trial then preprocesses nothing, or streams a training split too large to cache through a pool
        pools = 0 if shared.train_cached else 1
        per_trial = TRIAL_CPUS + t.max_workers * t.cpus_per_worker + pools * cfg.data.preprocess_actors + 1
    # the trial only drives the training run (its workers and actors ask for their own CPUs); Tune wants some ask
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, job=job, output=output, shared=shared), {"CPU": TRIAL_CPUS}
    )
    reenter(cwd)  # the shared preprocessing's actors may have swapped it already
    fs, search = loc.arrow_fs(), f"{loc.path.rstrip('/')}/search"
    if tune.Tuner.can_restore(search, storage_filesystem=fs):
        print(f"resuming the search in {output}/search (finished trials are not run again)", flush=True)
        tuner = tune.Tuner.restore(search, trainable, resume_errored=True, storage_filesystem=fs)
    else:
        if s.scheduler == "asha":
            scheduler = ASHAScheduler(
                time_attr="step",
                max_t=10**9,  # never reached: ASHA stops a trial at max_t, before its run writes model/
                grace_period=s.grace_steps or t.eval_every,
                reduction_factor=s.reduction_factor,
            )
        else:
            scheduler = FIFOScheduler()
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=s.num_samples,
                max_concurrent_trials=concurrent_trials(s.max_concurrent_trials, per_trial),
                scheduler=scheduler,
            ),
            run_config=tune.RunConfig(
                name="search",
                storage_path=loc.path,
                storage_filesystem=fs,
                verbose=0,
                callbacks=[trial_lines(list(s.space), metric, storage, output), working_dir_keeper(cwd)],
            ),
        )
    # Tune's newer console output prints its experiment table and paths even at verbose=0; the older one,
    # chosen by this variable (read when the search starts), prints nothing at 0: trial_lines speaks instead
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        results = tuner.fit()
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT")
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before
    reenter(cwd)
    return summarize(cfg, storage, output, results, metric, mode)


def summarize(cfg: JobConfig, storage: Storage, output: str, results, metric: str, mode: str) -> dict:
    """The table of trials; best.yaml and best/ from the best trial that finished."""
    sign = 1 if mode == "max" else -1
    rows = []
    for result in results:
        trial = result.path.rstrip("/").rsplit("/", 1)[-1] if result.path else "?"
        trial_id = (result.metrics or {}).get("trial_id") or trial
        folder = f"{output}/trials/{trial_id}"
        done = storage.exists(f"{folder}/metrics.json")
        figures = json.loads(storage.read_text(f"{folder}/metrics.json")) if done else {}
        # the model a run keeps is its best by the task's metric; another metric is compared at the end
        best = figures.get("best" if metric == f"eval_{get_task(cfg.task).best_metric}" else "final", {})
        last = result.metrics or {}
        status = "error" if result.error else ("done" if done else "stopped early")
        rows.append(
            {
                "trial": trial_id,
                "params": {k: result.config.get(k) for k in cfg.tune.space},
                metric: best.get(metric, last.get(metric)),
                "steps": last.get("step"),
                "status": status,
                "folder": folder,
            }
        )
    rows.sort(key=lambda r: r["trial"])
    for r in rows:
        if r["status"] == "stopped early":  # its MLflow run (when tracked) is closed, not left running
            end_run(trial_config(cfg, r["params"], r["folder"], r["trial"]), storage, r["folder"])
    finished = [r for r in rows if r["status"] == "done" and r[metric] is not None]
    if not finished:
        raise UserError(f"tune: no trial finished with {metric} (see the trials' errors above)")
    best = max(finished, key=lambda r: sign * r[metric])
    keys = list(cfg.tune.space)
    header = ["trial", *keys, metric, "steps", "status"]
    lines = [header] + [
        [
            r["trial"],
            *(format_value(r["params"][k]) for k in keys),
            format_value(r[metric]),
            str(r["steps"]),
            r["status"],
        ]
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)), flush=True)
    best_cfg = trial_config(cfg, best["params"], best["folder"], best["trial"])
    data = best_cfg.model_dump(mode="json", exclude={"tune"})
    data["serve"].pop("api_key", None)
    storage.write_text(f"{output}/best.yaml", yaml.safe_dump(data, sort_keys=False))
    commit_dir(storage, f"{best['folder']}/model", f"{output}/best")
    print(f"best trial {best['trial']}: {metric}={best[metric]:.4f} with {best['params']}", flush=True)
    print(
        f"best config: {output}/best.yaml (rayformers train {output}/best.yaml); best model: {output}/best", flush=True
    )
    summary = {"metric": metric, "mode": mode, "best": best, "trials": rows}
    storage.write_text(f"{output}/tune.json", json.dumps(summary, indent=2, default=str))
    return summary


def format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
