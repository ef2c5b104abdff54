"""The softmax variants against hand-computed values: CosFace, ArcFace (with its fallback), L-Softmax's psi and its
annealing, the margin on every row of the target class with MC, and test time as the formulas say."""

import math

import pytest
import torch
import torch.nn.functional as F

from mcc_train import UsageError, create_model
from mcc_train.cli import main
from mcc_train.head import MultiCenterHead
from mcc_train.margins import (
    LOSSES,
    CosineLinear,
    MarginLinear,
    arcface,
    chebyshev,
    hard_target,
    lsoftmax_psi,
    make_margin,
    set_margin_target,
    to_cosine_linear,
)
from mcc_train.model import test_time_classifier as to_test_time

from ..conftest import FAST_TRAIN

X = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # two features, |x| = 2 and 3
W = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # class 0 along x, class 1 at 45 degrees
COS = torch.tensor([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]])  # cos(theta) of each (sample, class)


def head(loss: str, **kw) -> MarginLinear:
    h = MarginLinear(2, 2, make_margin(loss, **kw))
    with torch.no_grad():
        h.weight.copy_(W)
        if h.bias is not None:
            h.bias.zero_()
    return h


def test_cosface_subtracts_m_from_the_target_cosine_and_scales_by_s():
    h = head("cosface", margin=0.2, scale=10.0).train()
    set_margin_target(h, torch.tensor([0, 1]), step=0)
    expected = 10 * (COS - 0.2 * torch.eye(2))
    torch.testing.assert_close(h(X), expected)
    assert h.bias is None  # a cosine classifier has no bias


def test_arcface_adds_m_to_the_angle_and_falls_back_past_pi():
    m = 0.5
    h = head("arcface", margin=m, scale=4.0).train()
    set_margin_target(h, torch.tensor([0, 1]), step=0)
    theta = torch.acos(COS)
    expected = 4 * torch.where(torch.eye(2, dtype=torch.bool), torch.cos(theta + m), COS)
    torch.testing.assert_close(h(X), expected)
    # theta + m > pi: cos(theta) - m sin(m), not cos(theta + m), which would rise again past pi
    cos = torch.tensor([math.cos(math.pi - 0.2)])  # theta = pi - 0.2, theta + m = pi + 0.3
    torch.testing.assert_close(arcface(cos, m), cos - m * math.sin(m))
    assert arcface(torch.tensor([math.cos(math.pi - 0.6)]), m) == pytest.approx(math.cos(math.pi - 0.1))


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_lsoftmax_psi_is_the_papers_piecewise_function(m):
    theta = torch.linspace(0, math.pi, 721, dtype=torch.float64)
    psi = lsoftmax_psi(torch.cos(theta), m)
    k = torch.clamp(torch.floor(theta * m / math.pi), 0, m - 1)
    torch.testing.assert_close(psi, (-1) ** k * torch.cos(m * theta) - 2 * k, atol=1e-6, rtol=0)
    assert psi[0] == pytest.approx(1.0) and psi[-1] == pytest.approx(1 - 2 * m, abs=1e-6)
    assert (psi[1:] <= psi[:-1] + 1e-9).all()  # monotonically decreasing: a larger angle never scores higher
    torch.testing.assert_close(chebyshev(torch.cos(theta), m), torch.cos(m * theta))


def test_lsoftmax_target_logit_is_annealed_from_softmax_over_the_run():
    h = head("lsoftmax", margin=2).train()
    target = torch.tensor([0, 1])
    raw = X @ W.T  # (2, 2): |w||x| cos(theta)
    norms = X.norm(dim=1, keepdim=True) * W.norm(dim=1)
    psi = lsoftmax_psi(COS, 2)
    for step, lam in ((0, 1000.0), (50, 1000 / 1001), (100, 1000 / 2001)):  # 1000 / (1 + (2000 / T) t), T = 100
        set_margin_target(h, target, step, total_steps=100)
        assert h.margin.lsoftmax_lambda() == pytest.approx(lam)
        on_target = (lam * raw + norms * psi) / (1 + lam)
        expected = torch.where(torch.eye(2, dtype=torch.bool), on_target, raw)
        torch.testing.assert_close(h(X), expected)


@pytest.mark.parametrize("loss", ["lsoftmax", "cosface", "arcface"])
@pytest.mark.parametrize("angle", [0.0, math.pi])
def test_gradients_are_finite_at_theta_0_and_pi(loss, angle):
    h = head(loss).train()
    x = (math.cos(angle) * W[0:1]).clone().requires_grad_(True)  # parallel or opposite to class 0's center
    set_margin_target(h, torch.tensor([0]), step=5)
    F.cross_entropy(h(x), torch.tensor([0])).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(h.weight.grad).all()


@pytest.mark.parametrize("loss", ["lsoftmax", "cosface", "arcface"])
def test_eval_and_test_time_classifier_are_the_test_time_formula(loss):
    h = head(loss).eval()
    set_margin_target(h, torch.tensor([0, 1]), step=0)  # a stale target changes nothing in eval
    s = LOSSES[loss].scale
    expected = s * COS if LOSSES[loss].cosine else X @ W.T
    torch.testing.assert_close(h(X), expected)
    plain = to_test_time(h)
    assert type(plain) is (CosineLinear if LOSSES[loss].cosine else torch.nn.Linear)
    torch.testing.assert_close(plain(X), expected)
    if LOSSES[loss].cosine:
        torch.testing.assert_close(plain.weight.norm(dim=1), torch.full((2,), s))
        assert not plain.bias.any()


