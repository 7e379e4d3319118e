"""Static checks of the cluster definitions in infra/ (no cluster started): the Ray cluster launcher
config validates against Ray's own schema, the KubeRay manifests carry the fields KubeRay and
rayformers rely on, the RayService's Serve config validates against Ray Serve's schema, and every
image / rayVersion names the Ray version installed here."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"
S3_SECRET = "rayformers-s3"
IMAGE_APP_DIR = "/app"  # where infra/docker/Dockerfile copies the repository


def load_yaml(relative_path: str) -> dict:
    return yaml.safe_load((INFRA / relative_path).read_text())


def repo_path_of_image_path(image_path: str) -> Path:
    """/app/jobs/examples/x.yaml inside the image -> the same file in this checkout."""
    assert image_path.startswith(IMAGE_APP_DIR + "/"), image_path
    return REPO_ROOT / image_path[len(IMAGE_APP_DIR) + 1 :]


# --- Ray cluster launcher (AWS) ---------------------------------------------------------------------


def test_launcher_config_validates_against_ray_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml("aws/cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # Ray's own check, as `ray up` runs it: defaults merged first, then schema + cross-field rules.
    validate_config(prepare_config(copy.deepcopy(config)))


def test_launcher_config_autoscales_gpu_workers_from_zero():
    config = load_yaml("aws/cluster.yaml")
    node_types = config["available_node_types"]
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert config["head_node_type"] in node_types
    gpu_types = [spec for spec in node_types.values() if spec.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types, "no worker node type offers a GPU"
    for spec in gpu_types:
        assert spec["min_workers"] == 0 < spec["max_workers"] <= config["max_workers"]
    assert any("~/rayformers" == remote for remote in config["file_mounts"])
    assert any(
        "pip install" in command and "constraints.txt" in command
        for command in config["head_setup_commands"] + config["worker_setup_commands"]
    )
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command, command


def test_launcher_images_use_installed_ray_version():
    config = load_yaml("aws/cluster.yaml")
    images = [config["docker"]["head_image"], config["docker"]["worker_image"]]
    images += [spec["docker"]["worker_image"] for spec in config["available_node_types"].values() if "docker" in spec]
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-"), image


# --- KubeRay -----------------------------------------------------------------------------------------

MANIFESTS = {
    "RayCluster": ("k8s/raycluster.yaml", lambda doc: doc["spec"]),
    "RayJob": ("k8s/rayjob.yaml", lambda doc: doc["spec"]["rayClusterSpec"]),
    "RayService": ("k8s/rayservice.yaml", lambda doc: doc["spec"]["rayClusterConfig"]),
}


def cluster_spec(kind: str) -> dict:
    path, spec_of = MANIFESTS[kind]
    doc = load_yaml(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    return spec_of(doc)


def ray_containers(spec: dict) -> list[dict]:
    """The Ray container (KubeRay uses the first one) of the head and of every worker group."""
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [group["template"]["spec"]["containers"][0] for group in groups]


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_kuberay_cluster_spec_has_head_and_autoscaled_worker_groups(kind):
    spec = cluster_spec(kind)
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["template"]["spec"]["containers"], "head pod template has no container"

    groups = spec["workerGroupSpecs"]
    assert len({group["groupName"] for group in groups}) == len(groups)
    for group in groups:
        assert isinstance(group["rayStartParams"], dict)
        assert all(isinstance(group[key], int) for key in ("replicas", "minReplicas", "maxReplicas"))
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > 0


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_kuberay_cluster_spec_has_a_gpu_group(kind):
    spec = cluster_spec(kind)
    gpu_groups = [
        group
        for group in spec["workerGroupSpecs"]
        if int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
    ]
    assert gpu_groups, "no worker group has an nvidia.com/gpu limit"
    for group in gpu_groups:
        assert group["template"]["spec"]["containers"][0]["image"].endswith("-gpu")


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_kuberay_containers_read_s3_credentials_from_the_secret(kind):
    for container in ray_containers(cluster_spec(kind)):
        env = {variable["name"]: variable for variable in container.get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            reference = env[name]["valueFrom"]["secretKeyRef"]
            assert reference["name"] == S3_SECRET and reference["key"] == name
            assert not reference.get("optional", False)
        if "AWS_ENDPOINT_URL" in env:
            reference = env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]
            assert reference["name"] == S3_SECRET and reference["optional"] is True


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_kuberay_images_are_the_project_image(kind):
    for container in ray_containers(cluster_spec(kind)):
        assert re.fullmatch(r"rayformers:latest(-gpu)?", container["image"]), container["image"]


def test_kuberay_job_and_service_clusters_match_the_raycluster():
    def shape(spec: dict) -> dict:
        return {
            "head_image": spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"],
            "groups": {
                group["groupName"]: group["template"]["spec"]["containers"][0]["image"]
                for group in spec["workerGroupSpecs"]
            },
        }

    reference = shape(cluster_spec("RayCluster"))
    assert shape(cluster_spec("RayJob")) == reference
    assert shape(cluster_spec("RayService")) == reference


def test_rayjob_trains_the_example_on_gpus_and_cleans_up():
    spec = load_yaml("k8s/rayjob.yaml")["spec"]
    words = spec["entrypoint"].split()
    assert words[:2] == ["rayformers", "train"]
    assert repo_path_of_image_path(words[2]).is_file(), f"{words[2]} is not in the repository"
    overrides = dict(word.split("=", 1) for word in words[3:])
    assert overrides["train.use_gpu"] == "true"
    assert int(overrides["train.num_workers"]) >= 1
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayservice_serve_config_validates_against_serve_schema():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    serve_config_text = load_yaml("k8s/rayservice.yaml")["spec"]["serveConfigV2"]
    assert isinstance(serve_config_text, str), "serveConfigV2 must be a YAML string"
    serve_config = yaml.safe_load(serve_config_text)
    ServeDeploySchema.model_validate(serve_config)

    # Serve's schemas accept unknown keys (forward compatibility); a typo must still fail here.
    assert set(serve_config) <= set(ServeDeploySchema.model_fields)
    app, health = serve_config["applications"]
    for application in (app, health):
        assert set(application) <= set(ServeApplicationSchema.model_fields)
        for deployment in application["deployments"]:
            assert set(deployment) <= set(DeploymentSchema.model_fields)
            if "autoscaling_config" in deployment:  # a plain dict in the schema; Serve checks it at deploy time
                AutoscalingConfig(**deployment["autoscaling_config"])
        assert repo_path_of_image_path(application["args"]["config"]).is_file()

    assert app["name"] == "rayformers"
    assert app["route_prefix"] == "/"
    assert app["import_path"] == "pipelines.serve:build_app"
    assert health["route_prefix"] == "/healthz" and health["import_path"] == "pipelines.serve:build_health_app"
    assert serve_config["http_options"]["host"] == "0.0.0.0"


def test_secret_example_defines_every_key_the_manifests_read():
    secret = load_yaml("k8s/secret-example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == S3_SECRET
    read = set()
    for kind in MANIFESTS:
        for container in ray_containers(cluster_spec(kind)):
            for variable in container.get("env", []):
                reference = variable.get("valueFrom", {}).get("secretKeyRef", {})
                if reference.get("name") == S3_SECRET:
                    read.add(reference["key"])
    assert read <= set(secret["stringData"])


# --- container image ---------------------------------------------------------------------------------


def test_dockerfile_builds_from_the_installed_ray_version():
    lines = (INFRA / "docker/Dockerfile").read_text().splitlines()
    instructions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    build_args = {}
    for instruction in instructions:
        if instruction.startswith("ARG ") and "=" in instruction:
            name, _, default = instruction[4:].partition("=")
            build_args.setdefault(name.strip(), default.strip().strip('"'))
    from_lines = [instruction for instruction in instructions if instruction.startswith("FROM ")]
    assert len(from_lines) == 1
    image = re.sub(r"\$\{(\w+)\}", lambda match: build_args[match.group(1)], from_lines[0].split()[1])
    assert image == f"rayproject/ray:{ray.__version__}-py311", image
    assert any(instruction.startswith("COPY") and instruction.endswith(" /app") for instruction in instructions)
    assert any(
        "pip install" in instruction and "-c constraints.txt" in instruction and "/app" in instruction
        for instruction in instructions
    )


def test_rayservice_serve_config_is_what_export_config_writes_for_its_documented_command(tmp_path):
    """serveConfigV2 is generated, never hand-edited: the command in its comment gives it back."""
    from config import load_config
    from jobs.serve import export_config

    text = (REPO_ROOT / "infra/k8s/rayservice.yaml").read_text()
    command = re.search(r"rayformers serve (\S+) \\\n\s*#\s*(.*?) --export-config", text)
    image_config, overrides = command.group(1), command.group(2).split()
    local_config = str(repo_path_of_image_path(image_config))
    export_config(load_config(local_config, overrides), local_config, overrides, str(tmp_path / "serve.yaml"))
    written = yaml.safe_load((tmp_path / "serve.yaml").read_text())
    for application in written["applications"]:  # the model app and its /healthz app
        application["args"]["config"] = image_config
    assert yaml.safe_load(load_yaml("k8s/rayservice.yaml")["spec"]["serveConfigV2"]) == written
