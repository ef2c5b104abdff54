"""Any timm backbone with the multi-center head in place of its classifier."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import timm
import torch
from torch import nn

from mcc_serve.runtime.choices import HEAD_TYPES, one_of

from .errors import UsageError
from .head import MC_DEFAULTS, MC_VALID, MCSettings, MultiCenterHead, check_mc
from .margins import Margin, MarginLinear, make_margin, to_cosine_linear

_logger = logging.getLogger(__name__)


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
    pretrained_file: str | Path | None = None,
    loss: str = "softmax",
    margin: float | None = None,
    margin_scale: float | None = None,
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
        pretrained_file: local timm or Hugging Face weights (``.safetensors``, ``.pth``, ``.bin``, or a directory with
            timm's ``config.json``, such as an mcc bundle) loaded through timm's own ``load_pretrained``: the input
            conv is adapted to ``in_chans``, a classifier of another size is dropped, the MC head goes on top.
        loss: the softmax variant, ``mcc_train.margins.LOSSES``: softmax | lsoftmax | cosface | arcface.
        margin, margin_scale: its m and s (None: the registry's defaults).
        **kwargs: MCSettings fields, the rest passed to ``timm.create_model`` (``drop_rate``, ``patch_size``, ...).
    """
    mc_kwargs = {k: v for k, v in kwargs.items() if k in MC_VALID}
    timm_kwargs = {k: v for k, v in kwargs.items() if k not in MC_VALID}
    mc, variant = resolve_head(head, mc, mc_kwargs, loss, margin, margin_scale)
    check_arch(arch)
    timm_kwargs = timm_size_kwargs(arch, img_size) | timm_kwargs
    model = _build(arch, num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
    path = classifier_path(model)
    if pretrained_file is not None:
        model = build_pretrained(model, arch, pretrained_file, path, num_classes, in_chans, timm_kwargs)
    return replace_classifier(model, path, head, mc, variant)


def resolve_head(
    head: str, mc: MCSettings, mc_kwargs: dict, loss: str, margin: float | None, margin_scale: float | None
) -> tuple[MCSettings, Margin | None]:
    """The MC settings (``mc`` with ``mc_kwargs`` in place of its fields) and the softmax variant (None: plain
    softmax) of a ``create_model`` call, checked before anything is built; UsageError names the first bad one."""
    if head not in HEAD_TYPES:
        raise UsageError(one_of("head", head, HEAD_TYPES))
    try:
        mc = dataclasses.replace(mc, **mc_kwargs)
        variant = make_margin(loss, margin, margin_scale)
        if head == "mc":
            check_mc(loss, sampling=mc.sampling)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return mc, variant if variant.kind.has_margin else None


def check_arch(arch: str) -> None:
    """UsageError for a name timm does not know, with similar names it does."""
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else " (see timm.list_models())"
        raise UsageError(f"unknown arch {arch!r}{hint}")


def build_pretrained(
    model: nn.Module,
    arch: str,
    pretrained_file: str | Path,
    classifier: str,
    num_classes: int,
    in_chans: int,
    timm_kwargs: dict,
) -> nn.Module:
    """``arch`` built again by timm with ``pretrained_file``'s weights (``model``: the same arch, freshly built,
    that the file is checked against); logs what timm adapted."""
    overlay = pretrained_overlay(model, arch, pretrained_file, classifier)
    try:
        model = timm.create_model(
            arch,
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            num_classes=num_classes,
            in_chans=in_chans,
            **timm_kwargs,
        )
    except Exception as e:  # whatever timm or the arch's key remapping raises on weights it cannot take
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        keyed = [line for line in lines if "key" in line.lower() or "size mismatch" in line]
        detail = (keyed or lines or [""])[0][:200]
        raise UsageError(
            f"--pretrained-file {pretrained_file}: timm cannot load it into {arch} ({type(e).__name__}: {detail})"
        ) from None
    notes = []
    if "input_size" in overlay and overlay["input_size"][0] != in_chans:
        notes.append(f"input conv adapted from {overlay['input_size'][0]} to {in_chans} channels")
    if overlay["num_classes"] < 0:
        notes.append("it has no classifier: a new one")
    elif overlay["num_classes"] != num_classes:
        notes.append(f"its {overlay['num_classes']}-class classifier dropped: a new one")
    _logger.info("initialised %s from %s%s", arch, pretrained_file, f" ({'; '.join(notes)})" if notes else "")
    return model


def replace_classifier(model: nn.Module, path: str, head: str, mc: MCSettings, variant: Margin | None) -> nn.Module:
    """``model`` with its linear classifier at ``path`` replaced by the MC head (or, for a linear head with a softmax
    variant, a MarginLinear), starting from the same weight and bias; a plain linear head stays as it is."""
    linear = model.get_submodule(path)
    bias = linear.bias is not None
    if head == "mc":
        new = MultiCenterHead(linear.in_features, linear.out_features, bias=bias, margin=variant, **mc.head_kwargs())
    elif variant is not None:
        new = MarginLinear(linear.in_features, linear.out_features, variant, bias=bias)
    else:
        return model
    with torch.no_grad():  # same starting point as the linear baseline
        new.weight.copy_(linear.weight)
        if linear.bias is not None and new.bias is not None:
            new.bias.copy_(linear.bias)
    model.set_submodule(path, new)
    return model


def timm_size_kwargs(arch: str, img_size: int | None) -> dict:
    """``{"img_size": ...}`` for archs whose pretrained_cfg has a fixed input size, else nothing."""
    cfg = timm.models.get_pretrained_cfg(arch)
    fixed = cfg is not None and bool(getattr(cfg, "fixed_input_size", False))
    return {"img_size": img_size} if img_size is not None and fixed else {}


def test_time_classifier(module: nn.Module) -> nn.Module:
    """The classifier a trained head stands for at test time, as a vanilla timm model holds it: an ``nn.Linear``
    (softmax, L-Softmax; MC collapsed to its mean centers) or a ``CosineLinear`` (CosFace, ArcFace: the mean centers
    row-normalised and scaled by s, zero bias, the pre-logits L2-normalised)."""
    if isinstance(module, MultiCenterHead):
        return module.to_linear()
    if isinstance(module, MarginLinear):
        if module.margin.kind.cosine:
            return to_cosine_linear(module.weight.detach(), module.margin.scale)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.load_state_dict(module.state_dict())
        return linear.to(device=module.weight.device, dtype=module.weight.dtype)
    return module


def get_mc_head(model: nn.Module) -> MultiCenterHead | None:
    """The model's MultiCenterHead, or None for a linear-head model."""
    head = model.get_classifier()
    return head if isinstance(head, MultiCenterHead) else None


def _build(arch: str, **kwargs) -> nn.Module:
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as e:  # an argument the model does not take, a value or input size it rejects
        extra = {k: v for k, v in kwargs.items() if k not in ("num_classes", "in_chans")}
        raise UsageError(
            f"{arch}: cannot build it with {extra or 'its defaults'} ({type(e).__name__}: {e}); "
            "check --img-size and --model-kwargs"
        ) from None


TRACKED = "num_batches_tracked"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pth.tar", ".bin", ".pt")


def weights_file(path: Path, arch: str) -> tuple[Path, dict]:
    """The weights file a ``--pretrained-file`` names, and its timm ``config.json`` (empty for a bare file)."""
    flag = f"--pretrained-file {path}"
    if path.is_dir():
        config = {}
        if (path / "config.json").is_file():
            try:
                config = json.loads((path / "config.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UsageError(f"{flag}: config.json is not valid JSON ({e})") from None
        found = config.get("architecture", arch) if isinstance(config, dict) else arch
        if found.removeprefix("timm/") != arch:
            raise UsageError(f"{flag}: holds weights for {found}, not --arch {arch}; pass --arch {found}")
        for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if (path / name).is_file():
                return path / name, config
        files = sorted(p for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        if not files:
            raise UsageError(f"{flag}: no weights file (model.safetensors, *.pth, *.bin) in the directory")
        return files[0], config
    if not path.is_file():
        raise UsageError(f"{flag}: no such file or directory")
    return path, {}


def pretrained_overlay(model: nn.Module, arch: str, pretrained_file: str | Path, classifier: str) -> dict:
    """``pretrained_cfg_overlay`` that makes timm load ``pretrained_file`` into ``arch``, after checking it fits.

    The file is read with timm's ``load_state_dict`` (safetensors, or torch files whose weights sit at the top or
    under ``state_dict``/``model``, EMA weights preferred, as timm does: so an mcc-train checkpoint works too).

    ``model`` is a freshly built ``arch`` (the target). timm adapts the input conv and drops a classifier whose
    class count differs from the overlay's ``num_classes``, then loads the rest non-strictly; the check here makes a
    file of another architecture one clear error instead of a silently half-initialised model.
    """
    file, config = weights_file(Path(pretrained_file), arch)
    flag = f"--pretrained-file {pretrained_file}"
    try:  # timm's train.py checkpoints also pickle their argparse.Namespace: plain values, allowed
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = timm.models.load_state_dict(str(file), weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise UsageError(f"{flag}: not a readable weights file ({type(e).__name__}: {first})") from None
    # an mcc-train checkpoint: timm's loader has taken its "model" (or "model_ema") weights; an MC head's mean centers
    # are its linear classifier, so only log_var goes
    state.pop(f"{classifier}.log_var", None)
    if (
        f"{classifier}.weight" in state
        and f"{classifier}.bias" not in state
        and model.get_classifier().bias is not None
    ):
        # a CosFace/ArcFace head trains without a bias; the vanilla classifier it stands for has a zero one
        state[f"{classifier}.bias"] = torch.zeros(state[f"{classifier}.weight"].shape[0])
    # NOTE: timm passes an arch's filter to its builder without recording it on the model; the convention is a
    # module-level checkpoint_filter_fn, which every arch with a remapping that we know of follows
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    filtered = state
    if filter_fn is not None:  # the arch's own remapping of other checkpoint layouts, as timm applies it
        try:
            filtered = filter_fn(dict(state), model)
        except Exception as e:
            raise UsageError(
                f"{flag}: {arch}'s checkpoint filter cannot remap it ({type(e).__name__}: {str(e)[:120]}); "
                "is it weights of another architecture?"
            ) from None
    own = model.state_dict()
    unexpected = [k for k in filtered if k not in own]
    missing = [  # BatchNorm step counters are missing from many published files; torch and timm load without them
        k for k in own if k not in filtered and not k.startswith(classifier + ".") and not k.endswith(TRACKED)
    ]
    if unexpected or missing:
        raise UsageError(
            f"{flag}: does not fit {arch} ({len(missing)} missing keys, e.g. {missing[:2]}; {len(unexpected)} "
            f"unexpected, e.g. {unexpected[:2]}); is it weights of another architecture?"
        )
    pretrained_cfg = config.get("pretrained_cfg", {}) if isinstance(config, dict) else {}
    file_classes = state[f"{classifier}.weight"].shape[0] if f"{classifier}.weight" in state else -1
    first_conv = model.pretrained_cfg.get("first_conv")
    overlay = {"state_dict": state, "num_classes": file_classes}  # loaded once, then timm's load_pretrained
    overlay |= {k: tuple(pretrained_cfg[k]) for k in ("mean", "std") if pretrained_cfg.get(k)}  # a snapshot's own
    if isinstance(first_conv, str) and f"{first_conv}.weight" in filtered:
        source_chans = filtered[f"{first_conv}.weight"].shape[1] * model.get_submodule(first_conv).groups
        size = pretrained_cfg.get("input_size") or model.pretrained_cfg.get("input_size") or (3, 224, 224)
        overlay["input_size"] = (int(source_chans), *size[1:])
    return overlay
