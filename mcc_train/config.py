"""TrainConfig: every knob of mcc-train, its default, its help text and its valid range."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mcc_serve.runtime.choices import DEVICES, HEAD_TYPES, INTERPOLATIONS, LOSSES, LossKind, one_of

from .checks import AT_LEAST_ONE, BELOW_ONE, NON_NEGATIVE, OPEN_UNIT, POSITIVE, PROBABILITY, UNIT, Valid, choice
from .errors import UsageError
from .head import MC_DEFAULTS, MC_PRESETS, MC_VALID, MCSettings, check_mc
from .margins import make_margin

# timm.create_model arguments that mcc sets itself; --model-kwargs may not name them
RESERVED_MODEL_KWARGS = {"arch", "head", "mc", "pretrained", "num_classes", "in_chans", "img_size", "drop_rate"}
RESERVED_MODEL_KWARGS |= {"pretrained_file", "pretrained_cfg", "pretrained_cfg_overlay"}
RESERVED_MODEL_KWARGS |= {"loss", "margin", "margin_scale"}
RESERVED_MODEL_KWARGS |= set(MC_VALID)
RENAMED = {"checkpoint_path": "pretrained_file"}  # old key (flag, YAML, older checkpoints) -> field
COMPILE_MODES = ("none", "head", "model")
SCHEDULERS = ("cosine", "tanh", "poly", "step", "multistep")  # timm's create_scheduler_v2 names that need no metric


def _f(default, help: str, valid: Valid | None = None, **meta):
    """A TrainConfig field: its default, its --help text and its valid range (``validate`` checks every field's)."""
    meta = {"help": help, "valid": valid, **meta}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def _or(names) -> str:
    """``a, b or c``."""
    *rest, last = names
    return f"{', '.join(rest)} or {last}" if rest else last


MARGIN_LOSSES = [name for name, kind in LOSSES.items() if kind.has_margin]
COSINE_LOSSES = [name for name, kind in LOSSES.items() if kind.cosine]


@dataclass
class TrainConfig:
    # data
    data: str = _f("digits", "digits | fashion-mnist[:DIR] | imagefolder:ROOT | cifar10:DIR | cifar100:DIR")
    img_size: int = _f(32, "input height and width fed to the model", Valid(lambda v: v >= 8, ">= 8"))
    in_chans: int | None = _f(
        None,
        "input channels (default: 1 when every image is grayscale, else 3)",
        Valid(lambda v: v in (1, 3), "1 or 3"),
    )
    crop_pct: float = _f(1.0, "eval center-crop fraction (timm crop_pct)", UNIT)
    interpolation: str = _f("bicubic", f"resize interpolation: {' | '.join(INTERPOLATIONS)}", choice(INTERPOLATIONS))
    hflip: float | None = _f(None, "train horizontal-flip probability (default: 0 for digits, else 0.5)", PROBABILITY)
    scale: tuple[float, float] = _f(
        (0.5, 1.0),
        "train RandomResizedCrop area range",
        Valid(lambda s: 0 < s[0] <= s[1] <= 1, "0 < lo <= hi <= 1"),
        nargs=2,
    )
    subset: int | None = _f(None, "use only this many training images (a fixed random subset)", AT_LEAST_ONE)
    workers: int = _f(2, "data-loading worker processes per rank", NON_NEGATIVE)
    skip_bad_images: bool = _f(False, "leave unreadable image files out (listed in the log and config.yaml)")
    balanced_sampler: bool = _f(False, "draw training images class-balanced (with replacement), for imbalanced data")
    # model
    arch: str = _f("resnet18", "any timm model name with a single linear classifier")
    model_kwargs: dict = _f({}, "extra timm.create_model arguments, KEY=VALUE ... (e.g. patch_size=4)", nargs="+")
    head: str = _f(
        "mc", f"{' | '.join(HEAD_TYPES)}: the multi-center head, or the vanilla linear baseline", choice(HEAD_TYPES)
    )
    mc_preset: str | None = _f(
        None, f"MC settings by name: {' | '.join(MC_PRESETS)}; single MC flags override it", choice(MC_PRESETS)
    )
    num_subcenters: int = _f(MC_DEFAULTS.num_subcenters, "K, sub-centers sampled per class", MC_VALID["num_subcenters"])
    center_weight: float = _f(
        MC_DEFAULTS.center_weight, "target mass on a class's mean center, in (0, 1]", MC_VALID["center_weight"]
    )
    sigma_scale: float = _f(
        MC_DEFAULTS.sigma_scale, "scale of the sub-center std (see --sigma-mode)", MC_VALID["sigma_scale"]
    )
    sigma_mode: str = _f(
        MC_DEFAULTS.sigma_mode,
        "absolute (the paper: std = sigma_scale * exp(log_var/2)) | relative (that times each class weight's RMS)",
        MC_VALID["sigma_mode"],
    )
    sampling: str = _f(
        MC_DEFAULTS.sampling,
        "shared (the paper: one draw per step) | local (per-sample logit draw, cheaper)",
        MC_VALID["sampling"],
    )
    kl_weight: float = _f(MC_DEFAULTS.kl_weight, "weight of the std loss L_sigma (0 removes it)", MC_VALID["kl_weight"])
    loss: str = _f("softmax", f"softmax variant, with either head: {' | '.join(LOSSES)}", choice(LOSSES))
    margin: float | None = _f(
        None,
        "the variant's margin m (default: "
        + ", ".join(f"{k} {v.margin:g}" for k, v in LOSSES.items() if v.margin)
        + ")",
    )
    margin_scale: float | None = _f(
        None,
        f"{'/'.join(COSINE_LOSSES)} scale s (default: "
        + ", ".join(f"{k} {v.scale:g}" for k, v in LOSSES.items() if v.scale)
        + ")",
    )
    drop_rate: float = _f(0.0, "dropout before the classifier", BELOW_ONE)
    pretrained_file: str | None = _f(
        None, "fine-tune from local timm weights: .safetensors/.pth/.bin, or a directory with config.json (a bundle)"
    )
    head_lr_scale: float = _f(1.0, "learning-rate multiplier of the classifier (fine-tuning: e.g. 10)", POSITIVE)
    layer_decay: float | None = _f(None, "timm layer-wise lr decay, e.g. 0.75 (none: off)", UNIT)
    freeze_backbone_epochs: int = _f(0, "train only the classifier for this many first epochs")
    # optimisation (AdamW + cosine with warm-up, after the paper's recipe scaled to small data)
    epochs: int = _f(10, "training epochs", AT_LEAST_ONE)
    batch_size: int = _f(64, "batch size per rank", AT_LEAST_ONE)
    grad_accum_steps: int = _f(
        1, "micro-batches per optimizer step (effective batch: batch size x this x ranks)", AT_LEAST_ONE
    )
    opt: str = _f("adamw", "optimizer, any name of timm.optim.list_optimizers() (sgd, adamw, lamb, ...)")
    momentum: float = _f(0.9, "momentum of SGD-like optimizers")
    sched: str = _f("cosine", f"learning-rate schedule from timm: {' | '.join(SCHEDULERS)}", choice(SCHEDULERS))
    decay_epochs: float | None = _f(
        None, "step/multistep: epochs between decays (default: a third of --epochs)", POSITIVE
    )
    decay_rate: float = _f(0.1, "step/multistep: lr multiplier at each decay", UNIT)
    lr: float = _f(1e-3, "peak learning rate", POSITIVE)
    min_lr: float = _f(1e-5, "final learning rate of the schedule", NON_NEGATIVE)
    warmup_epochs: int = _f(1, "linear warm-up epochs (capped at --epochs - 1)", NON_NEGATIVE)
    warmup_lr: float = _f(1e-5, "learning rate at the start of warm-up", NON_NEGATIVE)
    weight_decay: float = _f(0.05, "AdamW weight decay (norms and biases excluded)", NON_NEGATIVE)
    label_smoothing: float = _f(0.1, "label smoothing", BELOW_ONE)
    mixup: float = _f(0.0, "mixup alpha (0: off)", NON_NEGATIVE)
    cutmix: float = _f(0.0, "cutmix alpha (0: off)", NON_NEGATIVE)
    clip_grad: float | None = _f(5.0, "clip the gradient norm to this (none: off)", POSITIVE)
    seed: int = _f(0, "random seed")
    model_ema: bool = _f(False, "keep timm's ModelEmaV3 of the weights: evaluated, checkpointed, mcc-export --ema")
    model_ema_decay: float = _f(0.9998, "EMA decay (warmed up from 0 over the first steps)", OPEN_UNIT)
    early_stop_patience: int | None = _f(
        None, "stop after this many epochs without a better top-1 (none: off)", AT_LEAST_ONE
    )
    # runtime
    device: str = _f("auto", " | ".join(DEVICES), choice(DEVICES))
    amp: bool = _f(True, "mixed precision on CUDA (bf16 where supported, else fp16 with a grad scaler)")
    channels_last: bool = _f(True, "channels_last memory format on CUDA")
    compile: str = _f(
        "none",
        "torch.compile: none | head (the MC head's training math and loss, fused by inductor) | model (the whole "
        "model, and the head as with head)",
        choice(COMPILE_MODES),
    )
    out: str = _f("runs/mcc", "output directory for checkpoints, metrics.csv, config.yaml, curves.png")
    resume: str | None = _f(None, "continue from this last.pt (its config, overridden by flags given here)")
    overwrite: bool = _f(False, "allow starting a new run in an --out that already holds checkpoints")
    progress: bool = _f(True, "show progress bars for training and evaluation")
    tensorboard: bool = _f(True, "also log to OUT/tensorboard when the tensorboard package is installed")

    def validate(self) -> TrainConfig:
        """Raise UsageError naming the first out-of-range value; returns self.

        Each field's own range sits beside it (``_f(..., valid)``); the checks here tie fields together.
        """
        for f in dataclasses.fields(self):
            check_field(f, getattr(self, f.name))
        reserved = sorted(set(self.model_kwargs) & RESERVED_MODEL_KWARGS)
        checks = [
            (
                0 <= self.freeze_backbone_epochs < self.epochs,
                f"--freeze-backbone-epochs must be in [0, --epochs), got {self.freeze_backbone_epochs}",
            ),
            (
                self.opt.lower() in _optimizers(),
                f"--opt {self.opt!r}: not a timm optimizer; see timm.optim.list_optimizers()",
            ),
            (not reserved, f"--model-kwargs may not set {', '.join(reserved)} (mcc sets it; use its own flag)"),
            (
                self.variant.has_margin or (self.margin is None and self.margin_scale is None),
                f"--margin and --margin-scale apply to --loss {_or(MARGIN_LOSSES)}",
            ),
            (
                self.margin_scale is None or self.variant.cosine,
                f"--margin-scale applies to --loss {_or(COSINE_LOSSES)}, not {self.loss}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.head == "mc":
            try:
                check_mc(self.loss, sampling=self.sampling)
            except ValueError as e:
                raise UsageError(str(e)) from None
        if self.variant.has_margin:
            try:
                variant = make_margin(self.loss, self.margin, self.margin_scale)
            except ValueError as e:
                raise UsageError(f"--margin/--margin-scale: {e}") from None
            # the values trained with go into config.yaml and the checkpoint: a later change of the defaults
            # never changes what an earlier run's export, resume or evaluation computes
            self.margin = variant.margin
            self.margin_scale = variant.scale if self.variant.cosine else None
        return self

    @property
    def variant(self) -> LossKind:
        """The softmax variant of ``loss`` (plain softmax for a name that is not one: validate() says so)."""
        return LOSSES.get(self.loss, LOSSES["softmax"])

    def mc(self) -> MCSettings:
        """The MC hyperparameters of this run."""
        return MCSettings(**{name: getattr(self, name) for name in MC_VALID})

    def to_dict(self) -> dict:
        """Plain types only, so checkpoints load with ``torch.load(weights_only=True)``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a dict (YAML file, checkpoint), rejecting unknown keys with the valid ones named.

        ``mc_preset`` fills the MC fields that ``values`` does not set itself.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values = {RENAMED.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in values.items()}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UsageError(f"unknown config key(s) {', '.join(unknown)}; see mcc-train --help for valid ones")
        values = preset_values(values.get("mc_preset")) | values
        fields = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{k: coerce(fields[k], v) for k, v in values.items()})


def check_field(f: dataclasses.Field, value) -> None:
    """UsageError naming ``value`` when it is outside the field's valid range or not finite; None passes where the
    field is optional."""
    flag = "--" + f.name.replace("_", "-")
    if value is None:
        if field_type(f)[1]:
            return
        raise UsageError(f"{flag} needs a value, got none")
    valid = f.metadata.get("valid")
    if valid is not None and not valid.test(value):
        raise UsageError(valid.message(flag, value))
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag} must be finite, got {value}")


def _optimizers() -> set[str]:
    from timm.optim import list_optimizers

    return set(list_optimizers())


def preset_values(name) -> dict:
    """The MC fields of a named preset (empty for None or "none"); UsageError for an unknown name."""
    if name is None or (isinstance(name, str) and name.lower() in ("none", "null")):
        return {}
    if not isinstance(name, str) or name not in MC_PRESETS:
        raise UsageError(one_of("--mc-preset", name, MC_PRESETS))
    return dataclasses.asdict(MC_PRESETS[name])


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional) of a TrainConfig field: ``"float | None"`` -> (float, True)."""
    names = [t.strip() for t in str(f.type).split("|")]
    base = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}.get(names[0], float)  # tuple: float
    return base, "None" in names


def coerce(f: dataclasses.Field, value):
    """Convert a YAML or checkpoint value to the field's type, or raise UsageError naming the field."""
    base, optional = field_type(f)
    flag = "--" + f.name.replace("_", "-")
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise UsageError(f"{flag} needs a value, got none")
    try:
        if base is dict:
            return parse_kwargs(value)
        if f.metadata.get("nargs"):
            if not isinstance(value, (list, tuple)) or len(value) != f.metadata["nargs"]:
                raise ValueError
            return tuple(base(v) for v in value)
        if base is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return base(value)
    except (TypeError, ValueError, yaml.YAMLError):
        expected = "KEY=VALUE pairs" if base is dict else f.type
        raise UsageError(f"{flag}: expected {expected}, got {value!r}") from None


def parse_kwargs(value) -> dict:
    """``{"k": v}`` or ``["k=v", ...]`` (values read as YAML scalars: 4, 0.1, true, text) -> dict of plain values."""
    if isinstance(value, dict):
        out = {str(k): v for k, v in value.items()}
    elif isinstance(value, (list, tuple)):
        out = {}
        for item in value:
            key, sep, text = str(item).partition("=")
            if not sep or not key.isidentifier():
                raise ValueError
            out[key] = yaml.safe_load(text) if text else None
    else:
        raise ValueError
    if not all(_plain(v) for v in out.values()):  # checkpoints load with weights_only=True, model.json is JSON
        raise ValueError
    return out


def _plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (str, int, float, bool))


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a dict, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of option: value, got {type(values).__name__}")
    values.pop("skipped_images", None)  # written by save_yaml for the record, not an option
    values = {str(k).replace("-", "_"): v for k, v in values.items()}  # keys as the flags spell them, or as fields
    return {RENAMED.get(k, k): v for k, v in values.items()}


def save_yaml(cfg: TrainConfig, path: str | Path, skipped_images: list[str] | None = None) -> None:
    """config.yaml of a run: every option, then (for the record) the image files --skip-bad-images left out."""
    values = cfg.to_dict()
    if skipped_images:
        values["skipped_images"] = list(skipped_images)
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))
