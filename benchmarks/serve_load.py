"""Load test of mcc-serve: throughput and latency over HTTP against in-process onnxruntime.

The server runs in its own process (mcc-serve); this script is the load generator (one keep-alive connection
per client, each sending its next request when the last is answered). For each server configuration it sends
one-image /v1/predict requests with real digit PNGs at concurrency 1, 8, 32 and 64, then 8-image requests at
concurrency 8, each level for ``--seconds``, and records throughput, p50 and p99. Configurations: mcc-serve's
defaults (one worker, batches of up to 32, no delay: a request runs at once when the model is idle); batching
off (max batch 1); a 5 ms batching delay; two worker processes of one onnxruntime thread each. ``--precision int8``
serves the bundle's model_int8.onnx and runs it in the reference too.

Every configuration's server runs for the whole benchmark, idle but for its turn, and each level is measured in
``--rounds`` slices taken in turn (the reference, then each configuration, a different one first each round, round
after round): configurations are compared side by side, so the drift of a shared machine's speed lands in every
one of them alike instead of in their ratio. The reference is in-process onnxruntime (decode + preprocess + run,
batch 32, no HTTP), measured before each round and after the last with every server idle; a level's ratio to
in-process is against the mean of those references. Server CPU is also split out for the event loop (each
worker's main thread; the model runs on others).

    python benchmarks/serve_load.py [--bundle DIR] [--image-size 224] [--seconds 6] [--rounds 3] [--baseline-rev REV]

``--baseline-rev REV`` serves git revision REV's mcc-serve (a worktree of this repository) with its own defaults
beside the configurations, e.g. the revision before a change to the serving path.

Without --bundle it trains resnet18 on digits for one epoch and exports it (about a minute): at 1x32x32 by default,
with ``--image-size S`` at 3xSxS, and the requests then carry SxS RGB PNGs (digits scaled up, with noise).
Targets: default at concurrency 1 within 0.5 ms (p50) of batching off; default at concurrency 32 and 64 at least
the 5 ms delay's throughput (and the --baseline-rev's).
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
    "default": [],  # mcc-serve's defaults: one worker, batches of up to 32, no delay (an idle model runs at once)
    "off": ["--max-batch-size", "1"],
    "5 ms delay": ["--max-delay-ms", "5"],  # every batch waits 5 ms for company, as the default did before
    "2 workers": ["--workers", "2", "--intra-op-threads", "1"],
}


def digit_pngs(n: int = 64, size: int | None = None) -> list[bytes]:
    """``n`` digits as PNG files: 8x8 grey, or ``size`` x ``size`` RGB (scaled up, with noise, so a PNG of a
    photo's size rather than of flat blocks)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    out = []
    for img in load_digits().images[:n]:
        img = Image.fromarray(np.round(img * 255 / 16).astype(np.uint8))
        if size:
            x = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), np.int16)
            noise = rng.integers(-12, 13, x.shape)
            img = Image.fromarray(np.clip(x + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def make_bundle(workdir: Path, image_size: int | None = None) -> Path:
    """resnet18 trained on digits for one epoch and exported: 1x32x32, or 3 x image_size^2 on 64 images."""
    size = ["--img-size", str(image_size), "--in-chans", "3", "--subset", "64"] if image_size else []
    run = [str(BIN / "mcc-train"), "--arch", "resnet18", "--epochs", "1", "--out", str(workdir / "run"), *size]
    subprocess.run([*run, "--no-progress", "--workers", "0"], check=True, capture_output=True)
    export = [str(BIN / "mcc-export"), str(workdir / "run" / "last.pt"), "--out", str(workdir / "bundle")]
    subprocess.run([*export, "--latency-runs", "5"], check=True, capture_output=True)
    return workdir / "bundle"


class InProcess:
    """The reference: decode + preprocess + onnxruntime at ``batch`` in this process, mcc-serve's session options."""

    def __init__(self, bundle: Path, pngs: list[bytes], batch: int = 32, precision: str = "fp32"):
        from mcc_serve.runtime.bundle import onnx_file
        from mcc_serve.runtime.preprocess import Preprocessor
        from mcc_serve.runtime.session import create_session

        meta = json.loads((bundle / "model.json").read_text())
        self.pre, self.pngs, self.batch = Preprocessor.from_model_json(meta, 10**8), pngs, batch
        self.sess = create_session(bundle / onnx_file(precision))

    def model_ms_batch1(self) -> float:
        x1 = self.pre.load(self.pngs[0])[None]
        for _ in range(10):
            self.sess.run(None, {"input": x1})
        lat = []
        for _ in range(200):
            t = time.perf_counter()
            self.sess.run(None, {"input": x1})
            lat.append(time.perf_counter() - t)
        return 1000 * statistics.median(lat)

    def images_per_s(self, seconds: float) -> float:
        images, started, i = 0, time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            x = np.stack([self.pre.load(self.pngs[(i + k) % len(self.pngs)]) for k in range(self.batch)])
            self.sess.run(None, {"input": x})
            images, i = images + self.batch, i + self.batch
        rate = images / (time.perf_counter() - started)
        time.sleep(0.2)  # let the pool threads go idle before the server is measured
        return rate


# runs mcc-serve from the source tree given as its first argument, not from the installed (editable) package
FROM_TREE = (
    "import sys; root = sys.argv.pop(1); sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
    "getattr(f, '__module__', '') and '__editable__' not in repr(f)]; sys.path.insert(0, root); import mcc_serve; "
    "assert mcc_serve.__file__.startswith(root), mcc_serve.__file__; from mcc_serve.cli import main; sys.exit(main())"
)


class ServerProcess:
    def __init__(self, bundle: Path, args: list[str], tree: Path | None = None):
        """mcc-serve on ``bundle`` with ``args``; ``tree``: run the mcc_serve of that source tree instead."""
        self.name = "mcc-serve"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        program = [str(BIN / "mcc-serve")] if tree is None else [sys.executable, "-c", FROM_TREE, str(tree)]
        cmd = [*program, str(bundle), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        ready_in_a_row = 0  # with several workers, each answers for itself: wait until all of them are warm
        for _ in range(1200):
            try:
                with httpx.Client() as client:  # a new connection per probe, so probes reach every worker
                    ok = client.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200
                ready_in_a_row = ready_in_a_row + 1 if ok else 0
                if ready_in_a_row == 20:
                    return
            except httpx.TransportError:
                ready_in_a_row = 0
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready")

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


async def load(url: str, pngs: list[bytes], concurrency: int, seconds: float, per_request: int = 1) -> dict:
    """``concurrency`` clients send requests back to back for ``seconds``; throughput and latency of the answers."""
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
        head = (
            f"POST /v1/predict?top_k=1 HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        requests_bytes.append(head + body)
    latencies, errors = [], 0  # latencies of answers with status 200; the rest are errors
    sent = iter(range(10**9))

    async def worker(conn, deadline):
        nonlocal errors
        reader, writer = conn
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            status = await http_post(reader, writer, requests_bytes[next(sent) % len(requests_bytes)])
            if status == 200:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1
        writer.close()

    conns = [await asyncio.open_connection(host, int(port)) for _ in range(concurrency)]
    started = time.perf_counter()
    await asyncio.gather(*(worker(c, started + seconds) for c in conns))
    elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "images": len(latencies) * per_request,
        "elapsed_s": elapsed,
        "rps": len(latencies) / elapsed,
        "images_per_s": len(latencies) * per_request / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": errors,
        "latencies_ms": lat,
    }


def cpu_seconds(root: int, main_threads: bool = False) -> float | None:
    """User + system CPU seconds of process ``root`` and its descendants so far (Linux /proc; None elsewhere).
    ``main_threads``: only each process's main thread, which in an mcc-serve worker runs the event loop (the model,
    onnxruntime's pool and the preprocessing run on other threads)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def stat(path: Path) -> tuple[int, float] | None:  # (ppid, CPU seconds)
        try:
            fields = path.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ...
        except (OSError, IndexError):
            return None
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / tick

    stats = {int(path.parent.name): st for path in Path("/proc").glob("[0-9]*/stat") if (st := stat(path))}
    if root not in stats:
        return None
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, (ppid, _) in stats.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    if main_threads:
        return sum(st[1] for pid in tree if (st := stat(Path(f"/proc/{pid}/task/{pid}/stat"))))
    return sum(stats[pid][1] for pid in tree)


def checkout(rev: str, where: Path) -> Path:
    """The source tree of git revision ``rev`` of this repository, under ``where`` (removed with it)."""
    tree = where / "baseline"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True, capture_output=True
    )
    return tree


def measure(server: ServerProcess, pngs: list[bytes], concurrency: int, seconds: float, per_request: int) -> dict:
    """One slice of load on one server, with the server's and this process's CPU time over it."""
    cpu_before, loop_before = cpu_seconds(server.proc.pid), cpu_seconds(server.proc.pid, main_threads=True)
    own_before = time.process_time()
    r = run_load(server.url, pngs, concurrency, seconds, per_request, latencies=True)
    r["generator_cpu_s"] = time.process_time() - own_before  # the load alone, not the /proc scans
    cpu_after, loop_after = cpu_seconds(server.proc.pid), cpu_seconds(server.proc.pid, main_threads=True)
    r["server_cpu_s"] = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    r["loop_cpu_s"] = None if loop_before is None or loop_after is None else loop_after - loop_before
    return r


def combine(slices: list[dict], references: list[float]) -> dict:
    """A level's slices as one measurement: rates over the total time, percentiles over every answer."""
    n, elapsed = sum(s["requests"] for s in slices), sum(s["elapsed_s"] for s in slices)
    lat = np.concatenate([s["latencies_ms"] for s in slices])
    in_process = float(np.mean(references))
    r = {
        "requests": n,
        "rps": n / elapsed,
        "images_per_s": sum(s["images"] for s in slices) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": sum(s["errors"] for s in slices),
        "generator_cpu_ms_per_request": 1000 * sum(s["generator_cpu_s"] for s in slices) / max(n, 1),
        "in_process_images_per_s": in_process,
        "in_process_per_round": references,
        "images_per_s_per_round": [s["images_per_s"] for s in slices],
    }
    for key in ("server_cpu", "loop_cpu"):  # loop: the event loops (each worker's main thread)
        if all(s[f"{key}_s"] is not None for s in slices):
            r[f"{key}_ms_per_request"] = 1000 * sum(s[f"{key}_s"] for s in slices) / max(n, 1)
    r["vs_in_process"] = r["images_per_s"] / in_process
    return r


def run_load(*args, latencies: bool = False) -> dict:
    """One level in a fresh event loop: uvloop when installed (it is, with uvicorn[standard]), so that the
    generator, which shares the CPU with the server, costs as little of it as it can. ``latencies``: keep every
    answer's latency (ms, an array) under ``latencies_ms``."""
    try:
        import uvloop

        r = uvloop.run(load(*args))
    except ImportError:
        r = asyncio.run(load(*args))
    if not latencies:
        del r["latencies_ms"]
    return r


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a bundle from mcc-export (default: train and export one)")
    parser.add_argument("--image-size", type=int, help="S: without --bundle, train at 3xSxS; send SxS RGB PNGs")
    parser.add_argument("--seconds", type=float, default=6.0, help="load per level and configuration, in all")
    parser.add_argument("--rounds", type=int, default=3, help="slices each level is measured in, in turn")
    parser.add_argument("--reference-seconds", type=float, default=1.0, help="in-process reference between rounds")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32", help="the bundle's model to serve")
    parser.add_argument("--configs", nargs="+", choices=list(BATCHING), default=list(BATCHING))
    parser.add_argument("--baseline-rev", help="also serve this git revision's mcc-serve, with its defaults")
    parser.add_argument("--out", default="serve_load", help="results file name under benchmarks/results/")
    args = parser.parse_args()
    if args.baseline_rev and args.precision != "fp32":
        parser.error("--baseline-rev serves fp32 (a revision before --precision has no such option)")
    return args


def start_servers(args: argparse.Namespace, bundle: Path, tmp: Path, servers: dict[str, ServerProcess]) -> None:
    """Every configuration's server into ``servers``, which the caller stops whatever happens."""
    for mode in args.configs:
        servers[mode] = ServerProcess(bundle, [*BATCHING[mode], "--precision", args.precision])
    if args.baseline_rev:  # that revision's mcc-serve with its own defaults, side by side with ours
        servers[f"{args.baseline_rev} defaults"] = ServerProcess(bundle, [], tree=checkout(args.baseline_rev, tmp))


def measure_levels(args, servers: dict[str, ServerProcess], reference: InProcess, pngs, levels) -> dict[str, dict]:
    """Every level on every server, in rounds taken in turn; ``MODE/CONCURRENCY/IMAGES_PER_REQUEST`` -> result."""
    results = {}
    turn = 0  # which configuration goes first, counted across levels so that each is first as often
    for c, per in levels:
        slices = {mode: [] for mode in servers}
        references = []
        for _ in range(args.rounds):
            references.append(reference.images_per_s(args.reference_seconds))
            first, turn = turn % len(servers), turn + 1
            for mode in list(servers)[first:] + list(servers)[:first]:  # the first after the reference runs slower
                slices[mode].append(measure(servers[mode], pngs, c, args.seconds / args.rounds, per))
        references.append(reference.images_per_s(args.reference_seconds))
        for mode in servers:
            results[f"{mode}/{c}/{per}"] = r = combine(slices[mode], references)
            print(f"concurrency {c}, {per} img/request, {mode}: {r['rps']:.0f} req/s", file=sys.stderr)
    return results


def target_checks(results: dict[str, dict], baseline: str | None) -> dict[str, tuple[float, str] | None]:
    def ratio(a: str, b: str, c: int, key: str = "rps") -> float | None:
        x, y = results.get(f"{a}/{c}/1"), results.get(f"{b}/{c}/1")
        return x[key] / y[key] if x and y else None

    def check(value, where):
        return None if value is None else (value, where)

    on1, off1 = results.get("default/1/1"), results.get("off/1/1")
    checks = {
        "concurrency 1: default p50 - batching off p50, ms (<= 0.5)": check(
            on1 and off1 and on1["p50_ms"] - off1["p50_ms"], "default vs off, concurrency 1"
        )
    }
    for c in (32, 64):
        checks[f"concurrency {c}: default / 5 ms delay throughput (>= 1)"] = check(
            ratio("default", "5 ms delay", c), f"concurrency {c}"
        )
        if baseline:
            checks[f"concurrency {c}: default / {baseline} throughput"] = check(
                ratio("default", baseline, c), f"concurrency {c}"
            )
    best8 = [r["vs_in_process"] for k, r in results.items() if k.endswith("/8/8") and k.split("/")[0] in BATCHING]
    checks["8-image requests: best images/s vs in-process"] = check(max(best8, default=None), "concurrency 8")
    return checks


def report(args, meta: dict, model_ms: float, results: dict[str, dict], levels, modes: list[str]) -> None:
    baseline = f"{args.baseline_rev} defaults" if args.baseline_rev else None
    columns = {  # header -> the result's key
        "req/s": "rps",
        "img/s": "images_per_s",
        "p50 ms": "p50_ms",
        "p99 ms": "p99_ms",
        "server CPU ms/req": "server_cpu_ms_per_request",
        "of it, event loop": "loop_cpu_ms_per_request",
        "in-process img/s": "in_process_images_per_s",
        "vs in-process": "vs_in_process",
        "errors": "errors",
    }
    rows = []
    for mode in modes:
        for c, per in levels:
            r = results[f"{mode}/{c}/{per}"]
            rows.append([mode, c, per, *(r.get(key, "n/a") for key in columns.values())])
    print(
        f"\n{meta['arch']} {meta['input']['shape'][1:]} on {os.cpu_count()} CPU cores; in-process: decode + preprocess"
        f" + onnxruntime at batch 32, measured before each round and after the last; model latency at batch 1: "
        f"{model_ms:.2f} ms\n"
    )
    headers = ["batching", "concurrency", "img/request", *columns]
    table = print_table(headers, rows)
    print()
    checks = target_checks(results, baseline)
    check_rows = [[k, "n/a", ""] if v is None else [k, f"{v[0]:.2f}", v[1]] for k, v in checks.items()]
    check_table = print_table(["target", "measured", "where"], check_rows)
    payload = {
        "arch": meta["arch"],
        "input": meta["input"]["shape"][1:],
        "image_size": args.image_size,
        "seconds_per_level": args.seconds,
        "rounds": args.rounds,
        "precision": args.precision,
        "configurations": {m: BATCHING[m] for m in args.configs},
        "baseline_rev": args.baseline_rev,
        "model_ms_batch1": model_ms,
        "results": results,
    }
    name = args.out if args.precision == "fp32" else f"{args.out}_{args.precision}"
    write_json(name, {**payload, "checks": checks, "table": table, "check_table": check_table})


def main() -> None:
    args = parse_args()
    pngs = digit_pngs(size=args.image_size)
    levels = [(c, 1) for c in args.concurrency] + [(8, 8)]  # one-image requests, then 8 images share the HTTP cost
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or make_bundle(Path(tmp), args.image_size)
        meta = json.loads((bundle / "model.json").read_text())
        reference = InProcess(bundle, pngs, precision=args.precision)
        model_ms = reference.model_ms_batch1()
        servers = {}
        try:
            start_servers(args, bundle, Path(tmp), servers)
            results = measure_levels(args, servers, reference, pngs, levels)
        finally:
            for server in servers.values():
                server.stop()
            if args.baseline_rev:
                worktree = ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(tmp) / "baseline")]
                subprocess.run(worktree, check=False, capture_output=True)
    report(args, meta, model_ms, results, levels, list(servers))


if __name__ == "__main__":
    main()
