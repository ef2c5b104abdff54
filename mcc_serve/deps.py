"""Dependencies shared by the routes: the app's resources, auth, and running images through the batcher.

NOTE: every dependency is ``async def``: FastAPI runs a sync one in its threadpool, a thread hop per call.
"""

from __future__ import annotations

import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from .metrics import Metrics
from .runtime.batcher import DynamicBatcher, QueueFullError, TooManyImagesError
from .runtime.engine import Engine
from .runtime.preprocess import Preprocessor
from .settings import ServeSettings


@dataclass
class Resources:
    """Everything the lifespan loads; ``ready`` turns true after the warm-up."""

    settings: ServeSettings
    engine: Engine
    preprocess: Preprocessor
    batcher: DynamicBatcher
    metrics: Metrics
    model_name: str
    ready: bool = False
    draining: bool = False  # SIGTERM arrived: readiness answers 503, everything else is still served
    preprocess_pool: ThreadPoolExecutor | None = None  # large images are preprocessed here, a bounded few at once


async def get_resources(request: Request) -> Resources:
    return request.app.state.resources


_bearer = HTTPBearer(auto_error=False)  # documents the scheme in OpenAPI; check_api_key does the checking


def check_api_key(settings: ServeSettings, authorization: str | None) -> None:
    """With MCC_API_KEY set, every route but health and docs needs ``Authorization: Bearer <key>`` (else 401)."""
    if settings.api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        token.strip().encode(), settings.api_key.get_secret_value().encode()
    ):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


async def require_api_key(request: Request, _: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    check_api_key(request.app.state.settings, request.headers.get("authorization"))


async def require_ready(resources: Resources = Depends(get_resources)) -> Resources:
    check_ready(resources)
    return resources


def check_ready(resources: Resources) -> None:
    if not resources.ready:
        raise HTTPException(503, "the model is warming up; retry shortly", headers={"Retry-After": "1"})


async def infer(resources: Resources, x: np.ndarray, deadline: float | None = None) -> np.ndarray:
    """(N, C, H, W) -> (N, num_classes) logits through the dynamic batcher, by the request deadline
    (``time.monotonic()`` seconds; default: --request-timeout-s from now)."""
    timeout = resources.settings.request_timeout_s if deadline is None else deadline - time.monotonic()
    try:
        if timeout <= 0:
            raise TimeoutError
        return await resources.batcher.submit(x, timeout)
    except TooManyImagesError as e:
        raise HTTPException(413, f"{e}; send fewer images per request") from None
    except QueueFullError as e:
        raise HTTPException(429, f"server busy: {e}; retry later", headers={"Retry-After": "1"}) from None
    except TimeoutError:
        raise HTTPException(504, f"no answer within {resources.settings.request_timeout_s:g}s") from None


LOOP_JSON_BYTES = 64 * 1024  # parse larger JSON bodies in a worker thread: the event loop keeps serving
Model = TypeVar("Model", bound=BaseModel)


async def load_json(body: bytes, model: type[Model]) -> Model:
    """Parse and validate a JSON body, a large one off the event loop.

    Raises:
        HTTPException: 400 for a body that is not JSON Python can read (syntax, nesting depth, huge integers).
        pydantic.ValidationError: JSON that does not fit ``model``; the caller words it.
    """
    if len(body) > LOOP_JSON_BYTES:
        return await run_in_threadpool(_load_json, body, model)
    return _load_json(body, model)


def _load_json(body: bytes, model: type[Model]) -> Model:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HTTPException(400, "body is not valid JSON") from None
    except RecursionError:
        raise HTTPException(400, "body is not valid JSON: nested too deeply") from None
    except ValueError:  # an integer literal longer than Python's digit limit
        raise HTTPException(400, "body is not valid JSON: a number literal is too long") from None
    return model.model_validate(data)


def check_image_count(n: int, settings: ServeSettings) -> None:
    """413 for a request with more images than one request may carry or than the queue can ever hold (before any
    image is decoded: a retry could never succeed)."""
    if n > settings.max_images_per_request:
        raise HTTPException(413, f"{n} images in one request; the limit is {settings.max_images_per_request}")
    if n > settings.max_queue:
        raise HTTPException(413, f"{n} images in one request; the queue holds at most {settings.max_queue}")
