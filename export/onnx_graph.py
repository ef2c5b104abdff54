"""Writing ONNX from a torch model, and reading an ONNX graph's structure and FLOPs."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper, shape_inference

INPUT_NAME, OUTPUT_NAME = "input", "logits"
DEFAULT_OPSET = 18


def export_onnx(model: torch.nn.Module, path: str | Path, input_size: tuple[int, int, int], opset: int) -> None:
    """Export ``model`` (eval mode, fp32) with input ``input`` (N, C, H, W) and output ``logits`` (N, classes).

    NOTE: ``dynamo=True``: torch.export gives a cleaner graph (batch norm folded into the convolutions, fewer nodes)
    than the TorchScript exporter; docs/export.md has the counts.
    """
    model = model.eval()
    example = torch.randn(2, *input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in ("torch.onnx", "onnxscript", "onnx_ir"):
            logging.getLogger(name).setLevel(logging.ERROR)
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def graph_signature(model: onnx.ModelProto) -> dict:
    """What makes two graphs the same network: op sequence, attributes, initializer shapes, I/O."""

    def attr_value(a):
        value = helper.get_attribute_value(a)
        if isinstance(value, onnx.TensorProto):
            array = numpy_helper.to_array(value)
            return ("tensor", array.dtype.str, array.shape, array.tolist() if array.size <= 64 else None)
        if isinstance(value, bytes):
            return value.decode(errors="replace")
        return value if not isinstance(value, list) else [v.decode() if isinstance(v, bytes) else v for v in value]

    def io(values):
        return [
            (v.name, v.type.tensor_type.elem_type, [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
            for v in values
        ]

    g = model.graph
    return {
        "ops": [n.op_type for n in g.node],
        "attributes": [sorted((a.name, repr(attr_value(a))) for a in n.attribute) for n in g.node],
        "initializers": [(tuple(t.dims), t.data_type) for t in g.initializer],
        "inputs": io(g.input),
        "outputs": io(g.output),
    }


def count_flops(model: onnx.ModelProto) -> int:
    """Multiply-adds x 2 of Conv, Gemm and MatMul nodes for one image (batch fixed to 1)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in list(model.graph.input) + list(model.graph.output):
        dim = value.type.tensor_type.shape.dim
        if dim and not dim[0].dim_value:
            dim[0].ClearField("dim_param")
            dim[0].dim_value = 1
    del model.graph.value_info[:]
    model = shape_inference.infer_shapes(model, data_prop=True)
    g = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*g.value_info, *g.input, *g.output]}
    shapes |= {t.name: list(t.dims) for t in g.initializer}
    flops = 0
    for n in g.node:
        out = shapes.get(n.output[0])
        if not out or not all(out):
            if n.op_type in ("Conv", "Gemm", "MatMul"):
                raise ValueError(f"count_flops: unknown output shape of {n.op_type} node {n.name!r}")
            continue
        if n.op_type == "Conv":
            w = shapes[n.input[1]]  # (C_out, C_in / groups, kH, kW)
            flops += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "MatMul"):
            a = shapes[n.input[0]]
            k = a[-1] if not (n.op_type == "Gemm" and _attr(n, "transA", 0)) else a[-2]
            flops += 2 * int(np.prod(out)) * k
    return flops


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default
