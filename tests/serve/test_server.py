"""A real uvicorn process: tritonclient, 200 concurrent requests, graceful shutdown, and no torch inside."""

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import threading
import time

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from ..conftest import PYTHON, REPO, run_cli
from .conftest import Server
from .test_app import check_malformed_inputs, direct_probs


def test_mcc_serve_imports_neither_torch_nor_timm(bundle):
    code = f"""
import sys
from fastapi.testclient import TestClient
from mcc_serve.main import create_app
from mcc_serve.settings import ServeSettings
import mcc_serve.cli
with TestClient(create_app(ServeSettings(bundle={str(bundle)!r}))) as c:
    assert c.get("/v2/health/live").status_code == 200
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "torchvision", "mcc_train", "export"))
print(bad)
sys.exit(1 if bad else 0)
"""
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tritonclient_talks_to_the_server(server, bundle):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("resnet10t")
    meta = client.get_model_metadata("resnet10t")
    assert meta["inputs"][0]["shape"] == [-1, 1, 16, 16]
    x = np.random.default_rng(1).standard_normal((4, 1, 16, 16)).astype(np.float32)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    result = client.infer(
        "resnet10t", [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=False)], request_id="abc"
    )
    expected = ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-5)
    assert result.get_response()["id"] == "abc"


def test_tritonclient_binary_tensors_its_default(server, bundle):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    x = np.random.default_rng(2).standard_normal((3, 1, 16, 16)).astype(np.float32)
    expected = ort.InferenceSession(str(bundle / "model.onnx")).run(None, {"input": x})[0]
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary_data=True: the Inference-Header-Content-Length extension
    for outputs in (None, [triton.InferRequestedOutput("logits")], [triton.InferRequestedOutput("logits", False)]):
        result = client.infer("resnet10t", [inp], outputs=outputs)
        np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-5)
    header = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [1, 1, 16, 16], "datatype": "FP32", "parameters": {"binary_data_size": 1024}}
            ]
        }
    ).encode()
    url = f"{server.url}/v2/models/resnet10t/infer"
    for length, payload, message in [
        ("abc", header + bytes(1024), "Inference-Header-Content-Length 'abc'"),
        (str(len(header)), header + bytes(100), "needs 1024 bytes of FP32"),
    ]:
        r = httpx.post(url, content=payload, headers={"Inference-Header-Content-Length": length})
        assert r.status_code == 400 and message in r.json()["error"], r.text


def test_200_requests_from_32_clients_each_get_their_own_answer(server, bundle, digit_pngs):
    pngs, _ = digit_pngs
    expected = direct_probs(bundle, pngs)

    async def run():
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

            async def one(i):
                async with sem:
                    k = i % len(pngs)
                    r = await client.post("/v1/predict?top_k=10", files=[("files", (f"{k}.png", pngs[k], "image/png"))])
                    return k, r

            return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(run())
    assert all(r.status_code == 200 for _, r in results)
    for _, r in results[:3]:  # framed by Content-Length, not chunked, like every other route's answers
        assert r.headers["content-type"] == "application/json" and "transfer-encoding" not in r.headers
        assert "server" not in r.headers  # uvicorn's "server: uvicorn" would tell a scanner what to try
        assert int(r.headers["content-length"]) == len(r.content)
    error = httpx.post(f"{server.url}/v1/predict", content=b"x", headers={"content-type": "text/plain"})
    assert error.status_code == 415 and int(error.headers["content-length"]) == len(error.content) > 0
    for k, r in results:
        probs = np.zeros(10)
        for t in r.json()["predictions"][0]["top_k"]:
            probs[t["index"]] = t["probability"]
        np.testing.assert_allclose(probs, expected[k], atol=1e-5)
    metrics = httpx.get(f"{server.url}/metrics").text
    batches = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("mcc_batch_size_count")))
    assert batches < 200  # requests were batched together


def post_in_background(srv: Server, pngs: list[bytes]) -> tuple[list[threading.Thread], list[int]]:
    """One /v1/predict request per image, each from a thread of its own, started now; their statuses as they come."""
    statuses: list[int] = []

    def send(png: bytes) -> None:
        r = httpx.post(f"{srv.url}/v1/predict", files=[("files", ("a.png", png, "image/png"))], timeout=60)
        statuses.append(r.status_code)

    threads = [threading.Thread(target=send, args=(png,)) for png in pngs]
    for t in threads:
        t.start()
    return threads, statuses


