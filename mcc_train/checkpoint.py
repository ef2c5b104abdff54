"""The mcc checkpoint: a versioned schema, atomic writes, and loading with clear errors.

Schema (version 1), a dict of plain types and tensors, loadable with ``torch.load(weights_only=True)``:

- ``format``: ``"mcc-checkpoint"``; ``version``: 1
- ``arch``, ``head`` (``"mc"`` | ``"linear"``), ``num_classes``, ``in_chans``, ``class_names``
- ``model``: the model's state_dict (an MC head adds ``<classifier>.log_var`` to the vanilla keys)
- ``optimizer``, ``scheduler``, ``scaler`` (or None): state to resume exactly
- ``epoch``: epochs completed; ``metrics``: that epoch's eval metrics; ``best_top1``, ``best_epoch``
- ``config``: the TrainConfig as a dict; ``data_config``: timm's eval preprocessing (input_size, mean, std,
  interpolation, crop_pct)
- optional: ``model_ema`` (with --model-ema: the EMA weights, the same keys as ``model``) and ``metrics_ema``;
  ``schedule`` (``epochs``, ``updates_per_epoch``, ``sched``: what the saved scheduler state was planned for);
  ``early_stopped`` (--early-stop-patience ended the run here)
"""

from __future__ import annotations

import os
import pickle
import secrets
import zipfile
from pathlib import Path

import torch

from .errors import UsageError

FORMAT = "mcc-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("arch", "head", "num_classes", "in_chans", "class_names", "model", "epoch", "config", "data_config")


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    A crash at any point leaves either the old file or the new one, never a partial one. The file gets the mode any
    new file gets (0o666 less the umask: 0o644 under umask 022), not tempfile.mkstemp's 0o600.
    """
    path = Path(path)
    # NOTE: created with 0o666 so the kernel applies the umask (or the directory's default ACL) as for any new file;
    # reading the umask instead (os.umask(0) then os.umask(old)) would change it for every thread in between.
    # O_EXCL and a random name: never a file someone else has open. ``write`` truncates it and keeps its mode.
    tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp"))
    try:  # created inside the try: a Ctrl-C right after os.open still removes it
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_state(
    *,
    cfg,
    data,
    model,
    optimizer,
    scheduler,
    scaler,
    ema,
    epoch: int,
    metrics: dict,
    best: tuple,
    schedule: dict,
    early_stopped: bool = False,
) -> dict:
    """The checkpoint dict of the schema above. ``data``: (class_names, in_chans, data_config); ``best``:
    (best_top1, best_epoch); ``ema``: timm's ModelEmaV3 or None."""
    class_names, in_chans, data_config = data
    state = {
        "arch": cfg.arch,
        "head": cfg.head,
        "num_classes": len(class_names),
        "in_chans": in_chans,
        "class_names": list(class_names),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "epoch": epoch,
        "config": cfg.to_dict(),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "metrics": {k: v for k, v in metrics.items() if not k.startswith("ema_")},
        "best_top1": best[0],
        "best_epoch": best[1],
        "schedule": schedule,
        "early_stopped": early_stopped,
    }
    if ema is not None:
        state["model_ema"] = ema.module.state_dict()
        state["metrics_ema"] = {k.removeprefix("ema_"): v for k, v in metrics.items() if k.startswith("ema_")}
    return state


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
