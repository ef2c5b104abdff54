"""The Open Inference Protocol (KServe v2) REST API: health, metadata and JSON tensor inference."""

from __future__ import annotations

import json

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from .. import __version__
from ..deps import get_classifier, load_json, ready_classifier, require_api_key
from ..runtime.service import Classifier
from ..schemas import (
    ErrorResponse,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelReady,
    ServerMetadata,
    inline_schema,
)

health = APIRouter(prefix="/v2/health", tags=["health"])
router = APIRouter(prefix="/v2", tags=["open inference protocol"], dependencies=[Depends(require_api_key)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503, 504)}


@health.get("/live", summary="The server is up")
async def live() -> dict:
    return {"live": True}


@health.get("/ready", summary="The model is loaded and warmed up (503 until then, and while draining)")
async def ready(classifier: Classifier = Depends(get_classifier)):
    return JSONResponse({"ready": classifier.serving}, status_code=200 if classifier.serving else 503)


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="mcc-serve", version=__version__, extensions=["binary_tensor_data"])


def check_name(name: str, request: Request) -> None:
    served = request.app.state.model_name
    if name != served:
        raise HTTPException(404, f"unknown model {name!r}; this server serves {served!r}")


@router.get("/models/{name}", response_model=ModelMetadata, responses=ERRORS, summary="Model metadata")
async def model_metadata(name: str, request: Request, classifier: Classifier = Depends(get_classifier)):
    check_name(name, request)
    model = classifier.model
    return ModelMetadata(
        name=name,
        versions=["1"],
        platform="onnxruntime_onnx",
        inputs=[{"name": model.input_name, "datatype": "FP32", "shape": [-1, *model.input_shape]}],
        outputs=[{"name": model.output_name, "datatype": "FP32", "shape": [-1, model.num_classes]}],
    )


@router.get("/models/{name}/ready", response_model=ModelReady, responses=ERRORS, summary="Model readiness")
async def model_ready(name: str, request: Request, classifier: Classifier = Depends(get_classifier)):
    check_name(name, request)
    return JSONResponse({"name": name, "ready": classifier.serving}, status_code=200 if classifier.serving else 503)


BINARY_HEADER = "inference-header-content-length"  # the binary tensor data extension (tritonclient's default)


def split_binary(body: bytes, header: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a request body: all JSON unless the binary extension's header says otherwise."""
    if header is None:
        return body, b""
    # ASCII digits no longer than the body's own length: int() of other Unicode digits, or of thousands, raises
    if not (header.isascii() and header.isdigit() and len(header) <= len(str(len(body)))) or not 0 < int(header) <= len(
        body
    ):
        raise HTTPException(
            400, f"Inference-Header-Content-Length {header!r} must be the JSON header's byte length, 1 to {len(body)}"
        )
    return body[: int(header)], body[int(header) :]


def input_tensor(req: InferRequest, classifier: Classifier, binary: bytes = b"") -> np.ndarray:
    """The request's one FP32 input as (N, C, H, W), from JSON data or the binary part, or a 400 naming what is
    wrong."""
    want_name, chw = classifier.model.input_name, list(classifier.model.input_shape)
    if len(req.inputs) != 1 or req.inputs[0].name != want_name:
        raise HTTPException(400, f"expected exactly one input named {want_name!r}")
    tensor = req.inputs[0]
    if tensor.datatype != "FP32":
        raise HTTPException(400, f"input {tensor.name!r}: datatype {tensor.datatype} is not supported; send FP32")
    if len(tensor.shape) != 4 or tensor.shape[1:] != chw or tensor.shape[0] < 1:
        raise HTTPException(400, f"input shape {tensor.shape} does not match [N, {', '.join(map(str, chw))}]")
    classifier.check_count(tensor.shape[0])  # before the data is converted
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        need = 4 * int(np.prod(tensor.shape))
        if size != need or len(binary) != need:
            raise HTTPException(
                400,
                f"binary input: shape {tensor.shape} needs {need} bytes of FP32; binary_data_size is {size!r} "
                f"and the body holds {len(binary)} bytes after the JSON header",
            )
        x = np.frombuffer(binary, dtype="<f4")
    elif tensor.data is None:
        raise HTTPException(400, f"input {tensor.name!r} has no data and no binary_data_size")
    else:
        try:
            x = np.asarray(tensor.data, dtype=np.float32)
        except (ValueError, TypeError, OverflowError):  # OverflowError: an integer past float's range
            raise HTTPException(400, "input data must be numbers, as a flat or nested list") from None
    if x.size != int(np.prod(tensor.shape)):
        need = int(np.prod(tensor.shape))
        raise HTTPException(400, f"input data has {x.size} values; shape {tensor.shape} needs {need}")
    if not np.isfinite(x).all():
        raise HTTPException(400, "input data holds NaN or infinity")
    return x.reshape(tensor.shape)


INFER_BODY = {
    "content": {"application/json": {"schema": inline_schema(InferRequest)}},
    "required": True,
}


@router.post(
    "/models/{name}/infer",
    response_model=InferResponse,
    responses=ERRORS,
    summary="Inference",
    openapi_extra={"requestBody": INFER_BODY},
)
async def model_infer(name: str, request: Request, classifier: Classifier = Depends(ready_classifier)) -> Response:
    check_name(name, request)
    header, binary = split_binary(await request.body(), request.headers.get(BINARY_HEADER))
    try:
        req = await load_json(header, InferRequest)
    except ValidationError as e:
        err = e.errors()[0]
        raise HTTPException(400, f"invalid inference request: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    out_name = classifier.model.output_name
    for requested in req.outputs or []:
        if requested.name != out_name:
            raise HTTPException(400, f"unknown output {requested.name!r}; the model has {out_name!r}")
    logits = await classifier.infer(input_tensor(req, classifier, binary))  # (N, num_classes)
    output = {"name": out_name, "shape": list(logits.shape), "datatype": "FP32"}
    if not wants_binary_output(req):
        body = InferResponse(
            model_name=name, model_version="1", id=req.id, outputs=[{**output, "data": logits.ravel().tolist()}]
        )
        return JSONResponse(body.model_dump(exclude_none=True))
    data = np.ascontiguousarray(logits, dtype="<f4").tobytes()
    head = InferResponse(
        model_name=name,
        model_version="1",
        id=req.id,
        outputs=[{**output, "parameters": {"binary_data_size": len(data)}}],
    )
    head_bytes = json.dumps(head.model_dump(exclude_none=True)).encode()
    return Response(
        head_bytes + data,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head_bytes))},
    )


def wants_binary_output(req: InferRequest) -> bool:
    """The binary extension's request for binary outputs: per output, or ``binary_data_output`` for all."""
    if any((o.parameters or {}).get("binary_data") for o in req.outputs or []):
        return True
    return bool((req.parameters or {}).get("binary_data_output")) and not req.outputs
