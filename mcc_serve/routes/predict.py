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
import json
import logging
import time
from http import HTTPStatus
from urllib.parse import parse_qsl

import numpy as np
from fastapi import HTTPException
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema
from starlette.requests import ClientDisconnect

from ..deps import Resources, check_api_key, check_image_count, check_ready, infer, load_json
from ..middleware import CLIENT_CLOSED, BodyTooLargeError, declared_over, log_client_gone
from ..multipart import MultipartError, read_files
from ..runtime.engine import softmax
from ..runtime.preprocess import ImageError
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


class PredictApp:
    """The ASGI app behind /v1/predict (mounted by mcc_serve.main.ServeApp), with the body limit and request metrics
    that ``LimitsAndMetrics`` gives every other route.

    NOTE: it reads the scope and sends the answer itself, one pass over the headers and two ``send`` calls, instead
    of Starlette's Request, Headers, QueryParams and JSONResponse and the middleware's wrapped receive and send:
    together ~20 us of the event loop per request (measured on direct ASGI calls), the loop being what limits one
    worker's throughput (benchmarks/serve_load.py).
    """

    def __init__(self, settings: ServeSettings):
        self.max_body = settings.max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        started = time.perf_counter()
        resources: Resources | None = getattr(scope["app"].state, "resources", None)
        metrics = resources.metrics if resources is not None else None
        if metrics:
            metrics.in_flight.inc()
        status = 500
        try:
            status, body, headers = await self.answer(scope, receive, resources)
            headers = [(b"content-length", str(len(body)).encode()), *headers]  # else uvicorn sends it chunked
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            if metrics:
                metrics.in_flight.dec()
                metrics.observe_request("/v1/predict", status, time.perf_counter() - started)

    async def answer(self, scope, receive, resources: Resources | None) -> tuple[int, bytes, list]:
        """(status, JSON body, ASGI headers) of the answer; every error a user can cause is a 4xx JSON body."""
        try:
            if scope["method"] != "POST":
                raise HTTPException(405, f"{scope['method']} is not allowed; POST images to /v1/predict",
                                    {"Allow": "POST"})  # fmt: skip
            if resources is None:
                raise HTTPException(503, "the server is starting; retry shortly", {"Retry-After": "1"})
            return 200, await predict(scope, receive, resources, self.max_body), JSON_HEADERS
        except HTTPException as e:
            return error_answer(str(e.detail), e.status_code, e.headers)
        except BodyTooLargeError:
            return error_answer(f"request body over the limit of {self.max_body:,} bytes", 413)
        except ClientDisconnect:
            log_client_gone(scope["path"])
            return CLIENT_CLOSED, b"", []  # the 499 in the metrics; nobody reads the answer
        except Exception:
            _logger.exception("unhandled error on /v1/predict")
            return error_answer("internal server error", 500)


JSON_HEADERS = [(b"content-type", b"application/json")]


def json_bytes(content) -> bytes:
    """The body Starlette's JSONResponse would send."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


def error_answer(message: str, status: int, headers: dict | None = None) -> tuple[int, bytes, list]:
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return status, json_bytes({"error": message}), JSON_HEADERS + extra


def read_head(scope, max_body: int) -> tuple[str, str | None, str | None]:
    """(content type, authorization, the top_k query value) in one pass over the headers; 413 at once for a
    Content-Length over ``max_body``. Repeated headers: the first counts, as in Starlette (top_k: the last)."""
    content_type = authorization = None
    for name, value in scope["headers"]:  # ASGI header names are lower-case
        if name == b"content-type":
            content_type = value.decode("latin-1") if content_type is None else content_type
        elif name == b"authorization":
            authorization = value.decode("latin-1") if authorization is None else authorization
        elif name == b"content-length" and declared_over(value, max_body):
            raise BodyTooLargeError
    top_k = None
    query = scope.get("query_string", b"")
    if query:
        for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if key == "top_k":
                top_k = value
    return content_type or "", authorization, top_k


async def read_body(receive, max_body: int) -> bytes:
    """The whole request body, at most ``max_body`` bytes (else BodyTooLargeError, chunked bodies too)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_body:
            raise BodyTooLargeError
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def predict(scope, receive, resources: Resources, max_body: int) -> bytes:
    """The JSON body of a 200 answer; HTTPException for everything else."""
    settings = resources.settings
    deadline = time.monotonic() + settings.request_timeout_s  # preprocessing and the model
    content_type, authorization, raw_top_k = read_head(scope, max_body)
    check_api_key(settings, authorization)
    check_ready(resources)
    names = resources.engine.meta["class_names"]
    top_k = parse_top_k(raw_top_k, len(names))
    body = await read_body(receive, max_body)
    files = await read_images(content_type, body, settings)
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
        raise HTTPException(504, f"no answer within {settings.request_timeout_s:g}s (preprocessing)") from None
    probs = softmax(await infer(resources, x, deadline))  # (N, num_classes)
    top = (-probs).argsort(axis=1, kind="stable")[:, :top_k]  # (N, top_k)
    top_probs = probs[np.arange(len(top))[:, None], top].tolist()  # (N, top_k)
    return json_bytes(
        {
            "model": resources.model_name,
            "predictions": [
                {"top_k": [{"index": j, "label": names[j], "probability": p} for j, p in zip(row, ps, strict=True)]}
                for row, ps in zip(top.tolist(), top_probs, strict=True)
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
