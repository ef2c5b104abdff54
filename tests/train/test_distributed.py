"""torchrun with 2 CPU processes (gloo): what a user expects of a DDP run."""

import csv
import re

import pytest
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
    check_a_two_rank_run(out, proc.stdout + proc.stderr)


def check_a_two_rank_run(out, log: str) -> None:
    """What any 2-rank run of 2 epochs on 128 images at batch 16 must show: the steps split, metrics logged once, one
    set of files, and a checkpoint that evaluates to the logged metrics in a single process."""
    assert re.search(r"cpu x2, 4 steps/epoch per rank", log), log[-2000:]  # 4 steps per rank, not 8
    assert len(re.findall(r"^epoch 1/2 ", log, re.M)) == 1  # metrics logged once, by rank 0
    assert log.count("mcc-train: done:") == 1
    written = {"best.pt", "config.yaml", "curves.png", "last.pt", "metrics.csv"}
    assert {p.name for p in out.iterdir()} - {"tensorboard"} == written
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    ckpt = load_checkpoint(out / "last.pt")
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = create_model(ckpt["arch"], ckpt["num_classes"], in_chans=ckpt["in_chans"])
    model.load_state_dict(ckpt["model"])
    splits = load_data(cfg.data)
    set_transforms(splits, *build_transforms(ckpt["data_config"], 0.0, tuple(cfg.scale)), ckpt["in_chans"])
    _, _, val_loader = build_loaders(splits, cfg, Runtime(torch.device("cpu")))
    metrics = evaluate(model, val_loader, Runtime(torch.device("cpu")))
    assert abs(metrics["top1"] - float(rows[-1]["top1"])) < 1e-6
    assert abs(metrics["eval_loss"] - float(rows[-1]["eval_loss"])) < 1e-4


def test_torchrun_with_a_frozen_epoch_accumulation_balanced_draws_and_ema(tmp_path):
    out = tmp_path / "ddp"
    flags = ["--batch-size", "16", "--epochs", "2", "--freeze-backbone-epochs", "1", "--grad-accum-steps", "2"]
    args = [*FAST_TRAIN, *flags, "--balanced-sampler", "--model-ema", "--out", out]
    proc = run_cli("torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mcc_train", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    # 4 micro-batches per rank and epoch, 2 per update: the head steps in both epochs, the backbone (frozen in the
    # first, then under a rebuilt DDP) in the second only
    assert steps == {2, 4}
    assert ckpt["model_ema"].keys() == ckpt["model"].keys() and ckpt["metrics_ema"]["top1"] >= 0


def start_two_nodes(out, *extra) -> list:
    """``mcc-train`` as two torchrun "nodes" of one process each on this machine (c10d rendezvous, as on a cluster:
    one torchrun per node, the same endpoint); each node in a process group of its own."""
    import socket
    import subprocess
    import sys

    from ..conftest import REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*FAST_TRAIN, "--batch-size", "16", "--out", str(out), *map(str, extra)]
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "mcc-test",
                "-m",
                "mcc_train",
                *args,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]


def two_nodes(out, *extra, timeout=600) -> str:
    """Both nodes to the end; their output. Fails the test when either fails."""
    nodes = start_two_nodes(out, *extra)
    try:
        logs = [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:  # a node that failed or hung: nothing of either node outlives the test
        kill_nodes(nodes)
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    return "\n".join(logs)


def kill_nodes(nodes: list) -> None:
    """SIGKILL every process of the nodes: torchrun and its workers, which it starts in sessions of their own."""
    import contextlib
    import os
    import signal

    for pid in [pid for node in nodes for pid in (node.pid, *descendants(node.pid))]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for node in nodes:
        node.communicate()


@pytest.mark.slow
def test_torchrun_two_nodes_split_the_steps_and_log_once(tmp_path):
    out = tmp_path / "nodes"
    check_a_two_rank_run(out, two_nodes(out, "--epochs", "2"))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc)."""
    from pathlib import Path

    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.mark.slow
def test_a_killed_two_node_run_resumes_exactly(tmp_path):
    import time

    two_nodes(tmp_path / "whole", "--epochs", "4")
    out = tmp_path / "killed"
    nodes = start_two_nodes(out, "--epochs", "4")
    deadline = time.time() + 300
    while not (out / "last.pt").exists() and time.time() < deadline and nodes[0].poll() is None:
        time.sleep(0.02)
    kill_nodes(nodes)  # every process of both nodes, as a lost allocation would
    assert load_checkpoint(out / "last.pt")["epoch"] < 4
    two_nodes(tmp_path / "killed", "--resume", out / "last.pt")
    whole, resumed = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(out / "last.pt")
    assert resumed["epoch"] == whole["epoch"] == 4
    for key, value in whole["model"].items():  # the weights of the run that was never interrupted
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)
    with open(out / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3", "4"]
