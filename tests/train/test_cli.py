"""mcc-train as a user runs it: outputs, config files, resume, interruption and bad input."""

import csv
import os
import signal
import subprocess
import time

import pytest
import torch
import yaml

from mcc_train.checkpoint import load_checkpoint
from mcc_train.cli import main

from ..conftest import FAST_TRAIN, PYTHON, REPO, make_imagefolder, run_cli


def test_a_run_writes_checkpoints_metrics_config_and_plot(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"last.pt", "best.pt", "metrics.csv", "config.yaml", "curves.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    ckpt = torch.load(trained_run / "last.pt", weights_only=True)  # plain types only
    assert ckpt["format"] == "mcc-checkpoint" and ckpt["epoch"] == 2 and ckpt["head"] == "mc"
    assert ckpt["class_names"] == [str(i) for i in range(10)] and ckpt["in_chans"] == 1
    assert ckpt["data_config"]["input_size"] == [1, 16, 16]
    assert "fc.log_var" in ckpt["model"] and ckpt["optimizer"]["state"] and ckpt["scheduler"]
    with open(trained_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "eval_loss", "top1", "top5", "lr", "sub_center_std", "offset_ratio"} <= set(rows[0])
    assert 0 <= float(rows[1]["top1"]) <= float(rows[1]["top5"]) <= 100 and float(rows[1]["sub_center_std"]) > 0
    assert float(rows[1]["offset_ratio"]) > 0 and float(rows[1]["logit_spread"]) > 0 and rows[1]["logit_margin"]
    assert yaml.safe_load((trained_run / "config.yaml").read_text())["arch"] == "resnet10t"
    assert (trained_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_final_summary_is_one_line(tmp_path):
    proc = run_cli("mcc_train", *FAST_TRAIN, "--epochs", "1", "--head", "linear", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(summary) == 1 and summary[0].startswith("mcc-train: done: 1 epochs of resnet10t (linear head)")
    assert "best top-1" in summary[0]
    assert "fc.log_var" not in load_checkpoint(tmp_path / "last.pt")["model"]


def test_yaml_config_with_cli_override(tmp_path):
    (tmp_path / "recipe.yaml").write_text("epochs: 1\nlr: 0.002\nnum-subcenters: 3\nout: ignored\n")
    code = main(["--config", str(tmp_path / "recipe.yaml"), *FAST_TRAIN, "--out", str(tmp_path / "o")])
    assert code == 0
    saved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert (saved["epochs"], saved["lr"], saved["num_subcenters"]) == (1, 0.002, 3)
    assert load_checkpoint(tmp_path / "o" / "last.pt")["model"]["fc.log_var"].shape == (10, 512)


def test_help_documents_every_flag():
    proc = run_cli("mcc_train", "--help")
    assert proc.returncode == 0
    from dataclasses import fields

    from mcc_train import TrainConfig

    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in proc.stdout


def test_kill_9_leaves_a_resumable_checkpoint_and_resume_is_exact(tmp_path):
    args = [*FAST_TRAIN, "--epochs", "3", "--model-ema"]  # the EMA weights resume exactly too
    reference = run_cli("mcc_train", *args, "--out", tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [PYTHON, "-m", "mcc_train", *args, "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = load_checkpoint(out / "last.pt")  # intact, whatever moment the kill hit
    assert 1 <= ckpt["epoch"] <= 3

    if ckpt["epoch"] < 3:
        resumed = run_cli("mcc_train", "--resume", out / "last.pt", "--workers", "0")
        assert resumed.returncode == 0, resumed.stderr
    final, ref = load_checkpoint(out / "last.pt"), load_checkpoint(tmp_path / "ref" / "last.pt")
    assert final["epoch"] == 3
    for weights in ("model", "model_ema"):  # the same weights as the run that was never interrupted
        for key, value in ref[weights].items():
            torch.testing.assert_close(final[weights][key], value, rtol=0, atol=0, msg=f"{weights}: {key}")
    assert final["optimizer"]["param_groups"][0]["lr"] == ref["optimizer"]["param_groups"][0]["lr"]
    with open(out / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]


def test_ctrl_c_keeps_the_last_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    command = [PYTHON, "-m", "mcc_train", *FAST_TRAIN, "--epochs", "50", "--out", str(out)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert f"--resume {out}/last.pt" in err.strip().splitlines()[-1]
    assert 1 <= load_checkpoint(out / "last.pt")["epoch"] < 50
    assert not list(out.glob(".*.tmp"))


def test_refuses_to_overwrite_an_earlier_run(trained_run, capsys):
    before = (trained_run / "last.pt").read_bytes()
    assert main([*FAST_TRAIN, "--out", str(trained_run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (trained_run / "last.pt").read_bytes() == before


def test_resume_past_the_last_epoch_says_so(trained_run, capsys):
    assert main(["--resume", str(trained_run / "last.pt")]) == 2
    assert "raise --epochs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "resnet_nope"], "unknown arch 'resnet_nope'"),
        (["--data", "fashion-mnist:/no/such/dir"], "no directory /no/such/dir"),
        (["--data", "imagefolder:/no/such/dir"], "no directory /no/such/dir"),
        (["--data", "mnist"], "unknown dataset 'mnist'"),
        (["--num-subcenters", "0"], "--num-subcenters must be an integer >= 1"),
        (["--center-weight", "0"], "--center-weight must be in (0, 1]"),
        (["--center-weight", "1.5"], "--center-weight must be in (0, 1]"),
        (["--lr", "-0.1"], "--lr must be > 0"),
        (["--lr", "nan"], "--lr must be"),
        (["--resume", "/no/such/last.pt"], "no such checkpoint file"),
        (["--config", "/no/such.yaml"], "no such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    assert main([*FAST_TRAIN, "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mcc-train: error:") and message in err[0], err


def test_bad_yaml_keys_and_values(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("epoch: 3\n")
    assert main(["--config", str(tmp_path / "a.yaml")]) == 2
    assert "unknown config key(s) epoch" in capsys.readouterr().err
    (tmp_path / "b.yaml").write_text("epochs: many\n")
    assert main(["--config", str(tmp_path / "b.yaml")]) == 2
    assert "--epochs: expected int, got 'many'" in capsys.readouterr().err


def folder_args(root, out, batch_size=6, workers=0) -> list[str]:
    """A 1-epoch resnet10t run on an image folder."""
    run = ["--arch", "resnet10t", "--img-size", "16", "--epochs", "1", "--data", f"imagefolder:{root}"]
    return [*run, "--batch-size", str(batch_size), "--workers", str(workers), "--out", str(out)]


def test_imagefolder_trains_and_keeps_class_names(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    assert main(folder_args(root, tmp_path / "o")) == 0
    ckpt = load_checkpoint(tmp_path / "o" / "last.pt")
    assert ckpt["class_names"] == ["cat", "dog", "fish"] and ckpt["in_chans"] == 3


def test_imagefolder_problems_are_named(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "data")
    args = folder_args(root, tmp_path / "o")
    (root / "train" / "bird").mkdir()
    (root / "val" / "bird").mkdir()
    assert main(args) == 2
    assert f"no readable images in class folder {root / 'train' / 'bird'}" in capsys.readouterr().err
    (root / "train" / "bird").rmdir()
    (root / "val" / "bird").rmdir()
    (root / "train" / "cat" / "0.png").write_bytes(b"this is not a png")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"1 unreadable image file(s) ({root / 'train' / 'cat' / '0.png'}" in err.strip().splitlines()[-1]


def test_truncated_image_found_during_training_is_named(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "data", per_class=2)
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # valid header, truncated pixels
    args = folder_args(root, tmp_path / "o", batch_size=2, workers=1)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mcc-train: error: unreadable image") and str(bad) in err[-1]
