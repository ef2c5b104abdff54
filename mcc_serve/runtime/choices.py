"""Every choice mcc offers, named once: head types, softmax variants and the classifier each gives at test time,
resize interpolations, image file suffixes, bundle precisions and the default pixel limit.

Torch-free, so training (``mcc_train``), export and serving read the same tables. A flag's accepted values, the
bundle schema's ``Literal`` types and the error messages listing them all come from here.
"""

from __future__ import annotations

from dataclasses import dataclass

HEAD_TYPES = ("mc", "linear")  # --head: the multi-center head, or timm's own linear classifier


@dataclass(frozen=True)
class LossKind:
    """One softmax variant: its name in papers, the classifier its test-time logits come from, and its defaults."""

    name: str
    title: str
    cosine: bool  # test time: s * cos(feature, center) with no bias, instead of x . w + b
    margin: float  # default margin m (an integer for L-Softmax)
    scale: float | None  # default s; None: no scale (the logits keep the feature and weight norms)

    @property
    def has_margin(self) -> bool:
        return self.margin > 0

    @property
    def classifier_kind(self) -> str:
        return "cosine" if self.cosine else "linear"


# The defaults come from benchmarks/margin_sweep.py; docs/RESULTS.md has the sweep and why these were kept.
LOSSES = {
    "softmax": LossKind("softmax", "softmax", cosine=False, margin=0.0, scale=None),
    "lsoftmax": LossKind("lsoftmax", "L-Softmax", cosine=False, margin=2.0, scale=None),
    "cosface": LossKind("cosface", "CosFace", cosine=True, margin=0.2, scale=16.0),
    "arcface": LossKind("arcface", "ArcFace", cosine=True, margin=0.3, scale=16.0),
}
CLASSIFIER_KINDS = ("linear", "cosine")
CLASSIFIER_KIND = {name: kind.classifier_kind for name, kind in LOSSES.items()}

# Pillow's resampling filters by timm's names; the bundle records one, serving resizes with it
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")

# files taken as images when a folder is searched (training data, mcc-predict, mcc-eval)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

# the image formats mcc-serve decodes by default (Pillow's names): the ones clients send; the rare formats Pillow also
# reads, and containers that embed other images, stay off unless --image-formats names them
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_IMAGE_PIXELS = 40_000_000  # the largest image decoded (w * h) by default, in serving, mcc-predict and mcc-eval
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # Pillow's 16-bit, 32-bit and float modes: to 8 bits
CROP_MODES = ("center", "squash")  # timm's eval crop: resize the shorter side and center-crop, or resize both

PRECISIONS = ("fp32", "fp16", "int8")  # which of a bundle's ONNX files runs
DEVICES = ("auto", "cpu", "cuda")


def one_of(name: str, value, allowed) -> str:
    """The message for ``value`` not being one of ``allowed``: ``--head must be one of mc, linear, got 'x'``."""
    return f"{name} must be one of {', '.join(allowed)}, got {value!r}"
