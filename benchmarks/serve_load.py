"""Load test of mcc-serve: throughput and latency over HTTP against in-process onnxruntime.

The server runs in its own process (mcc-serve); this script is the load generator. For each concurrency
(1, 8, 32, 64) and batching on (max batch 32, 5 ms delay; one worker, or two with one onnxruntime thread each)
and off (max batch 1, no delay) it sends one-image /v1/predict requests with real digit PNGs, then 8-image
requests at concurrency 8, and records throughput, p50 and p99. Next to it: in-process
onnxruntime throughput (decode + preprocess + run, no HTTP) at batch 32 and the model's own batch-1 latency.

    python benchmarks/serve_load.py [--bundle DIR] [--requests 400]

Without --bundle it trains resnet18 on digits for one epoch and exports it (about two minutes).
Targets: batching-on throughput >= 0.7x in-process; batching on >= off at concurrency 32;
p99 at concurrency 1 < max-delay + 10 ms above the model's own latency.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import print_table, write_json  # noqa: E402

BIN = Path(sys.executable).parent
BATCHING = {
    "on": ["--max-batch-size", "32", "--max-delay-ms", "5"],
    "off": ["--max-batch-size", "1", "--max-delay-ms", "0"],
    "on, 2 workers": ["--max-batch-size", "32", "--max-delay-ms", "5", "--workers", "2", "--intra-op-threads", "1"],
}


def digit_pngs(n: int = 64) -> list[bytes]:
    from PIL import Image
    from sklearn.datasets import load_digits

    out = []
    for img in load_digits().images[:n]:
        buf = io.BytesIO()
        Image.fromarray(np.round(img * 255 / 16).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def make_bundle(workdir: Path) -> Path:
    run = [str(BIN / "mcc-train"), "--arch", "resnet18", "--epochs", "1", "--out", str(workdir / "run"),
           "--no-progress", "--workers", "0"]  # fmt: skip
    subprocess.run(run, check=True, capture_output=True)
    subprocess.run([str(BIN / "mcc-export"), str(workdir / "run" / "last.pt"), "--out", str(workdir / "bundle"),
                    "--latency-runs", "5"], check=True, capture_output=True)  # fmt: skip
    return workdir / "bundle"


def in_process(bundle: Path, pngs: list[bytes], batch: int, seconds: float = 5.0) -> dict:
    """Images/s of decode + preprocess + onnxruntime at ``batch``, and the model's batch-1 latency."""
    import onnxruntime as ort

    from mcc_serve.preprocess import Preprocessor

    meta = json.loads((bundle / "model.json").read_text())
    pre = Preprocessor.from_model_json(meta, 10**8)
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    x1 = pre.load(pngs[0])[None]
    for _ in range(10):
        sess.run(None, {"input": x1})
    lat = []
    for _ in range(200):
        t = time.perf_counter()
        sess.run(None, {"input": x1})
        lat.append(time.perf_counter() - t)
    images, started, i = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        x = np.stack([pre.load(pngs[(i + k) % len(pngs)]) for k in range(batch)])
        sess.run(None, {"input": x})
        images, i = images + batch, i + batch
    return {"images_per_s": images / (time.perf_counter() - started), "model_ms_batch1": 1000 * statistics.median(lat)}


