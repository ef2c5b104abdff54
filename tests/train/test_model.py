"""create_model: any timm backbone gets the MC head in place of its classifier, nothing else changes."""

import pytest
import timm
import torch

from mcc_train import MultiCenterHead, UsageError, classifier_path, create_model
from mcc_train.model import timm_size_kwargs

FAST_ARCHS = ["resnet18", "mobilenetv3_small_100", "vit_tiny_patch16_224", "convnext_atto"]
PAPER_ARCHS = [
    "resnet50",
    "resnet101",
    "regnety_040",
    "regnety_160",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "swin_tiny_patch4_window7_224",
    "swin_base_patch4_window7_224",
]


def check_forward_backward(arch: str, C: int = 7, size: int = 32):
    """At 32x32: token-grid models are built for it (Swin's windows shrink to fit), CNNs take it as is."""
    torch.manual_seed(0)
    model = create_model(arch, C, num_subcenters=2, img_size=size)
    torch.manual_seed(0)
    vanilla = timm.create_model(arch, pretrained=False, num_classes=C, **timm_size_kwargs(arch, size))
    head = model.get_classifier()
    path = classifier_path(model)
    assert isinstance(head, MultiCenterHead) and model.get_submodule(path) is head
    assert set(model.state_dict()) == set(vanilla.state_dict()) | {f"{path}.log_var"}

    x = torch.randn(2, 3, size, size)
    model.train()
    logits = model(x)
    assert logits.shape == (2, C * 3)
    logits.sum().add(head.kl_loss()).backward()
    assert head.weight.grad is not None and head.log_var.grad is not None
    assert any(p.grad is not None for n, p in model.named_parameters() if not n.startswith(path))

    state = {k: v for k, v in model.state_dict().items() if not k.endswith("log_var")}
    vanilla.load_state_dict(state, strict=True)
    model.eval(), vanilla.eval()
    with torch.no_grad():
        assert torch.equal(model(x), vanilla(x))  # the eval-mode MC model is the vanilla model


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_fast_archs_build_train_and_eval_as_vanilla(arch):
    check_forward_backward(arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_paper_backbones_build_and_train(arch):
    check_forward_backward(arch)


def test_mc_head_starts_from_the_linear_heads_init():
    torch.manual_seed(3)
    mc = create_model("resnet18", 5)
    torch.manual_seed(3)
    linear = create_model("resnet18", 5, head="linear")
    assert type(linear.get_classifier()) is torch.nn.Linear
    assert torch.equal(mc.fc.weight, linear.fc.weight) and torch.equal(mc.fc.bias, linear.fc.bias)


def test_head_hyperparameters_reach_the_head():
    model = create_model("resnet18", 4, num_subcenters=4, center_weight=0.3, sigma_scale=0.2, sampling="local")
    head = model.get_classifier()
    assert (head.num_subcenters, head.center_weight, head.sigma_scale, head.sampling) == (4, 0.3, 0.2, "local")
    assert create_model("resnet18", 4, in_chans=1).conv1.in_channels == 1


def test_distilled_two_head_model_gets_a_clear_error():
    with pytest.raises(UsageError, match="not a single linear classifier"):
        create_model("deit_tiny_distilled_patch16_224", 10, img_size=32)


def test_unknown_arch_and_bad_head_args_get_clear_errors():
    with pytest.raises(UsageError, match="unknown arch 'resnet_nope'"):
        create_model("resnet_nope", 10)
    with pytest.raises(UsageError, match="center_weight"):
        create_model("resnet18", 10, center_weight=2.0)
    with pytest.raises(UsageError, match="head must be"):
        create_model("resnet18", 10, head="cosine")


def test_local_weights_initialise_the_backbone_through_timm(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = create_model("resnet18", 10, pretrained_file=tmp_path / "weights.pth")
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc.weight.shape == (10, 512)  # the 1000-class classifier is dropped

    (tmp_path / "junk.pth").write_bytes(b"not weights")
    with pytest.raises(UsageError, match="not a readable weights file"):
        create_model("resnet18", 10, pretrained_file=tmp_path / "junk.pth")
    torch.save(timm.create_model("convnext_atto").state_dict(), tmp_path / "other.pth")
    with pytest.raises(UsageError, match="does not fit resnet18 .*another architecture"):
        create_model("resnet18", 10, pretrained_file=tmp_path / "other.pth")
