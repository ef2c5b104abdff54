"""Softmax variants with margins (the paper's table 6): L-Softmax, ArcFace and CosFace, for the MC and linear heads.

The kinds, their defaults and the classifier each gives at test time are ``LOSSES`` (``mcc_serve.runtime.choices``,
shared with export and serving; why these defaults: docs/RESULTS.md); the formulas below are the papers', written out
for a check in minutes.
Shapes: B batch, d features, R scored rows (C classes, or C*(K+1) extended centers), C classes.

- ``softmax``: ``x . w_r + b_r``, no margin.
- ``lsoftmax`` (Liu et al. 2016, "Large-Margin Softmax Loss"): the target row's logit ``|w||x| cos(theta)`` becomes
  ``|w||x| psi(theta)``, ``psi(theta) = (-1)^k cos(m theta) - 2k`` for ``theta in [k pi/m, (k+1) pi/m]``, an
  integer ``m``; annealed against plain softmax as the paper prescribes: ``(lambda |w||x| cos + |w||x| psi) /
  (1 + lambda)``, ``lambda = 1000 / (1 + gamma t)`` after t of the run's T optimizer updates. The paper's code sets
  gamma for ImageNet-length runs (its lambda is still in the hundreds after a thousand updates, which leaves a short
  run plain softmax); here ``gamma = 2000 / T``, so lambda is 1 at mid-run (psi has half the weight) and 0.5 at the
  end (two thirds), on any run length. Other rows and the bias (timm's classifier keeps one; the paper has none) are
  unchanged. Test time: ``x . w + b``, the linear head.
- ``cosface`` (Wang et al. 2018, "CosFace"): every row scores ``s cos(theta_r)``, cos of the L2-normalised feature
  and row; the target rows get ``s (cos(theta) - m)``. No bias. Test time: ``s cos(theta)`` over the mean centers.
- ``arcface`` (Deng et al. 2019, "ArcFace"): as CosFace with ``s cos(theta + m)`` on the target rows; where
  ``theta + m > pi`` (``cos(theta) < cos(pi - m)``) it falls back to ``s (cos(theta) - m sin(m))`` (insightface's
  rule: monotonic in theta, so the gradient never turns). Test time: ``s cos(theta)``.

With MC the rows are the mean centers and the sampled sub-centers (``MultiCenterHead.sample_centers``): every row is
scored the same way, and the margin goes on all K+1 rows of the target class. The target class of a sample is the
class its (soft) target gives the most mass (ties: the lowest index): with label smoothing that is the label, with
mixup/cutmix the dominant image's; the soft target itself (``multi_center_target``) is what the cross-entropy
scores, unchanged. The training loop sets the target (``set_margin_target``) before each training forward, which
consumes it; a training forward of a head with a margin and no target is an error, not a silent softmax. The
margin is computed in float32 whatever autocast is on (acos, sqrt and s * cos lose too much in bf16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mcc_serve.runtime.choices import LOSSES, LossKind, one_of


def cosine(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """cos(theta) between each feature and each row: (B, d), (R, d) -> (B, R)."""
    return F.linear(F.normalize(x, dim=1), F.normalize(weight, dim=1))


def cosface(cos: torch.Tensor, m: float) -> torch.Tensor:
    """cos(theta) - m."""
    return cos - m


def arcface(cos: torch.Tensor, m: float) -> torch.Tensor:
    """cos(theta + m) where theta + m <= pi, else cos(theta) - m sin(m) (the fallback that keeps it decreasing)."""
    sin = (1.0 - cos.square()).clamp_min(1e-12).sqrt()  # >= 0 on [0, pi]; clamped: a finite gradient at theta = 0
    phi = cos * math.cos(m) - sin * math.sin(m)  # cos(theta + m)
    return torch.where(cos > math.cos(math.pi - m), phi, cos - m * math.sin(m))


def lsoftmax_psi(cos: torch.Tensor, m: int) -> torch.Tensor:
    """psi(theta) = (-1)^k cos(m theta) - 2k, theta in [k pi/m, (k+1) pi/m]: monotonic, psi(0) = 1, psi(pi) = 1 - 2m.

    cos(m theta) comes from cos(theta) through the Chebyshev polynomial T_m, as the paper computes it; k from theta.
    """
    theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))  # clamped: acos has an infinite slope at +-1
    k = torch.floor(theta * m / math.pi).clamp(0, m - 1)
    sign = 1.0 - 2.0 * torch.remainder(k, 2)  # (-1)^k
    return sign * chebyshev(cos, m) - 2.0 * k


def chebyshev(cos: torch.Tensor, m: int) -> torch.Tensor:
    """T_m(cos(theta)) = cos(m theta), by the recurrence T_{n+1} = 2 x T_n - T_{n-1}."""
    prev, cur = torch.ones_like(cos), cos
    if m == 0:
        return prev
    for _ in range(m - 1):
        prev, cur = cur, 2 * cos * cur - prev
    return cur


ON_TARGET = {"cosface": cosface, "arcface": arcface}  # a cosine kind's target rows: cos(theta) -> with its margin
LSOFTMAX_BASE = 1000.0  # the paper's lambda at the start; its decay rate comes from the run's length
LSOFTMAX_MAX_MARGIN = 8  # the paper uses m = 1-4; cos(m theta) past 8 has no use and costs m steps per forward


@dataclass
class Margin:
    """A head's softmax variant. ``target`` (B,) and ``step`` are set by the training loop before each forward."""

    loss: str = "softmax"
    margin: float = 0.0
    scale: float = 1.0
    target: torch.Tensor | None = None  # (B,) class indices for the next training forward, which consumes them
    step: int = 0  # optimizer updates so far, of total_steps: the L-Softmax annealing
    total_steps: int = 1

    def __post_init__(self):
        check_margin_args(self.loss, self.margin, self.scale)

    @property
    def kind(self) -> LossKind:
        return LOSSES[self.loss]

    def lsoftmax_lambda(self) -> float:
        """lambda = 1000 / (1 + gamma t), gamma = 2000 / T: 1000 at the start, 1 at mid-run, 0.5 at the end."""
        gamma = 2 * LSOFTMAX_BASE / max(self.total_steps, 1)
        return LSOFTMAX_BASE / (1 + gamma * self.step)

    # NOTE: outside any compiled graph (--compile model): it reads the target and step the loop sets on this object
    # each step, which a graph would take as constants and recompile for at every step
    @torch.compiler.disable
    def train_logits(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_class: torch.Tensor):
        """Training logits over R rows with the margin on the target class's rows: (B, d), (R, d) -> (B, R).

        Args:
            row_class: (R,) the class of each row (``arange(C)`` for a linear head).
        """
        if not self.kind.has_margin:
            return self.test_logits(x, weight, bias)
        if self.target is None or len(self.target) != len(x):
            raise RuntimeError(
                f"a {self.kind.title} head in training mode needs set_margin_target(head, target, step, total) before "
                "each forward (mcc_train.train does it); call model.eval() for test-time logits"
            )
        target, self.target = self.target, None  # consumed: a stale target never scores another batch
        with torch.autocast(x.device.type, enabled=False):  # float32 margins whatever autocast is on
            bias = None if bias is None else bias.float()
            return self._train_logits(x.float(), weight.float(), bias, row_class, target)

    def _train_logits(self, x, weight, bias, row_class, target) -> torch.Tensor:
        is_target = row_class.unsqueeze(0) == target.unsqueeze(1)  # (B, R)
        if self.kind.cosine:
            cos = cosine(x, weight)  # (B, R)
            return self.scale * torch.where(is_target, ON_TARGET[self.loss](cos, self.margin), cos)
        raw = F.linear(x, weight)  # (B, R): |w||x| cos(theta)
        norms = x.norm(dim=1, keepdim=True) * weight.norm(dim=1)  # (B, R)
        cos = (raw / norms.clamp_min(1e-12)).clamp(-1.0, 1.0)
        lam = self.lsoftmax_lambda()
        target_logit = (lam * raw + norms * lsoftmax_psi(cos, int(self.margin))) / (1 + lam)
        logits = torch.where(is_target, target_logit, raw)
        return logits if bias is None else logits + bias

    def test_logits(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The variant's test-time logits: ``x . w + b``, or ``s cos(theta)`` for a cosine kind. (B, d) -> (B, R)."""
        if self.kind.cosine:
            with torch.autocast(x.device.type, enabled=False):
                return self.scale * cosine(x.float(), weight.float())
        return F.linear(x, weight, bias)


def check_margin_args(loss: str, margin: float, scale: float) -> None:
    """Raise ValueError naming the first bad margin setting."""
    if loss not in LOSSES:
        raise ValueError(one_of("loss", loss, LOSSES))
    kind = LOSSES[loss]
    if not (math.isfinite(margin) and math.isfinite(scale)):
        raise ValueError(f"the margin and scale must be finite, got {margin!r} and {scale!r}")
    if kind.has_margin and not kind.cosine and not (margin == int(margin) and 1 <= margin <= LSOFTMAX_MAX_MARGIN):
        raise ValueError(
            f"the {kind.title} margin is an integer from 1 to {LSOFTMAX_MAX_MARGIN} (cos(m theta)), got {margin!r}"
        )
    if kind.cosine and not 0 <= margin < 1:
        raise ValueError(f"the {loss} margin must be in [0, 1), got {margin!r}")
    if kind.cosine and not scale > 0:
        raise ValueError(f"the {loss} scale s must be > 0, got {scale!r}")


def make_margin(loss: str, margin: float | None = None, scale: float | None = None) -> Margin:
    """A ``Margin`` with the registry's defaults for what is not given."""
    kind = LOSSES.get(loss)
    if kind is None:
        raise ValueError(one_of("loss", loss, LOSSES))
    return Margin(loss, kind.margin if margin is None else margin, (kind.scale or 1.0) if scale is None else scale)


class MarginLinear(nn.Linear):
    """The linear head (no MC) with a softmax variant: the same ``weight``/``bias`` keys as ``nn.Linear``.

    Training with ``margin.target`` set: the variant's logits with the margin; otherwise its test-time logits.
    """

    def __init__(self, in_features: int, num_classes: int, margin: Margin, bias: bool = True):
        super().__init__(in_features, num_classes, bias=bias and not margin.kind.cosine)
        self.margin = margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            row_class = torch.arange(self.out_features, device=x.device)  # (C,)
            return self.margin.train_logits(x, self.weight, self.bias, row_class)  # (B, d) -> (B, C)
        return self.margin.test_logits(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, loss={self.margin.loss}, margin={self.margin.margin}, scale={self.margin.scale}"
        )


class CosineLinear(nn.Linear):
    """The test-time cosine classifier as a vanilla model holds it: ``F.linear(normalize(x), weight, bias)``.

    Its ``weight`` is the mean centers row-normalised and scaled by s, its ``bias`` zero, so the keys are
    ``nn.Linear``'s: ``timm.create_model(arch)`` loads them strictly, and L2-normalising the pre-logits before its
    classifier gives these logits.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=1), self.weight, self.bias)  # (B, d) -> (B, C)


def to_cosine_linear(weight: torch.Tensor, scale: float) -> CosineLinear:
    """The CosineLinear that computes ``scale * cos(x, weight)``: (C, d) mean centers -> the test-time classifier."""
    linear = CosineLinear(weight.shape[1], weight.shape[0], bias=True).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(scale * F.normalize(weight, dim=1))
        linear.bias.zero_()
    return linear


def hard_target(target: torch.Tensor) -> torch.Tensor:
    """The class a target gives the most mass: (B,) indices pass through, (B, C) soft targets -> (B,) argmax."""
    return target if target.ndim == 1 else target.argmax(dim=1)


def set_margin_target(head: nn.Module, target: torch.Tensor | None, step: int, total_steps: int = 1) -> None:
    """Tell a head with a softmax variant the target classes of its next training forward (class indices (B,) or a
    soft target (B, C)), and where the run is: ``step`` of ``total_steps`` optimizer updates. No-op for other
    heads."""
    margin = getattr(head, "margin", None)
    if isinstance(margin, Margin):
        margin.target = None if target is None else hard_target(target)
        margin.step, margin.total_steps = step, total_steps
