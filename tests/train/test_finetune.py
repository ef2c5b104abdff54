"""Fine-tuning from local weights as timm does it, and the training conveniences of timm's train.py."""

import csv
import math

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from mcc_train import TrainConfig, UsageError, create_model
from mcc_train.checkpoint import load_checkpoint
from mcc_train.cli import build_parser, main
from mcc_train.model import classifier_path
from mcc_train.train import BalancedSampler, build_optimizer, build_scheduler

from ..conftest import FAST_TRAIN, make_imagefolder


@pytest.fixture(scope="module")
def imagenet_style(tmp_path_factory):
    """3-channel, 1000-class resnet10t weights made locally, as .safetensors and .pth."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(3)
    source = timm.create_model("resnet10t", num_classes=1000)
    save_file(source.state_dict(), str(d / "model.safetensors"))
    torch.save(source.state_dict(), d / "model.pth")
    return d, source.state_dict()


# a run that never gets better: an early stop is certain
STILL = ["--lr", "1e-12", "--warmup-lr", "1e-12", "--min-lr", "0"]


def run(tmp_path, name, *extra):
    return main([*FAST_TRAIN, "--epochs", "1", "--out", str(tmp_path / name), *map(str, extra)])


def test_imagenet_weights_fine_tune_a_grayscale_folder(tmp_path, imagenet_style):
    weights, source = imagenet_style
    model = create_model("resnet10t", 4, in_chans=1, pretrained_file=weights / "model.safetensors")
    stem = model.conv1[0].weight  # (24, 1, 3, 3): timm's adapt_input_conv sums the RGB filters
    torch.testing.assert_close(stem, source["conv1.0.weight"].sum(1, keepdim=True))
    assert torch.equal(model.layer4[0].conv2.weight, source["layer4.0.conv2.weight"])
    assert model.fc.weight.shape == (4, 512) and hasattr(model.fc, "log_var")  # a fresh MC head on top
    same = create_model("resnet10t", 4, in_chans=1, pretrained_file=weights / "model.pth")
    assert torch.equal(same.conv1[0].weight, stem)

    root = make_imagefolder(tmp_path / "d", classes=("a", "b", "c", "d"), per_class=4, mode="L")
    args = ["--data", f"imagefolder:{root}", "--batch-size", "4", "--pretrained-file", weights / "model.safetensors"]
    assert run(tmp_path, "ft", *args) == 0
    ckpt = load_checkpoint(tmp_path / "ft" / "last.pt")
    assert ckpt["in_chans"] == 1 and ckpt["num_classes"] == 4
    assert ckpt["config"]["pretrained_file"] == str(weights / "model.safetensors")
    args[-2] = "--checkpoint-path"  # the older name still works
    assert run(tmp_path, "alias", *args) == 0


def test_weights_that_do_not_fit_are_one_line(tmp_path, imagenet_style, capsys):
    weights, _ = imagenet_style
    assert run(tmp_path, "a", "--arch", "resnet18", "--pretrained-file", weights / "model.safetensors") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit resnet18" in err[0] and "another architecture" in err[0]
    assert not (tmp_path / "a").exists()
    assert run(tmp_path, "b", "--arch", "resnet10t") == 0
    # mcc's own checkpoint is a weight file too: its MC head's mean centers become the classifier
    assert run(tmp_path, "c", "--arch", "resnet10t", "--pretrained-file", tmp_path / "b" / "last.pt") == 0
    trained = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    model = create_model("resnet10t", 10, in_chans=1, pretrained_file=tmp_path / "b" / "last.pt")
    for key in ("layer1.0.conv1.weight", "fc.weight", "fc.bias"):
        assert torch.equal(model.state_dict()[key], trained[key]), key
    assert run(tmp_path, "d", "--pretrained-file", tmp_path / "nope.safetensors") == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_a_timm_hub_directory_loads_and_its_arch_is_checked(tmp_path, imagenet_style):
    from timm.models import save_for_hf

    torch.manual_seed(4)
    source = timm.create_model("resnet10t", num_classes=7)
    save_for_hf(source, str(tmp_path / "hub"))  # config.json + model.safetensors, as the Hub holds them
    model = create_model("resnet10t", 7, head="linear", pretrained_file=tmp_path / "hub")
    assert torch.equal(model.fc.weight, source.fc.weight)  # same class count: the classifier is kept
    with pytest.raises(UsageError, match="holds weights for resnet10t, not --arch resnet18; pass --arch resnet10t"):
        create_model("resnet18", 7, pretrained_file=tmp_path / "hub")


def test_head_lr_scale_and_layer_decay_reach_the_learning_rates():
    model = create_model("resnet10t", 4, in_chans=1)
    classifier = classifier_path(model)
    cfg = TrainConfig(arch="resnet10t", head_lr_scale=10.0, epochs=2, warmup_epochs=0)
    optimizer = build_optimizer(model, cfg, classifier)
    build_scheduler(optimizer, cfg, updates_per_epoch=5).step_update(3)
    head = {id(p) for p in model.fc.parameters()}
    lrs = {(any(id(p) in head for p in g["params"]), g["lr"]) for g in optimizer.param_groups}
    head_lr = {lr for in_head, lr in lrs if in_head}
    body_lr = {lr for in_head, lr in lrs if not in_head}
    assert len(head_lr) == len(body_lr) == 1 and math.isclose(head_lr.pop(), 10 * body_lr.pop())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))

    vit = create_model("test_vit", 4, img_size=32)
    decayed = build_optimizer(vit, TrainConfig(arch="test_vit", layer_decay=0.5), classifier_path(vit))
    scales = sorted({g["lr_scale"] for g in decayed.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0 and math.isclose(scales[-2], 0.5)


def adam_steps(ckpt: dict, model) -> dict[str, int]:
    """Optimizer steps each parameter took, by name (AdamW keeps no state for a parameter that never had a grad)."""
    names = [n for n, _ in model.named_parameters()]
    order = [i for g in ckpt["optimizer"]["param_groups"] for i in g["params"]]  # state keys, group by group
    by_index = dict(zip(order, groups_in_order(model, ckpt), strict=True))
    return {by_index[i]: int(state["step"]) for i, state in ckpt["optimizer"]["state"].items()} | {
        n: 0 for n in names if n not in {by_index[i] for i in ckpt["optimizer"]["state"]}
    }


def groups_in_order(model, ckpt) -> list[str]:
    """Parameter names in the order timm's param_groups_weight_decay puts them: decayed, then not decayed."""
    params = list(model.named_parameters())
    decay = [n for n, p in params if p.ndim > 1]
    no_decay = [n for n, p in params if p.ndim <= 1]
    sizes = [len(g["params"]) for g in ckpt["optimizer"]["param_groups"]]
    assert sizes == [len(no_decay), len(decay)] or sizes == [len(decay), len(no_decay)]
    return no_decay + decay if sizes[0] == len(no_decay) else decay + no_decay


