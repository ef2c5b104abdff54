"""The HTTP API through FastAPI's TestClient: answers, the v2 protocol, limits, auth and errors."""

import base64
import io
import json
import re
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate
from PIL import Image

from mcc_serve.main import create_app
from mcc_serve.runtime.preprocess import Preprocessor
from mcc_serve.settings import ServeSettings


def client_for(bundle, **settings) -> TestClient:
    client = TestClient(create_app(ServeSettings(bundle=str(bundle), **settings)), raise_server_exceptions=False)
    client.__enter__()  # runs the lifespan
    deadline = time.time() + 60
    while client.get("/v2/health/ready").status_code != 200 and time.time() < deadline:
        time.sleep(0.05)
    return client


@pytest.fixture(scope="module")
def client(bundle):
    c = client_for(bundle)
    yield c
    c.__exit__(None, None, None)


def direct_probs(bundle, pngs):
    """What onnxruntime says for these images, preprocessed by the serving code, one image at a time."""
    meta = json.loads((bundle / "model.json").read_text())
    pre = Preprocessor.from_model_json(meta, 10**8)
    sess = ort.InferenceSession(str(bundle / "model.onnx"))
    logits = np.concatenate([sess.run(None, {"input": pre.load(p)[None]})[0] for p in pngs])
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_multipart_predict_answers_each_image_in_order(client, bundle, digit_pngs):
    pngs, _ = digit_pngs
    files = [("files", (f"{i}.png", pngs[i], "image/png")) for i in range(6)]
    r = client.post("/v1/predict?top_k=3", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = direct_probs(bundle, pngs[:6])
    assert body["model"] == "resnet10t" and len(body["predictions"]) == 6
    for pred, p in zip(body["predictions"], expected, strict=True):
        top = pred["top_k"]
        assert [t["index"] for t in top] == list(np.argsort(-p, kind="stable")[:3])
        assert top[0]["label"] == str(top[0]["index"])
        assert abs(top[0]["probability"] - p.max()) < 1e-5
        assert top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]


def test_json_base64_predict(client, digit_pngs):
    pngs, _ = digit_pngs
    images = [base64.b64encode(p).decode() for p in pngs[:2]]
    r = client.post("/v1/predict", json={"images": images})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2 and len(r.json()["predictions"][0]["top_k"]) == 5
    r2 = client.post("/v1/predict", json={"images": ["data:image/png;base64," + images[0]]})
    assert r2.json()["predictions"][0] == r.json()["predictions"][0]


@pytest.mark.parametrize("query, status", [("top_k=0", 422), ("top_k=11", 422), ("top_k=abc", 422), ("top_k=10", 200)])
def test_top_k_bounds(client, digit_pngs, query, status):
    r = client.post(f"/v1/predict?{query}", files=[("files", ("a.png", digit_pngs[0][0], "image/png"))])
    assert r.status_code == status
    if status != 200:
        assert r.json()["error"].startswith("top_k must be an integer from 1 to 10 (the class count), got ")


def test_form_fields_beside_the_images_are_bounded_in_count_not_in_size(client, digit_pngs):
    image = ("files", ("a.png", digit_pngs[0][0], "image/png"))
    fields = {f"note{i}": "x" for i in range(17)}
    r = client.post("/v1/predict", files=[image], data=fields)
    assert r.status_code == 413 and r.json()["error"] == "more than 16 form fields besides the images"
    r = client.post("/v1/predict", files=[image], data={"note": "x" * (2 << 20)})  # 2 MiB: within the body limit
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1


