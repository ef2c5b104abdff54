"""The bundle contract: its files and model.json's schema, defined once and torch-free.

``export`` writes model.json through ``ModelJson``; ``mcc-export --verify``, ``mcc-serve``, ``mcc-predict`` and
``mcc-eval`` read it back with ``read_model_json``. A model.json that does not validate is refused with one line
naming the field. docs/bundle.md is generated from this module (``scripts/bundle_doc.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .choices import CLASSIFIER_KIND, CLASSIFIER_KINDS, CROP_MODES, HEAD_TYPES, INTERPOLATIONS, LOSSES

FORMAT, VERSION = "mcc-bundle", 1
MODEL_JSON, ONNX_FILE, FP16_FILE, INT8_FILE, WEIGHTS_FILE, CONFIG_JSON, PARITY_JSON, README_FILE = (
    "model.json",
    "model.onnx",
    "model_fp16.onnx",
    "model_int8.onnx",
    "model.safetensors",
    "config.json",
    "parity.json",
    "README.md",
)
# A bundle's files, in the order mcc-export writes them into one staged directory that is renamed into place.
FILES = {
    WEIGHTS_FILE: "the collapsed weights: a vanilla timm state_dict",
    CONFIG_JSON: "timm's hub config with the bundle's preprocessing and class names, so "
    '`timm.create_model("local-dir:BUNDLE", pretrained=True)` rebuilds the exported model',
    ONNX_FILE: "the collapsed model as ONNX (fp32)",
    FP16_FILE: "with `mcc-export --fp16`: the same model in float16",
    INT8_FILE: "with `mcc-export --int8`: the model statically quantized by onnxruntime (QDQ, per-channel int8 "
    "weights, uint8 activations calibrated on training images)",
    MODEL_JSON: "the description below; `files` records the sha256 and size of every file above",
    PARITY_JSON: "the proof: every check and its result, and the sha256 of model.json",
    README_FILE: "a model card quoting the proof; not in `files`, since a publisher may edit it (licence, "
    "description) without changing what the model computes",
}
WEIGHTS = ("model", "ema")  # which of the checkpoint's weights were exported: its model, or its EMA of the model


class BundleError(Exception):
    """The bundle cannot be used; the message says why and what to do."""


class TensorSpec(BaseModel):
    name: str = Field(min_length=1, description="the graph's tensor name")
    shape: list[int | None] = Field(description="with a `null` batch axis")
    dtype: Literal["float32"] = "float32"


class Preprocess(BaseModel):
    """timm's eval transform, which mcc-serve, mcc-predict and mcc-eval apply before the model."""

    input_size: list[int] = Field(min_length=3, max_length=3, description="[C, H, W], square")
    mean: list[float] = Field(min_length=1, description="per channel, or one value for all")
    std: list[float] = Field(min_length=1, description="per channel, or one value for all; positive")
    interpolation: Literal[INTERPOLATIONS] = Field(description="the resize filter")
    crop_pct: float = Field(gt=0, le=1, description="resize to floor(size / crop_pct), then crop to size")
    crop_mode: Literal[CROP_MODES] = Field(
        "center", description="center: resize the shorter side and center-crop; squash: resize both sides"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Preprocess:
        c, h, w = self.input_size
        if min(c, h, w) < 1 or h != w:
            raise ValueError(f"input_size {self.input_size} must be [C, S, S] with positive sizes (a square input)")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, c):
                raise ValueError(f"{name} has {len(values)} values; the input has {c} channels")
        if min(self.std) <= 0:
            raise ValueError("std must be positive")
        return self