def test_a_frozen_backbone_takes_no_steps_in_its_frozen_epochs(tmp_path):
    assert run(tmp_path, "frozen", "--epochs", "2", "--freeze-backbone-epochs", "1") == 0
    ckpt = load_checkpoint(tmp_path / "frozen" / "last.pt")
    steps = adam_steps(ckpt, create_model("resnet10t", 10, in_chans=1))
    head = {n: s for n, s in steps.items() if n.startswith("fc.")}
    body = {n: s for n, s in steps.items() if not n.startswith("fc.")}
    assert set(head.values()) == {8}  # 4 updates per epoch, both epochs
    assert set(body.values()) == {4}  # the second epoch only


def lrs(out):
    with open(out / "metrics.csv") as f:
        return [float(r["lr"]) for r in csv.DictReader(f)]


def test_resume_with_more_epochs_replans_the_schedule_with_the_flags_given_now(tmp_path, capsys):
    assert run(tmp_path, "short", "--epochs", "2") == 0
    resume = ["--resume", str(tmp_path / "short" / "last.pt"), "--workers", "0"]
    assert main([*resume, "--epochs", "4", "--lr", "5e-3"]) == 0
    assert "schedule re-planned for 4 epochs" in capsys.readouterr().err
    assert run(tmp_path, "long", "--epochs", "4", "--lr", "5e-3") == 0
    resumed, planned = lrs(tmp_path / "short"), lrs(tmp_path / "long")
    assert resumed[2:] == pytest.approx(planned[2:], rel=1e-9)  # the added epochs follow the 4-epoch cosine
    assert resumed[2] > 10 * resumed[3] > 0  # not stuck at --min-lr


def test_ema_grad_accumulation_and_early_stop(tmp_path, capsys):
    assert run(tmp_path, "ema", "--epochs", "2", "--model-ema", "--grad-accum-steps", "3") == 0
    ckpt = load_checkpoint(tmp_path / "ema" / "last.pt")
    assert ckpt["model_ema"].keys() == ckpt["model"].keys()
    assert not torch.equal(ckpt["model_ema"]["fc.weight"], ckpt["model"]["fc.weight"])
    steps = max(int(s["step"]) for s in ckpt["optimizer"]["state"].values())
    assert steps == 2 * math.ceil(4 / 3)  # 128 images / batch 32 = 4 micro-batches -> 2 optimizer steps per epoch
    with open(tmp_path / "ema" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["ema_top1"]) == pytest.approx(ckpt["metrics_ema"]["top1"])
    assert "ema_top1" not in ckpt["metrics"]  # the model's own metrics stay apart from the EMA's

    capsys.readouterr()
    assert run(tmp_path, "stop", *STILL, "--epochs", "10", "--early-stop-patience", "2") == 0
    assert "early stop: no better top-1 for 2 epochs" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "stop" / "last.pt")["epoch"] == 3


def test_balanced_sampler_evens_out_classes_and_shards_ranks():
    labels = np.array([0] * 900 + [1] * 100)
    draws = [list(BalancedSampler(labels, 2, rank, seed=1)) for rank in (0, 1)]
    assert len(draws[0]) == len(draws[1]) == 500
    share = np.mean(labels[draws[0] + draws[1]] == 1)
    assert 0.45 < share < 0.55  # 10% of the images, half of the draws
    other = BalancedSampler(labels, 2, 0, seed=1)
    other.set_epoch(1)
    assert list(other) != draws[0]


