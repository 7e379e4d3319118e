"""The container image of infra/docker/Dockerfile builds from this checkout and runs rayformers with the Ray
installed here. Built only when asked (`make test-image`, or RAYFORMERS_TEST_IMAGE=1), where a Docker daemon
answers and its base image can be had: pulling the base image (GBs) and the pinned packages takes minutes to
tens of minutes, more than `make test`'s time budget. Elsewhere the test is skipped and says why."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import ray

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = f"rayproject/ray:{ray.__version__}-py311"  # test_cluster_definitions checks the Dockerfile names it

pytestmark = pytest.mark.slow


def docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def first_line(process: subprocess.CompletedProcess) -> str:
    return next((line for line in (process.stderr + process.stdout).splitlines() if line.strip()), "no output")


@pytest.fixture(scope="module")
def docker_with_base_image():
    if os.environ.get("RAYFORMERS_TEST_IMAGE") != "1":
        pytest.skip("the image is built only when asked: make test-image (or RAYFORMERS_TEST_IMAGE=1)")
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed: the image of infra/docker/Dockerfile is not built here")
    info = docker("info")
    if info.returncode != 0:
        pytest.skip(f"no Docker daemon answers (docker info: {first_line(info)}): the image is not built here")
    if docker("image", "inspect", BASE_IMAGE).returncode != 0:
        pulled = docker("pull", BASE_IMAGE, timeout=1800)
        if pulled.returncode != 0:
            pytest.skip(f"the base image {BASE_IMAGE} cannot be pulled ({first_line(pulled)})")


def test_the_dockerfile_builds_an_image_that_runs_rayformers(docker_with_base_image):
    tag = f"rayformers-test:{uuid.uuid4().hex[:12]}"
    try:
        built = subprocess.run(
            ["docker", "build", "-f", "infra/docker/Dockerfile", "-t", tag, "."],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        assert built.returncode == 0, built.stderr[-4000:]
        tasks = docker("run", "--rm", tag, "rayformers", "tasks", timeout=300)
        assert tasks.returncode == 0, tasks.stderr[-2000:]
        assert "text-classification" in tasks.stdout and "object-detection" in tasks.stdout, tasks.stdout
        version = docker("run", "--rm", tag, "python", "-c", "import ray; print(ray.__version__)", timeout=300)
        assert version.stdout.strip() == ray.__version__, version.stdout + version.stderr
        examples = docker("run", "--rm", tag, "ls", "/app/jobs/examples", timeout=300)
        assert "text-classification.yaml" in examples.stdout.split(), examples.stdout  # what the manifests run
    finally:
        docker("rmi", "-f", tag)
