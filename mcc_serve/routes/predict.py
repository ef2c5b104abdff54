"""POST /v1/predict: images in (multipart files or base64 JSON), labels with probabilities out."""

from __future__ import annotations

import base64
import binascii
import json

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..deps import Resources, infer, require_api_key, require_ready
from ..engine import softmax
from ..preprocess import ImageError
from ..schemas import ErrorResponse, PredictJSON, PredictResponse

INLINE_PIXELS = 256 * 256  # decode this many pixels on the event loop; more goes to a worker thread
router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)])

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 429, 503, 504)}
BODY_DOC = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }  # fmt: skip
            },
            "application/json": {"schema": PredictJSON.model_json_schema()},
        },
        "required": True,
    }
}


async def read_images(request: Request, max_images: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the request, in order."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 16)
        files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if isinstance(v, UploadFile)]
    elif ctype == "application/json":
        try:
            body = PredictJSON.model_validate(json.loads(await request.body()))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HTTPException(400, "body is not valid JSON") from None
        except ValidationError as e:
            raise HTTPException(400, f'expected {{"images": [base64, ...]}}: {e.errors()[0]["msg"]}') from None
        files = []
        for i, text in enumerate(body.images):
            try:
                files.append((f"images[{i}]", base64.b64decode(text.split(",")[-1], validate=True)))
            except (binascii.Error, ValueError):
                raise HTTPException(400, f"images[{i}] is not valid base64") from None
    else:
        raise HTTPException(
            415, f"unsupported media type {ctype or '(none)'}; send multipart/form-data files or application/json"
        )
    if not files:
        raise HTTPException(400, 'no images: send multipart files or JSON {"images": [base64, ...]}')
    if len(files) > max_images:
        raise HTTPException(413, f"{len(files)} images in one request; the limit is {max_images}")
    return files


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra=BODY_DOC,
    summary="Classify one or more images",
)
async def predict(
    request: Request,
    top_k: int = Query(5, ge=1, description="labels per image, at most the number of classes"),
    resources: Resources = Depends(require_ready),
) -> JSONResponse:
    names = resources.engine.meta["class_names"]
    if top_k > len(names):
        raise HTTPException(422, f"top_k must be between 1 and {len(names)} (the number of classes), got {top_k}")
    files = await read_images(request, resources.settings.max_images_per_request)
    try:
        images = [resources.preprocess.decode_header(data, name) for name, data in files]
        if sum(img.width * img.height for img in images) <= INLINE_PIXELS:
            x = resources.preprocess.load_many(images)  # (N, C, H, W); small: cheaper than a thread hop
        else:
            x = await run_in_threadpool(resources.preprocess.load_many, images)
    except ImageError as e:
        raise HTTPException(e.status, str(e)) from None
    probs = softmax(await infer(resources, x))  # (N, C)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]  # (N, k)
    # NOTE: a Response skips FastAPI's re-validation of the body (response_model still documents it)
    return JSONResponse(
        {
            "model": resources.model_name,
            "predictions": [
                {"top_k": [{"index": int(j), "label": names[j], "probability": float(p[j])} for j in row]}
                for p, row in zip(probs, top, strict=True)
            ],
        }
    )
