"""POST /v1/predict: images in (multipart files or base64 JSON), labels with probabilities out."""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..deps import BEARER, load_json, serving_classifier
from ..runtime.errors import TooManyImagesError
from ..runtime.service import DEFAULT_TOP_K, Classifier
from ..schemas import ErrorResponse, PredictJSON, PredictResponse, inline_schema

router = APIRouter(tags=["predict"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 405, 413, 415, 422, 429, 503, 504)}
MAX_FORM_FIELDS = 16  # form fields besides the images

PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}
                },
                "required": ["files"],
            }
        },
        "application/json": {"schema": inline_schema(PredictJSON)},
    },
}


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    summary="Classify one or more images",
    response_description="one prediction per image, in input order",
    openapi_extra={"requestBody": PREDICT_BODY, "security": BEARER},
)
async def predict(
    request: Request,
    classifier: Classifier = Depends(serving_classifier),
    top_k: int | None = Query(
        None, ge=1, description=f"labels per image, from 1 to the class count (default {DEFAULT_TOP_K})"
    ),
) -> PredictResponse:
    """One prediction per image, in input order."""
    k = classifier.check_top_k(top_k)
    deadline = classifier.deadline()  # reading the body, preprocessing and the model
    images = await read_images(request, classifier)
    predictions = await classifier.predict(images, k, deadline)
    return PredictResponse(
        model=request.app.state.model_name,
        predictions=[{"top_k": [label._asdict() for label in labels]} for labels in predictions],
    )


async def read_images(request: Request, classifier: Classifier) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the request body, in order (``Classifier.predict`` counts them before it
    decodes any; a multipart body stops at the limit while it is parsed, a JSON one before its base64 is decoded)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        images = await multipart_images(request, classifier.max_images, request.app.state.settings.max_body_bytes)
    elif media_type == "application/json":
        images = await json_images(request, classifier)
    else:
        raise HTTPException(
            415, f"unsupported media type {media_type or '(none)'}; send multipart/form-data files or application/json"
        )
    if not images:
        raise HTTPException(400, 'no images: send multipart files or JSON {"images": [base64, ...]}')
    return images


async def multipart_images(request: Request, max_images: int, max_field_bytes: int) -> list[tuple[str, bytes]]:
    """Every part with a filename is an image, whatever its field name; Starlette's parser reads the parts (a form
    field may be as large as the body limit allows)."""
    try:
        form = await request.form(max_files=max_images, max_fields=MAX_FORM_FIELDS, max_part_size=max_field_bytes)
    except StarletteHTTPException as e:  # Starlette's words for a malformed body, or one over its part limits
        if str(e.detail).startswith("Too many files"):
            raise TooManyImagesError(
                f"more than {max_images} images in one request; the limit is {max_images}"
            ) from None
        if str(e.detail).startswith("Too many fields"):
            raise HTTPException(413, f"more than {MAX_FORM_FIELDS} form fields besides the images") from None
        raise
    try:
        return [
            (value.filename or key, await value.read())
            for key, value in form.multi_items()
            if isinstance(value, UploadFile)
        ]
    finally:
        await form.close()


async def json_images(request: Request, classifier: Classifier) -> list[tuple[str, bytes]]:
    try:
        texts = (await load_json(await request.body(), PredictJSON)).images
    except ValidationError as e:
        raise HTTPException(400, f'expected {{"images": [base64, ...]}}: {e.errors()[0]["msg"]}') from None
    classifier.check_count(len(texts))
    images = []
    for i, text in enumerate(texts):
        try:
            images.append((f"images[{i}]", base64.b64decode(text.split(",")[-1], validate=True)))
        except (binascii.Error, ValueError):
            raise HTTPException(400, f"images[{i}] is not valid base64") from None
    return images
