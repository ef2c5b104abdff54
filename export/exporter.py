"""mcc-export's work: checkpoint -> collapsed weights, ONNX, model.json, then the proof, into one bundle."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import timm
import torch
from safetensors.torch import save_file

from mcc_serve import bundle as schema
from mcc_train import UsageError

from .bundle import (
    FP16_FILE,
    MODEL_JSON,
    ONNX_FILE,
    PARITY_JSON,
    WEIGHTS_FILE,
    file_record,
    sha256_file,
    staged_bundle,
    write_json,
)
from .collapse import collapse, collapsed_state_dict, load_trained, mc_settings
from .onnx_graph import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, export_onnx
from .verify import Report, verify_bundle

_logger = logging.getLogger("export")


@dataclass
class ExportConfig:
    checkpoint: str
    out: str
    opset: int = DEFAULT_OPSET
    image_size: tuple[int, int] | None = None  # (H, W); default: the size the model was trained at
    fp16: bool = False
    overwrite: bool = False
    num_real: int = 32  # real images used by the output check
    latency_runs: int = 50

    def validate(self) -> ExportConfig:
        if not 17 <= self.opset <= 23:
            raise UsageError(f"--opset must be between 17 and 23, got {self.opset}")
        if self.image_size is not None and min(self.image_size) < 8:
            raise UsageError(f"--image-size must be at least 8 8, got {' '.join(map(str, self.image_size))}")
        return self


def export_checkpoint(cfg: ExportConfig) -> Report:
    """Write the bundle for ``cfg.checkpoint`` into ``cfg.out`` (atomically) and return the verification report.

    Raises:
        UsageError: unreadable or non-mcc checkpoint, bad options; nothing is written then.
    """
    cfg.validate()
    loaded = load_trained(cfg.checkpoint)
    ckpt = loaded.ckpt
    dc = dict(ckpt["data_config"])
    input_size = (loaded.in_chans, *(cfg.image_size or dc["input_size"][1:]))
    fixed = getattr(timm.models.get_pretrained_cfg(loaded.arch), "fixed_input_size", False)
    if fixed and tuple(input_size[1:]) != tuple(dc["input_size"][1:]):
        raise UsageError(
            f"--image-size {input_size[1]} {input_size[2]}: {loaded.arch} has a fixed input size, trained at "
            f"{dc['input_size'][1]}x{dc['input_size'][2]}; drop --image-size"
        )
    if input_size[1] != input_size[2]:
        raise UsageError("--image-size: H and W must be equal (timm's eval transform crops a square)")

    with staged_bundle(Path(cfg.out), cfg.overwrite) as tmp:
        started = time.time()
        _logger.info("collapsing %s (%s head, epoch %d) to its mean centers", loaded.arch, ckpt["head"], ckpt["epoch"])
        save_file(collapsed_state_dict(loaded.model), str(tmp / WEIGHTS_FILE))
        _logger.info("exporting ONNX (opset %d, input %s, dynamic batch)", cfg.opset, list(input_size))
        export_onnx(collapse(loaded.model), tmp / ONNX_FILE, input_size, cfg.opset)
        files = {ONNX_FILE: file_record(tmp / ONNX_FILE), WEIGHTS_FILE: file_record(tmp / WEIGHTS_FILE)}
        if cfg.fp16:
            write_fp16(tmp / ONNX_FILE, tmp / FP16_FILE)
            files[FP16_FILE] = file_record(tmp / FP16_FILE)
        try:  # written through the schema the server reads it with
            meta = schema.validate_model_json(model_json(loaded, input_size, files, cfg.opset))
        except schema.BundleError as e:
            raise UsageError(f"{cfg.checkpoint}: cannot describe it as a bundle: {e}") from None
        write_json(tmp / MODEL_JSON, meta)
        _logger.info("verifying the bundle (weights, graph, outputs, latency)")
        report = verify_bundle(tmp, cfg.checkpoint, num_real=cfg.num_real, latency_runs=cfg.latency_runs)
        parity = {
            **report.to_dict(),
            "model_json_sha256": sha256_file(tmp / MODEL_JSON),
            "seconds": round(time.time() - started, 1),
        }
        write_json(tmp / PARITY_JSON, parity)
        if not report.passed:
            raise VerificationError(report)
    return report


class VerificationError(Exception):
    """The exported bundle failed its proof; nothing was written."""

    def __init__(self, report: Report):
        super().__init__("verification failed")
        self.report = report


def model_json(loaded, input_size: tuple[int, int, int], files: dict, opset: int) -> dict:
    ckpt, cfg = loaded.ckpt, loaded.ckpt["config"]
    dc = ckpt["data_config"]
    return {
        "format": schema.FORMAT,
        "version": schema.VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "arch": loaded.arch,
        "num_classes": loaded.num_classes,
        "class_names": list(ckpt["class_names"]),
        "in_chans": loaded.in_chans,
        "model_kwargs": dict(cfg.get("model_kwargs", {})),
        "input": {"name": INPUT_NAME, "shape": [None, *input_size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": [None, loaded.num_classes], "dtype": "float32"},
        "preprocess": {
            "input_size": list(input_size),
            "mean": list(dc["mean"]),
            "std": list(dc["std"]),
            "interpolation": dc["interpolation"],
            "crop_pct": dc["crop_pct"],
            "crop_mode": dc.get("crop_mode", "center"),
        },
        "head": {
            "type": ckpt["head"],
            "classifier": loaded.classifier,
            **mc_settings(cfg).head_kwargs(),
        },
        "source": {
            "checkpoint": str(loaded.path.resolve()),
            "sha256": sha256_file(loaded.path),
            "epoch": ckpt["epoch"],
        },
        "metrics": ckpt.get("metrics", {}),
        "files": files,
        "onnx": {
            "opset": opset,
            "exporter": "torch.onnx.export(dynamo=True)",
            "torch": torch.__version__,
            "timm": timm.__version__,
            "onnx": onnx.__version__,
        },
    }


def write_fp16(src: Path, dst: Path) -> None:
    """An fp16 copy of the model with float32 input and output (onnxruntime's converter)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