def test_timm_optimizer_and_schedule_by_name_and_tensorboard(tmp_path, capsys):
    assert run(tmp_path, "sgd", "--opt", "sgd", "--sched", "step", "--epochs", "2", "--lr", "0.01") == 0
    assert list((tmp_path / "sgd" / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = load_checkpoint(tmp_path / "sgd" / "last.pt")
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.9 and "betas" not in group  # SGD, not AdamW
    assert "decay_t" in ckpt["scheduler"]  # timm's StepLRScheduler
    assert run(tmp_path, "bad", "--opt", "adamz") == 2
    assert "--opt 'adamz': not a timm optimizer" in capsys.readouterr().err
    assert run(tmp_path, "bad", "--sched", "plateau") == 2


def test_top5_only_where_there_are_more_than_5_classes(tmp_path):
    root = make_imagefolder(tmp_path / "d", per_class=2)
    assert run(tmp_path, "three", "--data", f"imagefolder:{root}", "--batch-size", "2") == 0
    with open(tmp_path / "three" / "metrics.csv") as f:
        assert [r["top5"] for r in csv.DictReader(f)] == [""]


def test_help_states_each_default_once():
    helps = {a.dest: a.help or "" for a in build_parser()._actions}
    assert helps["in_chans"] == "input channels (default: 1 when every image is grayscale, else 3)"
    assert helps["lr"].endswith("(default: 0.001)")
    assert all(text.count("default:") <= 1 for text in helps.values()), helps


def test_resume_takes_another_optimizer_or_head_lr_and_refuses_other_data(tmp_path, capsys):
    assert run(tmp_path, "r", "--epochs", "1") == 0
    last = str(tmp_path / "r" / "last.pt")
    assert main(["--resume", last, "--epochs", "2", "--opt", "sgd", "--head-lr-scale", "5", "--workers", "0"]) == 0
    assert "its moments start afresh" in capsys.readouterr().err
    assert load_checkpoint(last)["optimizer"]["param_groups"][0]["momentum"] == 0.9
    root = make_imagefolder(tmp_path / "d", per_class=2, mode="L")
    assert main(["--resume", last, "--epochs", "3", "--data", f"imagefolder:{root}", "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mcc-train: error: --resume") and "resume on its own data" in err[-1]


def test_resume_goes_in_place_and_an_early_stop_is_final(tmp_path, capsys):
    out = tmp_path / "stop"
    assert run(tmp_path, "stop", *STILL, "--epochs", "6", "--early-stop-patience", "1") == 0
    assert load_checkpoint(out / "last.pt")["early_stopped"]
    moved = tmp_path / "moved"
    out.rename(moved)  # the run moved: --resume continues where the checkpoint is, not at the old --out
    assert main(["--resume", str(moved / "last.pt"), "--workers", "0"]) == 2
    assert "stopped early at epoch 2" in capsys.readouterr().err
    assert main(["--resume", str(moved / "last.pt"), "--early-stop-patience", "none", "--epochs", "3"]) == 0
    assert load_checkpoint(moved / "last.pt")["epoch"] == 3 and not out.exists()
    with open(moved / "metrics.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]
    assert run(tmp_path, "other", "--epochs", "1") == 0
    assert main(["--resume", str(moved / "last.pt"), "--epochs", "4", "--out", str(tmp_path / "other")]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_overwrite_keeps_the_older_run_until_the_new_one_has_a_checkpoint(tmp_path, capsys):
    assert run(tmp_path, "o", "--epochs", "1") == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir() if p.is_file()}
    assert run(tmp_path, "o", "--overwrite", "--lr", "1e30", "--warmup-epochs", "0", "--clip-grad", "none") == 2
    assert "diverged" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir() if p.is_file()} == before
    assert not (tmp_path / "o" / ".replaced").exists()
    assert run(tmp_path, "o", "--overwrite", "--epochs", "1", "--seed", "1") == 0
    assert load_checkpoint(tmp_path / "o" / "last.pt")["config"]["seed"] == 1
    assert not (tmp_path / "o" / ".replaced").exists()


def test_balanced_sampler_is_what_training_draws_from(tmp_path, monkeypatch):
    from mcc_train import train as train_module

    seen = []
    original = train_module.build_loaders

    def spy(splits, cfg, rt):
        loaders = original(splits, cfg, rt)
        seen.append(type(loaders[1]).__name__)
        return loaders

    monkeypatch.setattr(train_module, "build_loaders", spy)
    assert run(tmp_path, "bal", "--balanced-sampler") == 0
    assert seen == ["BalancedSampler"]


def test_a_cosface_checkpoint_is_a_weights_file_too(tmp_path):
    assert run(tmp_path, "cos", "--loss", "cosface") == 0  # its head has no bias
    model = create_model("resnet10t", 10, in_chans=1, pretrained_file=tmp_path / "cos" / "last.pt")
    trained = load_checkpoint(tmp_path / "cos" / "last.pt")["model"]
    assert torch.equal(model.fc.weight, trained["fc.weight"]) and not model.fc.bias.any()
