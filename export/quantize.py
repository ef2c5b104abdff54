"""``mcc-export --int8``: model_int8.onnx by onnxruntime's static quantization, and its accuracy beside fp32.

onnxruntime's recipe for CNNs on x86 (``onnxruntime.quantization``): the graph is pre-processed (shape inference and
onnxruntime's graph optimizations, so BatchNorm is folded before its ranges are measured), then quantized in the
QDQ format with per-channel int8 weights and uint8 activations whose ranges come from calibration images (MinMax).
The calibration images are training images through the bundle's own preprocessing (timm's eval transform, what
the server applies), so the ranges are those the model sees when served. VNNI CPUs run the U8S8 products
natively.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from timm.data import create_transform

from mcc_train import UsageError
from mcc_train.data import load_data

from .onnx_graph import INPUT_NAME

_logger = logging.getLogger("export")
CALIBRATION_IMAGES = 256  # onnxruntime's examples calibrate CNNs on a few hundred images
EVAL_IMAGES = 10_000  # the most validation images --int8 scores both models on (all of Fashion-MNIST's val split)
INT8_MIN_AGREEMENT = 0.90  # the proof's bar: int8 names fp32's class on at least 90% of the val images (a weak model
# has near-ties that quantization noise flips: 95.7% on a 1-epoch digits model whose logits moved by at most 0.05)
INT8_CHECK_IMAGES = 256  # val images the proof (mcc-export and --verify) compares the two models on


def preprocessed_batches(meta: dict, spec: str, split: str, count: int, batch: int = 64):
    """Up to ``count`` images of one split of ``--data spec`` (evenly spaced) through the bundle's preprocessing,
    ``batch`` at a time: yields (images (n, C, H, W), labels (n,)), so 10,000 images at 224 never sit in memory
    together.

    Raises:
        UsageError: the data cannot be read here.
    """
    pre = meta["preprocess"]
    splits = load_data(spec, only=split)
    dataset = getattr(splits, split)
    dataset.mode = "L" if meta["in_chans"] == 1 else "RGB"
    dataset.transform = create_transform(
        tuple(pre["input_size"]),
        is_training=False,
        interpolation=pre["interpolation"],
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        crop_pct=pre["crop_pct"],
        crop_mode=pre.get("crop_mode"),
    )
    index = np.unique(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).astype(int))
    for start in range(0, len(index), batch):
        pairs = [dataset[int(i)] for i in index[start : start + batch]]
        yield torch.stack([x for x, _ in pairs]), np.array([int(y) for _, y in pairs])


def preprocessed(meta: dict, spec: str, split: str, count: int) -> tuple[torch.Tensor, np.ndarray]:
    """All of ``preprocessed_batches`` at once, (N, C, H, W) and (N,): for the few hundred images of calibration and
    the proof."""
    batches = list(preprocessed_batches(meta, spec, split, count))
    return torch.cat([x for x, _ in batches]), np.concatenate([y for _, y in batches])


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over (N, C, H, W) images, 32 at a time."""

    def __init__(self, images: np.ndarray, batch: int = 32):
        self.batches = iter([{INPUT_NAME: images[i : i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.batches, None)


def write_int8(src: Path, dst: Path, calibration: np.ndarray) -> None:
    """Quantize ``src`` (the fp32 ONNX model) into ``dst`` with ``calibration`` images (N, C, H, W) float32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(dst),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )


def calibrate_and_write(meta: dict, spec: str | None, src: Path, dst: Path, count: int) -> int:
    """model_int8.onnx from ``count`` training images; returns how many were used.

    Raises:
        UsageError: no training data to calibrate on.
    """
    if not spec:
        raise UsageError("--int8 calibrates on the training images, and the checkpoint names no --data")
    try:
        images, _ = preprocessed(meta, spec, "train", count)
    except UsageError as e:
        raise UsageError(f"--int8 calibrates on the training images of {spec}; they cannot be read here: {e}") from None
    _logger.info("quantizing to int8 (QDQ, per-channel weights) on %d training images of %s", len(images), spec)
    write_int8(src, dst, images.numpy())
    return len(images)


def top1_report(fp32_path: Path, int8_path: Path, meta: dict, spec: str, count: int = EVAL_IMAGES) -> dict:
    """Top-1 of the fp32 and the int8 model on up to ``count`` validation images of ``spec``, their agreement, and
    how far apart their logits are."""
    from .verify import session

    sessions = {"fp32": session(fp32_path), "int8": session(int8_path)}
    outputs, labels = {k: [] for k in sessions}, []
    for images, y in preprocessed_batches(meta, spec, "val", count):
        labels.append(y)
        for name, sess in sessions.items():
            outputs[name].append(sess.run(None, {INPUT_NAME: images.numpy()})[0])  # (n, C)
    labels = np.concatenate(labels)
    outputs = {k: np.concatenate(v) for k, v in outputs.items()}
    pred = {k: v.argmax(1) for k, v in outputs.items()}
    # paired by image: d_i = int8 right - fp32 right (-1, 0, 1); its mean is the top-1 change
    diff = 100 * ((pred["int8"] == labels).astype(float) - (pred["fp32"] == labels))
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return {
        "val_images": len(labels),
        "top1_fp32": 100 * float((pred["fp32"] == labels).mean()),
        "top1_int8": 100 * float((pred["int8"] == labels).mean()),
        "top1_change_ci95": [float(diff.mean() - half), float(diff.mean() + half)],  # points, paired by image
        "top1_agreement": float((pred["fp32"] == pred["int8"]).mean()),
        "max_abs_logit_error": float(np.abs(outputs["fp32"] - outputs["int8"]).max()),
    }
