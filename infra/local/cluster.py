"""A throwaway local Ray cluster (head + worker nodes) and S3 emulator, as a Python context manager.

    from infra.local.cluster import local_cluster

    with local_cluster(workers=1) as cluster:
        subprocess.run(["rayformers", "submit", config, "--address", cluster.dashboard_url],
                       env=cluster.env, check=True)

It runs infra/local/start-cluster.sh and infra/local/stop-cluster.sh (the same scripts a developer
uses by hand) on free ports and in a fresh state directory, and always stops every recorded
process by pid when the block exits. The e2e tests use it.

Clients of the cluster need the environment in `cluster.env`: RAY_AUTH_MODE=token (Ray's token
auth stays on), RAY_ADDRESS (the dashboard URL, for job submission), AWS_ENDPOINT_URL and dummy
AWS credentials for the S3 emulator. Keep Ray calls in subprocesses started with that environment:
Ray reads RAY_AUTH_MODE once per process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
START_SCRIPT = HERE / "start-cluster.sh"
STOP_SCRIPT = HERE / "stop-cluster.sh"


@dataclass(frozen=True)
class LocalCluster:
    """What a running local cluster offers to its clients."""

    dashboard_url: str  # http://127.0.0.1:PORT: dashboard and Jobs API (JobSubmissionClient, `ray job`)
    gcs_address: str  # HEAD_IP:PORT for ray.init(address=...)
    s3_endpoint: str  # http://127.0.0.1:PORT of the S3 emulator
    s3_bucket: str  # bucket that already exists in the emulator
    env: dict[str, str]  # os.environ plus the cluster's variables: pass it to subprocesses
    pids: dict[str, int]  # "head", "worker-1", ..., "s3": the processes stop-cluster.sh stops
    state_dir: Path  # pids/, logs/ (one log per process), ray/ (the head's Ray temp dir), ray-wN/ (worker node N's)

    def s3_uri(self, *parts: str) -> str:
        """s3://BUCKET/part/part... in the emulator's bucket."""
        return "/".join([f"s3://{self.s3_bucket}", *parts])


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie holds nothing, it awaits reaping)."""
    if Path("/proc/self/stat").exists():  # Linux: read the process state
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    try:  # elsewhere: signal 0 only tells whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def local_cluster(
    workers: int = 1,
    cpus_per_node: int = 2,
    s3_port: int | None = None,
    dashboard_port: int | None = None,
    ray_port: int | None = None,
    python: str | None = None,
    ready_timeout: float = 120,
    keep_state: bool = False,
) -> Iterator[LocalCluster]:
    """Start a head and `workers` worker nodes (each `cpus_per_node` logical CPUs) plus the S3
    emulator, yield a LocalCluster, and stop them all on exit. Ports left as None are picked free.
    `python` is the interpreter whose venv holds ray and moto (default: the current one). The state
    directory is removed after a clean stop unless `keep_state`, or unless the block raised (its
    logs then help)."""
    state_dir = Path(tempfile.mkdtemp(prefix="rf-cluster-", dir="/tmp" if os.path.isdir("/tmp") else None))
    script_env = {
        **os.environ,
        "PYTHON": python or sys.executable,
        "RAYFORMERS_CLUSTER_DIR": str(state_dir),
        "RAY_PORT": str(ray_port or free_port()),
        "DASHBOARD_PORT": str(dashboard_port or free_port()),
        "S3_PORT": str(s3_port or free_port()),
        "CPUS_PER_NODE": str(cpus_per_node),
        "RAYFORMERS_WORKERS": str(workers),
        "READY_TIMEOUT": str(int(ready_timeout)),
    }
    try:
        started = subprocess.run(
            [str(START_SCRIPT)], env=script_env, capture_output=True, text=True, timeout=2 * ready_timeout + 60
        )
    except subprocess.TimeoutExpired:  # the script died, the nodes it had started did not
        subprocess.run([str(STOP_SCRIPT)], env=script_env, capture_output=True)
        raise
    if started.returncode != 0:  # the script already stopped whatever it had started
        raise RuntimeError(
            f"start-cluster.sh failed (exit {started.returncode}); logs in {state_dir / 'logs'}\n{started.stderr}"
        )

    recorded = _recorded_pids(state_dir)
    body_failed = False
    try:
        yield _read_cluster(state_dir, started.stdout)
    except BaseException:
        body_failed = True
        raise
    finally:
        stopped = subprocess.run([str(STOP_SCRIPT)], env=script_env, capture_output=True, text=True)
        survivors = {name: pid for name, pid in recorded.items() if is_running(pid)}
        if stopped.returncode != 0 or survivors:
            raise RuntimeError(
                f"stop-cluster.sh left processes running {survivors} (exit {stopped.returncode}):\n{stopped.stderr}"
            )
        if not (keep_state or body_failed):
            shutil.rmtree(state_dir, ignore_errors=True)


def _recorded_pids(state_dir: Path) -> dict[str, int]:
    """name -> pid of every process start-cluster.sh recorded: head, worker-1..N, s3."""
    return {path.stem: int(path.read_text()) for path in sorted((state_dir / "pids").glob("*.pid"))}


def _read_cluster(state_dir: Path, exports: str) -> LocalCluster:
    """Build the LocalCluster from the `export K=V` lines and cluster.json that start-cluster.sh wrote."""
    facts = json.loads((state_dir / "cluster.json").read_text())
    variables = {}
    for line in exports.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            variables[key] = value
    return LocalCluster(
        dashboard_url=facts["dashboard_url"],
        gcs_address=facts["gcs_address"],
        s3_endpoint=facts["s3_endpoint"],
        s3_bucket=facts["s3_bucket"],
        env={**os.environ, **variables},
        pids=_recorded_pids(state_dir),
        state_dir=state_dir,
    )
