"""The Open Inference Protocol (KServe v2) REST API: health, metadata and JSON tensor inference."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema

from .. import __version__
from ..deps import Resources, check_image_count, get_resources, infer, load_json, require_api_key, require_ready
from ..schemas import ErrorResponse, InferRequest, InferResponse, ModelMetadata, ModelReady, ServerMetadata

health = APIRouter(prefix="/v2/health", tags=["health"])
router = APIRouter(prefix="/v2", tags=["open inference protocol"], dependencies=[Depends(require_api_key)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503, 504)}


@health.get("/live", summary="The server is up")
async def live() -> dict:
    return {"live": True}


@health.get("/ready", summary="The model is loaded and warmed up (503 until then)")
async def ready(resources: Resources = Depends(get_resources)):
    return JSONResponse({"ready": resources.ready}, status_code=200 if resources.ready else 503)


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="mcc-serve", version=__version__, extensions=[])


def model_or_404(name: str, resources: Resources) -> Resources:
    if name != resources.model_name:
        raise HTTPException(404, f"unknown model {name!r}; this server serves {resources.model_name!r}")
    return resources


@router.get("/models/{name}", response_model=ModelMetadata, responses=ERRORS, summary="Model metadata")
async def model_metadata(name: str, resources: Resources = Depends(get_resources)) -> ModelMetadata:
    meta = model_or_404(name, resources).engine.meta
    return ModelMetadata(
        name=name,
        versions=["1"],
        platform="onnxruntime_onnx",
        inputs=[{"name": meta["input"]["name"], "datatype": "FP32", "shape": [-1, *meta["input"]["shape"][1:]]}],
        outputs=[{"name": meta["output"]["name"], "datatype": "FP32", "shape": [-1, meta["num_classes"]]}],
    )


@router.get("/models/{name}/ready", response_model=ModelReady, responses=ERRORS, summary="Model readiness")
async def model_ready(name: str, resources: Resources = Depends(get_resources)):
    resources = model_or_404(name, resources)
    return JSONResponse({"name": name, "ready": resources.ready}, status_code=200 if resources.ready else 503)


def input_tensor(req: InferRequest, resources: Resources) -> np.ndarray:
    """The request's one FP32 input as (N, C, H, W), or a 400 naming what is wrong."""
    meta = resources.engine.meta
    want_name, chw = meta["input"]["name"], list(meta["input"]["shape"][1:])
    if len(req.inputs) != 1 or req.inputs[0].name != want_name:
        raise HTTPException(400, f"expected exactly one input named {want_name!r}")
    tensor = req.inputs[0]
    if tensor.datatype != "FP32":
        raise HTTPException(400, f"input {tensor.name!r}: datatype {tensor.datatype} is not supported; send FP32")
    if (tensor.parameters or {}).get("binary_data_size") is not None:
        raise HTTPException(400, "binary tensor data is not supported; send JSON data (binary_data=False)")
    if len(tensor.shape) != 4 or tensor.shape[1:] != chw or tensor.shape[0] < 1:
        raise HTTPException(400, f"input shape {tensor.shape} does not match [N, {', '.join(map(str, chw))}]")
    check_image_count(tensor.shape[0], resources.settings)  # before the data is converted
    try:
        x = np.asarray(tensor.data, dtype=np.float32)
    except (ValueError, TypeError):
        raise HTTPException(400, "input data must be numbers, as a flat or nested list") from None
    if x.size != int(np.prod(tensor.shape)):
        need = int(np.prod(tensor.shape))
        raise HTTPException(400, f"input data has {x.size} values; shape {tensor.shape} needs {need}")
    if not np.isfinite(x).all():
        raise HTTPException(400, "input data holds NaN or infinity")
    return x.reshape(tensor.shape)


INFER_BODY = {
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}},
    "required": True,
}


def openapi_components() -> dict:
    """The component schemas INFER_BODY refers to (the route reads its raw body, so FastAPI adds none)."""
    _, top = models_json_schema([(InferRequest, "validation")], ref_template="#/components/schemas/{model}")
    return top["$defs"]


@router.post(
    "/models/{name}/infer",
    response_model=InferResponse,
    responses=ERRORS,
    summary="Inference",
    openapi_extra={"requestBody": INFER_BODY},
)
async def model_infer(name: str, request: Request, resources: Resources = Depends(require_ready)) -> InferResponse:
    model_or_404(name, resources)
    try:
        req = await load_json(await request.body(), InferRequest)
    except ValidationError as e:
        err = e.errors()[0]
        raise HTTPException(400, f"invalid inference request: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    out_name = resources.engine.meta["output"]["name"]
    for requested in req.outputs or []:
        if requested.name != out_name:
            raise HTTPException(400, f"unknown output {requested.name!r}; the model has {out_name!r}")
    logits = await infer(resources, input_tensor(req, resources))  # (N, num_classes)
    return InferResponse(
        model_name=name, model_version="1", id=req.id,
        outputs=[{"name": out_name, "shape": list(logits.shape), "datatype": "FP32", "data": logits.ravel().tolist()}],
    )  # fmt: skip
