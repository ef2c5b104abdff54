"""From an mcc checkpoint to the test-time model: the MC head collapsed to its mean centers."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from mcc_serve.bundle import WEIGHTS
from mcc_train import UsageError, classifier_path, create_model, load_checkpoint
from mcc_train.head import MC_PRESETS, MCSettings
from mcc_train.model import test_time_classifier, timm_size_kwargs


@dataclass
class LoadedCheckpoint:
    path: Path
    ckpt: dict
    model: nn.Module  # the model as trained (MC or linear head), eval mode
    classifier: str  # dotted path of the classifier module, e.g. "fc", "head.fc"
    weights: str = "model"  # which of the checkpoint's weights the model holds: "model" or "ema"

    @property
    def arch(self) -> str:
        return self.ckpt["arch"]

    @property
    def num_classes(self) -> int:
        return self.ckpt["num_classes"]

    @property
    def in_chans(self) -> int:
        return self.ckpt["in_chans"]

    @property
    def img_size(self) -> int:
        return int(self.ckpt["data_config"]["input_size"][-1])

    @property
    def metrics(self) -> dict:
        """The eval metrics of the weights loaded: ``metrics_ema`` for the EMA weights ({} if not recorded)."""
        return dict(self.ckpt.get(METRICS_KEYS[self.weights], {}))


# the checkpoint keys of each choice of weights (``mcc_serve.bundle.WEIGHTS``): the state_dict and its metrics
STATE_KEYS = {"model": "model", "ema": "model_ema"}
METRICS_KEYS = {"model": "metrics", "ema": "metrics_ema"}


def load_trained(path: str | Path, weights: str = "model") -> LoadedCheckpoint:
    """Rebuild the trained model from an mcc checkpoint (strict load), in eval mode.

    Args:
        path: an mcc-train checkpoint.
        weights: ``"model"``, the weights as trained, or ``"ema"``, their exponential moving average (a checkpoint
            of ``mcc-train --model-ema``; the same keys and shapes as ``"model"``).

    Raises:
        UsageError: not a readable mcc checkpoint, no EMA weights in it, or weights that do not fit the arch.
    """
    if weights not in WEIGHTS:
        raise UsageError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    ckpt = load_checkpoint(path)
    if ckpt.get(STATE_KEYS[weights]) is None:
        raise UsageError(f"{path} has no EMA weights; train with --model-ema")
    cfg = ckpt["config"]
    model = create_model(
        ckpt["arch"],
        ckpt["num_classes"],
        head=ckpt["head"],
        in_chans=ckpt["in_chans"],
        mc=mc_settings(cfg),
        img_size=int(ckpt["data_config"]["input_size"][-1]),
        **loss_settings(cfg),
        **cfg.get("model_kwargs", {}),
    )
    try:
        model.load_state_dict(ckpt[STATE_KEYS[weights]], strict=True)
    except RuntimeError as e:
        raise UsageError(
            f"{path}: {STATE_KEYS[weights]} weights do not fit {ckpt['arch']} ({str(e).splitlines()[1].strip()[:120]})"
        ) from None
    return LoadedCheckpoint(Path(path), ckpt, model.eval(), classifier_path(model), weights)


def mc_settings(cfg: dict) -> MCSettings:
    """The MC settings a checkpoint was trained with (a key missing from an older checkpoint: the paper's)."""
    paper = dataclasses.asdict(MC_PRESETS["paper"])
    return MCSettings(**{k: cfg.get(k, v) for k, v in paper.items()})


def loss_settings(cfg: dict) -> dict:
    """The softmax variant a checkpoint was trained with (an older checkpoint: plain softmax)."""
    return {"loss": cfg.get("loss", "softmax"), "margin": cfg.get("margin"), "margin_scale": cfg.get("margin_scale")}


def collapse(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose classifier is its test-time one (``mcc_train.model.test_time_classifier``): the MC
    head's mean centers and bias as an ``nn.Linear``, or for CosFace/ArcFace the ``CosineLinear`` of the mean centers
    (scaled by s, zero bias, normalising its input)."""
    model = copy.deepcopy(model).eval()
    path = classifier_path(model)
    model.set_submodule(path, test_time_classifier(model.get_submodule(path)))
    return model


def collapsed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict a vanilla timm model of the same arch loads with strict=True."""
    return {k: v.detach().clone().contiguous() for k, v in collapse(model).state_dict().items()}


def vanilla_model(
    arch: str, num_classes: int, in_chans: int, img_size: int, model_kwargs: dict | None = None
) -> nn.Module:
    """A fresh timm model with its own linear classifier, built directly by timm (no mcc code involved)."""
    kwargs = timm_size_kwargs(arch, img_size) | (model_kwargs or {})
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs).eval()
