"""deploy/: the Kubernetes manifests validated offline against a pinned Kubernetes version,
and checked against the image and the app they run. The KServe kinds are custom resources
whose schemas kubernetes-validate does not ship: they are parsed and checked field by field,
and the container they embed is validated as a core/v1 Container.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.app import create_app
from service.settings import Settings
from tests.dockerfile import parse

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.34.0"  # the oldest Kubernetes the manifests promise to run on
K8S_FILES = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
KSERVE_GRPC_FILE = ROOT / "deploy" / "kserve" / "inferenceservice-grpc.yaml"
KSERVE_FILES = sorted(set((ROOT / "deploy" / "kserve").glob("*.yaml")) - {KSERVE_GRPC_FILE})
RUNTIME = parse(ROOT / "Dockerfile")["runtime"]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(paths: list[Path]) -> dict[str, dict[str, Any]]:
    docs = [d for p in paths for d in documents(p)]
    kinds = {d["kind"]: d for d in docs}
    assert len(kinds) == len(docs), "one resource of each kind"
    return kinds


K8S = by_kind(K8S_FILES)
KSERVE = by_kind(KSERVE_FILES)


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = K8S["Deployment"]["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    (c,) = pod_spec()["containers"]
    return dict(c)


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def image_uid() -> int:
    return int(RUNTIME.one("USER").split(":")[0])


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_kubernetes_manifests_validate_strictly(path: Path) -> None:
    docs = documents(path)
    assert docs
    for doc in docs:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.34"
        assert DNS_LABEL.match(doc["metadata"]["name"])


def test_validation_rejects_broken_manifests() -> None:
    typo = copy.deepcopy(K8S["Deployment"])
    typo["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)
    bad_type = copy.deepcopy(K8S["HorizontalPodAutoscaler"])
    bad_type["spec"]["maxReplicas"] = "ten"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_type, K8S_VERSION, strict=True)


def test_kserve_kinds_are_not_in_the_bundled_schemas() -> None:
    # Why the KServe resources get the structural checks below instead.
    for doc in KSERVE.values():
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_probes_hit_the_services_health_routes() -> None:
    c = container()
    routes = set(create_app(Settings()).openapi()["paths"])
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"/healthz", "/readyz", "/metrics"} <= routes
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    port = ports["http"]
    exposed = RUNTIME.one("EXPOSE").split()
    assert str(port) == env_of(c)["DROPOUT_PORT"]["value"] == exposed[0]
    assert str(ports["grpc"]) == env_of(c)["DROPOUT_GRPC_PORT"]["value"] == exposed[1]
    annotations = K8S["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)


def test_deployment_runs_as_the_images_user_on_a_read_only_root() -> None:
    pod = pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == image_uid()
    sc = container()["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    (tmp,) = [m for m in container()["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]


def test_torch_threads_follow_the_cpu_limit() -> None:
    c = container()
    env = env_of(c)
    assert env["DROPOUT_WORKERS"]["value"] == "1"
    ref = env["DROPOUT_TORCH_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": c["name"], "resource": "limits.cpu", "divisor": "1"}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])


def test_service_autoscaler_and_budget_target_the_deployment() -> None:
    deployment = K8S["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = K8S["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    port_names = {p["name"] for p in container()["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= port_names
    hpa = K8S["HorizontalPodAutoscaler"]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    # CPU utilisation is measured against requests.cpu, which must therefore be set.
    assert any(m["resource"]["name"] == "cpu" for m in hpa["metrics"])
    assert "cpu" in container()["resources"]["requests"]
    budget = K8S["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert budget.items() <= labels.items()


def test_kserve_runtime_serves_the_inference_service_over_v2() -> None:
    runtime, isvc = KSERVE["ServingRuntime"], KSERVE["InferenceService"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    for doc in (runtime, isvc):
        assert DNS_LABEL.match(doc["metadata"]["name"])
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "v2"
    assert "v2" in runtime["spec"]["protocolVersions"]
    formats = {f["name"]: f for f in runtime["spec"]["supportedModelFormats"]}
    assert formats[model["modelFormat"]["name"]]["version"] == model["modelFormat"]["version"]
    assert re.match(r"^(pvc|s3|gs|https?)://", model["storageUri"])
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["scaleMetric"] in {"concurrency", "rps", "cpu", "memory"}
    assert isinstance(predictor["scaleTarget"], int)


def test_kserve_container_is_a_valid_container_on_kserves_port() -> None:
    (c,) = KSERVE["ServingRuntime"]["spec"]["containers"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [c]},
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert c["name"] == "kserve-container"  # the container KServe routes to
    assert c["image"] == container()["image"]
    env = env_of(c)
    (port,) = c["ports"]
    assert str(port["containerPort"]) == env["DROPOUT_PORT"]["value"] == "8080"
    assert env["DROPOUT_MODEL_DIR"]["value"] == "/mnt/models"  # the storage initializer's
    ref = env["DROPOUT_TORCH_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert ref["containerName"] == c["name"]
    assert c["securityContext"]["runAsUser"] == image_uid()
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    # The Open Inference Protocol's health endpoints, served by the app.
    routes = set(create_app(Settings()).openapi()["paths"])
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {"/v2/health/live", "/v2/health/ready", "/v2/models/{name}/infer"} <= routes


def test_service_exposes_grpc_as_h2c() -> None:
    ports = {p["name"]: p for p in K8S["Service"]["spec"]["ports"]}
    assert ports["grpc"]["targetPort"] == "grpc"
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"


def test_kserve_grpc_inference_service_routes_h2c_to_the_grpc_port() -> None:
    (isvc,) = documents(KSERVE_GRPC_FILE)
    runtime = KSERVE["ServingRuntime"]
    assert isvc["kind"] == "InferenceService"
    assert DNS_LABEL.match(isvc["metadata"]["name"])
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "grpc-v2"
    assert "grpc-v2" in runtime["spec"]["protocolVersions"]
    (port,) = model["ports"]
    assert port["name"] == "h2c"  # Knative carries HTTP/2 to a port of that name
    (c,) = runtime["spec"]["containers"]
    assert str(port["containerPort"]) == env_of(c)["DROPOUT_GRPC_PORT"]["value"]
    assert port["containerPort"] != c["ports"][0]["containerPort"]
