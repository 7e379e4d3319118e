"""`rayformers submit` against a real two-node Ray cluster on this machine (infra/local: a head, one
worker node, the S3 emulator, token auth on): a train job places its two workers on the two nodes
and writes the model to S3, a predict job spreads its actors over both nodes and writes one row per
input to S3, a tune job runs its trials and writes the best config and model to S3; `--no-wait`, a
failing job and a refused token behave as a user expects.

Every Ray client runs in a subprocess with the cluster's environment: Ray reads RAY_AUTH_MODE once
per process, and this process keeps no Ray state of its own.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml

from infra.local.cluster import local_cluster
from tests.conftest import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
RAYFORMERS = str(Path(sys.executable).with_name("rayformers"))
EXAMPLE = str(REPO / "jobs/examples/text-classification.yaml")
DEMO_ROWS = 300  # the eval split gets a fifth: 60 rows

# Waits for a job to end, then reports it and where the cluster's nodes and the job's actors are.
PROBE = """
import json, sys, time
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_nodes

dashboard, job_id = sys.argv[1:3]
client = JobSubmissionClient(dashboard)
deadline = time.monotonic() + 120
while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
    time.sleep(0.5)
info = client.get_job_info(job_id)
driver = info.driver_info  # None when the job failed before its driver joined Ray
actors = list_actors(address=dashboard, filters=[("job_id", "=", driver.id)], detail=True, limit=1000) if driver else []
print(json.dumps({
    "status": str(info.status.value),
    "nodes": [n.node_id for n in list_nodes(address=dashboard) if n.state == "ALIVE"],
    "actors": [{"name": a.repr_name or a.class_name, "node": a.node_id} for a in actors],
}))
"""


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as patch:
        # The nodes, and so every process of every job, inherit this: an actor pool is complete before
        # Ray Data feeds it, so the first predictor cannot score the small corpus alone while the
        # second one is still starting (and never gets a node).
        patch.setenv("RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S", "300")
        # 2 logical CPUs per node: one train worker per node (STRICT_SPREAD) and room for Ray Data.
        # ports from tests.conftest.free_port (below the ephemeral range), not picked in it by local_cluster
        ports = dict(s3_port=free_port(), dashboard_port=free_port(), ray_port=free_port())
        with local_cluster(workers=1, cpus_per_node=2, **ports) as cluster:
            run(
                [RAYFORMERS, "demo-data", "text-classification", cluster.s3_uri("demo"), "--rows", str(DEMO_ROWS)],
                cluster.env,
                check=True,
            )
            yield cluster


def run(argv: list[str], env: dict, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def submit(
    cluster, verb: str, *overrides: str, options: tuple = (), env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    argv = [RAYFORMERS, "submit", EXAMPLE, "--address", cluster.dashboard_url, "--verb", verb, *options]
    return run(argv + list(overrides), cluster.env if env is None else env, timeout=timeout)


def probe(cluster, job_id: str) -> dict:
    done = run([sys.executable, "-c", PROBE, cluster.dashboard_url, job_id], cluster.env, check=True, timeout=180)
    return json.loads(done.stdout.strip().splitlines()[-1])


def job_id_of(output: str) -> str:
    return re.search(r"submitted \w+ job (\S+) to ", output).group(1)


def s3(cluster) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(endpoint_url=cluster.s3_endpoint, key="testing", secret="testing")


def data_overrides(cluster) -> list[str]:
    return [
        f"data.train={cluster.s3_uri('demo/train')}",
        f"data.eval={cluster.s3_uri('demo/eval')}",
        f"train.output={cluster.s3_uri('run')}",
        "model.max_length=32",
        "model.tokenizer.vocab_size=300",
    ]


@pytest.fixture(scope="module")
def train_job(cluster) -> dict:
    done = submit(
        cluster,
        "train",
        *data_overrides(cluster),
        "train.num_workers=2",
        "train.placement_strategy=STRICT_SPREAD",
        "train.max_steps=6",
        "train.eval_every=6",
        "train.log_every=2",
        "train.batch_size=16",
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return {"output": output, "job_id": job_id_of(output), "probe": probe(cluster, job_id_of(output))}


def test_train_job_runs_one_worker_on_each_node_and_writes_the_model_to_s3(cluster, train_job):
    output = train_job["output"]
    assert train_job["probe"]["status"] == "SUCCEEDED"
    assert f"job {train_job['job_id']} SUCCEEDED" in output
    nodes = set(train_job["probe"]["nodes"])
    assert len(nodes) == 2

    # Each worker says where it runs; the job's logs reach this terminal through `submit`.
    placed = dict(re.findall(r"worker rank (\d+) on node ([0-9a-f]+)", output))
    print(f"\ntrain workers by rank: {placed}; cluster nodes: {sorted(nodes)}")
    assert set(placed) == {"0", "1"}, output
    assert set(placed.values()) == nodes  # two workers, two different nodes: the head and the worker node

    fs = s3(cluster)
    run_dir = cluster.s3_uri("run").removeprefix("s3://")
    assert fs.exists(f"{run_dir}/model/model.safetensors")
    assert fs.exists(f"{run_dir}/model/tokenizer.json")
    assert [p for p in fs.ls(f"{run_dir}/checkpoints") if p.rsplit("/", 1)[-1].startswith("step-")]
    metrics = json.loads(fs.cat(f"{run_dir}/metrics.json"))
    assert metrics["final"]["step"] == 6
    assert metrics["worker_nodes"] == [placed["0"], placed["1"]]


def test_predict_job_spreads_its_actors_over_both_nodes_and_scores_every_row(cluster, train_job):
    predictions = cluster.s3_uri("predictions")
    # two input files (train and eval): predict commits one unit per file, and each unit goes to one actor
    corpus = cluster.s3_uri("demo/*/part-00000.parquet")
    done = submit(
        cluster,
        "predict",
        *data_overrides(cluster),
        f"predict.input={corpus}",
        f"predict.output={predictions}",
        "predict.actors=2",
        "predict.sort_window=16",
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"wrote {DEMO_ROWS + DEMO_ROWS // 5} predictions (0 errors" in output  # train 300 + eval 60

    report = probe(cluster, job_id_of(output))
    predictors = [a for a in report["actors"] if "UnitScorer" in a["name"]]
    print(f"\npredict actors: {predictors}")
    assert len(predictors) >= 2, report
    assert {a["node"] for a in predictors} == set(report["nodes"])  # one or more on each of the two nodes

    fs = s3(cluster)
    table = pq.ParquetDataset(predictions.removeprefix("s3://"), filesystem=fs).read()
    expected = pa.concat_tables(
        [
            pq.ParquetDataset(cluster.s3_uri(f"demo/{split}").removeprefix("s3://"), filesystem=fs).read()
            for split in ("train", "eval")
        ]
    )
    assert sorted(table.column("id").to_pylist()) == sorted(expected.column("id").to_pylist())
    assert table.column("error").null_count == table.num_rows
    assert set(table.column("label").to_pylist()) <= set(expected.column("label").to_pylist())


def test_a_tune_job_runs_its_trials_on_the_cluster_and_writes_the_best_config_and_model_to_s3(cluster):
    search = cluster.s3_uri("search")
    done = submit(
        cluster,
        "tune",
        *data_overrides(cluster),
        f"tune.output={search}",
        # one trial: choosing the best of several (and ASHA stopping some) is tests/e2e/test_tune.py's; here the
        # search runs as a submitted job and writes its trials, state, best config and model to S3
        "tune.space={train.lr: {grid: [1.0e-3]}}",
        "tune.num_samples=1",
        "tune.metric=eval_loss",
        "tune.mode=min",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.log_every=2",
        "train.batch_size=16",
        timeout=600,  # one training run (the two-trial version took 130 s on 2 cores at stop 25)
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"job {job_id_of(output)} SUCCEEDED" in output
    assert f"best config: {search}/best.yaml" in output, output

    fs = s3(cluster)
    root = search.removeprefix("s3://")
    trials = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/trials")]
    summary = json.loads(fs.cat(f"{root}/tune.json"))
    assert sorted(trials) == sorted(t["trial"] for t in summary["trials"]) and len(trials) == 1, summary
    best = yaml.safe_load(fs.cat(f"{root}/best.yaml"))
    assert best["train"]["lr"] == summary["best"]["params"]["train.lr"]
    assert best["train"]["output"] == f"{search}/trials/{summary['best']['trial']}"
    assert fs.exists(f"{best['train']['output'].removeprefix('s3://')}/model/model.safetensors")
    assert fs.exists(f"{root}/best/model.safetensors") and fs.exists(f"{root}/best/_COMPLETE.json")
    assert fs.exists(f"{root}/search")  # Tune's state, for a re-run to restore


def test_a_job_whose_config_is_wrong_fails_with_a_one_line_error(cluster):
    missing = cluster.s3_uri("no-such-data/train")
    done = submit(
        cluster,
        "train",
        *data_overrides(cluster),
        f"data.train={missing}",
        f"train.output={cluster.s3_uri('failed-run')}",
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    errors = [line for line in output.splitlines() if line.startswith("rayformers: error:")]
    assert len(errors) == 1 and missing in errors[0], output  # the job's own message, from its logs
    assert "Traceback" not in output
    assert re.search(r"rayformers: job \S+ FAILED", done.stderr), done.stderr


def test_no_wait_prints_the_job_id_and_returns_while_the_job_goes_on(cluster):
    # A job bound to fail: `submit --no-wait` still exits 0, so it cannot have waited for the end.
    # RAY_AUTH_MODE is unset here: the token in ~/.ray/auth_token is sent once the dashboard asks.
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    done = submit(
        cluster,
        "train",
        *data_overrides(cluster),
        f"data.train={cluster.s3_uri('nothing-here')}",
        options=("--no-wait",),
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = job_id_of(done.stdout)
    assert f"RAY_AUTH_MODE=token ray job stop --address {cluster.dashboard_url} {job_id}" in done.stdout
    assert "rayformers: error" not in done.stdout + done.stderr  # the job's logs were not followed
    assert probe(cluster, job_id)["status"] == "FAILED"


def test_a_refused_or_missing_token_is_one_line_naming_the_address(cluster, tmp_path):
    wrong = {**cluster.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}
    done = submit(cluster, "train", *data_overrides(cluster), options=("--no-wait",), env=wrong)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"rayformers: error: {cluster.dashboard_url}: the cluster refused the Ray auth " "token from RAY_AUTH_TOKEN"
    )

    no_token = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    done = submit(
        cluster, "train", *data_overrides(cluster), options=("--no-wait",), env={**no_token, "HOME": str(tmp_path)}
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith(
        f"rayformers: error: {cluster.dashboard_url}: the cluster requires a Ray auth token"
    )
    assert len(done.stderr.strip().splitlines()) == 1
