"""CUDA: AMP and channels_last training, then export parity. Skipped where no GPU is visible."""

import pytest
import torch

from export import ExportConfig, export_checkpoint
from mcc_train.checkpoint import load_checkpoint
from mcc_train.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_amp_channels_last_training_and_export(tmp_path):
    args = ["--arch", "resnet18", "--img-size", "32", "--subset", "256", "--batch-size", "64", "--epochs", "2",
            "--device", "cuda", "--workers", "2", "--no-progress", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())  # loadable anywhere
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    report = export_checkpoint(ExportConfig(str(tmp_path / "run" / "last.pt"), str(tmp_path / "b"), latency_runs=5))
    assert report.passed
