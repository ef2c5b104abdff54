"""deploy/: the Kubernetes and KServe manifests against the Kubernetes schemas, and the container contract they rely
on (the port from PORT, the bundle from the environment, the probe paths, the SIGTERM drain) on a real process."""

import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import types

import httpx
import pytest
import yaml

from ..conftest import PYTHON, REPO
from .conftest import free_port

kubernetes_validate = pytest.importorskip("kubernetes_validate")
K8S_VERSION = "1.30.0"
DEPLOY = REPO / "deploy"


def documents(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_the_plain_kubernetes_manifests_are_valid_deployment_service_and_hpa():
    docs = documents(DEPLOY / "kubernetes" / "mcc-serve.yaml")
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any unknown or mistyped field
    container = docs[0]["spec"]["template"]["spec"]["containers"][0]
    check_contract(container, port_env=True)


def test_the_inferenceservice_predictor_is_a_valid_pod_spec_with_the_v2_probes():
    (isvc,) = documents(DEPLOY / "kserve" / "inferenceservice.yaml")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    predictor = dict(isvc["spec"]["predictor"])
    # KServe's own fields beside the pod spec it embeds
    kserve_fields = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "containerConcurrency", "timeout"}
    assert predictor["scaleMetric"] == "concurrency" and predictor["minReplicas"] <= predictor["maxReplicas"]
    pod_spec = {k: v for k, v in predictor.items() if k not in kserve_fields}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    # fields Knative's admission webhook refuses on a Serverless predictor
    assert not {"terminationGracePeriodSeconds", "activeDeadlineSeconds", "nodeName"} & set(pod_spec)
    (container,) = pod_spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe's storage initializer mounts /mnt/models for
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MCC_BUNDLE"] == "/mnt/models" and env["STORAGE_URI"].startswith("s3://")
    assert env["MCC_PORT"] == str(container["ports"][0]["containerPort"])  # RawDeployment sets no PORT
    check_contract(container, port_env=False)


def kserve_models():
    """KServe's Python SDK's API types (generated from the same Go types as its CRDs), without the SDK's model server:
    ``make install`` installs the ``kserve`` wheel with --no-deps, and its ``models`` need only six and urllib3."""
    spec = importlib.util.find_spec("kserve")
    if spec is None:
        pytest.skip("the kserve SDK is not installed (make install adds it)")
    if "kserve.models" not in sys.modules:
        package = types.ModuleType("kserve")  # kserve/__init__.py would import its model server (grpc, pandas, ...)
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules.setdefault("kserve", package)
    return importlib.import_module("kserve.models")


PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def kserve_errors(value, kind: str, where: str, models) -> list[str]:
    """Every field of ``value`` that KServe's API type ``kind`` does not have, or has with another type. Kubernetes'
    own types (V1Container, V1ObjectMeta, ...: not KServe's) are left to kubernetes-validate."""
    if kind.startswith("list["):
        if not isinstance(value, list):
            return [f"{where}: a list expected"]
        return [e for i, v in enumerate(value) for e in kserve_errors(v, kind[5:-1], f"{where}[{i}]", models)]
    if kind.startswith("dict("):
        if not isinstance(value, dict):
            return [f"{where}: a mapping expected"]
        inner = kind[5:-1].split(", ", 1)[1]
        return [e for k, v in value.items() for e in kserve_errors(v, inner, f"{where}.{k}", models)]
    if kind in PRIMITIVES:
        ok = isinstance(value, PRIMITIVES[kind]) and not (kind in ("int", "float") and isinstance(value, bool))
        return [] if ok else [f"{where}: {kind} expected, got {value!r}"]
    model = getattr(models, kind, None)
    if model is None:
        return []  # a Kubernetes type
    if not isinstance(value, dict):
        return [f"{where}: a {kind} mapping expected"]
    fields = {key: attr for attr, key in model.attribute_map.items()}  # the YAML key -> the Python attribute
    errors = [f"{where}.{key}: not a field of KServe's {kind}" for key in value if key not in fields]
    return errors + [
        e
        for key, v in value.items()
        if key in fields
        for e in kserve_errors(v, model.openapi_types[fields[key]], f"{where}.{key}", models)
    ]


def test_the_inferenceservice_has_only_fields_of_kserves_api_types():
    models = kserve_models()
    (isvc,) = documents(DEPLOY / "kserve" / "inferenceservice.yaml")
    assert kserve_errors(isvc, "V1beta1InferenceService", "isvc", models) == []
    predictor = isvc["spec"]["predictor"]
    for key, value, message in [
        ("scaleMetrics", "rps", "isvc.spec.predictor.scaleMetrics: not a field of KServe's V1beta1PredictorSpec"),
        ("minReplicas", "one", "isvc.spec.predictor.minReplicas: int expected, got 'one'"),
        ("annotations", {"a": 1}, "isvc.spec.predictor.annotations.a: str expected, got 1"),
    ]:  # the check can fail: a misspelled KServe field, a mistyped one
        broken = {**isvc, "spec": {**isvc["spec"], "predictor": {**predictor, key: value}}}
        assert kserve_errors(broken, "V1beta1InferenceService", "isvc", models) == [message]


def check_contract(container: dict, port_env: bool) -> None:
    """The probes hit mcc-serve's v2 health paths on the port it listens on."""
    port = container["ports"][0]["containerPort"]
    assert port == 8080
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    if port_env:  # plain Kubernetes sets PORT itself; Knative sets it for KServe
        assert {e["name"]: e["value"] for e in container["env"]}["PORT"] == str(port)


def test_the_container_contract_port_from_port_bundle_from_env_probes_and_sigterm(bundle):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCC_")}
    env |= {"PORT": str(port), "MCC_BUNDLE": str(bundle), "MCC_HOST": "127.0.0.1", "MCC_DRAIN_S": "0.5"}
    proc = subprocess.Popen(
        [PYTHON, "-m", "mcc_serve"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )  # no arguments: as the image starts
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                pytest.fail(proc.stdout.read())
            subprocess.run(["sleep", "0.1"])
        assert httpx.get(f"{url}/v2/health/live").status_code == 200
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # drained and exited cleanly, as a pod being replaced must
    finally:
        if proc.poll() is None:
            proc.kill()
