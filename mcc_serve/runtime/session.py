"""The one place an onnxruntime session is made: mcc-serve's engine, mcc-predict, the exporter's proof, INT8
calibration checks and the benchmarks all run a model through ``create_session``, with the same options."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from .bundle import BundleError
from .choices import DEVICES


class SessionError(BundleError):
    """onnxruntime cannot load or place the model; the message names the file or the missing provider."""


def providers_for(device: str) -> list[str]:
    """onnxruntime's execution providers for ``device`` (auto | cpu | cuda), CUDA first where it is installed."""
    if device not in DEVICES:
        raise SessionError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise SessionError("--device cuda: onnxruntime has no CUDAExecutionProvider; install onnxruntime-gpu")
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(intra_op_threads: int = 0, inter_op_threads: int = 0) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads  # 0: onnxruntime's default, one per core
    opts.inter_op_num_threads = inter_op_threads
    opts.log_severity_level = 3  # errors only: its warnings about unused initializers are not the user's
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # NOTE: idle pool threads spin by default, burning the cores that decoding and HTTP need on a shared machine
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


def create_session(
    path: str | Path, device: str = "cpu", intra_op_threads: int = 0, inter_op_threads: int = 0
) -> ort.InferenceSession:
    """An InferenceSession on the ONNX file ``path`` (SessionError naming the file when onnxruntime refuses it)."""
    providers = providers_for(device)
    try:
        return ort.InferenceSession(str(path), session_options(intra_op_threads, inter_op_threads), providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        raise SessionError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