def test_sigterm_finishes_queued_requests_then_exits(bundle, digit_pngs):
    # a long batching delay holds the requests in the queue while SIGTERM arrives
    srv = Server(bundle, "--max-batch-size", "32", "--max-delay-ms", "1500", "--drain-s", "0.5")
    threads, statuses = post_in_background(srv, digit_pngs[0][:12])
    deadline = time.time() + 30
    while time.time() < deadline:  # wait until all 12 are inside the server (the metrics request is the 13th)
        metrics = httpx.get(f"{srv.url}/metrics").text
        if "mcc_requests_in_flight 13.0" in metrics:
            break
        time.sleep(0.02)
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert srv.proc.wait(60) == 0
    assert statuses == [200] * 12  # every queued request was answered before the process exited
    try:
        httpx.get(f"{srv.url}/v2/health/live", timeout=2)
        raise AssertionError("the server still answers after SIGTERM")
    except httpx.ConnectError:
        pass


def test_sigterm_turns_readiness_off_and_answers_every_request_sent_before_the_listener_closes(bundle, digit_pngs):
    srv = Server(bundle, "--drain-s", "2")
    pngs, _ = digit_pngs

    async def run():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as client:

            async def one(i):
                r = await client.post("/v1/predict", files=[("files", ("a.png", pngs[i % 40], "image/png"))])
                return r.status_code

            tasks = [asyncio.create_task(one(i)) for i in range(100)]
            await asyncio.sleep(0.03)
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            ready, live = await client.get("/v2/health/ready"), await client.get("/v2/health/live")
            late = await client.post("/v1/predict", files=[("files", ("a.png", pngs[0], "image/png"))])
            return await asyncio.gather(*tasks), ready, live, late

    statuses, ready, live, late = asyncio.run(run())
    assert ready.status_code == 503 and ready.json() == {"ready": False} and live.status_code == 200
    assert late.status_code == 200  # still served during the drain
    assert statuses == [200] * 100
    assert srv.proc.wait(60) == 0
    log = srv.proc.stdout.read()
    assert "Traceback" not in log


def predicted_by(worker_dir) -> float:
    """/v1/predict 200s in a directory holding one worker's prometheus multiprocess counter file."""
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(worker_dir))
    value = registry.get_sample_value("mcc_requests_total", {"endpoint": "/v1/predict", "status": "200"})
    return value or 0.0


