"""The mcc checkpoint: a versioned schema, atomic writes, and loading with clear errors.

Schema (version 1), a dict of plain types and tensors, loadable with ``torch.load(weights_only=True)``:

- ``format``: ``"mcc-checkpoint"``; ``version``: 1
- ``arch``, ``head`` (``"mc"`` | ``"linear"``), ``num_classes``, ``in_chans``, ``class_names``
- ``model``: the model's state_dict (an MC head adds ``<classifier>.log_var`` to the vanilla keys)
- ``optimizer``, ``scheduler``, ``scaler`` (or None): state to resume exactly
- ``epoch``: epochs completed; ``metrics``: that epoch's eval metrics; ``best_top1``, ``best_epoch``
- ``config``: the TrainConfig as a dict; ``data_config``: timm's eval preprocessing (input_size, mean, std,
  interpolation, crop_pct)
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import UsageError

FORMAT = "mcc-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("arch", "head", "num_classes", "in_chans", "class_names", "model", "epoch", "config", "data_config")


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    A crash at any point leaves either the old file or the new one, never a partial one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write a checkpoint dict atomically, stamped with the format and version."""
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, "version": VERSION, **state}, tmp))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load and check an mcc checkpoint.

    Raises:
        UsageError: missing, truncated or corrupt file, or not an mcc checkpoint, or a newer schema version.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path}: not a readable checkpoint, truncated or corrupt ({first[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UsageError(
            f"{path}: not an mcc checkpoint (no format: {FORMAT!r}); pass a last.pt or best.pt of mcc-train"
        )
    if ckpt.get("version", 0) > VERSION:
        raise UsageError(
            f"{path}: checkpoint version {ckpt['version']} is newer than this mcc ({VERSION}); upgrade mcc"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UsageError(f"{path}: mcc checkpoint lacks {', '.join(missing)}; it is damaged")
    return ckpt
