"""What a run writes besides checkpoints (rank 0 only): config.yaml, metrics.csv, curves.png, the epoch log line,
and TensorBoard events under ``OUT/tensorboard`` when the ``tensorboard`` package is installed."""

from __future__ import annotations

import csv
import importlib.util
import logging
import shutil
from pathlib import Path

from mcc_serve.runtime.choices import LOSSES

from .checkpoint import atomic_write
from .config import TrainConfig, save_yaml
from .plots import plot_curves

_logger = logging.getLogger("mcc_train")

METRIC_FIELDS = [
    "epoch",
    "train_loss",
    "eval_loss",
    "top1",
    "top5",
    "ema_top1",
    "lr",
    "sub_center_std",
    "offset_ratio",
    "logit_margin",
    "logit_spread",
    "epoch_time_s",
]
RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "curves.png", "config.yaml")  # what a run in another's --out replaces


class RunLog:
    """The run's record in ``out``; ``start`` writes config.yaml, ``epoch`` appends one row everywhere.

    Args:
        out: the run directory.
        cfg: the run's config.
        start_epoch: epochs already done (a resumed run).
        history: directory whose metrics.csv a resumed run continues (rows up to ``start_epoch``), or None.
        replace: ``out`` may hold another run's files (--overwrite, or a resume into another directory): they are
            set aside in ``out/.replaced`` at ``start``, deleted once this run's first checkpoint is written, and
            put back if the run ends before that.
    """

    def __init__(self, out: Path, cfg: TrainConfig, start_epoch: int, history: Path | None, replace: bool):
        self.out, self.cfg, self.replace = out, cfg, replace
        self.rows = read_metrics(history / "metrics.csv", start_epoch) if history is not None else []
        self.writer, self.set_aside = None, None

    def start(self, splits, model, rt, in_chans: int, channels: str, steps: int) -> None:
        """Create ``out``, set an older run's files aside, write config.yaml, log the run's start-up line."""
        self.out.mkdir(parents=True, exist_ok=True)
        old = [self.out / n for n in (*RUN_FILES, "tensorboard") if (self.out / n).exists()] if self.replace else []
        if old:
            self.set_aside = self.out / ".replaced"
            shutil.rmtree(self.set_aside, ignore_errors=True)
            self.set_aside.mkdir()
            for path in old:
                path.rename(self.set_aside / path.name)
        save_yaml(self.cfg, self.out / "config.yaml", splits.skipped)
        if self.cfg.tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=len(self.rows) + 1)
        cfg = self.cfg
        variant = f" + {LOSSES[cfg.loss].title}" if LOSSES[cfg.loss].has_margin else ""
        params = sum(p.numel() for p in model.parameters()) / 1e6
        amp = f", amp {str(rt.amp_dtype).split('.')[-1]}" if rt.amp_dtype else ""
        _logger.info(
            f"{cfg.arch} {cfg.head} head{variant}, {splits.num_classes} classes, {len(splits.train)} train / "
            f"{len(splits.val)} val images, in_chans {in_chans} ({channels}), {params:.2f}M params, {rt.device} "
            f"x{rt.world_size}{amp}, {steps} steps/epoch per rank"
        )

    def saved(self) -> None:
        """This run's checkpoint is on disk: the older run's files go for good."""
        if self.set_aside is not None:
            shutil.rmtree(self.set_aside, ignore_errors=True)
            self.set_aside = None

    def epoch(self, metrics: dict) -> None:
        """Record one finished epoch: metrics.csv (atomically), curves.png, TensorBoard, the log line."""
        self.rows.append(metrics)
        write_metrics(self.out / "metrics.csv", self.rows)
        plot_curves(self.out / "metrics.csv", self.out / "curves.png")
        if self.writer is not None:
            for key, value in metrics.items():
                if key != "epoch" and value is not None:
                    self.writer.add_scalar(key, value, metrics["epoch"])
            self.writer.flush()
        extras = "".join(
            f"  {name} {metrics[key]:{fmt}}"
            for key, name, fmt in (
                ("top5", "top5", ".2f"),
                ("ema_top1", "ema_top1", ".2f"),
                ("sub_center_std", "std", ".4f"),
            )
            if metrics.get(key) is not None
        )
        _logger.info(
            "epoch %d/%d  train_loss %.4f  eval_loss %.4f  top1 %.2f%s  lr %.2e  (%.1fs)",
            metrics["epoch"],
            self.cfg.epochs,
            metrics["train_loss"],
            metrics["eval_loss"],
            metrics["top1"],
            extras,
            metrics["lr"],
            metrics["epoch_time_s"],
        )

    def close(self) -> None:
        """End the record; a run that wrote no checkpoint puts the older run's files back as they were."""
        if self.writer is not None:
            self.writer.close()
        if self.set_aside is not None:
            for name in RUN_FILES:  # this run's, if any
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / "tensorboard", ignore_errors=True)
            for path in self.set_aside.iterdir():
                path.rename(self.out / path.name)
            self.set_aside.rmdir()


def read_metrics(path: Path, up_to_epoch: int) -> list[dict]:
    """Rows of an earlier metrics.csv for epochs <= up_to_epoch (a resumed run redoes the later ones)."""
    if up_to_epoch == 0 or not path.is_file():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("epoch", "").isdigit() and int(row["epoch"]) <= up_to_epoch]


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Rewrite metrics.csv, one row per epoch, atomically."""

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS} for row in rows)

    atomic_write(path, write)
