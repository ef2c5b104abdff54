"""One table from the service's domain errors to HTTP answers, and the app's handlers for every other error.

Every refusal is a JSON ``{"error": message}`` body with the status below; nothing a client sends gets a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .runtime.errors import (
    DeadlineError,
    ImageError,
    ImageTooLargeError,
    InvalidArgumentError,
    NotReadyError,
    QueueFullError,
    ServiceError,
    TooManyImagesError,
)

CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer: counted apart from 5xx
RETRY = {"Retry-After": "1"}

# the most specific class first: ImageTooLargeError is an ImageError
STATUS: list[tuple[type[ServiceError], int, dict | None]] = [
    (ImageTooLargeError, 413, None),
    (ImageError, 400, None),
    (TooManyImagesError, 413, None),
    (InvalidArgumentError, 422, None),
    (QueueFullError, 429, RETRY),
    (NotReadyError, 503, RETRY),
    (DeadlineError, 504, None),
]
ALLOW_HINTS = {"/v1/predict": "POST images to /v1/predict"}  # what a 405 on these paths says to do instead

_logger = logging.getLogger("mcc_serve")


def json_error(message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def status_of(exc: ServiceError) -> tuple[int, dict | None]:
    for cls, status, headers in STATUS:
        if isinstance(exc, cls):
            return status, headers
    return 500, None  # a domain error missing from the table is the server's fault (a test holds the table whole)


def log_client_gone(path: str) -> None:
    _logger.info("%s: the client disconnected before sending its whole request", path)


def add_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        status, headers = status_of(exc)
        return json_error(str(exc), status, headers)

    @app.exception_handler(HTTPException)  # FastAPI's HTTPException and the router's own 404/405
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        message = str(exc.detail)
        if exc.status_code == 405:
            if headers.get("Allow", "").split(", ") == ["GET"]:
                headers["Allow"] = "GET, HEAD"  # every GET route answers HEAD (main.head_as_get)
            if request.url.path in ALLOW_HINTS:
                message = f"{request.method} is not allowed; {ALLOW_HINTS[request.url.path]}"
        return json_error(message, exc.status_code, headers or None)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        log_client_gone(request.url.path)
        return Response(status_code=CLIENT_CLOSED)  # counted in the metrics; nobody reads it

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        classifier = getattr(request.app.state, "classifier", None)
        if tuple(err.get("loc", ())) == ("query", "top_k") and classifier is not None:
            return json_error(classifier.top_k_error(err.get("input")), 422)  # the words of every other bad top_k
        where = ".".join(str(p) for p in err.get("loc", ()))
        status = 400 if request.url.path.startswith("/v2/") else 422
        return json_error(f"{where}: {err.get('msg', 'invalid')}", status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        _logger.exception("unhandled error on %s", request.url.path)
        return json_error("internal server error", 500)
