"""From an mcc checkpoint to the test-time model: the MC head collapsed to its mean centers, a cosine head (CosFace,
ArcFace) to its cosine classifier; and the baseline timm model a bundle must equal."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mcc_serve.runtime.bundle import WEIGHTS
from mcc_serve.runtime.choices import CLASSIFIER_KINDS, LOSSES, one_of
from mcc_train import UsageError, classifier_path, create_model, load_checkpoint
from mcc_train.head import MC_PRESETS, MCSettings
from mcc_train.margins import CosineLinear, make_margin
from mcc_train.model import test_time_classifier, timm_size_kwargs

# config.json of a cosine bundle: timm builds the classifier as a plain nn.Linear, so under this key it says what to add
COSINE_CONFIG_KEY = "cosine_classifier"
COSINE_TIMM_CALL = (
    "model.get_classifier()(F.normalize(model.forward_head(model.forward_features(x), pre_logits=True), dim=1))"
)


def cosine_config(head: dict) -> dict | None:
    """config.json's ``cosine_classifier`` entry for model.json's ``head`` (None for a linear classifier)."""
    if head["classifier_kind"] != "cosine":
        return None
    return {
        "loss": head["loss"],
        "scale": head["margin_scale"],
        "usage": "L2-normalise the pre-logit features before the classifier (its weight rows are the class centers "
        f"scaled to norm {head['margin_scale']:g}, its bias zero): logits = {COSINE_TIMM_CALL}; model(x) skips the "
        "normalisation. model.onnx contains it.",
    }


def cosine_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm model's logits with its pre-logit features L2-normalised: a cosine bundle loaded by plain timm."""
    features = model.forward_head(model.forward_features(x), pre_logits=True)  # (B, d)
    return model.get_classifier()(F.normalize(features, dim=1))  # (B, d) -> (B, C)


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


# the checkpoint keys of each choice of weights (``mcc_serve.runtime.bundle.WEIGHTS``): the state_dict and its metrics
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


def head_variant(cfg: dict) -> dict:
    """The softmax variant as model.json's ``head`` records it: ``loss``, its m and s as trained (None where the kind
    has none: no margin for softmax, no scale but for the cosine kinds), and the test-time ``classifier_kind``."""
    settings = loss_settings(cfg)
    variant = make_margin(settings["loss"], settings["margin"], settings["margin_scale"])  # the defaults filled in
    kind = LOSSES[variant.loss]
    return {
        "loss": variant.loss,
        "margin": float(variant.margin) if kind.has_margin else None,
        "margin_scale": float(variant.scale) if kind.cosine else None,
        "classifier_kind": kind.classifier_kind,
    }


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
    arch: str,
    num_classes: int,
    in_chans: int,
    img_size: int,
    model_kwargs: dict | None = None,
    classifier_kind: str = "linear",
) -> nn.Module:
    """A fresh timm model built directly by timm: the baseline a bundle of ``classifier_kind`` must equal.

    ``"linear"``: the model as timm builds it, its own linear classifier. ``"cosine"``: the baseline cosine model, the
    same with its classifier swapped for a ``CosineLinear`` (the same ``weight``/``bias`` keys; it L2-normalises the
    pre-logit features before ``F.linear``), the only mcc code involved.
    """
    kwargs = timm_size_kwargs(arch, img_size) | (model_kwargs or {})
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if classifier_kind == "cosine":
        path = classifier_path(model)
        linear = model.get_submodule(path)
        model.set_submodule(path, CosineLinear(linear.in_features, linear.out_features, bias=True))
    elif classifier_kind not in CLASSIFIER_KINDS:
        raise ValueError(one_of("classifier_kind", classifier_kind, CLASSIFIER_KINDS))
    return model.eval()
