"""torchrun with 2 CPU processes (gloo): what a user expects of a DDP run."""

import csv
import re

import torch

from mcc_train import create_model
from mcc_train.checkpoint import load_checkpoint
from mcc_train.config import TrainConfig
from mcc_train.data import build_transforms, load_data, set_transforms
from mcc_train.train import Runtime, build_loaders, evaluate

from ..conftest import FAST_TRAIN, run_cli


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    args = [*FAST_TRAIN, "--batch-size", "16", "--epochs", "2", "--out", out]
    proc = run_cli("torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mcc_train", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    # 128 images over 2 ranks, 16 per batch: 4 steps per rank, not 8
    assert re.search(r"cpu x2, 4 steps/epoch per rank", log), log[-2000:]
    assert len(re.findall(r"^epoch 1/2 ", log, re.M)) == 1  # metrics logged once, by rank 0
    assert log.count("mcc-train: done:") == 1
    assert {p.name for p in out.iterdir()} - {"tensorboard"} == {"best.pt", "config.yaml", "curves.png", "last.pt",
                                                               "metrics.csv"}  # fmt: skip
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]

    # the checkpoint loads into a single-process model and evaluates to the recorded metrics
    ckpt = load_checkpoint(out / "last.pt")
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = create_model(ckpt["arch"], ckpt["num_classes"], in_chans=ckpt["in_chans"])
    model.load_state_dict(ckpt["model"])
    splits = load_data(cfg.data)
    dc = ckpt["data_config"]
    set_transforms(splits, *build_transforms(dc, 0.0, tuple(cfg.scale)), ckpt["in_chans"])
    _, _, val_loader = build_loaders(splits, cfg, Runtime(torch.device("cpu")))
    metrics = evaluate(model, val_loader, Runtime(torch.device("cpu")))
    assert abs(metrics["top1"] - float(rows[-1]["top1"])) < 1e-6
    assert abs(metrics["eval_loss"] - float(rows[-1]["eval_loss"])) < 1e-4


def test_torchrun_with_a_frozen_epoch_accumulation_balanced_draws_and_ema(tmp_path):
    out = tmp_path / "ddp"
    args = [*FAST_TRAIN, "--batch-size", "16", "--epochs", "2", "--out", out, "--freeze-backbone-epochs", "1",
            "--grad-accum-steps", "2", "--balanced-sampler", "--model-ema"]  # fmt: skip
    proc = run_cli("torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mcc_train", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    # 4 micro-batches per rank and epoch, 2 per update: the head steps in both epochs, the backbone (frozen in the
    # first, then under a rebuilt DDP) in the second only
    assert steps == {2, 4}
    assert ckpt["model_ema"].keys() == ckpt["model"].keys() and ckpt["metrics_ema"]["top1"] >= 0
