"""The fused MC path (``--compile head``) against the eager head, the loss without an expanded target, and the
training loop's one-step-late loss read (no host sync on the step path)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from timm.loss import SoftTargetCrossEntropy

from mcc_train import MultiCenterHead, MultiCenterLoss, multi_center_target
from mcc_train.errors import UsageError
from mcc_train.head import draw_centers, fuse_mc, fused, mc_cross_entropy
from mcc_train.margins import make_margin, set_margin_target
from mcc_train.train import LossWatch


@pytest.mark.parametrize("K, center_weight", [(1, 0.5), (2, 0.5), (3, 0.3), (2, 1.0)])
@pytest.mark.parametrize("soft", [False, True])
def test_cross_entropy_without_the_expanded_target_equals_the_reference(K, center_weight, soft):
    torch.manual_seed(K)
    B, C = 6, 5
    logits = (3 * torch.randn(B, C * (K + 1), dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, C, (B,))
    if soft:  # mixup-like: two classes, smoothing, rows summing to 1
        target = 0.7 * torch.nn.functional.one_hot(target, C) + 0.3 * torch.softmax(torch.randn(B, C), -1)
        target = target.double()
    dense = target if soft else torch.nn.functional.one_hot(target, C).double()  # the reference in float64 too
    reference = SoftTargetCrossEntropy()(logits, multi_center_target(dense, C, K, center_weight))
    (grad_ref,) = torch.autograd.grad(reference, logits)
    loss = mc_cross_entropy(logits, target, K, center_weight)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12, abs=1e-12)
    assert torch.allclose(grad, grad_ref, atol=1e-12)


def _head_pair(sampling: str, sigma_mode: str, margin=None, device="cpu"):
    torch.manual_seed(0)
    eager = MultiCenterHead(16, 7, sampling=sampling, sigma_mode=sigma_mode, sigma_scale=0.3, margin=margin)
    fused = MultiCenterHead(16, 7, sampling=sampling, sigma_mode=sigma_mode, sigma_scale=0.3, margin=margin)
    fused.load_state_dict(eager.state_dict())
    eager, fused = eager.to(device), fused.to(device)
    loss_eager, loss_fused = MultiCenterLoss(eager), MultiCenterLoss(fused)
    fuse_mc(fused, loss_fused)
    return (eager, loss_eager), (fused, loss_fused)


def _step(head, loss_fn, x, target, seed):
    head.train()
    set_margin_target(head, target, 0, 10)
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    logits = head(x)
    loss = loss_fn(logits, target)
    grads = torch.autograd.grad(loss, [x, *head.parameters()])
    return logits.detach(), loss.detach(), grads


@pytest.mark.slow
@pytest.mark.parametrize(
    "sampling, sigma_mode, loss",
    [("shared", "absolute", "softmax"), ("local", "relative", "softmax"), ("shared", "absolute", "cosface")],
)
def test_fused_head_equals_the_eager_head_with_the_same_noise(sampling, sigma_mode, loss):
    # inductor draws its own in-kernel noise; fallback_random makes it call the eager generator, so both paths
    # see the same noise and must give the same logits, loss and gradients (fp32, inductor on CPU)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        _check_fused_equals_eager(sampling, sigma_mode, loss)
    torch._dynamo.reset()  # nothing compiled under fallback_random is reused by a later test


def _check_fused_equals_eager(sampling, sigma_mode, loss, device="cpu"):
    """Also run by tests/train/test_gpu.py on CUDA."""
    margin = None if loss == "softmax" else make_margin(loss)
    (eager, loss_eager), (fused, loss_fused) = _head_pair(sampling, sigma_mode, margin, device)
    x = torch.randn(8, 16, device=device)
    target = torch.softmax(
        3 * torch.randn(8, 7, device=device), -1
    )  # a soft target: mixup and smoothing take this path
    for seed in (1, 2):  # the second call runs the compiled code again, not a fresh trace
        logits_e, loss_e, grads_e = _step(eager, loss_eager, x, target, seed)
        logits_f, loss_f, grads_f = _step(fused, loss_fused, x, target, seed)
        assert torch.allclose(logits_f, logits_e, atol=1e-5, rtol=1e-5)
        assert loss_f.item() == pytest.approx(loss_e.item(), rel=1e-5)
        for g_f, g_e in zip(grads_f, grads_e, strict=True):
            assert torch.allclose(g_f, g_e, atol=1e-5, rtol=1e-4)
    eager.eval(), fused.eval()
    assert torch.equal(fused(x), eager(x))  # eval is the mean centers, compiled or not


@pytest.mark.slow
def test_in_kernel_noise_of_the_fused_draw_has_the_methods_statistics():
    # inductor's own in-kernel noise (no fallback): on CPU here, on CUDA in tests/train/test_gpu.py, where a
    # compiled head draws its noise this way
    check_in_kernel_noise("cpu")


def check_in_kernel_noise(device: str) -> None:
    """The compiled draw's sub-centers are w + std * N(0, 1), independent per entry, fresh every call."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = MultiCenterHead(256, 100, num_subcenters=3, sigma_scale=0.2).to(device)
    with torch.no_grad():
        head.log_var.uniform_(-1.0, 1.0)
    draw = fused(draw_centers)
    with torch.no_grad():
        centers, again = (draw(head.weight, head.log_var, 3, 0.2, False).view(100, 4, 256) for _ in range(2))
        assert torch.equal(centers[:, 0], head.weight)
        z = (centers[:, 1:] - head.weight.unsqueeze(1)) / head.std().unsqueeze(1)  # (C, K, d) standardised offsets
    assert abs(z.mean().item()) < 0.01  # 76,800 draws: the standard error is 0.0036
    assert z.std().item() == pytest.approx(1.0, abs=0.01)
    assert abs(torch.corrcoef(z.reshape(-1, 2).T)[0, 1].item()) < 0.02  # neighbouring entries uncorrelated
    assert not torch.equal(again[:, 1:], centers[:, 1:])


