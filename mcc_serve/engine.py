"""The model: a bundle's model.json and model.onnx in one onnxruntime session."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

_logger = logging.getLogger("mcc_serve")


class BundleError(Exception):
    """The bundle cannot be served; the message says why and what to do."""


def read_bundle(path: str | Path) -> dict:
    """model.json of a bundle, after checking that model.onnx is the file it describes."""
    path = Path(path)
    meta_path = path / "model.json"
    if not meta_path.is_file():
        raise BundleError(f"{path}: no model.json; point mcc-serve at a directory written by mcc-export")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{meta_path}: not valid JSON ({e})") from None
    required = ("format", "num_classes", "class_names", "in_chans", "preprocess", "files", "input", "output")
    missing = [k for k in required if k not in meta] if isinstance(meta, dict) else list(required)
    if missing:
        raise BundleError(f"{meta_path}: not a valid mcc model.json (missing {', '.join(missing)})")
    if meta["format"] != "mcc-bundle":
        raise BundleError(f"{meta_path}: format is {meta['format']!r}, not 'mcc-bundle'")
    onnx_path = path / "model.onnx"
    if not onnx_path.is_file():
        raise BundleError(f"{path}: no model.onnx")
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    if digest != meta["files"].get("model.onnx", {}).get("sha256"):
        raise BundleError(f"{onnx_path}: sha256 differs from model.json; re-export, or check with mcc-export --verify")
    return meta


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise BundleError("--device cuda: onnxruntime has no CUDAExecutionProvider; install onnxruntime-gpu")
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass
class Engine:
    """One InferenceSession; ``run`` is thread-safe and called off the event loop."""

    session: ort.InferenceSession
    meta: dict
    input_name: str
    output_name: str

    @classmethod
    def load(cls, bundle: str | Path, device: str = "auto", intra_op_threads: int = 0, inter_op_threads: int = 0):
        meta = read_bundle(bundle)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # NOTE: idle onnxruntime pool threads spin by default; on a server that shares its cores with HTTP work
        # that spinning cost 2.6 ms of CPU per request (benchmarks/serve_load.py, resnet18, 2 cores).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(Path(bundle) / "model.onnx"), opts, providers=providers_for(device))
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise BundleError(
                f"{bundle}/model.onnx: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})"
            ) from None
        _logger.info("loaded %s (%s) on %s", meta.get("arch"), bundle, session.get_providers()[0])
        return cls(session, meta, meta["input"]["name"], meta["output"]["name"])

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def input_shape(self) -> list[int]:
        return list(self.meta["input"]["shape"][1:])  # (C, H, W)

    def run(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 -> logits (N, num_classes) float32."""
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def warmup(self, runs: int, batch_sizes=(1,)) -> None:
        for batch in batch_sizes:
            x = np.zeros((batch, *self.input_shape), np.float32)
            for _ in range(runs):
                self.run(x)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