def test_mc_puts_the_margin_on_every_row_of_the_target_class():
    mc = MultiCenterHead(2, 2, num_subcenters=3, sigma_scale=1e-3, bias=True, margin=make_margin("cosface", 0.25, 8))
    with torch.no_grad():
        mc.weight.copy_(W)
    assert mc.bias is None  # cosine
    torch.manual_seed(0)
    centers = mc.sample_centers()  # (C*(K+1), d); the same draw the forward makes
    torch.manual_seed(0)
    set_margin_target(mc, torch.tensor([[0.3, 0.7], [0.9, 0.1]]), step=0)  # soft targets: classes 1 and 0
    logits = mc.train()(X)  # (2, 8)
    cos = F.normalize(X, dim=1) @ F.normalize(centers, dim=1).T
    row_class = torch.arange(2).repeat_interleave(4)
    on_target = row_class[None, :] == torch.tensor([[1], [0]])
    torch.testing.assert_close(logits, 8 * (cos - 0.25 * on_target))
    torch.testing.assert_close(mc.eval()(X), 8 * COS)  # test time: s cos over the mean centers
    torch.testing.assert_close(mc.to_linear()(X), 8 * COS)


def test_a_target_is_needed_and_consumed_and_the_soft_target_rule():
    h = head("cosface", margin=0.3, scale=5.0).train()
    with pytest.raises(RuntimeError, match="needs set_margin_target"):
        h(X)  # a training forward without a target would silently be plain softmax
    set_margin_target(h, torch.tensor([0, 1]), step=0)
    h(X)
    with pytest.raises(RuntimeError, match="needs set_margin_target"):
        h(X)  # consumed: a stale target never scores another batch
    set_margin_target(h, torch.tensor([0, 1, 1]), step=0)
    with pytest.raises(RuntimeError, match="needs set_margin_target"):
        h(X)  # a target for another batch size
    assert hard_target(torch.tensor([[0.5, 0.5], [0.2, 0.8]])).tolist() == [0, 1]  # ties: the lowest class


def test_margins_are_float32_under_autocast():
    h = head("arcface", margin=0.3, scale=16.0).train()
    x = torch.randn(8, 2)
    target = torch.randint(0, 2, (8,))
    set_margin_target(h, target, step=0)
    reference = h(x)
    set_margin_target(h, target, step=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = h(x)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, reference, rtol=1e-5, atol=1e-5)


def test_the_training_loop_sets_every_forwards_target_and_the_run_position(tmp_path, monkeypatch):
    from mcc_train.margins import Margin

    seen = []
    original = Margin._train_logits

    def spy(self, x, weight, bias, row_class, target):
        seen.append((len(target), self.step, self.total_steps))
        return original(self, x, weight, bias, row_class, target)

    monkeypatch.setattr(Margin, "_train_logits", spy)
    flags = ["--epochs", "2", "--loss", "lsoftmax", "--mixup", "0.2", "--grad-accum-steps", "2"]
    args = [*FAST_TRAIN, *flags, "--out", str(tmp_path / "o")]
    assert main(args) == 0
    # 128 images / batch 32 = 4 micro-batches per epoch, 2 per update: 2 updates per epoch, 4 in the run
    assert [b for b, _, _ in seen] == [32] * 8
    assert [step for _, step, _ in seen] == [0, 0, 1, 1, 2, 2, 3, 3] and {t for _, _, t in seen} == {4}


def test_to_cosine_linear_normalises_its_input():
    lin = to_cosine_linear(W, 3.0)
    torch.testing.assert_close(lin(X), 3 * COS)
    torch.testing.assert_close(lin(10 * X), 3 * COS)  # the feature's norm does not matter


def test_bad_settings_are_one_line(tmp_path, capsys):
    def run(*extra):
        return main([*FAST_TRAIN, "--epochs", "1", "--out", str(tmp_path / "o"), *extra])

    for args, message in (
        (["--margin", "0.2"], "--margin and --margin-scale apply to --loss lsoftmax, cosface or arcface"),
        (["--loss", "lsoftmax", "--margin", "2.5"], "L-Softmax margin is an integer from 1 to 8"),
        (["--loss", "lsoftmax", "--margin", "inf"], "must be finite"),
        (["--loss", "lsoftmax", "--margin-scale", "30"], "--margin-scale applies to --loss cosface or arcface"),
        (["--loss", "arcface", "--margin", "1.5"], "margin must be in [0, 1)"),
        (["--loss", "cosface", "--margin-scale", "0"], "scale s must be > 0"),
        (["--loss", "arcface", "--sampling", "local"], "use --sampling shared"),
        (["--loss", "nope"], "--loss must be one of softmax, lsoftmax, cosface, arcface"),
    ):
        assert run(*args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    with pytest.raises(UsageError, match="use --sampling shared"):
        create_model("resnet10t", 4, loss="cosface", sampling="local")
