"""mcc-serve on Ray Serve (the mcc[ray] extra): a real local Ray instance, two replicas, a replica killed."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from mcc_serve.runtime.preprocess import Preprocessor

from .conftest import free_port

ray = pytest.importorskip("ray", reason="the mcc[ray] extra is not installed")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_serve():
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def expected_labels(bundle, pngs) -> list[str]:
    meta = json.loads((bundle / "model.json").read_text())
    pre = Preprocessor.from_model_json(meta, 10**8)
    logits = ort.InferenceSession(str(bundle / "model.onnx")).run(
        None, {"input": np.stack([pre.load(p) for p in pngs])}
    )
    return [meta["class_names"][int(i)] for i in logits[0].argmax(1)]


def replicas_running(n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = serve.status().applications["mcc"].deployments["mcc"]
        if status.replica_states.get("RUNNING", 0) == n and status.status == "HEALTHY":
            return
        time.sleep(0.5)
    raise AssertionError(f"not {n} running replicas after {timeout}s: {serve.status()}")


def send_all(url, pngs, requests=200, clients=16) -> list[tuple[int, str]]:
    def one(i):
        with httpx.Client(timeout=60) as client:
            r = client.post(f"{url}/v1/predict?top_k=1", files=[("files", ("d.png", pngs[i % len(pngs)], "image/png"))])
        return r.status_code, r.json()["predictions"][0]["top_k"][0]["label"] if r.status_code == 200 else r.text

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(requests)))


def test_two_replicas_answer_as_onnxruntime_and_survive_a_killed_replica(ray_serve, bundle, digit_pngs):
    from mcc_serve.ray_app import build

    pngs, _ = digit_pngs
    serve.run(build({"bundle": str(bundle), "num_replicas": "2", "max_batch_size": "16"}), name="mcc", route_prefix="/")
    replicas_running(2)
    want = expected_labels(bundle, pngs)
    answers = send_all(ray_serve, pngs)
    assert answers == [(200, want[i % len(pngs)]) for i in range(200)]
    # the same app in every replica: its health, metrics and JSON errors
    assert httpx.get(f"{ray_serve}/v2/health/ready").status_code == 200
    assert "mcc_requests_total" in httpx.get(f"{ray_serve}/metrics").text
    bad = httpx.post(f"{ray_serve}/v1/predict", files=[("files", ("x.png", b"not an image", "image/png"))])
    assert bad.status_code == 400 and "error" in bad.json()

    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"])
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    answers = send_all(ray_serve, pngs, requests=60, clients=8)  # the surviving replica answers meanwhile
    assert [status for status, _ in answers] == [200] * 60
    replicas_running(2)  # Ray replaced the killed one
    assert send_all(ray_serve, pngs, requests=40, clients=8) == [(200, want[i % len(pngs)]) for i in range(40)]


def test_a_bad_bundle_or_argument_fails_the_build_in_one_line(tmp_path, bundle):
    from mcc_serve.ray_app import build

    with pytest.raises(ValueError, match="no model.json"):
        build({"bundle": str(tmp_path)})
    with pytest.raises(ValueError, match="unknown argument"):
        build({"bundle": str(bundle), "replicas": "2"})
    with pytest.raises(ValueError, match="not both"):
        build({"bundle": str(bundle), "num_replicas": "2", "max_replicas": "4"})
    with pytest.raises(ValueError, match="max_replicas 2 is below min_replicas 3"):
        build({"bundle": str(bundle), "min_replicas": "3", "max_replicas": "2"})
    with pytest.raises(ValueError, match="max_batch_size"):
        build({"bundle": str(bundle), "max_batch_size": "0"})


def test_the_serve_deploy_config_is_valid_for_ray_and_builds(bundle):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from mcc_serve.ray_app import build

    from ..conftest import REPO

    config = yaml.safe_load((REPO / "deploy" / "ray" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # Ray's own schema of a serve deploy file
    app = config["applications"][0]
    assert app["import_path"] == "mcc_serve.ray_app:build"
    build({**app["args"], "bundle": str(bundle)})  # its arguments are all known and in range
