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
FAST_TRAIN = ["--arch", "resnet10t", "--img-size", "16", "--subset", "128", "--batch-size", "32", "--workers", "0",
              "--no-progress"]  # fmt: skip


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
