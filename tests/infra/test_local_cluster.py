"""End-to-end check of infra/local: start-cluster.sh brings up a real head + worker Ray cluster on this
machine that runs a submitted job across both nodes, and stop-cluster.sh leaves no process behind."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from infra.local.cluster import is_running, local_cluster
from tests.conftest import free_port

# The job's driver places one task on the worker node (the only node with the worker_node resource).
JOB_CODE = """
import ray
ray.init()
on_worker = ray.remote(lambda: ray.get_runtime_context().get_node_id()).options(resources={"worker_node": 1})
print("task ran on node", ray.get(on_worker.remote()))
"""

# Runs in a subprocess with cluster.env: Ray reads RAY_AUTH_MODE=token once per process, and the test
# process must stay free of Ray state. Prints the nodes and the job's outcome as JSON.
PROBE = f"""
import json, sys, time
import ray
from ray.job_submission import JobSubmissionClient

gcs_address, dashboard_url = sys.argv[1:3]
ray.init(address=gcs_address, logging_level="ERROR", log_to_driver=False)
nodes = [{{"id": node["NodeID"], "alive": node["Alive"], "resources": node["Resources"]}} for node in ray.nodes()]
ray.shutdown()

client = JobSubmissionClient(dashboard_url)
submitted = time.monotonic()
job_id = client.submit_job(entrypoint="python -c " + {shlex.quote(JOB_CODE)!r})
deadline = submitted + 150
while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
    time.sleep(0.5)
seconds = time.monotonic() - submitted
status, logs = str(client.get_job_status(job_id)), client.get_job_logs(job_id)
print(json.dumps({{"nodes": nodes, "job_status": status, "job_logs": logs, "job_seconds": seconds}}))
"""


@pytest.mark.e2e
def test_local_cluster_runs_a_job_on_two_nodes_and_stops_cleanly():
    # ports from tests.conftest.free_port (below the ephemeral range), not picked in it by local_cluster
    ports = dict(s3_port=free_port(), dashboard_port=free_port(), ray_port=free_port())
    with local_cluster(workers=1, cpus_per_node=1, **ports) as cluster:
        pids = dict(cluster.pids)
        assert set(pids) == {"head", "worker-1", "s3"}
        assert all(is_running(pid) for pid in pids.values())

        probe = subprocess.run(
            [sys.executable, "-c", PROBE, cluster.gcs_address, cluster.dashboard_url],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert probe.returncode == 0, probe.stderr
        report = json.loads(probe.stdout.strip().splitlines()[-1])
        print(f"\nthe job ended after {report['job_seconds']:.1f} s: {report['job_status']}")

        alive = [node for node in report["nodes"] if node["alive"]]
        assert len(alive) == 2
        assert len({node["id"] for node in alive}) == 2
        worker_node = next(node["id"] for node in alive if "worker_node" in node["resources"])
        assert report["job_status"] == "SUCCEEDED", report["job_logs"]
        assert f"task ran on node {worker_node}" in report["job_logs"]

    still_running = {name: pid for name, pid in pids.items() if is_running(pid)}
    assert not still_running
