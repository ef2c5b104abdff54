"""The model: a bundle's model.json and model.onnx in one onnxruntime session."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import BundleError, onnx_file, read_model_json
from .session import create_session

_logger = logging.getLogger("mcc_serve")


def read_bundle(path: str | Path, precision: str = "fp32") -> dict:
    """model.json of a bundle, validated against the bundle schema, after checking that the ONNX file of
    ``precision`` is the file it describes."""
    path = Path(path)
    meta = read_model_json(path)
    name = onnx_file(precision)
    onnx_path = path / name
    if name not in meta["files"] or not onnx_path.is_file():
        flag = "" if precision == "fp32" else f" --{precision}"
        raise BundleError(f"{path}: no {name} (--precision {precision}); export it with mcc-export{flag}")
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    if digest != meta["files"][name]["sha256"]:
        raise BundleError(f"{onnx_path}: sha256 differs from model.json; re-export, or check with mcc-export --verify")
    return meta


def check_graph(session: ort.InferenceSession, meta: dict, where: str) -> None:
    """The ONNX graph takes and gives what model.json says: input name and (C, H, W), output width = classes."""
    inputs = {i.name: i for i in session.get_inputs()}
    want = meta["input"]["name"]
    if want not in inputs:
        raise BundleError(f"{where}: model.json names input {want!r}; the graph's inputs are {sorted(inputs)}")
    graph_chw = inputs[want].shape[1:]
    if [d if isinstance(d, int) else None for d in graph_chw] != meta["input"]["shape"][1:]:
        raise BundleError(f"{where}: the graph's input is [N, {graph_chw}], model.json says {meta['input']['shape']}")
    outputs = {o.name: o for o in session.get_outputs()}
    out = outputs.get(meta["output"]["name"])
    if out is None:
        raise BundleError(
            f"{where}: model.json names output {meta['output']['name']!r}; the graph has {sorted(outputs)}"
        )
    if out.shape[-1] != meta["num_classes"]:
        raise BundleError(
            f"{where}: the graph gives {out.shape[-1]} logits per image; model.json has {meta['num_classes']} classes"
        )


@dataclass
class Engine:
    """One InferenceSession; ``run`` is thread-safe and called off the event loop."""

    session: ort.InferenceSession
    meta: dict
    input_name: str
    output_name: str

    @classmethod
    def load(
        cls,
        bundle: str | Path,
        device: str = "auto",
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        precision: str = "fp32",
    ):
        meta = read_bundle(bundle, precision)
        name = onnx_file(precision)
        session = create_session(Path(bundle) / name, device, intra_op_threads, inter_op_threads)
        check_graph(session, meta, f"{bundle}/{name}")
        _logger.info("loaded %s (%s, %s) on %s", meta.get("arch"), bundle, name, session.get_providers()[0])
        return cls(session, meta, meta["input"]["name"], meta["output"]["name"])

    def run(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 -> logits (N, num_classes) float32."""
        return self.session.run([self.output_name], {self.input_name: x})[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
