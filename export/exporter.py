"""mcc-export's work: checkpoint -> collapsed weights, timm config, ONNX, model.json, the proof, a model card.

All of it goes into one staged directory that is renamed into place only when the proof passed.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import timm
import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf

from mcc_serve.runtime.bundle import FORMAT, VERSION, WEIGHTS, ModelJson, describe_error
from mcc_train import UsageError
from mcc_train.model import timm_size_kwargs

from .bundle import (
    CONFIG_JSON,
    FP16_FILE,
    INT8_FILE,
    MODEL_JSON,
    ONNX_FILE,
    PARITY_JSON,
    README_FILE,
    WEIGHTS_FILE,
    file_record,
    sha256_file,
    staged_bundle,
    write_json,
)
from .collapse import (
    COSINE_CONFIG_KEY,
    LoadedCheckpoint,
    collapse,
    collapsed_state_dict,
    cosine_config,
    head_variant,
    load_trained,
    loss_settings,
    mc_settings,
)
from .measure import top1_report
from .model_card import render_model_card
from .onnx_graph import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, export_onnx
from .proof import Report, verify_bundle
from .quantize import CALIBRATION_IMAGES, calibrate_and_write

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
    weights: str = "model"  # "model", or "ema": the checkpoint's EMA weights (mcc-train --model-ema)
    int8: bool = False  # also model_int8.onnx, calibrated on the training images
    calibration_images: int = CALIBRATION_IMAGES

    def validate(self) -> ExportConfig:
        if self.weights not in WEIGHTS:
            raise UsageError(f"weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if not 17 <= self.opset <= 23:
            raise UsageError(f"--opset must be between 17 and 23, got {self.opset}")
        if self.calibration_images < 1:
            raise UsageError(f"--calibration-images must be >= 1, got {self.calibration_images}")
        if self.image_size is not None and min(self.image_size) < 8:
            raise UsageError(f"--image-size must be at least 8 8, got {' '.join(map(str, self.image_size))}")
        return self


def export_checkpoint(cfg: ExportConfig) -> Report:
    """Write the bundle for ``cfg.checkpoint`` into ``cfg.out`` (atomically) and return the verification report.

    Raises:
        UsageError: unreadable or non-mcc checkpoint, bad options; nothing is written then.
    """
    cfg.validate()
    loaded = load_trained(cfg.checkpoint, cfg.weights)
    ckpt = loaded.ckpt
    input_size = export_input_size(loaded, cfg.image_size)

    with staged_bundle(Path(cfg.out), cfg.overwrite) as tmp:
        started = time.time()
        _logger.info(
            "collapsing %s (%s head, %s loss, epoch %d, %s weights) to its test-time classifier",
            loaded.arch,
            ckpt["head"],
            loss_settings(ckpt["config"])["loss"],
            ckpt["epoch"],
            loaded.weights,
        )
        collapsed = collapse(loaded.model)
        save_file(collapsed_state_dict(collapsed), str(tmp / WEIGHTS_FILE))
        preprocess = preprocess_spec(ckpt["data_config"], input_size)
        class_names, cosine = list(ckpt["class_names"]), cosine_config(head_variant(ckpt["config"]))
        write_timm_config(collapsed, tmp / CONFIG_JSON, class_names, preprocess, timm_model_args(loaded), cosine)
        _logger.info("exporting ONNX (opset %d, input %s, dynamic batch)", cfg.opset, list(input_size))
        export_onnx(collapsed, tmp / ONNX_FILE, input_size, cfg.opset)
        files = {name: file_record(tmp / name) for name in (ONNX_FILE, WEIGHTS_FILE, CONFIG_JSON)}
        if cfg.fp16:
            write_fp16(tmp / ONNX_FILE, tmp / FP16_FILE)
            files[FP16_FILE] = file_record(tmp / FP16_FILE)
        data = ckpt["config"].get("data")
        if cfg.int8:
            calib_meta = {"preprocess": preprocess, "in_chans": loaded.in_chans}
            calibrated = calibrate_and_write(calib_meta, data, tmp / ONNX_FILE, tmp / INT8_FILE, cfg.calibration_images)
            files[INT8_FILE] = file_record(tmp / INT8_FILE)
        try:  # written through the schema the server reads it with
            meta = model_json(loaded, input_size, preprocess, files, cfg.opset).model_dump(mode="json")
        except ValidationError as e:
            raise UsageError(f"{cfg.checkpoint}: cannot describe it as a bundle: {describe_error(e)}") from None
        write_json(tmp / MODEL_JSON, meta)
        _logger.info("verifying the bundle (weights, timm config, graph, outputs, latency)")
        report = verify_bundle(tmp, cfg.checkpoint, num_real=cfg.num_real, latency_runs=cfg.latency_runs)
        parity = {**report.to_dict(), "model_json_sha256": sha256_file(tmp / MODEL_JSON)}
        if cfg.int8 and report.passed:  # a failed proof writes nothing: no need to score it
            _logger.info("scoring the fp32 and int8 models on the validation images of %s", data)
            int8 = top1_report(tmp / ONNX_FILE, tmp / INT8_FILE, meta, data)
            parity["int8"] = {"calibration_images": calibrated, **int8, "proof": report.int8}
            _logger.info(
                "top-1 fp32 %.2f%%, int8 %.2f%% on %d val images",
                int8["top1_fp32"],
                int8["top1_int8"],
                int8["val_images"],
            )
        parity["seconds"] = round(time.time() - started, 1)
        write_json(tmp / PARITY_JSON, parity)
        card = render_model_card(meta, report, Path(cfg.out).name, ckpt["config"].get("data"))
        (tmp / README_FILE).write_text(card)
        if not report.passed:
            raise VerificationError(report)
    return report


class VerificationError(Exception):
    """The exported bundle failed its proof; nothing was written."""

    def __init__(self, report: Report):
        super().__init__("verification failed")
        self.report = report


def export_input_size(loaded: LoadedCheckpoint, image_size: tuple[int, int] | None) -> tuple[int, int, int]:
    """The (C, H, W) the bundle takes: ``--image-size`` (H, W), or the size the model was trained at.

    Raises:
        UsageError: an arch of fixed input size at another size, or H != W.
    """
    trained = tuple(loaded.ckpt["data_config"]["input_size"][1:])
    input_size = (loaded.in_chans, *(image_size or trained))
    fixed = getattr(timm.models.get_pretrained_cfg(loaded.arch), "fixed_input_size", False)
    if fixed and tuple(input_size[1:]) != trained:
        raise UsageError(
            f"--image-size {input_size[1]} {input_size[2]}: {loaded.arch} has a fixed input size, trained at "
            f"{trained[0]}x{trained[1]}; drop --image-size"
        )
    if input_size[1] != input_size[2]:
        raise UsageError("--image-size: H and W must be equal (timm's eval transform crops a square)")
    return input_size


def timm_model_args(loaded: LoadedCheckpoint) -> dict:
    """The ``timm.create_model`` arguments that rebuild the model: in_chans, its size arguments, its model_kwargs."""
    return {
        "in_chans": loaded.in_chans,
        **timm_size_kwargs(loaded.arch, loaded.img_size),
        **loaded.ckpt["config"].get("model_kwargs", {}),
    }


def preprocess_spec(data_config: dict, input_size: tuple[int, int, int]) -> dict:
    """timm's eval transform the bundle expects: the checkpoint's, at the exported input size."""
    return {
        "input_size": list(input_size),
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
        "interpolation": data_config["interpolation"],
        "crop_pct": data_config["crop_pct"],
        "crop_mode": data_config.get("crop_mode", "center"),
    }


PREPROCESS_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
PROVENANCE_KEYS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "hf_hub_id", "url")


def write_timm_config(
    model: torch.nn.Module,
    path: Path,
    class_names: list[str],
    preprocess: dict,
    model_args: dict,
    cosine: dict | None = None,
) -> None:
    """config.json as ``timm.models.save_for_hf`` writes it, so ``timm.create_model("local-dir:BUNDLE")`` works.

    ``model_args`` (in_chans, img_size, patch_size, ...) are the ``timm.create_model`` arguments that rebuild the
    model; the class names go into ``label_names`` and the bundle's preprocessing into ``pretrained_cfg``. A cosine
    bundle's ``cosine`` (``collapse.cosine_config``) goes in as a top-level ``cosine_classifier`` entry, which timm
    writes as given and ignores when it loads: it tells a timm user to L2-normalise the pre-logits.
    NOTE: ``save_config_for_hf`` is the half of timm's public ``save_for_hf`` that writes config.json (the weights
    are written apart, as the proof checks them). Its ``data_config`` argument is recent (timm 1.0.31 has it, 1.0.29
    not): without it the preprocessing is set on the written JSON, which every version reads back the same way.
    The arch's default ``pretrained_cfg`` also names its published weights (``tag: c3_in1k``, their licence, paper):
    those entries are dropped, as they do not describe these weights.
    """
    model_config = {"label_names": class_names} | ({COSINE_CONFIG_KEY: cosine} if cosine else {})
    kwargs = {"model_config": model_config, "model_args": model_args}
    timm_sets_preprocessing = "data_config" in inspect.signature(save_config_for_hf).parameters
    if timm_sets_preprocessing:
        kwargs["data_config"] = preprocess
    try:
        save_config_for_hf(model, Path(path), **kwargs)
    except ValueError as e:  # a model argument that is not JSON
        raise UsageError(f"cannot write timm's config.json: {e}") from None
    config = json.loads(Path(path).read_text())
    pretrained_cfg = config.setdefault("pretrained_cfg", {})
    for key in PROVENANCE_KEYS:  # they describe the arch's published weights, not these
        pretrained_cfg.pop(key, None)
    if not timm_sets_preprocessing:
        for key in ("test_input_size", "test_crop_pct", "test_pool_size", "pool_size"):  # for the source's input
            pretrained_cfg.pop(key, None)
        pretrained_cfg.update({k: preprocess[k] for k in PREPROCESS_KEYS})
        pretrained_cfg["num_classes"] = config["num_classes"]  # the arch's default cfg says 1000
    Path(path).write_text(json.dumps(config, indent=2) + "\n")


def model_json(
    loaded: LoadedCheckpoint, input_size: tuple[int, int, int], preprocess: dict, files: dict, opset: int
) -> ModelJson:
    """model.json for the collapsed ``loaded`` (pydantic's ValidationError when the checkpoint does not fit the
    schema). The nested parts go in as dicts, so that an error names its whole path (``head.loss``)."""
    ckpt, cfg = loaded.ckpt, loaded.ckpt["config"]
    return ModelJson(
        format=FORMAT,
        version=VERSION,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        arch=loaded.arch,
        num_classes=loaded.num_classes,
        class_names=list(ckpt["class_names"]),
        in_chans=loaded.in_chans,
        model_kwargs=dict(cfg.get("model_kwargs", {})),
        input={"name": INPUT_NAME, "shape": [None, *input_size], "dtype": "float32"},
        output={"name": OUTPUT_NAME, "shape": [None, loaded.num_classes], "dtype": "float32"},
        preprocess=preprocess,
        head={
            "type": ckpt["head"],
            "classifier": loaded.classifier,
            **mc_settings(cfg).head_kwargs(),
            **head_variant(cfg),
        },
        source={
            "checkpoint": str(loaded.path.resolve()),
            "sha256": sha256_file(loaded.path),
            "epoch": ckpt["epoch"],
            "weights": loaded.weights,
        },
        metrics=loaded.metrics,
        files=files,
        onnx={
            "opset": opset,
            "exporter": "torch.onnx.export(dynamo=True)",
            "torch": torch.__version__,
            "timm": timm.__version__,
            "onnx": onnx.__version__,
        },
    )


def write_fp16(src: Path, dst: Path) -> None:
    """An fp16 copy of the model with float32 input and output (onnxruntime's converter)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
