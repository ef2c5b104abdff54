"""Any timm backbone with the multi-center head in place of its classifier."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import timm
import torch
from torch import nn

from .errors import UsageError
from .head import MC_DEFAULTS, MCSettings, MultiCenterHead, check_head_args

_logger = logging.getLogger(__name__)

HEADS = ("mc", "linear")


def classifier_path(model: nn.Module) -> str:
    """Dotted path of the model's single linear classifier, as timm's pretrained_cfg names it.

    Raises:
        UsageError: the model has no single ``nn.Linear`` classifier (a distilled two-head model, a conv head).
    """
    name = type(model).__name__
    path = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    if not isinstance(path, str):
        raise UsageError(f"{name} has classifier {path!r}, not a single linear classifier; the MC head needs one")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise UsageError(f"{name}: pretrained_cfg names classifier {path!r}, which the model does not have") from None
    if module is not model.get_classifier() or not isinstance(module, (nn.Linear, MultiCenterHead)):
        raise UsageError(f"{name}: classifier {path!r} is a {type(module).__name__}, not a single nn.Linear")
    return path


def create_model(
    arch: str,
    num_classes: int,
    *,
    head: str = "mc",
    in_chans: int = 3,
    mc: MCSettings = MC_DEFAULTS,
    img_size: int | None = None,
    checkpoint_path: str | Path | None = None,
    **kwargs,
) -> nn.Module:
    """Build ``timm.create_model(arch, pretrained=False, ...)`` with an MC (or the vanilla linear) head.

    For ``head="mc"`` the model's own classifier is replaced by a MultiCenterHead that starts from the same
    weight and bias, so the state_dict keys are the vanilla model's plus ``<classifier>.log_var``.

    Args:
        arch: any timm model name with a single linear classifier.
        num_classes: C.
        head: ``"mc"`` or ``"linear"`` (the vanilla baseline).
        in_chans: input channels (1 for grayscale).
        mc: the MC hyperparameters (``MC_DEFAULTS`` unless given); single fields can also be passed as keywords,
            e.g. ``num_subcenters=4, sampling="local"``.
        img_size: input size; passed to timm only for models with a fixed token grid (ViT, Swin), CNNs take any.
        checkpoint_path: local timm weights that initialise the backbone; a classifier of another shape is skipped.
        **kwargs: MCSettings fields, the rest passed to ``timm.create_model`` (``drop_rate``, ``patch_size``, ...).
    """
    if head not in HEADS:
        raise UsageError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    mc_fields = {f.name for f in dataclasses.fields(MCSettings)}
    mc = dataclasses.replace(mc, **{k: kwargs.pop(k) for k in list(kwargs) if k in mc_fields})
    timm_kwargs = kwargs
    if head == "mc":
        try:
            check_head_args(mc.num_subcenters, mc.center_weight, mc.sigma_scale, mc.sampling, mc.sigma_mode)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else " (see timm.list_models())"
        raise UsageError(f"unknown arch {arch!r}{hint}")
    timm_kwargs = timm_size_kwargs(arch, img_size) | timm_kwargs
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
    except Exception as e:  # an argument the model does not take, a value or input size it rejects
        raise UsageError(
            f"{arch}: cannot build it with {timm_kwargs or 'its defaults'} ({type(e).__name__}: {e}); "
            "check --img-size and --model-kwargs"
        ) from None
    path = classifier_path(model)
    if checkpoint_path is not None:
        load_backbone(model, checkpoint_path, path)
    if head == "mc":
        linear = model.get_submodule(path)
        mc_head = MultiCenterHead(linear.in_features, num_classes, bias=linear.bias is not None, **mc.head_kwargs())
        with torch.no_grad():  # same starting point as the linear baseline
            mc_head.weight.copy_(linear.weight)
            if linear.bias is not None:
                mc_head.bias.copy_(linear.bias)
        model.set_submodule(path, mc_head)
    return model


def timm_size_kwargs(arch: str, img_size: int | None) -> dict:
    """``{"img_size": ...}`` for archs whose pretrained_cfg has a fixed input size, else nothing."""
    cfg = timm.models.get_pretrained_cfg(arch)
    fixed = cfg is not None and bool(getattr(cfg, "fixed_input_size", False))
    return {"img_size": img_size} if img_size is not None and fixed else {}


def get_mc_head(model: nn.Module) -> MultiCenterHead | None:
    """The model's MultiCenterHead, or None for a linear-head model."""
    head = model.get_classifier()
    return head if isinstance(head, MultiCenterHead) else None


def load_backbone(model: nn.Module, checkpoint_path: str | Path, classifier: str) -> None:
    """Load local timm weights into ``model``; classifier tensors of another shape are left at their init."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise UsageError(f"--checkpoint-path {path}: no such file")
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as e:
        raise UsageError(f"--checkpoint-path {path}: not a readable weights file ({type(e).__name__}: {e})") from None
    own = model.state_dict()
    skipped = [k for k in state if k.startswith(classifier + ".") and k in own and state[k].shape != own[k].shape]
    for k in skipped:
        del state[k]
    result = model.load_state_dict(state, strict=False)
    unexpected = list(result.unexpected_keys)
    backbone_missing = [k for k in result.missing_keys if not k.startswith(classifier + ".")]
    if unexpected or backbone_missing:
        raise UsageError(
            f"--checkpoint-path {path}: does not fit {type(model).__name__} "
            f"(unexpected keys {unexpected[:3]}, missing keys {backbone_missing[:3]}); is it weights for this arch?"
        )
    _logger.info("initialised backbone from %s%s", path, " (classifier skipped: shape differs)" if skipped else "")
