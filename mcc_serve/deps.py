"""Dependencies shared by the routes: the service, auth, readiness, and JSON bodies parsed off the event loop.

NOTE: every dependency is ``async def``: FastAPI runs a sync one in its threadpool, a thread hop per call.
"""

from __future__ import annotations

import json
import secrets
from typing import TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from .runtime.service import Classifier
from .settings import ServeSettings


async def get_classifier(request: Request) -> Classifier:
    """The app's service; 503 before the lifespan has loaded it."""
    classifier = getattr(request.app.state, "classifier", None)
    if classifier is None:
        raise HTTPException(503, "the server is starting; retry shortly", headers={"Retry-After": "1"})
    return classifier


async def ready_classifier(classifier: Classifier = Depends(get_classifier)) -> Classifier:
    classifier.check_ready()
    return classifier


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


async def serving_classifier(request: Request) -> Classifier:
    """The service, for a client allowed to use it (the bearer token, when a key is set), once it is warmed up.

    One dependency without sub-dependencies for the route that carries the load: FastAPI solves every node of a
    route's dependency tree on each request. The route documents the bearer scheme itself (``BEARER``).
    """
    check_api_key(request.app.state.settings, request.headers.get("authorization"))
    classifier = await get_classifier(request)
    classifier.check_ready()
    return classifier


BEARER = [{"HTTPBearer": []}]  # OpenAPI security of a route that checks the token in ``serving_classifier``


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
