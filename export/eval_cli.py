"""mcc-eval: accuracy, per-class scores and the confusion matrix of a bundle or checkpoint on a --data split.

Exit codes: 0 success, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys

from mcc_serve.runtime.choices import DEVICES, PRECISIONS
from mcc_train import UsageError

from .evaluate import REPORT_FILES, SPLITS, EvalConfig, evaluate, format_report, summarize, write_report

EPILOG = """examples:
  mcc-eval bundles/demo --data digits                         # the served model on the data it was trained on
  mcc-eval runs/demo/best.pt --data digits                    # the checkpoint, as training evaluated it
  mcc-eval bundles/pets --data imagefolder:/data/pets --out reports/pets   # + metrics.json, confusion.png, ...
  mcc-eval bundles/demo-int8 --data digits --precision int8   # the int8 model (mcc-export --int8)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcc-eval",
        description="Evaluate a bundle (its ONNX model, preprocessed as served) or an mcc-train checkpoint on a "
        "split of a dataset: top-1, top-5, per-class precision / recall / F1, confusion matrix.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="a bundle directory (mcc-export) or a checkpoint (mcc-train)")
    p.add_argument(
        "--data",
        required=True,
        metavar="SPEC",
        help="digits | fashion-mnist[:DIR] | imagefolder:ROOT | cifar10:DIR | cifar100:DIR (as mcc-train)",
    )
    p.add_argument("--split", choices=SPLITS, default="val", help="split to evaluate (default: val)")
    p.add_argument(
        "--out", metavar="DIR", help="also write metrics.json, per_class.csv, confusion.png, misclassified.csv here"
    )
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per model run (default: 64)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="default: CUDA when available")
    p.add_argument(
        "--workers", type=int, default=2, metavar="N", help="threads that decode and preprocess images (default: 2)"
    )
    p.add_argument("--skip-bad-images", action="store_true", help="leave unreadable image files of the data out")
    p.add_argument("--ema", action="store_true", help="with a checkpoint: its EMA weights (mcc-train --model-ema)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="with a bundle: run model.onnx (fp32), model_fp16.onnx or model_int8.onnx",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = EvalConfig(
            args.model,
            args.data,
            split=args.split,
            out=args.out,
            batch_size=args.batch_size,
            device=args.device,
            workers=args.workers,
            skip_bad_images=args.skip_bad_images,
            weights="ema" if args.ema else "model",
            precision=args.precision,
        ).validate()
        result = evaluate(cfg)
        metrics = summarize(result, cfg)
        print(format_report(metrics))
        if cfg.out:
            write_report(result, metrics, cfg.out)
            print(f"mcc-eval: wrote {cfg.out}/ ({', '.join(REPORT_FILES)})")
        return 0
    except UsageError as e:
        print(f"mcc-eval: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the report could not be written after all (disk full, removed directory)
        print(f"mcc-eval: error: {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
