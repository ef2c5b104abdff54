"""Latency of exported MC models against their vanilla timm twins: onnxruntime, same session options.

For each arch: an MC model (weights perturbed off init, as after training) is collapsed and exported the way
mcc-export does; the vanilla timm model with the same weights is exported the same way; both run in one process,
interleaved, at batch 1 and 32. A ratio of 1.00 within noise is the claim "zero test-time cost".

    python benchmarks/export_parity.py [--runs 30] [--archs resnet18 ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import print_table, write_json  # noqa: E402
from export.collapse import collapse, collapsed_state_dict, vanilla_model  # noqa: E402
from export.measure import measure_latency  # noqa: E402
from export.onnx_graph import count_flops, export_onnx, graph_signature  # noqa: E402
from mcc_train import create_model  # noqa: E402

ARCHS = {  # arch: input size (C, H, W)
    "resnet18": (3, 32, 32),
    "mobilenetv3_small_100": (3, 32, 32),
    "convnext_atto": (3, 32, 32),
    "vit_tiny_patch16_224": (3, 32, 32),
    "resnet50": (3, 64, 64),
    "deit_small_patch16_224": (3, 64, 64),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30, help="interleaved runs per model and batch size")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    args = parser.parse_args()
    rows, record = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            size = ARCHS[arch]
            torch.manual_seed(0)
            mc = create_model(arch, 100, img_size=size[-1]).eval()
            with torch.no_grad():
                for p in mc.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            vanilla = vanilla_model(arch, 100, size[0], size[-1])
            vanilla.load_state_dict(collapsed_state_dict(mc), strict=True)
            ours, theirs = Path(tmp) / f"{arch}.onnx", Path(tmp) / f"{arch}_vanilla.onnx"
            export_onnx(collapse(mc), ours, size, 18)
            export_onnx(vanilla, theirs, size, 18)
            same_graph = graph_signature(onnx.load(str(ours))) == graph_signature(onnx.load(str(theirs)))
            mflops = count_flops(onnx.load(str(ours))) / 1e6
            latency = measure_latency(ours, theirs, size, args.runs, batches=(1, 32))
            record[arch] = {"input": size, "mflops": mflops, "same_graph": same_graph, "latency": latency}
            same, shape = "yes" if same_graph else "NO", f"{size[1]}x{size[2]}"
            for batch, r in latency.items():
                rows.append(
                    [arch, shape, batch, f"{mflops:.1f}", same, r["vanilla_ms"], r["ours_ms"], f"{r['ratio']:.3f}"]
                )
            print(f"{arch}: done", file=sys.stderr)
    print(f"\nonnxruntime CPU latency, 100 classes, medians of {args.runs} interleaved runs\n")
    table = print_table(
        ["arch", "input", "batch", "MFLOPs/img", "same graph", "vanilla ms", "MC-export ms", "ratio"], rows
    )
    write_json("export_parity", {"runs": args.runs, "results": record, "table": table})


if __name__ == "__main__":
    main()
