"""The paper's equations, checked against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from mcc_train import MultiCenterHead, MultiCenterLoss, multi_center_target
from mcc_train.head import MC_DEFAULTS, MC_PRESETS, MCSettings


def make_head(C=3, d=4, K=2, **kw):
    torch.manual_seed(0)
    return MultiCenterHead(d, C, num_subcenters=K, **kw)


def test_parameters_and_init_follow_method():
    head = make_head(C=5, d=64)
    assert head.weight.shape == (5, 64) and head.log_var.shape == (5, 64) and head.bias.shape == (5,)
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=sqrt(5)) on (C, d) gives U(-1/sqrt(d), 1/sqrt(d))
    assert head.log_var.abs().max() <= bound and head.log_var.std() > bound / 4
    assert make_head(bias=False).bias is None


@pytest.mark.parametrize("sigma_mode", ["absolute", "relative"])
def test_eval_logits_equal_nn_linear_bit_for_bit(sigma_mode):
    head = make_head(C=10, d=32, sigma_mode=sigma_mode).eval()
    linear = nn.Linear(32, 10)
    linear.load_state_dict({"weight": head.weight.detach(), "bias": head.bias.detach()})
    x = torch.randn(7, 32)
    assert torch.equal(head(x), linear(x))
    assert torch.equal(head(x), head.to_linear()(x))


def test_sample_centers_are_interleaved_mean_then_subcenters():
    head = make_head(C=3, d=4, K=2, sigma_scale=0.1)
    eps = torch.randn(3, 2, 4)
    centers = head.sample_centers(eps)
    assert centers.shape == (3 * 3, 4)
    std = 0.1 * torch.exp(0.5 * head.log_var)
    for c in range(3):
        assert torch.equal(centers[c * 3], head.weight[c])
        for k in (1, 2):
            torch.testing.assert_close(centers[c * 3 + k], head.weight[c] + std[c] * eps[c, k - 1])


def test_sampled_subcenters_have_the_stated_mean_and_std():
    head = make_head(C=4, d=8, K=2, sigma_scale=0.5)
    with torch.no_grad():
        head.log_var.uniform_(-1, 1)
    torch.manual_seed(123)
    draws = torch.stack([head.sample_centers().detach() for _ in range(4000)])  # (N, C*(K+1), d)
    sub = draws.reshape(4000, 4, 3, 8)[:, :, 1:]  # (N, C, K, d)
    expected_std = 0.5 * torch.exp(0.5 * head.log_var.detach())  # (C, d)
    mean_err = (sub.mean(0) - head.weight.detach()[:, None]).abs() / expected_std[:, None]
    assert mean_err.max() < 5 / math.sqrt(4000)  # 5 standard errors
    std_ratio = sub.std(0) / expected_std[:, None]
    assert (std_ratio - 1).abs().max() < 0.06
    assert torch.equal(draws[:, 0::3], head.weight.detach().expand(4000, 4, 8))  # means are never perturbed


def test_noise_is_drawn_on_the_parameters_dtype():
    head = make_head().double()
    assert head.sample_centers().dtype == torch.float64
    head.train()
    assert head(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64


def test_training_forward_shape_and_shared_bias():
    head = make_head(C=3, d=4, K=2).train()
    with torch.no_grad():
        head.log_var.fill_(-200.0)  # std ~ 0: every sub-center equals its mean
        head.bias.copy_(torch.tensor([1.0, -2.0, 3.0]))
    x = torch.randn(5, 4)
    logits = head(x)
    assert logits.shape == (5, 9)
    mean_logits = F.linear(x, head.weight, head.bias)  # (5, 3)
    torch.testing.assert_close(logits, mean_logits.repeat_interleave(3, dim=1))


@pytest.mark.parametrize("sampling", ["shared", "local"])
def test_gradients_reach_weight_bias_and_log_var(sampling):
    head = make_head(sampling=sampling).train()
    loss = MultiCenterLoss(head, kl_weight=0.0)(head(torch.randn(6, 4)), torch.tensor([0, 1, 2, 0, 1, 2]))
    loss.backward()
    for p in (head.weight, head.bias, head.log_var):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_kl_loss_matches_hand_computed_value():
    head = make_head(C=2, d=2)
    with torch.no_grad():
        head.log_var.copy_(torch.tensor([[0.0, math.log(2.0)], [1.0, -1.0]]))
    # -0.5 * [(1+0-1) + (1+ln2-2) + (1+1-e) + (1-1-e^-1)] / C
    expected = -0.5 * ((0.0) + (math.log(2) - 1) + (2 - math.e) + (-math.exp(-1))) / 2
    assert head.kl_loss().item() == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        head.log_var.zero_()
    assert head.kl_loss().item() == 0.0  # minimum at log_var = 0


def test_hard_label_target_matches_eq_8():
    t = multi_center_target(torch.tensor([1, 0]), num_classes=3, num_subcenters=2, center_weight=0.5)
    expected = torch.tensor(
        [[0, 0, 0, 0.5, 0.25, 0.25, 0, 0, 0], [0.5, 0.25, 0.25, 0, 0, 0, 0, 0, 0]], dtype=torch.float32
    )
    assert torch.equal(t, expected)
    t4 = multi_center_target(torch.tensor([2]), num_classes=3, num_subcenters=4, center_weight=0.6)
    assert t4.shape == (1, 15)
    torch.testing.assert_close(t4[0, 10:], torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1]))
    assert t4.sum().item() == pytest.approx(1.0)


def test_soft_target_expansion_for_mixup():
    lam = 0.7
    soft = lam * F.one_hot(torch.tensor([0]), 2).float() + (1 - lam) * F.one_hot(torch.tensor([1]), 2).float()
    t = multi_center_target(soft, num_classes=2, num_subcenters=2, center_weight=0.5)
    expected = torch.tensor([[0.35, 0.175, 0.175, 0.15, 0.075, 0.075]])
    torch.testing.assert_close(t, expected)
    smoothed = torch.full((4, 5), 0.02).scatter_(1, torch.tensor([[0], [1], [2], [3]]), 0.92)
    assert torch.allclose(multi_center_target(smoothed, 5, 3, 0.4).sum(-1), torch.ones(4))


def test_loss_is_soft_target_ce_plus_weighted_kl():
    head = make_head().train()
    logits, target = torch.randn(4, 9), torch.tensor([0, 1, 2, 1])
    ce = SoftTargetCrossEntropy()(logits, multi_center_target(target, 3, 2, 0.5))
    torch.testing.assert_close(MultiCenterLoss(head, kl_weight=2.0)(logits, target), ce + 2.0 * head.kl_loss())
    torch.testing.assert_close(MultiCenterLoss(head, kl_weight=0.0)(logits, target), ce)


@pytest.mark.parametrize("sigma_mode", ["absolute", "relative"])
def test_local_sampling_matches_shared_per_sample_mean_and_variance(sigma_mode):
    head = make_head(C=3, d=6, K=2, sigma_scale=1.0, sigma_mode=sigma_mode).train()
    with torch.no_grad():
        head.log_var.uniform_(-1, 1)
    x = torch.randn(2, 6)
    n = 6000
    with torch.no_grad():
        torch.manual_seed(1)
        shared = torch.stack([head(x) for _ in range(n)])  # (n, B, C*(K+1))
        head.sampling = "local"
        local = torch.stack([head(x) for _ in range(n)])
    expected_mean = F.linear(x, head.weight, head.bias).detach().repeat_interleave(3, dim=1)
    expected_var = F.linear(x**2, (head.std() ** 2).detach())  # (B, C)
    for draws in (shared, local):
        sub = draws.reshape(n, 2, 3, 3)[..., 1:]  # (n, B, C, K)
        assert torch.allclose(draws.mean(0), expected_mean, atol=5 * expected_var.max().sqrt().item() / math.sqrt(n))
        assert ((sub.var(0) / expected_var[..., None]) - 1).abs().max() < 0.1
    assert torch.equal(local[:, :, 0::3], expected_mean[:, 0::3].expand(n, 2, 3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_subcenters": 0}, "num_subcenters"),
        ({"center_weight": 0.0}, "center_weight"),
        ({"center_weight": 1.5}, "center_weight"),
        ({"sigma_scale": -1.0}, "sigma_scale"),
        ({"sampling": "bogus"}, "sampling"),
        ({"sigma_mode": "proportional"}, "sigma_mode"),
    ],
)
def test_out_of_range_hyperparameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiCenterHead(4, 3, **kwargs)
    with pytest.raises(ValueError, match=message):
        MCSettings(**kwargs)


def test_relative_std_is_sigma_times_each_class_weights_rms():
    head = make_head(C=2, d=4, sigma_scale=0.5, sigma_mode="relative")
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, -1.0, 1.0, -1.0], [3.0, 0.0, 0.0, 4.0]]))
        head.log_var.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 2 * math.log(2.0), 0.0, 0.0]]))
    # rms(w_0) = 1, rms(w_1) = sqrt(25 / 4) = 2.5; std = 0.5 * rms * exp(log_var / 2)
    expected = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.25, 2.5, 1.25, 1.25]])
    torch.testing.assert_close(head.std(), expected)
    eps = torch.randn(2, 2, 4)
    centers = head.sample_centers(eps)
    torch.testing.assert_close(centers[4], head.weight[1] + expected[1] * eps[1, 0])
    # the RMS is a constant: the noise gives no gradient to the mean centers through it
    head.std().sum().backward()
    assert head.weight.grad is None and head.log_var.grad is not None
    absolute = make_head(C=2, d=4, sigma_scale=0.5)
    with torch.no_grad():
        absolute.log_var.zero_()
    torch.testing.assert_close(absolute.std(), torch.full((2, 4), 0.5))


def test_offset_ratio_and_logit_std_by_hand():
    head = make_head(C=2, d=2, sigma_scale=1.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        head.log_var.copy_(torch.tensor([[0.0, 0.0], [2 * math.log(2.0), 0.0]]))  # std rows (1, 1), (2, 1)
    # ||std_c|| / ||w_c||: sqrt(2) / 5 and sqrt(5) / 1
    torch.testing.assert_close(head.offset_ratio(), torch.tensor([math.sqrt(2) / 5, math.sqrt(5)]))
    x = torch.tensor([[1.0, 2.0]])
    # sqrt(sum_j x_j^2 std_cj^2): sqrt(1 + 4) and sqrt(4 + 4)
    torch.testing.assert_close(head.logit_std(x), torch.tensor([[math.sqrt(5), math.sqrt(8)]]))


def test_paper_preset_is_the_papers_settings():
    paper = MC_PRESETS["paper"]
    paper_settings = {"center_weight": 0.5, "sigma_scale": 0.1, "sigma_mode": "absolute", "sampling": "shared"}
    assert paper == MCSettings(num_subcenters=2, kl_weight=1.0, **paper_settings)
    assert MC_PRESETS["default"] is MC_DEFAULTS and MCSettings() == MC_DEFAULTS
    head = MultiCenterHead(8, 3)
    assert (head.num_subcenters, head.center_weight, head.sigma_scale, head.sigma_mode, head.sampling) == (
        MC_DEFAULTS.num_subcenters,
        MC_DEFAULTS.center_weight,
        MC_DEFAULTS.sigma_scale,
        MC_DEFAULTS.sigma_mode,
        MC_DEFAULTS.sampling,
    )
    assert MultiCenterLoss(head).kl_weight == MC_DEFAULTS.kl_weight
