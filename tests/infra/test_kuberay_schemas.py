"""The KubeRay manifests in infra/k8s validate against KubeRay's own CRD schemas (v1.7.0, vendored under
tests/infra/kuberay), as strictly as `kubectl apply` checks them: a misspelt or misplaced key is an error
(Kubernetes' strict field validation), as are a wrong type or a missing required field."""

from __future__ import annotations

import copy
import gzip
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CRDS = Path(__file__).resolve().parent / "kuberay"
MANIFESTS = {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}


def strict(schema):
    """The schema with unknown keys refused wherever Kubernetes refuses them: in every object that lists its
    properties, unless it says x-kubernetes-preserve-unknown-fields (the API server prunes or, under strict
    field validation, rejects the others)."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [strict(value) for value in schema]
    return schema


@cache
def crd(kind: str) -> dict:
    with gzip.open(CRDS / f"ray.io_{kind.lower()}s.yaml.gz", "rt") as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@cache
def validator(kind: str) -> jsonschema.Draft7Validator:
    definition = crd(kind)
    assert definition["spec"]["names"]["kind"] == kind
    version = next(v for v in definition["spec"]["versions"] if v["name"] == "v1")
    assert version["served"] and version["storage"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def manifest(kind: str) -> dict:
    return yaml.safe_load((REPO_ROOT / "infra/k8s" / MANIFESTS[kind]).read_text())


def problems(kind: str, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(kind).iter_errors(doc)]


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_the_manifest_validates_against_kuberays_crd(kind):
    doc = manifest(kind)
    assert doc["apiVersion"] == f"{crd(kind)['spec']['group']}/v1" and doc["kind"] == kind
    assert problems(kind, doc) == []


def cluster_of(kind: str, doc: dict) -> dict:
    return {"RayCluster": lambda: doc["spec"], "RayJob": lambda: doc["spec"]["rayClusterSpec"]}.get(
        kind, lambda: doc["spec"]["rayClusterConfig"]
    )()


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_a_misspelt_key_a_wrong_type_and_a_missing_field_are_refused(kind):
    """The check above can fail: each of these edits of the manifest is an error that names its place."""
    misspelt = copy.deepcopy(manifest(kind))
    head = cluster_of(kind, misspelt)["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")
    assert any("'rayStartParam' was unexpected" in p for p in problems(kind, misspelt)), problems(kind, misspelt)

    wrong_type = copy.deepcopy(manifest(kind))
    cluster_of(kind, wrong_type)["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert any(p.startswith("spec.") and "maxReplicas" in p for p in problems(kind, wrong_type))

    missing = copy.deepcopy(manifest(kind))
    del cluster_of(kind, missing)["headGroupSpec"]["template"]
    assert any("'template' is a required property" in p for p in problems(kind, missing)), problems(kind, missing)

    container = copy.deepcopy(manifest(kind))  # deep inside the pod template, in Kubernetes' own schema
    cluster_of(kind, container)["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy" in p for p in problems(kind, container)), problems(kind, container)
