"""What a run writes besides checkpoints (rank 0 only): config.yaml, metrics.csv, curves.png, the epoch log line,
and TensorBoard events under ``OUT/tensorboard`` when the ``tensorboard`` package is installed."""

from __future__ import annotations

import csv
import importlib.util
import logging
import shutil
from pathlib import Path

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
RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "curves.png", "config.yaml")  # what a new --overwrite run replaces


class RunLog:
    """The run's record in ``out``; ``start`` writes config.yaml, ``epoch`` appends one row everywhere."""

    def __init__(self, out: Path, cfg: TrainConfig, start_epoch: int):
        self.out, self.cfg = out, cfg
        self.rows = read_metrics(out / "metrics.csv", start_epoch)
        self.writer = None

    def start(self, skipped_images: list[str]) -> None:
        """Create ``out`` and write config.yaml; a new run first clears an older run's files (--overwrite)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.cfg.resume:
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / "tensorboard", ignore_errors=True)
        save_yaml(self.cfg, self.out / "config.yaml", skipped_images)
        if self.cfg.tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=len(self.rows) + 1)

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
            )  # fmt: skip
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
        if self.writer is not None:
            self.writer.close()


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
