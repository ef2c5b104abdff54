"""mcc-predict: the top-k classes of image files into a CSV, through the same ``Classifier`` service mcc-serve runs.

A bundle needs no torch. A checkpoint is read by the loader ``export`` registers (the ``mcc.model_loaders`` entry
point), which needs torch; mcc_serve itself never imports it. Exit codes: 0 at least one image predicted, 2 bad input
or no image readable (one line on stderr). Files that cannot be read are listed on stderr and skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import sys
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from .runtime.bundle import BundleError
from .runtime.choices import DEVICES, IMAGE_SUFFIXES
from .runtime.errors import ImageError
from .runtime.offline import InputError, check_output, find_images, is_bundle
from .runtime.service import DEFAULT_TOP_K, Classifier, Label, Model, load_bundle

MODEL_LOADERS = "mcc.model_loaders"  # entry point group: "checkpoint" -> (path, device, weights) -> Model

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
    p.add_argument("--device", choices=DEVICES, default="auto", help="default: CUDA when available")
    p.add_argument(
        "--workers", type=int, default=2, metavar="N", help="threads that decode and preprocess images (default: 2)"
    )
    p.add_argument("--ema", action="store_true", help="with a checkpoint: its EMA weights (mcc-train --model-ema)")
    return p


def load_model(path: str, device: str, ema: bool = False) -> Model:
    """A bundle through onnxruntime alone, or a checkpoint through the loader ``export`` registers (torch)."""
    if is_bundle(path):
        if ema:
            raise InputError("--ema applies to a checkpoint; a bundle holds the weights it was exported with")
        return load_bundle(path, device)
    loaders = entry_points(group=MODEL_LOADERS, name="checkpoint")
    if not loaders:
        raise InputError(f"{path}: reading a checkpoint needs mcc's export package and torch; pass a bundle")
    try:
        load = next(iter(loaders)).load()
    except ImportError as e:
        raise InputError(f"{path}: reading a checkpoint needs torch ({e}); install it, or pass a bundle") from None
    return load(path, device, "ema" if ema else "model")


async def classify_files(
    classifier: Classifier, files: Sequence[Path], k: int, window: int
) -> AsyncIterator[tuple[Path, list[Label] | str]]:
    """Each file's top-k labels, or the reason it was skipped, in input order; ``window`` files in flight at once,
    so the service's batcher fills its batches while the next files are decoded."""

    async def one(path: Path) -> list[Label] | str:
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as e:
            return f"{path} cannot be read ({e.strerror or e})"
        try:
            return (await classifier.predict([(str(path), data)], k))[0]
        except ImageError as e:
            return str(e)

    pending: deque[tuple[Path, asyncio.Task]] = deque()
    for path in files:
        pending.append((path, asyncio.ensure_future(one(path))))
        if len(pending) >= window:
            head, task = pending.popleft()
            yield head, await task
    while pending:
        head, task = pending.popleft()
        yield head, await task


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


def check_args(args: argparse.Namespace) -> None:
    for flag, value, least in (
        ("--top-k", args.top_k, 1),
        ("--batch-size", args.batch_size, 1),
        ("--workers", args.workers, 0),
    ):
        if value is not None and value < least:
            raise InputError(f"{flag} must be >= {least}, got {value}")
    if args.out != "-":
        check_output(args.out, "file")


def predict(args: argparse.Namespace) -> int:
    check_args(args)
    model = load_model(args.model, args.device, args.ema)
    k = min(args.top_k or DEFAULT_TOP_K, model.num_classes)
    files, missing = find_images(args.paths)
    for message in missing:
        print(f"mcc-predict: skipped {message}", file=sys.stderr)
    if not files:
        raise InputError(f"no image files in {' '.join(args.paths)} (looked for {' '.join(sorted(IMAGE_SUFFIXES))})")
    with open_output(args.out) as f:
        done, skipped = asyncio.run(write_predictions(f, model, files, k, args))
    where = "stdout" if args.out == "-" else args.out
    summary = f"mcc-predict: {done} image{'' if done == 1 else 's'} -> {where}"
    print(summary + (f" ({skipped + len(missing)} skipped)" if skipped + len(missing) else ""), file=sys.stderr)
    return 0


async def write_predictions(f: TextIO, model: Model, files: list[Path], k: int, args) -> tuple[int, int]:
    """(images written, files skipped); InputError when none could be read."""
    window = 2 * args.batch_size
    classifier = Classifier(
        model,
        max_batch_size=args.batch_size,
        max_queue=window,
        timeout_s=float("inf"),
        preprocess_threads=args.workers,
        inline_pixels=0,  # every image to the pool: the model runs while the next ones decode
    )
    done = skipped = 0
    try:
        classifier.start()
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path"] + [f"{col}_{i}" for i in range(1, k + 1) for col in ("label", "prob")])
        with tqdm(total=len(files), unit="img", disable=None, file=sys.stderr) as bar:
            async for path, result in classify_files(classifier, files, k, window):
                bar.update(1)
                if isinstance(result, str):
                    bar.write(f"mcc-predict: skipped {result}", file=sys.stderr)
                    skipped += 1
                    continue
                writer.writerow([path, *(v for label in result for v in (label.label, f"{label.probability:.6f}"))])
                done += 1
    finally:
        await classifier.stop()
    if done == 0:
        raise InputError(f"none of the {len(files)} image files could be read (each is listed above)")
    return done, skipped


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
