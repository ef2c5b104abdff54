"""mcc-export: write a verified bundle from a checkpoint, or re-verify a bundle.

Exit codes: 0 success, 1 a verification check failed, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mcc_train import UsageError

from .exporter import ExportConfig, VerificationError, export_checkpoint
from .proof import verify_bundle
from .quantize import CALIBRATION_IMAGES

EPILOG = """examples:
  mcc-export runs/demo/best.pt --out bundles/demo             # collapse, write ONNX, prove it is vanilla
  mcc-export runs/demo/best.pt --out bundles/demo --fp16 --overwrite
  mcc-export runs/demo/best.pt --out bundles/demo-int8 --int8  # + model_int8.onnx, its top-1 in parity.json
  mcc-export runs/demo/best.pt --out bundles/demo-ema --ema    # the EMA weights (mcc-train --model-ema)
  mcc-export --verify bundles/demo                            # re-check a bundle (non-zero exit on failure)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcc-export",
        description="Collapse an MC checkpoint to its mean head, export ONNX, and prove it is a vanilla timm model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", nargs="?", help="an mcc-train checkpoint (last.pt or best.pt)")
    p.add_argument("--out", metavar="BUNDLE_DIR", help="bundle directory to write (written whole, or not at all)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: as trained)")
    p.add_argument("--fp16", action="store_true", help="also write model_fp16.onnx and report its error")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write model_int8.onnx (onnxruntime static QDQ quantization, calibrated on training images) and "
        "record its top-1 beside fp32's",
    )
    p.add_argument(
        "--calibration-images",
        type=int,
        default=CALIBRATION_IMAGES,
        help=f"training images --int8 calibrates on (default: {CALIBRATION_IMAGES})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights (mcc-train --model-ema)")
    p.add_argument("--verify", metavar="BUNDLE_DIR", help="verify an existing bundle instead of exporting")
    p.add_argument("--source", metavar="CHECKPOINT", help="with --verify: the source checkpoint, if it moved")
    p.add_argument("--latency-runs", type=int, default=50, help="interleaved runs per model for the latency ratio")
    p.add_argument("-v", "--verbose", action="store_true", help="log each step")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s", force=True)
    try:
        if args.latency_runs < 1:
            raise UsageError(f"--latency-runs must be >= 1, got {args.latency_runs}")
        if args.verify:
            if args.checkpoint or args.out or args.ema or args.int8:
                raise UsageError(
                    "--verify BUNDLE_DIR takes no CHECKPOINT, --out, --ema or --int8 (model.json says what it holds)"
                )
            report = verify_bundle(args.verify, args.source, latency_runs=args.latency_runs)
            print(report.table())
            return 0 if report.passed else 1
        if not args.checkpoint or not args.out:
            raise UsageError("give a CHECKPOINT and --out BUNDLE_DIR (or --verify BUNDLE_DIR)")
        cfg = ExportConfig(
            args.checkpoint,
            args.out,
            opset=args.opset,
            fp16=args.fp16,
            int8=args.int8,
            calibration_images=args.calibration_images,
            overwrite=args.overwrite,
            image_size=tuple(args.image_size) if args.image_size else None,
            latency_runs=args.latency_runs,
            weights="ema" if args.ema else "model",
        )
        try:
            report = export_checkpoint(cfg)
        except VerificationError as failed:
            print(failed.report.table())
            print(
                f"mcc-export: error: the export of {args.checkpoint} failed verification; nothing was written",
                file=sys.stderr,
            )
            return 1
        print(report.table())
        names = ", ".join(sorted(p.name for p in Path(args.out).iterdir()))
        print(f"mcc-export: wrote {args.out}/ ({names})")
        return 0
    except UsageError as e:
        print(f"mcc-export: error: {e}", file=sys.stderr)
        return 2