def test_loss_watch_reads_one_step_late_and_stops_a_diverged_run():
    watch = LossWatch(torch.device("cpu"), epoch=2)
    assert watch.push(torch.tensor(1.5), 0) is None
    assert watch.push(torch.tensor(0.5), 1) == 1.5
    assert watch.push(torch.tensor(float("nan")), 2) == 0.5
    with pytest.raises(UsageError, match=r"diverged at epoch 3, step 3 \(loss nan\)"):
        watch.push(torch.tensor(0.1), 3)
    last = LossWatch(torch.device("cpu"), epoch=0)
    last.push(torch.tensor(2.0), 0)
    last.push(torch.tensor(math.inf), 1)
    with pytest.raises(UsageError, match="step 2"):  # the epoch's last step is checked at its end
        last.flush()


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
# Reads that stay on the host under CUDA too: the data loader and its transforms (CPU tensors, in worker processes
# when --workers > 0) and the optimizer's step counter (a CPU tensor when not capturable).
HOST_SIDE = ("torch/utils/data/", "torchvision/transforms/", "torch/optim/")


def _on_host_side() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if any(part in frame.f_code.co_filename for part in HOST_SIDE):
            return True
        frame = frame.f_back
    return False


def host_reads_per_epoch(tmp_path, name: str, subset: int, monkeypatch, *flags) -> int:
    """Tensor-to-host reads of the step path (each a device sync on CUDA) made inside train_one_epoch over one epoch
    of ``subset`` training images."""
    from mcc_train import train as train_module
    from mcc_train.cli import main

    from ..conftest import FAST_TRAIN

    counts, inside = {"n": 0}, {"on": False}
    for method in HOST_READS:
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, **kwargs):
            counts["n"] += inside["on"] and not _on_host_side()
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    one_epoch = train_module.train_one_epoch

    def watched(*args, **kwargs):
        inside["on"] = True
        try:
            return one_epoch(*args, **kwargs)
        finally:
            inside["on"] = False

    monkeypatch.setattr(train_module, "train_one_epoch", watched)
    args = [*FAST_TRAIN, "--subset", str(subset), "--batch-size", "8", "--epochs", "1", "--out", str(tmp_path / name)]
    assert main([*args, *flags]) == 0
    monkeypatch.undo()
    return counts["n"]


@pytest.mark.parametrize("flags", [(), ("--loss", "arcface", "--mixup", "0.2", "--model-ema")])
def test_the_step_path_reads_nothing_back_from_the_device(tmp_path, monkeypatch, flags):
    # 4 steps or 12 steps: the same reads, all at the epoch's end (the mean loss), none per step
    few = host_reads_per_epoch(tmp_path, "few", 32, monkeypatch, *flags)
    many = host_reads_per_epoch(tmp_path, "many", 96, monkeypatch, *flags)
    assert few == many <= 2


@pytest.mark.slow
def test_compiled_model_trains_resumes_and_exports_with_its_proof(tmp_path):
    from torch._dynamo.utils import counters

    from export import ExportConfig, export_checkpoint
    from mcc_train.checkpoint import load_checkpoint
    from mcc_train.cli import main

    from ..conftest import FAST_TRAIN

    torch._dynamo.reset()
    counters.clear()
    run = tmp_path / "run"
    # L-Softmax: its annealing step changes every step; the model must still compile once, not once per step
    args = [*FAST_TRAIN, "--subset", "320", "--epochs", "1", "--compile", "model", "--loss", "lsoftmax"]
    assert main([*args, "--out", str(run)]) == 0  # 10 steps
    assert counters["stats"]["unique_graphs"] <= 6  # the model's pieces around the margin, eval, the loss
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["config"]["compile"] == "model"
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])  # the plain module's state dict
    assert main(["--resume", str(run / "last.pt"), "--epochs", "2", "--workers", "0"]) == 0
    assert export_checkpoint(ExportConfig(str(run / "last.pt"), str(tmp_path / "bundle"), latency_runs=3)).passed
