"""mcc-predict: the top-k classes of image files, from a bundle (no torch needed) or a checkpoint, into a CSV.

Exit codes: 0 at least one image predicted, 2 bad input or no image readable (one line on stderr). Files that
cannot be read are listed on stderr and skipped.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from mcc_serve.runtime.bundle import BundleError
from mcc_serve.runtime.offline import (
    IMAGE_SUFFIXES,
    InputError,
    OfflineModel,
    check_output,
    find_images,
    is_bundle,
    load_bundle,
    predict_files,
)

EPILOG = """examples:
  mcc-predict bundles/demo photos/                            # every image under photos/ -> predictions.csv
  mcc-predict bundles/demo a.png b.jpg --top-k 3 --out -      # CSV on stdout
  mcc-predict runs/demo/best.pt list.txt --out preds.csv      # a checkpoint (needs torch); list.txt: one path a line
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcc-predict",
        description="Predict the top-k classes of image files with a bundle (onnxruntime, preprocessed as "
        "mcc-serve does) or an mcc-train checkpoint, and write them as CSV.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="a bundle directory (mcc-export) or a checkpoint (mcc-train)")
    p.add_argument(
        "paths",
        metavar="PATH",
        nargs="+",
        help="an image file, a folder (searched recursively) or a .txt/.lst file listing one path per line",
    )
    p.add_argument("--top-k", type=int, metavar="K", help="classes per image (default: 5, at most the model's classes)")
    p.add_argument(
        "--out", default="predictions.csv", metavar="CSV", help="CSV to write, - for stdout (default: predictions.csv)"
    )
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per model run (default: 64)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA when available")
    p.add_argument(
        "--workers", type=int, default=2, metavar="N", help="threads that decode and preprocess images (default: 2)"
    )
    p.add_argument("--ema", action="store_true", help="with a checkpoint: its EMA weights (mcc-train --model-ema)")
    return p


def load_model(path: str, device: str, ema: bool = False) -> OfflineModel:
    """A bundle through onnxruntime alone, or a checkpoint through torch (imported only then)."""
    if is_bundle(path):
        if ema:
            raise InputError("--ema applies to a checkpoint; a bundle holds the weights it was exported with")
        return load_bundle(path, device)
    try:
        from mcc_train import UsageError

        from .evaluate import load_checkpoint_model
    except ImportError as e:
        raise InputError(f"{path}: reading a checkpoint needs torch ({e}); install it, or pass a bundle") from None
    try:
        return load_checkpoint_model(path, device, weights="ema" if ema else "model")
    except UsageError as e:
        raise InputError(str(e)) from None


@contextmanager
def open_output(out: str) -> Iterator[TextIO]:
    """stdout for ``-``; else a temporary file beside ``out``, renamed into place only when the block succeeds."""
    if out == "-":
        yield sys.stdout
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def predict(args: argparse.Namespace) -> int:
    for flag, value, least in (("--top-k", args.top_k, 1), ("--batch-size", args.batch_size, 1),
                               ("--workers", args.workers, 0)):  # fmt: skip
        if value is not None and value < least:
            raise InputError(f"{flag} must be >= {least}, got {value}")
    if args.out != "-":
        check_output(args.out, "file")
    model = load_model(args.model, args.device, args.ema)
    k = min(args.top_k or 5, model.num_classes)
    files, missing = find_images(args.paths)
    for message in missing:
        print(f"mcc-predict: skipped {message}", file=sys.stderr)
    if not files:
        raise InputError(f"no image files in {' '.join(args.paths)} (looked for {' '.join(sorted(IMAGE_SUFFIXES))})")
    done, skipped = 0, len(missing)
    with open_output(args.out) as f, tqdm(total=len(files), unit="img", disable=None, file=sys.stderr) as bar:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path"] + [f"{col}_{i}" for i in range(1, k + 1) for col in ("label", "prob")])
        for predictions, messages in predict_files(model, files, k, args.batch_size, args.workers):
            for message in messages:
                bar.write(f"mcc-predict: skipped {message}", file=sys.stderr)
            for p in predictions:
                row = [p.path]
                for label, prob in zip(p.labels, p.probs, strict=True):
                    row += [label, f"{prob:.6f}"]
                writer.writerow(row)
            done, skipped = done + len(predictions), skipped + len(messages)
            bar.update(len(predictions) + len(messages))
        if done == 0:
            raise InputError(f"none of the {len(files)} image files could be read (each is listed above)")
    where = "stdout" if args.out == "-" else args.out
    print(
        f"mcc-predict: {done} image{'' if done == 1 else 's'} -> {where}"
        + (f" ({skipped} skipped)" if skipped else ""),
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return predict(args)
    except (InputError, BundleError) as e:
        print(f"mcc-predict: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output could not be written after all (disk full, removed directory)
        print(f"mcc-predict: error: {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
