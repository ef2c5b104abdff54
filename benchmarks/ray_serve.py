"""mcc-serve on Ray Serve (``mcc[ray]``): 1 and 2 replicas against plain mcc-serve, on this machine, in one run.

The same bundle, the same load as benchmarks/serve_load.py (one-image /v1/predict requests of real digit PNGs from
``--concurrency`` keep-alive clients, ``--seconds`` each): plain ``mcc-serve`` with its defaults; then a local Ray
instance serving ``mcc_serve.ray_app:build`` with 1 replica and with 2 (one onnxruntime thread each), through Ray's
HTTP proxy. What it shows on a small machine is the proxy's cost per request, not scaling: every request crosses
the proxy and an actor call before it reaches a replica's own batcher.

    python benchmarks/ray_serve.py [--bundle DIR] [--seconds 4] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import print_table, write_json  # noqa: E402
from benchmarks.serve_load import ServerProcess, digit_pngs, make_bundle, run_load  # noqa: E402


def ray_levels(bundle: Path, pngs: list[bytes], replicas: list[int], concurrency: int, seconds: float) -> dict:
    import ray
    from ray import serve

    from mcc_serve.ray_app import build
    from tests.serve.conftest import free_port

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    out = {}
    try:
        for n in replicas:
            args = {"bundle": str(bundle), "num_replicas": n, "intra_op_threads": 1 if n > 1 else 0}
            serve.run(build(args), name="mcc", route_prefix="/")
            time.sleep(3)  # the replicas' warm-up
            out[f"Ray Serve, {n} replica{'s' if n > 1 else ''}"] = run_load(
                f"http://127.0.0.1:{port}", pngs, concurrency, seconds, 1
            )
            serve.delete("mcc")
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a bundle from mcc-export (default: train and export one)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    pngs = digit_pngs()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or make_bundle(Path(tmp))
        server = ServerProcess(bundle, [])
        try:
            results = {"mcc-serve (1 worker)": run_load(server.url, pngs, args.concurrency, args.seconds, 1)}
        finally:
            server.stop()
        results |= ray_levels(bundle, pngs, [1, 2], args.concurrency, args.seconds)
    base = results["mcc-serve (1 worker)"]["rps"]
    rows = [
        [name, args.concurrency, r["rps"], r["p50_ms"], r["p99_ms"], f"{r['rps'] / base:.2f}x", r["errors"]]
        for name, r in results.items()
    ]
    print()
    table = print_table(["server", "concurrency", "req/s", "p50 ms", "p99 ms", "vs mcc-serve", "errors"], rows)
    write_json(
        "ray_serve", {"concurrency": args.concurrency, "seconds": args.seconds, "results": results, "table": table}
    )


if __name__ == "__main__":
    main()