class Head(BaseModel):
    """How the model was trained and what its classifier computes at test time. The MC settings it was trained with
    (`num_subcenters`, ...) are kept as extra keys. A bundle written before the softmax variants has none of `loss`,
    `margin`, `margin_scale`, `classifier_kind`: it reads as softmax with a linear classifier."""

    model_config = ConfigDict(extra="allow")

    type: Literal[HEAD_TYPES] = Field(description="the training head")
    classifier: str = Field(description="the classifier's dotted path in the timm model, e.g. `fc`")
    loss: Literal[tuple(LOSSES)] = Field("softmax", description="the softmax variant trained with")
    margin: float | None = Field(None, description="its m; null for softmax")
    margin_scale: float | None = Field(None, gt=0, description="its s; null but for cosface and arcface")
    classifier_kind: Literal[CLASSIFIER_KINDS] = Field(
        "linear",
        description="linear: `logits = x @ W^T + b` on the pre-logit features (softmax, lsoftmax), the vanilla timm "
        "model; cosine: `logits = s * normalize(x) @ normalize(W_mean)^T` (cosface, arcface), stored as timm's "
        "linear classifier with `W = s * normalize(W_mean)` and a zero bias, the features L2-normalised inside "
        "model.onnx",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Head:
        kind = CLASSIFIER_KIND[self.loss]
        if self.classifier_kind != kind:
            raise ValueError(
                f"classifier_kind {self.classifier_kind!r} does not fit loss {self.loss!r} (a {kind} classifier)"
            )
        if kind == "cosine" and self.margin_scale is None:
            raise ValueError(f"loss {self.loss!r} needs margin_scale, the s of its cosine logits")
        return self


class FileRecord(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Source(BaseModel):
    """The checkpoint the bundle was exported from."""

    model_config = ConfigDict(extra="allow")

    checkpoint: str | None = Field(None, description="its path at export")
    sha256: str | None = None
    epoch: int | None = None
    weights: Literal[WEIGHTS] = Field("model", description="which of its weights: the model, or its EMA")


class ModelJson(BaseModel):
    """model.json: what the bundle holds and how to feed it."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format: Literal["mcc-bundle"]
    version: int = Field(ge=1, description=f"the schema version; this mcc reads up to {VERSION}")
    created: str | None = Field(None, description="ISO 8601 time of export")
    arch: str = Field(min_length=1, description="the timm architecture")
    num_classes: int = Field(ge=1)
    class_names: list[str] = Field(description="one per class, in output order")
    in_chans: Literal[1, 3]
    model_kwargs: dict[str, Any] = Field({}, description="extra `timm.create_model` arguments")
    input: TensorSpec = Field(description="shape `[null, *preprocess.input_size]`")
    output: TensorSpec = Field(description="shape `[null, num_classes]`: logits")
    preprocess: Preprocess
    head: Head
    source: Source = Source()
    metrics: dict[str, Any] = Field({}, description="the exported weights' eval metrics at training time")
    files: dict[str, FileRecord] = Field(description="sha256 and size of each file; must hold model.onnx")
    onnx: dict[str, Any] = Field({}, description="opset and exporter versions")

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > VERSION:
            raise ValueError(f"bundle version {v} is newer than this mcc ({VERSION}); upgrade mcc")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelJson:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for num_classes {self.num_classes}")
        if self.preprocess.input_size[0] != self.in_chans:
            raise ValueError(f"preprocess.input_size {self.preprocess.input_size} has not in_chans {self.in_chans}")
        if self.input.shape != [None, *self.preprocess.input_size]:
            raise ValueError(f"input.shape {self.input.shape} is not [null, *preprocess.input_size]")
        if self.output.shape != [None, self.num_classes]:
            raise ValueError(f"output.shape {self.output.shape} is not [null, num_classes]")
        if ONNX_FILE not in self.files:
            raise ValueError(f"files lacks {ONNX_FILE}")
        return self


def onnx_file(precision: str) -> str:
    """The bundle's ONNX file for a precision."""
    return {"fp32": ONNX_FILE, "fp16": FP16_FILE, "int8": INT8_FILE}[precision]


def read_model_json(bundle: str | Path) -> dict:
    """model.json of a bundle directory, validated against ``ModelJson`` (BundleError naming what is wrong)."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle directory")
    path = bundle / MODEL_JSON
    if not path.is_file():
        raise BundleError(f"{bundle}: no {MODEL_JSON}; point at a directory written by mcc-export")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    return validate_model_json(raw, str(path))


def validate_model_json(raw: Any, where: str = MODEL_JSON) -> dict:
    """``raw`` checked against the schema, as a plain dict with defaults filled in."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{where}: not an mcc bundle description (format is not {FORMAT!r})")
    try:
        return ModelJson.model_validate(raw).model_dump(mode="json")
    except ValidationError as e:
        raise BundleError(describe_error(e, where)) from None


def describe_error(e: ValidationError, where: str = MODEL_JSON) -> str:
    """The first of pydantic's errors as a reader of model.json needs it: ``model.json: head.loss: Input ...``."""
    err = e.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or MODEL_JSON
    return f"{where}: {field}: {err['msg'].removeprefix('Value error, ')}"
