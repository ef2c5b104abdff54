"""curves.png: loss and accuracy per epoch, drawn from metrics.csv."""

from __future__ import annotations

import csv
from pathlib import Path

from .checkpoint import atomic_write


def plot_curves(metrics_csv: str | Path, out_png: str | Path) -> None:
    """Draw train/eval loss and top-1/top-5 against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    keys = ("train_loss", "eval_loss", "top1", "top5", "ema_top1")
    col = {k: [float(r[k]) if r.get(k) else None for r in rows] for k in keys}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(
        epochs, col["train_loss"], "o-", label="train (MC target + L_sigma)" if rows[0]["sub_center_std"] else "train"
    )
    ax_loss.plot(epochs, col["eval_loss"], "o-", label="eval (mean head)")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, col["top1"], "o-", label="top-1")
    for key, label in (("top5", "top-5"), ("ema_top1", "top-1, EMA weights")):  # top-5 only where C > 5
        if all(v is not None for v in col[key]):
            ax_acc.plot(epochs, col[key], "o-", label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="eval accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