def test_bad_inputs_get_4xx_with_a_json_error(client, digit_pngs):
    png = digit_pngs[0][0]
    cases = [
        (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported media type"),
        (dict(files=[("files", ("notes.txt", b"just text", "text/plain"))]), 400, "notes.txt is not an image"),
        (dict(files=[("files", ("cut.png", png[: len(png) // 2], "image/png"))]), 400, "cut.png is a corrupt"),
        (dict(files=[("files", ("e.png", b"", "image/png"))]), 400, "e.png is empty"),
        (dict(files={"note": (None, b"no files")}), 400, "no images"),
        (dict(json={"images": ["***"]}), 400, "images[0] is not valid base64"),
        (dict(json={"pictures": []}), 400, "expected"),
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    ]
    for kwargs, status, message in cases:
        r = client.post("/v1/predict", **kwargs)
        assert r.status_code == status, (message, r.text)
        assert message in r.json()["error"] and "Traceback" not in r.text


def test_v2_metadata_and_health(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2").json()["name"] == "mcc-serve"
    meta = client.get("/v2/models/resnet10t").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 16, 16]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get("/v2/models/resnet10t/ready").json() == {"name": "resnet10t", "ready": True}
    r = client.get("/v2/models/nope")
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]


def test_v2_infer_nested_and_flat(client, bundle):
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    expected = ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"input": x})[0]
    for data in (x.tolist(), x.ravel().tolist()):
        r = client.post(
            "/v2/models/resnet10t/infer",
            json={
                "id": "req-7",
                "inputs": [{"name": "input", "shape": [3, 1, 16, 16], "datatype": "FP32", "data": data}],
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == "req-7" and body["model_name"] == "resnet10t"
        out = body["outputs"][0]
        assert out["name"] == "logits" and out["shape"] == [3, 10] and out["datatype"] == "FP32"
        np.testing.assert_allclose(np.array(out["data"]).reshape(3, 10), expected, atol=1e-5)


def test_v2_infer_errors_are_400_or_404(client):
    def infer(body, name="resnet10t"):
        return client.post(f"/v2/models/{name}/infer", json=body)

    good = {"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32", "data": [0.0] * 256}
    cases = [
        ({"inputs": [{**good, "shape": [1, 3, 16, 16]}]}, 400, "does not match"),
        ({"inputs": [{**good, "datatype": "INT8"}]}, 400, "datatype INT8"),
        ({"inputs": [{**good, "name": "x"}]}, 400, "named 'input'"),
        ({"inputs": [{**good, "data": [0.0] * 10}]}, 400, "needs 256"),
        ({"inputs": [{**good, "data": ["a"] * 256}]}, 400, "must be numbers"),
        ({"inputs": [good], "outputs": [{"name": "probs"}]}, 400, "unknown output 'probs'"),
        ({"nothing": 1}, 400, "invalid inference request"),
    ]
    for body, status, message in cases:
        r = infer(body)
        assert r.status_code == status and message in r.json()["error"], (message, r.text)
    assert infer({"inputs": [good]}, name="other").status_code == 404


def test_metrics_and_docs(client, digit_pngs):
    client.post("/v1/predict", files=[("files", ("a.png", digit_pngs[0][0], "image/png"))])
    client.get("/v2/models/resnet10t")
    client.get("/no/such/path")
    r = client.get("/v1/predict")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "POST images" in r.json()["error"]
    text = client.get("/metrics").text
    for name in (
        "mcc_requests_total",
        "mcc_request_latency_seconds_bucket",
        "mcc_queue_wait_seconds_bucket",
        "mcc_batch_size_bucket",
        "mcc_requests_in_flight",
    ):
        assert name in text
    for label in (
        'endpoint="/v1/predict",status="200"',
        'endpoint="/v2/models/{name}",status="200"',
        'endpoint="unmatched",status="404"',
        'endpoint="/v1/predict",status="405"',
    ):
        assert f"mcc_requests_total{{{label}}}" in text
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    validate(schema)  # a real OpenAPI validator: every $ref resolves, the document is valid OpenAPI 3.1
    refs = re.findall(r'"\$ref": "([^"]+)"', json.dumps(schema))
    assert refs and all(r.startswith("#/components/schemas/") for r in refs)
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(schema["components"]["schemas"])
    infer = schema["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]
    assert set(infer["schema"]["properties"]) == {"id", "parameters", "inputs", "outputs"}  # the body, in place
    assert infer["schema"]["properties"]["inputs"]["items"]["properties"]["shape"]["type"] == "array"
    paths = schema["paths"]
    predict = paths["/v1/predict"]["post"]
    assert [p["name"] for p in predict["parameters"]] == ["top_k"]
    assert predict["security"] == [{"HTTPBearer": []}] and "HTTPBearer" in schema["components"]["securitySchemes"]
    assert predict["requestBody"]["content"]["application/json"]["schema"]["required"] == ["images"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("PredictResponse")


def test_limits_return_413(bundle, digit_pngs):
    png = digit_pngs[0][0]
    big = io.BytesIO()
    Image.new("L", (300, 300)).save(big, format="PNG")
    c = client_for(bundle, max_body_bytes=4096, max_image_pixels=200 * 200, max_images_per_request=3)
    try:
        r = c.post("/v1/predict", files=[("files", ("a.png", b"x" * 5000, "image/png"))])
        assert r.status_code == 413 and "body over the limit" in r.json()["error"]
        r = c.post("/v1/predict", files=[("files", ("big.png", big.getvalue(), "image/png"))])
        assert r.status_code == 413 and "more than the limit" in r.json()["error"]
        r = c.post("/v1/predict", files=[("files", (f"{i}.png", png, "image/png")) for i in range(4)])
        assert r.status_code == 413 and "limit is 3" in r.json()["error"]

        def chunks():  # no content-length: the limit holds on the stream too
            for _ in range(10):
                yield b"x" * 1000

        r = c.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413

        # a Content-Length of 5,001 digits (HTTP parsers pass leading zeros): past int()'s digit limit, not a 500
        for length, status in [("0" * 5000 + "1", 400), ("0" * 5000 + "5000", 413), ("9" * 5001, 413)]:
            for path in ("/v1/predict", "/v2/models/resnet10t/infer"):
                r = c.post(path, content=b"{}", headers={"content-type": "application/json", "content-length": length})
                assert r.status_code == status and "error" in r.json(), (path, length[-8:], r.text)
    finally:
        c.__exit__(None, None, None)


def test_predict_before_the_lifespan_is_503_and_a_missing_token_names_the_scheme(bundle, digit_pngs):
    files = [("files", ("a.png", digit_pngs[0][0], "image/png"))]
    r = TestClient(create_app(ServeSettings(bundle=str(bundle)))).post("/v1/predict", files=files)  # no lifespan
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "starting" in r.json()["error"]
    c = client_for(bundle, api_key="s3cret")
    try:
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    finally:
        c.__exit__(None, None, None)


def test_bearer_token(bundle, digit_pngs):
    c = client_for(bundle, api_key="s3cret")
    try:
        files = [("files", ("a.png", digit_pngs[0][0], "image/png"))]
        assert c.post("/v1/predict", files=files).status_code == 401
        r = c.post("/v1/predict", files=files, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json() == {"error": "missing or wrong bearer token"}
        assert c.post("/v1/predict", files=files, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v2/models/resnet10t").status_code == 401 and c.get("/metrics").status_code == 401
        assert c.get("/v2/health/live").status_code == 200 and c.get("/v2/health/ready").status_code == 200
    finally:
        c.__exit__(None, None, None)


def test_overload_timeout_and_model_failure(bundle, digit_pngs):
    files = [("files", ("a.png", digit_pngs[0][0], "image/png"))]
    c = client_for(bundle, request_timeout_s=0.2, max_queue=1, max_batch_size=1, max_delay_ms=0)
    res = c.app.state.classifier
    real_run = res.model.run
    try:
        res.batcher.run = lambda x: (time.sleep(0.5), real_run(x))[1]  # a model slower than the deadline
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 504 and "no answer within 0.2s" in r.json()["error"]
        res.batcher.queued_images = 1  # the queue is full
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        res.batcher.queued_images = 0
        time.sleep(0.6)

        def broken(x):
            raise RuntimeError("onnxruntime exploded at /secret/path")

        res.batcher.run = broken
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 500 and r.json() == {"error": "internal server error"}
    finally:
        c.__exit__(None, None, None)


def test_not_ready_until_the_warm_up_is_done(bundle, digit_pngs, monkeypatch):
    from mcc_serve.runtime import service

    release = threading.Event()
    real_run_zeros = service.run_zeros
    monkeypatch.setattr(service, "run_zeros", lambda *a: (release.wait(30), real_run_zeros(*a)))
    with TestClient(create_app(ServeSettings(bundle=str(bundle))), raise_server_exceptions=False) as c:
        files = [("files", ("a.png", digit_pngs[0][0], "image/png"))]
        assert c.get("/v2/health/live").json() == {"live": True}  # alive while warming up
        r = c.get("/v2/health/ready")
        assert r.status_code == 503 and r.json() == {"ready": False}
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "warming up" in r.json()["error"]
        release.set()
        deadline = time.time() + 30
        while c.get("/v2/health/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.02)
        assert c.post("/v1/predict", files=files).status_code == 200


def test_router_errors_head_and_trailing_slashes_answer_like_every_other_route(client):
    r = client.get("/no/such/route")
    assert r.status_code == 404 and set(r.json()) == {"error"}
    r = client.post("/v2/health/live")
    assert r.status_code == 405 and set(r.json()) == {"error"} and r.headers["allow"] == "GET, HEAD"
    r = client.get("/v2/health/live/", follow_redirects=False, headers={"host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers and set(r.json()) == {"error"}
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/metrics", "/v2/models/resnet10t/ready"):
        head, get = client.head(path), client.get(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    assert client.head("/v1/predict").status_code == 405
    assert client.get("/v2/health/ready").status_code == 200  # still ready


def test_more_images_than_the_queue_holds_is_413_not_429(bundle, digit_pngs):
    c = client_for(bundle, max_queue=2)
    try:
        files = [("files", (f"{i}.png", digit_pngs[0][i], "image/png")) for i in range(3)]
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 413 and "queue holds at most 2" in r.json()["error"] and "retry-after" not in r.headers
        assert c.post("/v1/predict", files=files[:2]).status_code == 200
        # v2: refused from the declared shape, before the data is even read as numbers
        body = {"inputs": [{"name": "input", "shape": [3, 1, 16, 16], "datatype": "FP32", "data": ["not numbers"]}]}
        r = c.post("/v2/models/resnet10t/infer", json=body)
        assert r.status_code == 413 and "queue holds at most 2" in r.json()["error"]
    finally:
        c.__exit__(None, None, None)


def test_json_python_cannot_read_is_400_on_both_apis(client):
    huge_int = b'{"images": [' + b"1" * 5000 + b"]}"
    deep = b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    v2_huge = b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [' + b"9" * 5000 + b"]}]}"
    headers = {"content-type": "application/json"}
    for path, body in [
        ("/v1/predict", huge_int),
        ("/v1/predict", deep),
        ("/v2/models/resnet10t/infer", v2_huge),
        ("/v2/models/resnet10t/infer", deep),
    ]:
        r = client.post(path, content=body, headers=headers)
        assert r.status_code == 400 and r.json()["error"].startswith("body is not valid JSON"), (path, r.text)
    assert client.get("/v2/health/ready").status_code == 200


def test_a_large_json_body_is_parsed_off_the_event_loop_and_answered(client, bundle):
    x = np.random.default_rng(2).standard_normal((32, 1, 16, 16)).astype(np.float32)  # ~160 KB of JSON
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = client.post("/v2/models/resnet10t/infer", json=body)
    assert r.status_code == 200 and len(r.content) > 0
    expected = ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"input": x})[0]
    got = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_an_aspect_ratio_bomb_is_answered_like_any_image(client):
    strip = (np.arange(300_000) % 251).astype(np.uint8)[None]  # 1 x 300,000: 16 px high would be 4.8M px long
    for array in (strip, strip.T):
        Image.fromarray(array).save(buf := io.BytesIO(), format="PNG")
        r = client.post("/v1/predict", files=[("files", ("strip.png", buf.getvalue(), "image/png"))])
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    assert client.get("/v2/health/ready").status_code == 200


def test_the_deadline_covers_preprocessing(bundle, digit_pngs, monkeypatch):
    real_into = Preprocessor._into  # one image's resize, crop and scaling
    monkeypatch.setattr(Preprocessor, "_into", lambda self, img, out: (time.sleep(0.3), real_into(self, img, out))[1])
    c = client_for(bundle, request_timeout_s=0.5)
    try:
        big = Image.fromarray(np.zeros((300, 300), np.uint8))  # past the inline limit: the preprocessing threads
        big.save(buf := io.BytesIO(), format="PNG")
        files = [("files", (f"{i}.png", buf.getvalue(), "image/png")) for i in range(6)]  # 1.8 s of preprocessing
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 504 and "no answer within 0.5s (preprocessing)" in r.json()["error"]
        monkeypatch.setattr(Preprocessor, "_into", lambda self, img, out: (time.sleep(3), real_into(self, img, out))[1])
        r = c.post("/v1/predict", files=files[:1])  # one image far slower than the whole deadline
        assert r.status_code == 504 and r.elapsed.total_seconds() < 2.5  # answered before that image was done
        monkeypatch.setattr(Preprocessor, "_into", real_into)
        assert c.post("/v1/predict", files=files[:1]).status_code == 200
    finally:
        c.__exit__(None, None, None)


def test_malformed_numbers_and_rare_formats_from_a_client_are_4xx_never_500(client):
    check_malformed_inputs(client)


def check_malformed_inputs(client) -> None:
    """Malformed numbers and rare image formats get a 400 each and leave the server ready (any client object with
    httpx's post and get: the app's TestClient, or httpx.Client on a real server)."""
    x = np.zeros((1, 1, 16, 16), np.float32)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 16, 16],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    for length in ("²", "¹²³", "0" * 5000 + str(len(head))):  # Unicode digits int() refuses; thousands of digits
        r = client.post(
            "/v2/models/resnet10t/infer",
            content=head + x.tobytes(),
            headers={"Inference-Header-Content-Length": length.encode("latin-1")},
        )
        assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"], (length[:8], r.text)
    huge = {"inputs": [{"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32", "data": [10**400] * 256}]}
    r = client.post("/v2/models/resnet10t/infer", content=json.dumps(huge))
    assert r.status_code == 400 and "must be numbers" in r.json()["error"]
    rare = {  # headers Pillow recognises, bodies it cannot decode: formats mcc-serve does not read by default
        "x.blp": b"BLP1" + bytes(200),
        "x.dds": b"DDS " + (124).to_bytes(4, "little") + bytes(200),
        "x.avif": b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf" + bytes(200),
        "x.ico": b"\0\0\1\0\1\0" + bytes(200),
    }
    for name, data in rare.items():
        r = client.post("/v1/predict", files=[("files", (name, data, "application/octet-stream"))])
        assert r.status_code == 400 and f"{name} is not an image format read here (PNG" in r.json()["error"]
    assert client.get("/v2/health/ready").status_code == 200


def test_the_event_loop_lag_is_in_the_metrics(bundle):
    c = client_for(bundle)
    try:
        c.portal.call(time.sleep, 0.4)  # runs on the app's event loop: blocks it, as a large parse would
        time.sleep(0.3)  # the watcher's next turn
        text = c.get("/metrics").text
        total = float(
            next(line.split()[-1] for line in text.splitlines() if line.startswith("mcc_event_loop_lag_seconds_sum"))
        )
        assert total >= 0.25, text
    finally:
        c.__exit__(None, None, None)
