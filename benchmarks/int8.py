"""INT8 against fp32 (``mcc-export --int8``, ``mcc-serve --precision int8``): accuracy and speed, in one run.

  accuracy  resnet18 trained on Fashion-MNIST (all 60,000 images, 28x28 as RGB, 2 epochs) and exported with
            --int8: the top-1 of the fp32 and the int8 model on the 10,000 validation images, from parity.json, with a
            95% interval of the change paired by image (one trained model, seed 0)
            (falls back to digits, 32x32 RGB, 10 epochs, where Fashion-MNIST is not installed);
  speed     resnet18 and resnet50 at 224x224 RGB (briefly trained on digits, so calibration sees real images):
            in-process onnxruntime images/s at batch 32, fp32 and int8 interleaved; then served by mcc-serve with its
            defaults at concurrency 32, one-image requests, --precision fp32 and int8, each beside the in-process
            reference of its own precision.

    python benchmarks/int8.py [--seconds 4] [--skip accuracy speed served]

Targets: in-process int8 >= 2x fp32 images/s and served >= 1.5x at 224; top-1 drop <= 0.5 points.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import print_table, write_json  # noqa: E402
from benchmarks.serve_load import BIN, InProcess, ServerProcess, cpu_seconds, digit_pngs, run_load  # noqa: E402
from mcc_serve.runtime.session import create_session  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
# the speed runs: trained briefly, so calibration sees real images
SPEED_TRAIN = "--data digits --img-size 224 --in-chans 3 --subset 64 --epochs 1 --batch-size 32 --workers 0"


def train_and_export(work: Path, name: str, train_args: list[str]) -> Path:
    run, bundle = work / name / "run", work / name / "bundle"
    train = [str(BIN / "mcc-train"), *train_args, "--out", str(run), "--no-progress"]
    subprocess.run(train, check=True, capture_output=True)
    export = [str(BIN / "mcc-export"), str(run / "last.pt"), "--out", str(bundle), "--int8", "--latency-runs", "5"]
    subprocess.run(export, check=True, capture_output=True)
    return bundle


def accuracy(work: Path) -> dict:
    if FASHION.is_dir():
        args = "--data fashion-mnist --arch resnet18 --img-size 28 --in-chans 3 --epochs 2 --batch-size 128 --workers 1"
        what = "resnet18, Fashion-MNIST 28x28 as RGB, 2 epochs"
    else:
        args = "--data digits --arch resnet18 --img-size 32 --in-chans 3 --epochs 10 --workers 0"
        what = "resnet18, digits 32x32 as RGB, 10 epochs"
    bundle = train_and_export(work, "accuracy", args.split())
    int8 = json.loads((bundle / "parity.json").read_text())["int8"]
    return {"model": what, **int8}


def in_process(bundle: Path, pngs: list[bytes], seconds: float) -> dict:
    """Model-only images/s at batch 32, fp32 and int8 alternating, each given ``seconds`` in total."""
    meta = json.loads((bundle / "model.json").read_text())
    sessions = {"fp32": create_session(bundle / "model.onnx"), "int8": create_session(bundle / "model_int8.onnx")}
    x = np.random.default_rng(0).standard_normal((32, *meta["input"]["shape"][1:]), dtype=np.float32)
    spent, images = dict.fromkeys(sessions, 0.0), dict.fromkeys(sessions, 0)
    for s in sessions.values():
        s.run(None, {"input": x})
    while min(spent.values()) < seconds:
        for p, s in sessions.items():
            t = time.perf_counter()
            for _ in range(3):
                s.run(None, {"input": x})
            spent[p] += time.perf_counter() - t
            images[p] += 3 * len(x)
    return {p: images[p] / spent[p] for p in sessions}


def served(bundle: Path, pngs: list[bytes], seconds: float) -> dict:
    out = {}
    for precision in ("fp32", "int8"):
        reference = InProcess(bundle, pngs, precision=precision)
        server = ServerProcess(bundle, ["--precision", precision])
        try:
            before = reference.images_per_s(2)
            cpu0 = cpu_seconds(server.proc.pid)
            r = run_load(server.url, pngs, 32, seconds, 1)
            cpu1 = cpu_seconds(server.proc.pid)
            after = reference.images_per_s(2)
        finally:
            server.stop()
        out[precision] = {
            **r,
            "in_process_images_per_s": (before + after) / 2,
            "server_cpu_ms_per_request": 1000 * (cpu1 - cpu0) / max(r["requests"], 1),
        }
    return out


def met(ok: bool) -> str:
    return "yes" if ok else "NO"


def accuracy_row(acc: dict) -> list:
    drop = acc["top1_fp32"] - acc["top1_int8"]
    low, high = acc["top1_change_ci95"]
    change = f"{-drop:+.2f} points [{low:+.2f}, {high:+.2f}]"
    what = f"top-1 on {acc['val_images']} val images ({acc['model']})"
    fp32, int8 = f"{acc['top1_fp32']:.2f}%", f"{acc['top1_int8']:.2f}%"
    return [what, "fp32 vs int8", fp32, int8, change, "drop <= 0.5", met(drop <= 0.5)]


def in_process_row(arch: str, ips: dict) -> list:
    ratio = ips["int8"] / ips["fp32"]
    what = f"{arch} 3x224x224, in-process, batch 32 (img/s)"
    return [what, "fp32 vs int8", ips["fp32"], ips["int8"], f"{ratio:.2f}x", ">= 2x", met(ratio >= 2)]


def served_rows(arch: str, srv: dict) -> list[list]:
    fp32, int8 = srv["fp32"]["images_per_s"], srv["int8"]["images_per_s"]
    what = f"{arch} 3x224x224, served, concurrency 32 (img/s)"
    rows = [[what, "fp32 vs int8", fp32, int8, f"{int8 / fp32:.2f}x", ">= 1.5x", met(int8 / fp32 >= 1.5)]]
    for p in ("fp32", "int8"):
        r = srv[p]
        what = f"  {arch} served {p}: p50 / p99 ms, server CPU ms/req, vs in-process {p}"
        vs_in_process = f"{r['images_per_s'] / r['in_process_images_per_s']:.2f}x"
        rows.append([what, "", r["p50_ms"], r["p99_ms"], f"{r['server_cpu_ms_per_request']:.2f}", vs_in_process, ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--skip", nargs="*", default=[], choices=("accuracy", "speed", "served"))
    args = parser.parse_args()
    pngs = digit_pngs()
    record, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "accuracy" not in args.skip:
            record["accuracy"] = accuracy(work)
            rows.append(accuracy_row(record["accuracy"]))
        for arch in ("resnet18", "resnet50"):
            if "speed" in args.skip and "served" in args.skip:
                break
            bundle = train_and_export(work, arch, ["--arch", arch, *SPEED_TRAIN.split()])
            if "speed" not in args.skip:
                record[f"{arch}_in_process"] = in_process(bundle, pngs, args.seconds)
                rows.append(in_process_row(arch, record[f"{arch}_in_process"]))
            if "served" not in args.skip:
                record[f"{arch}_served"] = served(bundle, pngs, args.seconds)
                rows += served_rows(arch, record[f"{arch}_served"])
    headers = ["measurement", "compared", "fp32", "int8", "int8 / fp32", "target", "met"]
    print()
    table = print_table(headers, rows)
    write_json("int8", {"results": record, "table": table})


if __name__ == "__main__":
    main()
