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
from mcc_train.train import BalancedSampler, build_optimizer, build_scheduler, set_backbone_trainable

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


def test_a_frozen_backbone_does_not_move_but_the_head_does(tmp_path):
    assert run(tmp_path, "frozen", "--epochs", "2", "--freeze-backbone-epochs", "1") == 0
    model = create_model("resnet10t", 10, in_chans=1)
    classifier = classifier_path(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_backbone_trainable(model, classifier, False)
    optimizer = build_optimizer(model, TrainConfig(), classifier)
    model(torch.randn(4, 1, 16, 16)).sum().backward()
    optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k, _ in model.named_parameters() if not k.startswith("fc."))
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def lrs(out):
    with open(out / "metrics.csv") as f:
        return [float(r["lr"]) for r in csv.DictReader(f)]


def test_resume_with_more_epochs_replans_the_schedule(tmp_path, capsys):
    assert run(tmp_path, "short", "--epochs", "2") == 0
    assert main(["--resume", str(tmp_path / "short" / "last.pt"), "--epochs", "4", "--workers", "0"]) == 0
    assert "schedule re-planned for 4 epochs" in capsys.readouterr().err
    assert run(tmp_path, "long", "--epochs", "4") == 0
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
    assert run(tmp_path, "stop", "--epochs", "10", "--lr", "1e-12", "--warmup-lr", "1e-12", "--min-lr", "0",
               "--early-stop-patience", "2") == 0  # fmt: skip
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
