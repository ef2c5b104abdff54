"""Image files without a server: find the files a user names, check an output path, and preprocess items in
batches with a thread pool. ``mcc-predict`` runs the files through the ``Classifier`` service; ``mcc-eval`` (in
``export``) runs a labelled split through a bundle or a checkpoint with ``preprocess_batches``.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .choices import IMAGE_SUFFIXES
from .errors import ImageError
from .preprocess import Preprocessor

LIST_SUFFIXES = {".txt", ".lst"}  # a PATH with one of these lists image paths, one per line


class InputError(ValueError):
    """Bad input to an offline command (no such model, a bad option): the message names it and the fix."""


def check_output(path: str | Path, kind: str) -> None:
    """Refuse, before any work, an output path that cannot be written: ``kind`` "file" (a CSV) or "dir" (a report
    directory). Creates nothing (InputError naming the path and the fix)."""
    path = Path(path)
    if path.exists() and (path.is_dir() if kind == "file" else not path.is_dir()):
        what = "a directory" if kind == "file" else "not a directory"
        raise InputError(f"--out {path}: is {what}; give a {'file name' if kind == 'file' else 'directory'}")
    parent = path.parent if kind == "file" else path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"--out {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise InputError(f"--out {path}: {parent} is not writable")


def is_bundle(path: str | Path) -> bool:
    """Whether MODEL is a bundle directory (else a checkpoint file); InputError when it is neither."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such bundle directory or checkpoint file")
    return path.is_dir()


def find_images(paths: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """The image files named by ``paths``, in the order given, and a message for each path that does not exist.

    Each path is an image file (taken as one whatever its suffix), a folder (its files with an image suffix,
    searched recursively, sorted), or a list file (``.txt``, ``.lst``: one image file or folder per line, relative
    to the current directory; blank lines and lines starting with ``#`` are ignored).
    """
    found: list[Path] = []
    missing: list[str] = []

    def add(path: Path, listed_in: Path | None) -> None:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file() and listed_in is None and path.suffix.lower() in LIST_SUFFIXES:
            for line in path.read_text(errors="replace").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    add(Path(line.strip()), path)
        elif path.is_file():
            found.append(path)
        else:
            missing.append(f"{path}: no such file or directory" + (f" (listed in {listed_in})" if listed_in else ""))

    for path in paths:
        add(Path(path), None)
    return found, missing


def load_file(pre: Preprocessor, path: Path) -> np.ndarray:
    """An image file -> float32 (C, H, W), decoded and preprocessed as mcc-serve does (ImageError if unreadable)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path} cannot be read ({e.strerror or e})") from None
    return pre.load(data, str(path))


@dataclass
class Batch:
    items: list  # the items that loaded, in input order
    x: np.ndarray | None  # (N, C, H, W) float32, one row per item; None when none loaded
    skipped: list[str]  # the ImageError message of each item that did not load


def preprocess_batches(
    items: Sequence, load: Callable[[Any], np.ndarray], batch_size: int, workers: int = 0
) -> Iterator[Batch]:
    """``load`` every item into a (C, H, W) array, ``batch_size`` items at a time, in order.

    Args:
        items: what ``load`` takes (file paths, dataset indices).
        load: item -> float32 (C, H, W); an ImageError leaves the item out of its batch, with its message.
        batch_size: items per batch (the last batch may be smaller).
        workers: threads that load the next batch while the caller runs the model on this one (Pillow and numpy
            release the GIL while they decode and resize); 0 loads in the caller's thread, one batch at a time.
    """
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    if workers == 0:
        for chunk in chunks:
            yield _collect(chunk, [_attempt(load, item) for item in chunk])
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="mcc-load") as pool:
        pending: deque[tuple[Sequence, list[Future]]] = deque()
        for chunk in chunks:
            pending.append((chunk, [pool.submit(_attempt, load, item) for item in chunk]))
            if len(pending) > 1:  # one batch ahead of the caller, so at most two batches are held
                yield _collect(*_results(pending.popleft()))
        while pending:
            yield _collect(*_results(pending.popleft()))


def _attempt(load: Callable[[Any], np.ndarray], item) -> np.ndarray | ImageError:
    try:
        return load(item)
    except ImageError as e:
        return e


def _results(job: tuple[Sequence, list[Future]]) -> tuple[Sequence, list]:
    chunk, futures = job
    return chunk, [f.result() for f in futures]


def _collect(chunk: Sequence, results: list) -> Batch:
    kept = [(item, x) for item, x in zip(chunk, results, strict=True) if not isinstance(x, ImageError)]
    skipped = [str(x) for x in results if isinstance(x, ImageError)]
    x = np.stack([x for _, x in kept]) if kept else None  # (N, C, H, W)
    return Batch([item for item, _ in kept], x, skipped)
