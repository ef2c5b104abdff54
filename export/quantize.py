"""``mcc-export --int8``: model_int8.onnx by onnxruntime's static quantization.

onnxruntime's recipe for CNNs on x86 (``onnxruntime.quantization``): the graph is pre-processed (shape inference and
onnxruntime's graph optimizations, so BatchNorm is folded before its ranges are measured), then quantized in the
QDQ format with per-channel int8 weights and uint8 activations whose ranges come from calibration images (MinMax).
The calibration images are training images through the bundle's own preprocessing (timm's eval transform, what
the server applies), so the ranges are those the model sees when served. VNNI CPUs run the U8S8 products
natively. The proof checks the int8 model's answers (``proof.check_int8``); ``measure.top1_report`` scores it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from mcc_train import UsageError

from .images import preprocessed
from .onnx_graph import INPUT_NAME

_logger = logging.getLogger("export")
CALIBRATION_IMAGES = 256  # onnxruntime's examples calibrate CNNs on a few hundred images


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
