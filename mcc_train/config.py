"""TrainConfig: every knob of mcc-train, its default, its help text and its valid range."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UsageError
from .head import MC_DEFAULTS, MC_PRESETS, SAMPLING_MODES, SIGMA_MODES, MCSettings
from .margins import LOSSES, LossKind, make_margin

# timm.create_model arguments that mcc sets itself; --model-kwargs may not name them
RESERVED_MODEL_KWARGS = {"arch", "head", "mc", "pretrained", "num_classes", "in_chans", "img_size", "pretrained_file",
                         "pretrained_cfg", "pretrained_cfg_overlay", "drop_rate"}  # fmt: skip
RESERVED_MODEL_KWARGS |= {"loss", "margin", "margin_scale"}
RESERVED_MODEL_KWARGS |= set(MCSettings.__dataclass_fields__)
RENAMED = {"checkpoint_path": "pretrained_file"}  # old key (flag, YAML, older checkpoints) -> field
COMPILE_MODES = ("none", "head", "model")
SCHEDULERS = ("cosine", "tanh", "poly", "step", "multistep")  # timm's create_scheduler_v2 names that need no metric


def _f(default, help: str, **meta):
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    # data
    data: str = _f("digits", "digits | fashion-mnist[:DIR] | imagefolder:ROOT | cifar10:DIR | cifar100:DIR")
    img_size: int = _f(32, "input height and width fed to the model")
    in_chans: int | None = _f(None, "input channels (default: 1 when every image is grayscale, else 3)")
    crop_pct: float = _f(1.0, "eval center-crop fraction (timm crop_pct)")
    interpolation: str = _f("bicubic", "resize interpolation: bilinear | bicubic | nearest")
    hflip: float | None = _f(None, "train horizontal-flip probability (default: 0 for digits, else 0.5)")
    scale: tuple[float, float] = _f((0.5, 1.0), "train RandomResizedCrop area range", nargs=2)
    subset: int | None = _f(None, "use only this many training images (a fixed random subset)")
    workers: int = _f(2, "data-loading worker processes per rank")
    skip_bad_images: bool = _f(False, "leave unreadable image files out (listed in the log and config.yaml)")
    balanced_sampler: bool = _f(False, "draw training images class-balanced (with replacement), for imbalanced data")
    # model
    arch: str = _f("resnet18", "any timm model name with a single linear classifier")
    model_kwargs: dict = _f({}, "extra timm.create_model arguments, KEY=VALUE ... (e.g. patch_size=4)", nargs="+")
    head: str = _f("mc", "mc (multi-center) | linear (vanilla baseline)")
    mc_preset: str | None = _f(None, f"MC settings by name: {' | '.join(MC_PRESETS)}; single MC flags override it")
    num_subcenters: int = _f(MC_DEFAULTS.num_subcenters, "K, sub-centers sampled per class")
    center_weight: float = _f(MC_DEFAULTS.center_weight, "target mass on a class's mean center, in (0, 1]")
    sigma_scale: float = _f(MC_DEFAULTS.sigma_scale, "scale of the sub-center std (see --sigma-mode)")
    sigma_mode: str = _f(
        MC_DEFAULTS.sigma_mode,
        "absolute (the paper: std = sigma_scale * exp(log_var/2)) | relative (that times each class weight's RMS)",
    )
    sampling: str = _f(
        MC_DEFAULTS.sampling, "shared (the paper: one draw per step) | local (per-sample logit draw, cheaper)"
    )
    kl_weight: float = _f(MC_DEFAULTS.kl_weight, "weight of the std loss L_sigma (0 removes it)")
    loss: str = _f("softmax", f"softmax variant, with either head: {' | '.join(LOSSES)}")
    margin: float | None = _f(
        None,
        "the variant's margin m (default: "
        + ", ".join(f"{k} {v.margin:g}" for k, v in LOSSES.items() if v.margin)
        + ")",
    )
    margin_scale: float | None = _f(
        None,
        "cosface/arcface scale s (default: "
        + ", ".join(f"{k} {v.scale:g}" for k, v in LOSSES.items() if v.scale)
        + ")",
    )
    drop_rate: float = _f(0.0, "dropout before the classifier")
    pretrained_file: str | None = _f(
        None, "fine-tune from local timm weights: .safetensors/.pth/.bin, or a directory with config.json (a bundle)"
    )
    head_lr_scale: float = _f(1.0, "learning-rate multiplier of the classifier (fine-tuning: e.g. 10)")
    layer_decay: float | None = _f(None, "timm layer-wise lr decay, e.g. 0.75 (none: off)")
    freeze_backbone_epochs: int = _f(0, "train only the classifier for this many first epochs")
    # optimisation (AdamW + cosine with warm-up, after the paper's recipe scaled to small data)
    epochs: int = _f(10, "training epochs")
    batch_size: int = _f(64, "batch size per rank")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step (effective batch: batch size x this x ranks)")
    opt: str = _f("adamw", "optimizer, any name of timm.optim.list_optimizers() (sgd, adamw, lamb, ...)")
    momentum: float = _f(0.9, "momentum of SGD-like optimizers")
    sched: str = _f("cosine", f"learning-rate schedule from timm: {' | '.join(SCHEDULERS)}")
    decay_epochs: float | None = _f(None, "step/multistep: epochs between decays (default: a third of --epochs)")
    decay_rate: float = _f(0.1, "step/multistep: lr multiplier at each decay")
    lr: float = _f(1e-3, "peak learning rate")
    min_lr: float = _f(1e-5, "final learning rate of the schedule")
    warmup_epochs: int = _f(1, "linear warm-up epochs (capped at --epochs - 1)")
    warmup_lr: float = _f(1e-5, "learning rate at the start of warm-up")
    weight_decay: float = _f(0.05, "AdamW weight decay (norms and biases excluded)")
    label_smoothing: float = _f(0.1, "label smoothing")
    mixup: float = _f(0.0, "mixup alpha (0: off)")
    cutmix: float = _f(0.0, "cutmix alpha (0: off)")
    clip_grad: float | None = _f(5.0, "clip the gradient norm to this (none: off)")
    seed: int = _f(0, "random seed")
    model_ema: bool = _f(False, "keep timm's ModelEmaV3 of the weights: evaluated, checkpointed, mcc-export --ema")
    model_ema_decay: float = _f(0.9998, "EMA decay (warmed up from 0 over the first steps)")
    early_stop_patience: int | None = _f(None, "stop after this many epochs without a better top-1 (none: off)")
    # runtime
    device: str = _f("auto", "auto | cpu | cuda")
    amp: bool = _f(True, "mixed precision on CUDA (bf16 where supported, else fp16 with a grad scaler)")
    channels_last: bool = _f(True, "channels_last memory format on CUDA")
    compile: str = _f(
        "none",
        "torch.compile: none | head (the MC head's training math and loss, fused by inductor) | model (the whole "
        "model, and the head as with head)",
    )
    out: str = _f("runs/mcc", "output directory for checkpoints, metrics.csv, config.yaml, curves.png")
    resume: str | None = _f(None, "continue from this last.pt (its config, overridden by flags given here)")
    overwrite: bool = _f(False, "allow starting a new run in an --out that already holds checkpoints")
    progress: bool = _f(True, "show progress bars for training and evaluation")
    tensorboard: bool = _f(True, "also log to OUT/tensorboard when the tensorboard package is installed")

    def validate(self) -> TrainConfig:
        """Raise UsageError naming the first out-of-range value; returns self."""
        checks = [
            (self.num_subcenters >= 1, f"--num-subcenters must be >= 1, got {self.num_subcenters}"),
            (0 < self.center_weight <= 1, f"--center-weight must be in (0, 1], got {self.center_weight}"),
            (self.sigma_scale > 0, f"--sigma-scale must be > 0, got {self.sigma_scale}"),
            (self.kl_weight >= 0, f"--kl-weight must be >= 0, got {self.kl_weight}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.min_lr >= 0 and self.warmup_lr >= 0, "--min-lr and --warmup-lr must be >= 0"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix must be >= 0"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.grad_accum_steps >= 1, f"--grad-accum-steps must be >= 1, got {self.grad_accum_steps}"),
            (self.head_lr_scale > 0, f"--head-lr-scale must be > 0, got {self.head_lr_scale}"),
            (
                self.layer_decay is None or 0 < self.layer_decay <= 1,
                f"--layer-decay must be in (0, 1], got {self.layer_decay}",
            ),
            (
                0 <= self.freeze_backbone_epochs < self.epochs,
                f"--freeze-backbone-epochs must be in [0, --epochs), got {self.freeze_backbone_epochs}",
            ),
            (0 < self.model_ema_decay < 1, f"--model-ema-decay must be in (0, 1), got {self.model_ema_decay}"),
            (
                self.early_stop_patience is None or self.early_stop_patience >= 1,
                f"--early-stop-patience must be >= 1, got {self.early_stop_patience}",
            ),
            (self.compile in COMPILE_MODES, f"--compile is one of {', '.join(COMPILE_MODES)}, got {self.compile!r}"),
            (self.sched in SCHEDULERS, f"--sched must be one of {', '.join(SCHEDULERS)}, got {self.sched!r}"),
            (
                self.opt.lower() in _optimizers(),
                f"--opt {self.opt!r}: not a timm optimizer; see timm.optim.list_optimizers()",
            ),
            (
                self.decay_epochs is None or self.decay_epochs > 0,
                f"--decay-epochs must be > 0, got {self.decay_epochs}",
            ),
            (0 < self.decay_rate <= 1, f"--decay-rate must be in (0, 1], got {self.decay_rate}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.img_size >= 8, f"--img-size must be >= 8, got {self.img_size}"),
            (self.in_chans in (None, 1, 3), f"--in-chans must be 1 or 3, got {self.in_chans}"),
            (0 < self.crop_pct <= 1, f"--crop-pct must be in (0, 1], got {self.crop_pct}"),
            (self.hflip is None or 0 <= self.hflip <= 1, f"--hflip must be in [0, 1], got {self.hflip}"),
            (0 < self.scale[0] <= self.scale[1] <= 1, f"--scale must be 0 < lo <= hi <= 1, got {self.scale}"),
            (self.clip_grad is None or self.clip_grad > 0, f"--clip-grad must be > 0, got {self.clip_grad}"),
            (self.subset is None or self.subset >= 1, f"--subset must be >= 1, got {self.subset}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (0 <= self.drop_rate < 1, f"--drop-rate must be in [0, 1), got {self.drop_rate}"),
            (self.head in ("mc", "linear"), f"--head must be mc or linear, got {self.head!r}"),
            (self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (
                LOSSES.get(self.loss, LOSSES["softmax"]).has_margin
                or (self.margin is None and self.margin_scale is None),
                "--margin and --margin-scale apply to --loss lsoftmax, cosface or arcface",
            ),
            (
                not LOSSES.get(self.loss, LOSSES["softmax"]).has_margin
                or self.head == "linear"
                or self.sampling == "shared",
                f"--loss {self.loss} scores sampled sub-center rows: use --sampling shared",
            ),
            (
                self.sampling in SAMPLING_MODES,
                f"--sampling must be {' or '.join(SAMPLING_MODES)}, got {self.sampling!r}",
            ),
            (
                self.sigma_mode in SIGMA_MODES,
                f"--sigma-mode must be {' or '.join(SIGMA_MODES)}, got {self.sigma_mode!r}",
            ),
            (
                self.mc_preset is None or self.mc_preset in MC_PRESETS,
                f"--mc-preset must be one of {', '.join(MC_PRESETS)}, got {self.mc_preset!r}",
            ),
            (
                not set(self.model_kwargs) & RESERVED_MODEL_KWARGS,
                f"--model-kwargs may not set {', '.join(sorted(set(self.model_kwargs) & RESERVED_MODEL_KWARGS))}"
                " (mcc sets it; use its own flag)",
            ),
            (self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}"),
            (
                self.interpolation in ("bilinear", "bicubic", "nearest"),
                f"--interpolation must be bilinear, bicubic or nearest, got {self.interpolation!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.margin_scale is not None and not self.variant.cosine:
            raise UsageError(f"--margin-scale applies to --loss cosface or arcface, not {self.loss}")
        if self.variant.has_margin:
            try:
                variant = make_margin(self.loss, self.margin, self.margin_scale)
            except ValueError as e:
                raise UsageError(f"--margin/--margin-scale: {e}") from None
            # the values trained with go into config.yaml and the checkpoint: a later change of the defaults
            # never changes what an earlier run's export, resume or evaluation computes
            self.margin = variant.margin
            self.margin_scale = variant.scale if self.variant.cosine else None
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{f.name.replace('_', '-')} must be finite, got {value}")
        return self

    @property
    def variant(self) -> LossKind:
        """The softmax variant of ``loss`` (plain softmax for a name that is not one: validate() says so)."""
        return LOSSES.get(self.loss, LOSSES["softmax"])

    def mc(self) -> MCSettings:
        """The MC hyperparameters of this run."""
        return MCSettings(**{f: getattr(self, f) for f in MCSettings.__dataclass_fields__})

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


def _optimizers() -> set[str]:
    from timm.optim import list_optimizers

    return set(list_optimizers())


def preset_values(name) -> dict:
    """The MC fields of a named preset (empty for None or "none"); UsageError for an unknown name."""
    if name is None or (isinstance(name, str) and name.lower() in ("none", "null")):
        return {}
    if not isinstance(name, str) or name not in MC_PRESETS:
        raise UsageError(f"--mc-preset must be one of {', '.join(MC_PRESETS)}, got {name!r}")
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
