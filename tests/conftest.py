"""Shared fixtures: small real-looking data made on the fly, and the commands' entry points."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# resnet10t at 16x16 on 128 digits: a real training run in seconds on 2 cores
FAST_TRAIN = [
    "--arch",
    "resnet10t",
    "--img-size",
    "16",
    "--subset",
    "128",
    "--batch-size",
    "32",
    "--workers",
    "0",
    "--no-progress",
]


def make_imagefolder(root: Path, classes=("cat", "dog", "fish"), per_class=6, size=20, mode="RGB") -> Path:
    """ROOT/train/<class>/*.png and ROOT/val/<class>/*.png with class-dependent colours."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.full((size, size, 3), 60 * c + 20, dtype=np.uint8)
                img = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).convert(mode).save(folder / f"{i}.png")
    return root


def run_cli(module: str, *args, timeout=600, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` as a user would; returns the completed process (text output)."""
    return subprocess.run(
        [PYTHON, "-m", module, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One finished 2-epoch MC run on digits, shared by tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run")
    proc = run_cli("mcc_train", *FAST_TRAIN, "--epochs", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


def make_checkpoint(
    path: Path, arch: str, head: str = "mc", img_size: int = 32, in_chans: int = 3, seed: int = 0, **config
):
    """A checkpoint as mcc-train writes it, for an arch we do not train in tests; weights perturbed off init.

    ``config``: further TrainConfig fields (MC settings, ``model_kwargs``) the model is built with.
    """
    import torch

    from mcc_train import TrainConfig, create_model, save_checkpoint
    from mcc_train.data import build_data_config

    torch.manual_seed(seed)
    cfg = TrainConfig(arch=arch, head=head, img_size=img_size, in_chans=in_chans, epochs=1, **config)
    model = create_model(
        arch,
        10,
        head=head,
        in_chans=in_chans,
        img_size=img_size,
        mc=cfg.mc(),
        loss=cfg.loss,
        margin=cfg.margin,
        margin_scale=cfg.margin_scale,
        **cfg.model_kwargs,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    dc = build_data_config(model, img_size, in_chans, cfg.crop_pct, cfg.interpolation)
    dc = {k: list(v) if isinstance(v, tuple) else v for k, v in dc.items()}
    save_checkpoint(
        {
            "arch": arch,
            "head": head,
            "num_classes": 10,
            "in_chans": in_chans,
            "class_names": [str(i) for i in range(10)],
            "model": model.state_dict(),
            "optimizer": {},
            "scheduler": {},
            "scaler": None,
            "epoch": 1,
            "config": cfg.to_dict(),
            "data_config": dc,
            "metrics": {"top1": 10.0},
            "best_top1": 10.0,
            "best_epoch": 1,
        },
        path,
    )
    return path
