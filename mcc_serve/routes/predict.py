"""POST /v1/predict: images in (multipart files or base64 JSON), labels with probabilities out.

An ASGI endpoint of its own, not a FastAPI route: FastAPI's routing, dependency solving, query validation and
form spooling cost more CPU than decoding and classifying a small image, and this is the endpoint that carries
the load. It checks what those would (bearer token, readiness, ``top_k``, media type, limits) itself and
answers errors as ``{"error": ...}`` like every other route; ``openapi_operation`` documents it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from http import HTTPStatus

import numpy as np
from fastapi import HTTPException
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from ..deps import Resources, check_api_key, check_image_count, check_ready, infer, load_json
from ..engine import softmax
from ..middleware import BodyTooLargeError, client_disconnected, json_error
from ..multipart import MultipartError, read_files
from ..preprocess import ImageError
from ..schemas import ErrorResponse, PredictJSON, PredictResponse
from ..settings import ServeSettings

INLINE_PIXELS = 256 * 256  # decode and resize this many pixels on the event loop; more goes to a worker thread
DEFAULT_TOP_K = 5
ERROR_CODES = (400, 401, 405, 413, 415, 422, 429, 503, 504)
_logger = logging.getLogger("mcc_serve")


def parse_top_k(raw: str | None, num_classes: int) -> int:
    if raw is None:
        return min(DEFAULT_TOP_K, num_classes)
    try:
        top_k = int(raw)
    except ValueError:
        top_k = 0
    if not 1 <= top_k <= num_classes:
        raise HTTPException(422, f"top_k must be an integer from 1 to {num_classes} (the class count), got {raw!r}")
    return top_k


async def read_images(content_type: str, body: bytes, settings: ServeSettings) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the request body, in order."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        try:
            files = read_files(body, content_type, settings.max_images_per_request)
        except MultipartError as e:
            raise HTTPException(e.status, str(e)) from None
    elif media_type == "application/json":
        try:
            images = (await load_json(body, PredictJSON)).images
        except ValidationError as e:
            raise HTTPException(400, f'expected {{"images": [base64, ...]}}: {e.errors()[0]["msg"]}') from None
        files = []
        for i, text in enumerate(images):
            try:
                files.append((f"images[{i}]", base64.b64decode(text.split(",")[-1], validate=True)))
            except (binascii.Error, ValueError):
                raise HTTPException(400, f"images[{i}] is not valid base64") from None
    else:
        raise HTTPException(
            415, f"unsupported media type {media_type or '(none)'}; send multipart/form-data files or application/json"
        )
    if not files:
        raise HTTPException(400, 'no images: send multipart files or JSON {"images": [base64, ...]}')
    check_image_count(len(files), settings)
    return files


async def endpoint(scope, receive, send) -> None:
    """The ASGI app behind /v1/predict (mounted by mcc_serve.main.ServeApp, behind LimitsAndMetrics)."""
    request = Request(scope, receive)
    try:
        if request.method != "POST":
            raise HTTPException(405, f"{request.method} is not allowed; POST images to /v1/predict", {"Allow": "POST"})
        response = await predict(request)
    except HTTPException as e:
        response = json_error(str(e.detail), e.status_code, e.headers)
    except BodyTooLargeError:
        raise  # LimitsAndMetrics answers it
    except ClientDisconnect:
        response = client_disconnected(scope["path"])
    except Exception:
        _logger.exception("unhandled error on /v1/predict")
        response = json_error("internal server error", 500)
    await response(scope, receive, send)


async def predict(request: Request) -> JSONResponse:
    deadline = time.monotonic() + request.app.state.settings.request_timeout_s  # preprocessing and the model
    resources: Resources = request.app.state.resources
    check_api_key(resources.settings, request.headers.get("authorization"))
    check_ready(resources)
    names = resources.engine.meta["class_names"]
    top_k = parse_top_k(request.query_params.get("top_k"), len(names))
    body = await request.body()  # capped at max_body_bytes by the LimitsAndMetrics middleware
    files = await read_images(request.headers.get("content-type", ""), body, resources.settings)
    try:
        images = [resources.preprocess.decode_header(data, name) for name, data in files]
        if sum(resources.preprocess.work_pixels(img) for img in images) <= INLINE_PIXELS:
            x = resources.preprocess.load_many(images, deadline)  # (N, C, H, W); small: cheaper than a thread hop
        else:
            loop = asyncio.get_running_loop()
            job = loop.run_in_executor(resources.preprocess_pool, resources.preprocess.load_many, images, deadline)
            # the answer comes at the deadline even while one slow image is still being decoded (the thread stops
            # at its next image)
            x = await asyncio.wait_for(job, max(0.0, deadline - time.monotonic()))
    except ImageError as e:
        raise HTTPException(e.status, str(e)) from None
    except (TimeoutError, asyncio.TimeoutError):  # the same class from Python 3.11 on; wait_for's own on 3.10
        raise HTTPException(
            504, f"no answer within {resources.settings.request_timeout_s:g}s (preprocessing)"
        ) from None
    probs = softmax(await infer(resources, x, deadline))  # (N, num_classes)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]  # (N, top_k)
    return JSONResponse(
        {
            "model": resources.model_name,
            "predictions": [
                {"top_k": [{"index": int(j), "label": names[j], "probability": float(p[j])} for j in row]}
                for p, row in zip(probs, top, strict=True)
            ],
        }
    )


def openapi_operation() -> tuple[dict, dict]:
    """The OpenAPI operation of POST /v1/predict, and the component schemas it refers to."""
    models = [(PredictResponse, "serialization"), (ErrorResponse, "serialization"), (PredictJSON, "validation")]
    _, top = models_json_schema(models, ref_template="#/components/schemas/{model}")

    def ref(name: str) -> dict:
        return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}

    operation = {
        "tags": ["predict"],
        "summary": "Classify one or more images",
        "operationId": "predict_v1_predict_post",
        "security": [{"HTTPBearer": []}],
        "parameters": [
            {
                "name": "top_k",
                "in": "query",
                "required": False,
                "description": "labels per image, from 1 to the number of classes",
                "schema": {"type": "integer", "minimum": 1, "default": DEFAULT_TOP_K},
            }
        ],  # fmt: skip
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}
                        },
                        "required": ["files"],
                    }  # fmt: skip
                },
                **ref("PredictJSON"),
            },
        },
        "responses": {
            "200": {"description": "one prediction per image, in input order", "content": ref("PredictResponse")},
            **{str(c): {"description": HTTPStatus(c).phrase, "content": ref("ErrorResponse")} for c in ERROR_CODES},
        },
    }
    return operation, top["$defs"]