class ServerProcess:
    def __init__(self, bundle: Path, args: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(BIN / "mcc-serve"), str(bundle), "--port", str(self.port), "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("mcc-serve did not become ready")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


async def http_post(reader, writer, request: bytes) -> int:
    """One request on a keep-alive HTTP/1.1 connection; returns the status. Lean on purpose: the generator must
    not be the bottleneck on a 2-core machine (httpx's pool collapses past ~16 concurrent connections)."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)
    return status


async def load(url: str, pngs: list[bytes], concurrency: int, requests: int, per_request: int = 1) -> dict:
    host, port = url.removeprefix("http://").split(":")
    boundary = "mccbench"
    requests_bytes = []
    for i in range(len(pngs)):
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{k}.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + pngs[(i + k) % len(pngs)]
            + b"\r\n"
            for k in range(per_request)
        ]
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        head = (f"POST /v1/predict?top_k=1 HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
                f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        requests_bytes.append(head + body)
    latencies, errors = [], 0
    counter = iter(range(requests))

    async def worker(conn):
        nonlocal errors
        reader, writer = conn
        for i in counter:
            t = time.perf_counter()
            status = await http_post(reader, writer, requests_bytes[i % len(requests_bytes)])
            latencies.append(time.perf_counter() - t)
            errors += status != 200
        writer.close()

    conns = [await asyncio.open_connection(host, int(port)) for _ in range(concurrency)]
    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {
        "rps": requests / elapsed,
        "images_per_s": requests * per_request / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a bundle from mcc-export (default: train and export one)")
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    args = parser.parse_args()
    pngs = digit_pngs()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or make_bundle(Path(tmp))
        meta = json.loads((bundle / "model.json").read_text())
        base = in_process(bundle, pngs, 32)
        results, rows = {}, []
        for mode, flags in BATCHING.items():
            server = ServerProcess(bundle, flags)
            # one-image requests at each concurrency, then 8-image requests: HTTP cost shared by 8 images
            levels = [(c, 1) for c in args.concurrency] + [(8, 8)]
            try:
                for c, per in levels:
                    n = args.requests if c > 1 else max(100, args.requests // 4)
                    r = asyncio.run(load(server.url, pngs, c, n // per, per))
                    results[f"{mode}/{c}/{per}"] = r
                    ratio = r["images_per_s"] / base["images_per_s"]
                    rows.append([mode, c, per, r["rps"], r["images_per_s"], r["p50_ms"], r["p99_ms"], ratio,
                                 r["errors"]])  # fmt: skip
                    print(f"batching {mode}, concurrency {c}, {per} img/request: {r['rps']:.0f} req/s", file=sys.stderr)
            finally:
                server.stop()
    best_single = max(results[f"{m}/{c}/1"]["images_per_s"] for c in args.concurrency for m in ("on", "on, 2 workers"))
    checks = {
        "batching on, one-image requests: images/s vs in-process (>= 0.7)": best_single / base["images_per_s"],
        "batching on, 8-image requests: images/s vs in-process (>= 0.7)": max(
            results[f"{m}/8/8"]["images_per_s"] for m in ("on", "on, 2 workers")
        )
        / base["images_per_s"],
        "concurrency 32: batching on / off throughput (>= 1)": results["on/32/1"]["rps"] / results["off/32/1"]["rps"]
        if 32 in args.concurrency
        else None,
        "concurrency 1: p99 - model latency, ms (< 5 + 10)": results["on/1/1"]["p99_ms"] - base["model_ms_batch1"]
        if 1 in args.concurrency
        else None,
    }
    print(f"\n{meta['arch']} {meta['input']['shape'][1:]} on {os.cpu_count()} CPU cores; "
          f"in-process (decode + preprocess + onnxruntime, batch 32): {base['images_per_s']:.0f} images/s; "
          f"model latency at batch 1: {base['model_ms_batch1']:.2f} ms\n")  # fmt: skip
    headers = [
        "batching",
        "concurrency",
        "img/request",
        "req/s",
        "img/s",
        "p50 ms",
        "p99 ms",
        "vs in-process",
        "errors",
    ]
    table = print_table(headers, rows)
    print()
    check_table = print_table(
        ["target", "measured"], [[k, "n/a" if v is None else f"{v:.2f}"] for k, v in checks.items()]
    )
    payload = {"arch": meta["arch"], "input": meta["input"]["shape"][1:], "in_process": base, "results": results}
    write_json("serve_load", {**payload, "checks": checks, "table": table, "check_table": check_table})


if __name__ == "__main__":
    main()
