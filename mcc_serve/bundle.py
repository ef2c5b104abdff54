"""The bundle contract: its files and model.json's schema, defined once and torch-free.

``export`` builds model.json through ``ModelJson`` and reads it back with ``read_model_json`` for
``mcc-export --verify``; ``mcc-serve`` reads it with the same function and checks the ONNX graph against it at
start-up (``mcc_serve.engine``). A model.json that does not validate is refused with one line naming the field.

A bundle directory holds (``mcc-export`` writes them in this order, all in one staged directory renamed into place):

- ``model.safetensors``: the collapsed weights, a vanilla timm state_dict.
- ``config.json``: timm's hub config (``timm.models.save_for_hf``'s, with the bundle's preprocessing and class
  names), so ``timm.create_model("local-dir:BUNDLE", pretrained=True)`` rebuilds the exported model; absent from
  bundles written before it was added.
- ``model.onnx`` (and with ``--fp16`` ``model_fp16.onnx``): the collapsed model as ONNX.
- ``model_int8.onnx`` (``--int8``): that model statically quantized by onnxruntime (QDQ, per-channel int8
  weights, uint8 activations calibrated on training images); its top-1 beside fp32's is in ``parity.json``.
- ``model.json``: this schema; ``files`` records the sha256 and size of every file above.
- ``parity.json``: the proof (every check and its result) and the sha256 of model.json.
- ``README.md``: a model card (Hugging Face front matter) quoting the proof. NOTE: not in ``files``: it is written
  after the proof it quotes, and it is documentation a publisher may edit (licence, description) without changing
  what the model computes.

model.json, version 1: ``format`` ("mcc-bundle"), ``version``, ``created``, ``arch``, ``num_classes``,
``class_names``, ``in_chans``, ``model_kwargs`` (extra ``timm.create_model`` arguments), ``input`` and ``output``
(name, shape with a ``null`` batch axis, dtype), ``preprocess`` (timm's eval transform: ``input_size`` [C, H, W],
``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``), ``head`` (see below), ``source``
(``checkpoint``, ``sha256``, ``epoch``, ``weights``: ``model`` or ``ema``, the checkpoint's weights that were
exported; ``model`` when absent), ``metrics`` (those weights' eval metrics), ``files`` (sha256 and size of each
file), ``onnx`` (opset and exporter versions).

``head``: how the model was trained and what its classifier computes at test time. ``type`` (mc | linear, the
training head), ``classifier`` (its dotted path, e.g. ``fc``), the MC settings it was trained with
(``num_subcenters``, ...), the softmax variant: ``loss`` (softmax | lsoftmax | cosface | arcface), ``margin`` (its m;
null for softmax) and ``margin_scale`` (its s; null but for cosface and arcface), and ``classifier_kind``:

- ``linear``: ``logits = x @ W^T + b`` on the pre-logit features x (softmax, lsoftmax): the vanilla timm model.
- ``cosine``: ``logits = s * normalize(x) @ normalize(W_mean)^T`` (cosface, arcface). The weights hold the classifier
  as timm's ``nn.Linear`` does, ``W = s * normalize(W_mean)`` row by row and a zero bias, so the model is the
  vanilla timm model with its pre-logit features L2-normalised before the classifier; model.onnx contains that
  normalisation, so onnxruntime and mcc-serve run it as any other bundle.

A bundle written before the variants has none of these four keys: it reads as ``loss`` softmax, ``classifier_kind``
linear.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FORMAT, VERSION = "mcc-bundle", 1
PRECISIONS = ("fp32", "fp16", "int8")  # mcc-serve --precision: which of the bundle's ONNX files it runs
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
WEIGHTS = ("model", "ema")  # which of the checkpoint's weights were exported: its model, or its EMA of the model
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
# the softmax variants (mcc_train.margins.LOSSES, restated: this module imports no mcc_train) and, for each, the
# classifier its test-time logits come from
CLASSIFIER_KIND = {"softmax": "linear", "lsoftmax": "linear", "cosface": "cosine", "arcface": "cosine"}
LOSSES = tuple(CLASSIFIER_KIND)
CLASSIFIER_KINDS = ("linear", "cosine")


class BundleError(Exception):
    """The bundle cannot be used; the message says why and what to do."""


class TensorSpec(BaseModel):
    name: str = Field(min_length=1)
    shape: list[int | None]
    dtype: Literal["float32"] = "float32"


class Preprocess(BaseModel):
    input_size: list[int] = Field(min_length=3, max_length=3)  # [C, H, W]
    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)
    interpolation: Literal[INTERPOLATIONS]
    crop_pct: float = Field(gt=0, le=1)
    crop_mode: Literal["center", "squash"] = "center"

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
    model_config = ConfigDict(extra="allow")  # the MC settings it was trained with

    type: Literal["mc", "linear"]
    classifier: str
    loss: Literal[LOSSES] = "softmax"
    margin: float | None = None
    margin_scale: float | None = Field(default=None, gt=0)
    classifier_kind: Literal[CLASSIFIER_KINDS] = "linear"

    @model_validator(mode="after")
    def _consistent(self) -> Head:
        kind = CLASSIFIER_KIND[self.loss]
        if self.classifier_kind != kind:
            raise ValueError(f"classifier_kind {self.classifier_kind!r} does not fit loss {self.loss!r} (a {kind} "
                             "classifier)")  # fmt: skip
        if kind == "cosine" and self.margin_scale is None:
            raise ValueError(f"loss {self.loss!r} needs margin_scale, the s of its cosine logits")
        return self


class FileRecord(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Source(BaseModel):
    model_config = ConfigDict(extra="allow")

    checkpoint: str | None = None
    sha256: str | None = None
    epoch: int | None = None
    weights: Literal[WEIGHTS] = "model"


class ModelJson(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format: Literal["mcc-bundle"]
    version: int = Field(ge=1)
    created: str | None = None
    arch: str = Field(min_length=1)
    num_classes: int = Field(ge=1)
    class_names: list[str]
    in_chans: Literal[1, 3]
    model_kwargs: dict[str, Any] = {}
    input: TensorSpec
    output: TensorSpec
    preprocess: Preprocess
    head: Head
    source: Source = Source()
    metrics: dict[str, Any] = {}
    files: dict[str, FileRecord]
    onnx: dict[str, Any] = {}

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
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "model.json"
        raise BundleError(f"{where}: {field}: {err['msg'].removeprefix('Value error, ')}") from None