def test_two_workers_one_metrics_endpoint(bundle, digit_pngs, tmp_path):
    """With --workers 2 every scrape counts the requests of both workers, whichever worker answers it."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    srv = Server(bundle, "--workers", "2", "--intra-op-threads", "1", env=env)
    try:
        in_a_row = 0  # each worker warms up on its own: wait until fresh connections keep finding ready workers
        while in_a_row < 20:
            with httpx.Client() as c:
                in_a_row = in_a_row + 1 if c.get(f"{srv.url}/v2/health/ready").status_code == 200 else 0
        files = [("files", ("a.png", digit_pngs[0][0], "image/png"))]
        for _ in range(30):  # a fresh connection per request, so both workers get some
            with httpx.Client() as c:
                assert c.post(f"{srv.url}/v1/predict", files=files).status_code == 200
        per_worker = []
        for f in metrics_dir.glob("counter_*.db"):  # one file per worker process
            worker_dir = tmp_path / f.stem
            worker_dir.mkdir()
            shutil.copy(f, worker_dir)
            per_worker.append(predicted_by(worker_dir))
        assert len(per_worker) == 2 and min(per_worker) > 0 and sum(per_worker) == 30
        line = 'mcc_requests_total{endpoint="/v1/predict",status="200"} 30.0'
        for _ in range(6):  # whichever worker answers the scrape
            with httpx.Client() as c:
                assert line in c.get(f"{srv.url}/metrics").text
    finally:
        srv.stop()


def test_cli_bad_bundle_and_bad_options_exit_2(tmp_path, bundle):
    proc = run_cli("mcc_serve", tmp_path)
    assert (
        proc.returncode == 2 and proc.stderr.strip().startswith("mcc-serve: error:") and "no model.json" in proc.stderr
    )
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("mcc_serve", bundle, "--max-batch-size", "0")
    assert proc.returncode == 2 and "--max-batch-size" in proc.stderr
    tampered = tmp_path / "t"
    import shutil

    shutil.copytree(bundle, tampered)
    (tampered / "model.onnx").write_bytes((tampered / "model.onnx").read_bytes() + b"\0")
    proc = run_cli("mcc_serve", tampered)
    assert proc.returncode == 2 and "sha256 differs" in proc.stderr
    proc = run_cli("mcc_serve", bundle, "--precision", "int8")  # a bundle exported without --int8
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "no model_int8.onnx (--precision int8); export it with mcc-export --int8" in proc.stderr
    proc = run_cli("mcc_serve", bundle, "--precision", "int4")
    assert proc.returncode == 2 and "--precision: must be one of fp32, fp16, int8" in proc.stderr


def broken_bundles(bundle, root):
    """(name, bundle dir, message) for bundles that must not start: each breaks one thing model.json promises."""
    import hashlib

    def variant(name, edit=None, onnx=None):
        out = root / name
        shutil.copytree(bundle, out)
        meta = json.loads((out / "model.json").read_text())
        if onnx is not None:
            (out / "model.onnx").write_bytes(onnx)
            meta["files"]["model.onnx"]["sha256"] = hashlib.sha256(onnx).hexdigest()  # the sha256 matches
        if edit is not None:
            edit(meta)
        (out / "model.json").write_text(json.dumps(meta))
        return out

    def fewer_classes(m):
        m["class_names"], m["num_classes"], m["output"]["shape"] = m["class_names"][:9], 9, [None, 9]

    return [
        ("short class_names", variant("a", lambda m: m.update(class_names=m["class_names"][:9])), "class_names"),
        ("fewer outputs than the graph", variant("b", fewer_classes), "10 logits per image; model.json has 9"),
        ("no input shape", variant("c", lambda m: m["input"].pop("shape")), "input.shape"),
        ("wrong input name", variant("d", lambda m: m["input"].update(name="pixels")), "names input 'pixels'"),
        ("empty preprocess", variant("e", lambda m: m.update(preprocess={})), "preprocess"),
        ("non-square", variant("f", lambda m: m["preprocess"].update(input_size=[1, 16, 12])), "square"),
        ("newer version", variant("g", lambda m: m.update(version=99)), "newer than this mcc"),
        ("corrupt graph", variant("h", onnx=b"not a model" * 10), "onnxruntime cannot load it"),
    ]


def test_every_broken_bundle_is_one_line_and_exit_2_with_one_or_two_workers(tmp_path, bundle):
    for name, broken, message in broken_bundles(bundle, tmp_path):
        for workers in ("1", "2"):
            proc = run_cli("mcc_serve", broken, "--workers", workers, "--port", "0", timeout=120)
            err = proc.stderr.strip()
            assert proc.returncode == 2 and len(err.splitlines()) == 1, (name, workers, proc.stderr)
            assert err.startswith("mcc-serve: error:") and message in err, (name, err)
    for name, broken, _message in broken_bundles(bundle, tmp_path / "verify"):
        proc = run_cli("export", "--verify", broken)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, (name, proc.stderr)


def test_help_lists_every_option():
    proc = run_cli("mcc_serve", "--help")
    from mcc_serve.settings import ServeSettings

    for name in ServeSettings.model_fields:
        if name not in ("bundle", "api_key"):
            assert "--" + name.replace("_", "-") in proc.stdout
    assert "MCC_API_KEY" in proc.stdout


def test_a_client_that_disconnects_mid_body_is_a_499_and_one_log_line(bundle, digit_pngs):
    import socket

    srv = Server(bundle, "--log-level", "info")
    try:
        for path in ("/v1/predict", "/v2/models/resnet10t/infer"):
            with socket.create_connection(("127.0.0.1", srv.port)) as sock:
                sock.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    'Content-Length: 100000\r\n\r\n{"images": ['.encode()
                )
                time.sleep(0.3)
        time.sleep(0.5)
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'mcc_requests_total{endpoint="/v1/predict",status="499"} 1.0' in metrics
        assert 'mcc_requests_total{endpoint="/v2/models/{name}/infer",status="499"} 1.0' in metrics
        assert 'status="500"' not in metrics
        assert httpx.get(f"{srv.url}/v2/health/ready").status_code == 200
    finally:
        srv.stop()
    log = srv.proc.stdout.read()
    assert "Traceback" not in log and log.count("disconnected before sending its whole request") == 2
    assert "GET /metrics" not in log  # no access log by default, at info level too


def test_access_log_on_request(bundle, digit_pngs):
    srv = Server(bundle, "--log-level", "info", "--access-log")
    try:
        files = [("files", ("0.png", digit_pngs[0][0], "image/png"))]
        assert httpx.post(f"{srv.url}/v1/predict", files=files).status_code == 200
    finally:
        srv.stop()
    assert '"POST /v1/predict HTTP/1.1" 200' in srv.proc.stdout.read()


def test_slow_and_oversized_clients_are_cut_off_and_the_server_stays_ready(bundle):
    import socket

    srv = Server(bundle, "--header-timeout-s", "1", "--body-timeout-s", "1", "--max-header-bytes", "4096")

    def exchange(payload: bytes, wait: float = 5) -> bytes:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=wait) as sock:
            sock.sendall(payload)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)  # the server closed the connection

    try:
        started = time.time()
        assert exchange(b"").startswith(b"HTTP/1.1 408")  # connects, sends nothing
        assert exchange(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n").startswith(b"HTTP/1.1 408")  # slow headers
        assert time.time() - started < 4.5
        big = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 10_000 + b"\r\n\r\n"
        answer = exchange(big)
        assert answer.startswith(b"HTTP/1.1 431") and b'"error"' in answer
        short_body = (
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999\r\n\r\n{"
        )
        assert b"200 OK" not in exchange(short_body)  # closed after --body-timeout-s
        ok = httpx.get(f"{srv.url}/v2/health/live", headers={"X-Pad": "a" * 2000})  # within the limits: served
        assert ok.status_code == 200
        assert httpx.get(f"{srv.url}/v2/health/ready").status_code == 200
    finally:
        srv.stop()


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def test_a_request_of_small_files_that_decode_large_holds_one_image_at_a_time(bundle):
    from PIL import Image

    Image.new("RGB", (4000, 4000), (10, 200, 30)).save(buf := io.BytesIO(), format="WEBP", lossless=True)
    webp = buf.getvalue()  # under 1 KB on the wire, 48 MB decoded
    srv = Server(bundle)
    try:
        one = [("files", ("0.webp", webp, "image/webp"))]
        assert httpx.post(f"{srv.url}/v1/predict", files=one, timeout=120).status_code == 200  # arenas warm
        before = peak_rss_mb(srv.proc.pid)
        eight = [("files", (f"{i}.webp", webp, "image/webp")) for i in range(8)]
        r = httpx.post(f"{srv.url}/v1/predict", files=eight, timeout=120)
        grown = peak_rss_mb(srv.proc.pid) - before
        assert r.status_code == 200 and len(r.json()["predictions"]) == 8
        # one image at a time fits in what the first request already used (measured: +16 MB); holding all
        # eight, WebP's own frame buffers included, measured +887 MB
        assert grown < 200, f"peak RSS grew {grown:.0f} MB for 8 images of 48 MB: more than one at a time"
    finally:
        srv.stop()


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_sighup_and_sigint_drain_like_sigterm_and_exit_0(bundle, digit_pngs, sig):
    srv = Server(bundle, "--max-delay-ms", "800", "--drain-s", "0.5")  # requests wait in the queue when it comes
    threads, statuses = post_in_background(srv, digit_pngs[0][:6])
    time.sleep(0.3)
    srv.proc.send_signal(sig)
    for t in threads:
        t.join(60)
    assert srv.proc.wait(60) == 0 and statuses == [200] * 6
    assert "Traceback" not in srv.proc.stdout.read()


def test_sigterm_with_no_drain_time_still_finishes_in_flight_requests_and_exits_0(bundle, digit_pngs):
    srv = Server(bundle, "--max-delay-ms", "800", "--drain-s", "0")
    pngs, _ = digit_pngs
    answer = {}
    thread = threading.Thread(
        target=lambda: answer.update(
            r=httpx.post(f"{srv.url}/v1/predict", files=[("files", ("a.png", pngs[0], "image/png"))], timeout=60)
        )
    )
    thread.start()
    time.sleep(0.3)
    srv.proc.send_signal(signal.SIGTERM)
    thread.join(60)
    assert srv.proc.wait(60) == 0 and answer["r"].status_code == 200


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_or_blank_api_key_is_refused_at_start_up(bundle, key):
    proc = run_cli("mcc_serve", bundle, env={**os.environ, "MCC_API_KEY": key}, timeout=120)  # a server would hang
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("mcc-serve: error: MCC_API_KEY: is empty or whitespace")


def test_an_unusable_metrics_directory_is_exit_2_in_one_line(bundle, tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")}
    proc = run_cli("mcc_serve", bundle, "--workers", "2", env=env, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "PROMETHEUS_MULTIPROC_DIR=" in proc.stderr and "is not a writable directory" in proc.stderr


def test_a_worker_killed_mid_request_leaves_no_request_in_flight_behind(tmp_path):
    """A worker that dies without its shutdown (SIGKILL) leaves its live gauge file; a scrape drops it."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    dying = "from mcc_serve.metrics import Metrics; import os; m = Metrics(8); m.in_flight.inc(); os._exit(0)"
    subprocess.run([PYTHON, "-c", dying], env=env, check=True, cwd=REPO)
    assert list(tmp_path.glob("gauge_livesum_*.db"))  # what the dead worker left
    scrape = "from mcc_serve.metrics import Metrics; m = Metrics(8); m.in_flight.inc(); print(m.exposition().decode())"
    text = subprocess.run([PYTHON, "-c", scrape], env=env, check=True, cwd=REPO, capture_output=True, text=True).stdout
    assert "mcc_requests_in_flight 1.0" in text  # this process's request only, not the dead worker's too


def test_malformed_numbers_and_rare_formats_are_400s_on_a_real_server_too(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        check_malformed_inputs(client)
    assert server.proc.poll() is None
