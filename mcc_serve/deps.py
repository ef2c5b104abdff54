"""Dependencies shared by the routes: the app's resources, auth, and running images through the batcher.

NOTE: every dependency is ``async def``: FastAPI runs a sync one in its threadpool, a thread hop per call.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

import numpy as np
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .batcher import DynamicBatcher, QueueFullError
from .engine import Engine
from .metrics import Metrics
from .preprocess import Preprocessor
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


async def get_resources(request: Request) -> Resources:
    return request.app.state.resources


_bearer = HTTPBearer(auto_error=False)


async def require_api_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    """With MCC_API_KEY set, every route but health and docs needs ``Authorization: Bearer <key>``."""
    key = request.app.state.settings.api_key
    if key is None:
        return
    if credentials is None or not secrets.compare_digest(
        credentials.credentials.encode(), key.get_secret_value().encode()
    ):
        raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


async def require_ready(resources: Resources = Depends(get_resources)) -> Resources:
    if not resources.ready:
        raise HTTPException(503, "the model is warming up; retry shortly", headers={"Retry-After": "1"})
    return resources


async def infer(resources: Resources, x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, num_classes) logits through the dynamic batcher, with the request deadline."""
    try:
        return await asyncio.wait_for(resources.batcher.submit(x), resources.settings.request_timeout_s)
    except QueueFullError as e:
        raise HTTPException(429, f"server busy: {e}; retry later", headers={"Retry-After": "1"}) from None
    except asyncio.TimeoutError:
        raise HTTPException(504, f"no answer within {resources.settings.request_timeout_s:g}s") from None
