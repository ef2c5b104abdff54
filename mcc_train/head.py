"""The multi-center classifier (MC): head, multi-center target and loss.

Everything here follows ``METHOD.md`` (Zhang & Gong, "Generating Multi-Center Classifier via
Conditional Gaussian Distribution"); names match the paper: ``weight`` (mean centers),
``log_var`` (per-class log-variance), ``num_subcenters`` (K), ``center_weight`` (eq. 8).

Shapes: B batch, d features, C classes, K sub-centers per class.

Defaults (``MCSettings()``, ``MC_DEFAULTS``): the paper's settings (K=2, center weight 0.5, shared draw, L_sigma
weight 1) with ``sigma_scale`` 0.03 instead of 0.1; ``MC_PRESETS["paper"]`` (``--mc-preset paper``) keeps the
paper's exact settings. Why: the paper's std is absolute, so how far a sub-center sits from its mean center depends
on the scale of the classifier's weights, which differs between backbones (timm starts a ViT's head with far smaller
weights than a CNN's); the paper's 0.1 puts sub-centers several center norms away on some backbones, a small std
keeps them near their means on any. ``sigma_mode="relative"`` ties the offset to the weight scale instead. (The
study: docs/RESULTS.md.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mcc_serve.runtime.choices import LOSSES

from .checks import NON_NEGATIVE, POSITIVE, UNIT, Valid, choice
from .margins import Margin, to_cosine_linear

SAMPLING_MODES = ("shared", "local")
SIGMA_MODES = ("absolute", "relative")


def _mc(default, valid: Valid):
    return field(default=default, metadata={"valid": valid})


@dataclass(frozen=True)
class MCSettings:
    """The MC hyperparameters, defined once: the head's, plus the loss's ``kl_weight``. The defaults are mcc's
    (``MC_DEFAULTS``); each field's valid range sits beside it, checked on construction (ValueError).

    Args:
        num_subcenters: K >= 1 sub-centers sampled per class and forward pass.
        center_weight: target mass on a class's mean center (eq. 8); the rest is split over its K sub-centers.
        sigma_scale: scale on the standard deviation (see ``sigma_mode``).
        sigma_mode: ``"absolute"`` (the paper: ``std = sigma_scale * exp(log_var / 2)``) or ``"relative"``
            (``std = sigma_scale * rms(w_c) * exp(log_var / 2)``: the noise scales with each class's weight).
        sampling: ``"shared"`` (the paper: one set of sub-centers per forward pass, shared by the batch) or
            ``"local"`` (local reparameterization: each sample's sub-center logits are drawn directly from
            their exact per-sample distribution; same per-sample law, far fewer random numbers).
        kl_weight: weight of L_sigma in the loss (1 in the paper; 0 removes it).
    """

    num_subcenters: int = _mc(2, Valid(lambda k: isinstance(k, int) and k >= 1, "an integer >= 1"))
    center_weight: float = _mc(0.5, UNIT)
    sigma_scale: float = _mc(0.03, POSITIVE)
    sigma_mode: str = _mc("absolute", choice(SIGMA_MODES))
    sampling: str = _mc("shared", choice(SAMPLING_MODES))
    kl_weight: float = _mc(1.0, NON_NEGATIVE)

    def __post_init__(self):
        check_mc(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def head_kwargs(self) -> dict:
        """The MultiCenterHead arguments (everything but the loss's kl_weight)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "kl_weight"}


MC_VALID = {f.name: f.metadata["valid"] for f in dataclasses.fields(MCSettings)}  # each MC setting's valid range


def check_mc(loss: str = "softmax", **settings) -> None:
    """Raise ValueError naming the first of ``settings`` (``MCSettings`` fields, by name) out of its range; with a
    margin ``loss``, also ``sampling="local"``: the margin goes on sampled sub-center rows, which a local draw lacks.

    The one check of MC settings: the head, the loss, ``MCSettings``, ``create_model`` and the CLI all call it (the
    CLI through ``MC_VALID``, with the flag's name in the message).
    """
    for name, value in settings.items():
        if not MC_VALID[name].test(value):
            raise ValueError(MC_VALID[name].message(name, value))
    if LOSSES[loss].has_margin and settings.get("sampling") == "local":
        raise ValueError(f"--loss {loss} scores sampled sub-center rows: use --sampling shared")


MC_DEFAULTS = MCSettings()
MC_PRESETS = {
    "paper": MCSettings(sigma_scale=0.1),  # the paper and the authors' code: K=2, 0.5, absolute std 0.1, shared draw
    "default": MC_DEFAULTS,  # mcc's: the paper's with std 0.03 (why: the module docstring)
}


class MultiCenterHead(nn.Module):
    """Linear classifier whose classes are Gaussians; K sub-centers per class are sampled in training.

    In eval mode the head is exactly ``F.linear(x, weight, bias)``: the mean centers, nothing else.

    Args:
        in_features: d, the pooled feature width.
        num_classes: C.
        num_subcenters, center_weight, sigma_scale, sigma_mode, sampling: as ``MCSettings``; the defaults are
            ``MC_DEFAULTS``.
        bias: keep a per-class bias, shared by the mean and its sub-centers (none with a cosine ``margin``).
        margin: a softmax variant (``mcc_train.margins``: L-Softmax, CosFace, ArcFace) scoring the mean centers and
            the sampled sub-centers alike; None: plain softmax. Needs shared sampling (a local draw has no rows).
            The margin goes on all K+1 rows of each sample's target class: the class its soft target (label
            smoothing, mixup, cutmix) gives the most mass, the lowest on a tie; the cross-entropy still scores the
            soft multi-center target. The training loop names the targets before each forward
            (``set_margin_target``).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        num_subcenters: int = MC_DEFAULTS.num_subcenters,
        center_weight: float = MC_DEFAULTS.center_weight,
        sigma_scale: float = MC_DEFAULTS.sigma_scale,
        bias: bool = True,
        sampling: str = MC_DEFAULTS.sampling,
        sigma_mode: str = MC_DEFAULTS.sigma_mode,
        margin: Margin | None = None,
    ):
        super().__init__()
        check_mc(
            "softmax" if margin is None else margin.loss,
            num_subcenters=num_subcenters,
            center_weight=center_weight,
            sigma_scale=sigma_scale,
            sampling=sampling,
            sigma_mode=sigma_mode,
        )
        self.margin = margin
        self.fused = False  # training math through torch.compile (``fuse_mc``); eval is F.linear either way
        bias = bias and not (margin is not None and margin.kind.cosine)
        self.in_features = in_features
        self.num_classes = num_classes
        self.num_subcenters = num_subcenters
        self.center_weight = center_weight
        self.sigma_scale = sigma_scale
        self.sigma_mode = sigma_mode
        self.sampling = sampling
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.bias = nn.Parameter(torch.empty(num_classes)) if bias else None
        self.log_var = nn.Parameter(torch.empty(num_classes, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # weight and bias as nn.Linear; log_var like an nn.Linear weight (authors' code).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.log_var, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def std(self) -> torch.Tensor:
        """Standard deviation of every class's Gaussian, (C, d).

        ``absolute``: ``sigma_scale * exp(log_var / 2)``. ``relative``: the same times the RMS of the class's
        mean center ``sqrt(mean_j w_cj^2)``, taken as a constant (no gradient flows through it), so the offset
        of a sub-center is a fixed fraction of its center whatever scale the backbone and the data give ``w``.
        """
        return mc_std(self.weight, self.log_var, self.sigma_scale, self.sigma_mode == "relative")

    def logit_std(self, x: torch.Tensor) -> torch.Tensor:
        """Standard deviation of each sub-center logit around its mean center's logit, (B, d) -> (B, C).

        For one sample, ``x . w_c^(k) = x . w_c + sum_j x_j std_cj eps_ckj ~ N(x . w_c, sum_j x_j^2 std_cj^2)``.
        """
        return sub_logit_std(x, self.std())

    def offset_ratio(self) -> torch.Tensor:
        """RMS sub-center offset norm over mean-center norm, per class: ``||std_c|| / ||w_c||``, (C,).

        ``E ||std_c * eps||^2 = ||std_c||^2``; a ratio of 1 means a sub-center is typically as far from its mean as
        the mean is from the origin.
        """
        return self.std().norm(dim=1) / self.weight.norm(dim=1).clamp_min(1e-12)

    def sample_centers(self, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Mean centers and K sampled sub-centers per class, interleaved: (C*(K+1), d).

        Row ``c*(K+1)`` is ``weight[c]``; rows ``c*(K+1)+k`` (k = 1..K) are its sub-centers.

        Args:
            eps: standard normal noise (C, K, d); one vectorised draw on the parameters' device when None.
        """
        draw = fused(draw_centers) if self.fused and not torch.compiler.is_compiling() else draw_centers
        if eps is None:
            eps = self._eager_noise((self.num_classes, self.num_subcenters, self.in_features), self.weight)
        relative = self.sigma_mode == "relative"
        return draw(self.weight, self.log_var, self.num_subcenters, self.sigma_scale, relative, eps)

    def _eager_noise(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
        """Standard normal noise drawn with ATen for a fused head on the CPU, where ATen's generator is faster than
        inductor's; None elsewhere: eager draws it itself, and a compiled CUDA head draws it in-kernel."""
        if not self.fused or like.device.type != "cpu":
            return None
        return torch.randn(shape, dtype=torch.promote_types(like.dtype, self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            if self.margin is not None:
                return self.margin.test_logits(x, self.weight, self.bias)  # (B, d) -> (B, C)
            return F.linear(x, self.weight, self.bias)  # (B, d) -> (B, C)
        if self.margin is not None and self.margin.kind.has_margin:
            K = self.num_subcenters
            bias = None if self.bias is None else self.bias.repeat_interleave(K + 1)  # (C*(K+1),)
            row_class = torch.arange(self.num_classes, device=x.device).repeat_interleave(K + 1)  # (C*(K+1),)
            return self.margin.train_logits(x, self.sample_centers(), bias, row_class)  # (B, d) -> (B, C*(K+1))
        fn = local_logits if self.sampling == "local" else shared_logits
        if self.fused and not torch.compiler.is_compiling():  # under --compile model the model's graph fuses it
            fn = fused(fn)
        C, K = self.num_classes, self.num_subcenters
        noise = self._eager_noise((len(x), C, K) if self.sampling == "local" else (C, K, self.in_features), x)
        relative = self.sigma_mode == "relative"
        return fn(x, self.weight, self.log_var, self.bias, K, self.sigma_scale, relative, noise)  # (B, C*(K+1))

    def kl_loss(self) -> torch.Tensor:
        """L_sigma = -0.5 * sum_{c,j} (1 + log_var - exp(log_var)) / C (eq. 10-11, authors' code)."""
        return kl_loss(self.log_var)

    def to_linear(self) -> nn.Linear:
        """The test-time classifier: an ``nn.Linear`` holding copies of the mean centers and bias; with a cosine
        margin, the ``CosineLinear`` of the mean centers (``s * cos``)."""
        if self.margin is not None and self.margin.kind.cosine:
            return to_cosine_linear(self.weight.detach(), self.margin.scale)
        linear = nn.Linear(self.in_features, self.num_classes, bias=self.bias is not None)
        linear = linear.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, num_subcenters={self.num_subcenters}, "
            f"center_weight={self.center_weight}, sigma_scale={self.sigma_scale}, sigma_mode={self.sigma_mode}, "
            f"bias={self.bias is not None}, sampling={self.sampling}"
            + (
                f", loss={self.margin.loss}, margin={self.margin.margin}, scale={self.margin.scale}"
                if self.margin
                else ""
            )
        )


# The training math as pure functions of tensors: the head calls them eagerly, or compiled (``fuse_mc``), so the
# eager code is the reference the fused path is tested against.


def mc_std(weight: torch.Tensor, log_var: torch.Tensor, sigma_scale: float, relative: bool) -> torch.Tensor:
    """Every class's standard deviation, (C, d): ``sigma_scale * exp(log_var / 2)``, times ``rms(w_c)`` (no
    gradient) when relative."""
    std = sigma_scale * torch.exp(0.5 * log_var)  # (C, d)
    if relative:
        std = std * weight.detach().square().mean(dim=1, keepdim=True).sqrt()  # (C, d) * (C, 1)
    return std


def draw_centers(
    weight: torch.Tensor,
    log_var: torch.Tensor,
    num_subcenters: int,
    sigma_scale: float,
    relative: bool,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean centers and K sub-centers ``w_c + std_c * eps_ck`` per class, interleaved: (C, d) -> (C*(K+1), d).

    Args:
        eps: standard normal noise (C, K, d); drawn here in one call when None.
    """
    C, d = weight.shape
    K = num_subcenters
    if eps is None:
        eps = torch.randn(C, K, d, device=weight.device, dtype=weight.dtype)
    std = mc_std(weight, log_var, sigma_scale, relative)
    sub = torch.addcmul(weight.unsqueeze(1), std.unsqueeze(1), eps)  # (C, K, d)
    return torch.cat([weight.unsqueeze(1), sub], dim=1).reshape(C * (K + 1), d)


def sub_logit_std(x: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``sqrt(sum_j x_j^2 std_cj^2)``: (B, d), (C, d) -> (B, C), > 0 so the gradient is finite at x = 0."""
    return F.linear(x.square(), std.square()).clamp_min(1e-12).sqrt()


def shared_logits(x, weight, log_var, bias, num_subcenters: int, sigma_scale: float, relative: bool, eps=None):
    """The paper's training logits: one draw of sub-centers shared by the batch, (B, d) -> (B, C*(K+1)).

    Args:
        eps: the noise (C, K, d); drawn here when None.
    """
    K = num_subcenters
    centers = draw_centers(weight, log_var, K, sigma_scale, relative, eps)  # (C*(K+1), d)
    return F.linear(x, centers, None if bias is None else bias.repeat_interleave(K + 1))


def local_logits(x, weight, log_var, bias, num_subcenters: int, sigma_scale: float, relative: bool, xi=None):
    """Local reparameterization: each sub-center logit drawn from its exact per-sample law
    ``N(x . w_c + b_c, sum_j x_j^2 std_cj^2)``, (B, d) -> (B, C*(K+1)).

    Args:
        xi: the noise (B, C, K); drawn here when None.
    """
    mean = F.linear(x, weight, bias)  # (B, C)
    std = sub_logit_std(x, mc_std(weight, log_var, sigma_scale, relative))  # (B, C)
    if xi is None:
        xi = torch.randn(*mean.shape, num_subcenters, device=mean.device, dtype=mean.dtype)  # (B, C, K)
    sub = torch.addcmul(mean.unsqueeze(-1), std.unsqueeze(-1), xi)  # (B, C, K)
    return torch.cat([mean.unsqueeze(-1), sub], dim=-1).flatten(-2)  # (B, C*(K+1))


def kl_loss(log_var: torch.Tensor) -> torch.Tensor:
    """L_sigma = -0.5 * sum_{c,j} (1 + log_var - exp(log_var)) / C (eq. 10-11, authors' code)."""
    return -0.5 * torch.sum(1 + log_var - log_var.exp()) / log_var.shape[0]


def mc_cross_entropy(logits: torch.Tensor, target: torch.Tensor, num_subcenters: int, center_weight: float):
    """Cross-entropy of the extended logits (B, C*(K+1)) against the multi-center target of ``target`` (class
    indices (B,) or soft (B, C)), mean over the batch, without building that (B, C*(K+1)) target.

    ``-sum_j t_j log p_j = lse(z) sum_j t_j - sum_c t_c (cw z_c0 + (1 - cw) / K sum_k z_ck)``: the same number as
    ``SoftTargetCrossEntropy()(logits, multi_center_target(target, ...))``.
    """
    B, K = logits.shape[0], num_subcenters
    z = logits.reshape(B, -1, K + 1)  # (B, C, K+1)
    pooled = center_weight * z[..., 0] + (1 - center_weight) / K * z[..., 1:].sum(-1)  # (B, C)
    lse = torch.logsumexp(logits, dim=-1)  # (B,)
    if target.ndim == 1:
        return (lse - pooled.gather(1, target.long().unsqueeze(1)).squeeze(1)).mean()
    return (lse * target.sum(-1) - (pooled * target).sum(-1)).mean()


def mc_loss(logits, target, log_var, num_subcenters: int, center_weight: float, kl_weight: float) -> torch.Tensor:
    """Eq. 9: the multi-center cross-entropy plus ``kl_weight * L_sigma``."""
    loss = mc_cross_entropy(logits, target, num_subcenters, center_weight)
    return loss + kl_weight * kl_loss(log_var) if kl_weight else loss


@functools.cache
def fused(fn):
    """``fn`` through ``torch.compile`` (inductor: the noise, the sub-centers, the interleave and the loss's
    reductions become a few generated kernels), compiled once per process and function."""
    return torch.compile(fn, dynamic=False)


def fuse_mc(model: nn.Module, loss_fn) -> None:
    """``--compile head``: every MultiCenterHead in ``model`` and ``loss_fn`` (a MultiCenterLoss) run their training
    math compiled. Eval stays ``F.linear``; a margin variant's rows are scored eagerly on compiled centers."""
    for module in model.modules():
        if isinstance(module, MultiCenterHead):
            module.fused = True
    if isinstance(loss_fn, MultiCenterLoss):
        loss_fn.fused = True


def multi_center_target(
    target: torch.Tensor,
    num_classes: int,
    num_subcenters: int = MC_DEFAULTS.num_subcenters,
    center_weight: float = MC_DEFAULTS.center_weight,
) -> torch.Tensor:
    """Expand a target over C classes to the C*(K+1) interleaved outputs (eq. 8, generalised).

    Class c's mass t_c goes ``center_weight * t_c`` to its mean and ``(1 - center_weight) / K * t_c`` to each
    sub-center, so the result still sums to 1.

    Args:
        target: class indices (B,) or a soft target (B, C) (label smoothing, mixup, cutmix).
    """
    check_mc(num_subcenters=num_subcenters, center_weight=center_weight)
    if target.ndim == 1:
        target = F.one_hot(target.long(), num_classes).float()  # (B,) -> (B, C)
    if target.shape[-1] != num_classes:
        raise ValueError(f"target has {target.shape[-1]} classes, expected {num_classes}")
    K = num_subcenters
    split = target.new_tensor([center_weight] + [(1 - center_weight) / K] * K)  # (K+1,)
    return (target.unsqueeze(-1) * split).flatten(-2)  # (B, C) -> (B, C*(K+1))


class MultiCenterLoss:
    """Soft-target cross-entropy over the extended logits plus ``kl_weight * L_sigma`` (eq. 9).

    NOTE: a plain callable, not an nn.Module, so the head's parameters are not registered twice.

    Args:
        head: the MultiCenterHead whose logits are scored.
        kl_weight: weight of L_sigma (1 in the paper; 0 removes it, the table 7 ablation).
    """

    def __init__(self, head: MultiCenterHead, kl_weight: float = MC_DEFAULTS.kl_weight):
        check_mc(kl_weight=kl_weight)
        self.head = head
        self.kl_weight = kl_weight
        self.fused = False  # through torch.compile (``fuse_mc``)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss for extended logits (B, C*(K+1)) and a target, class indices (B,) or soft (B, C)."""
        head = self.head
        if target.shape[-1] != head.num_classes and target.ndim == 2:
            raise ValueError(f"target has {target.shape[-1]} classes, expected {head.num_classes}")
        loss = fused(mc_loss) if self.fused else mc_loss
        return loss(logits, target, head.log_var, head.num_subcenters, head.center_weight, self.kl_weight)
