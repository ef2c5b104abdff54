"""The ASGI middleware in front of every endpoint: body limit (413), request metrics, and JSON errors."""

from __future__ import annotations

import logging
import time

from starlette.responses import JSONResponse, Response

from .metrics import Metrics
from .settings import ServeSettings

CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer: counted apart from 5xx
_logger = logging.getLogger("mcc_serve")


class BodyTooLargeError(Exception):
    pass


class LimitsAndMetrics:
    """ASGI middleware: refuses bodies over the limit (413, even when chunked) and records request metrics."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.max_body = app, settings.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics: Metrics | None = getattr(getattr(scope["app"].state, "resources", None), "metrics", None)
        status, started, received = 500, time.perf_counter(), 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLargeError
            return message

        async def tracking_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        if metrics:
            metrics.in_flight.inc()
        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and declared_over(length, self.max_body):
                raise BodyTooLargeError
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLargeError:
            await json_error(f"request body over the limit of {self.max_body:,} bytes", 413)(
                scope, receive, tracking_send
            )
        finally:
            if metrics:
                endpoint = getattr(scope.get("route"), "path", "unmatched")  # the FastAPI route matched
                metrics.in_flight.dec()
                metrics.observe_request(endpoint, status, time.perf_counter() - started)


def declared_over(content_length: bytes, max_body: int) -> bool:
    """A Content-Length that declares more than ``max_body`` bytes. NOTE: by its digits first: ``int()`` of more than
    4,300 digits raises (Python's limit), and httptools passes ``000...0001`` of any length within the header limit."""
    if not content_length.isdigit():
        return False  # not a length; the server's HTTP parser has the final word on it
    digits = content_length.lstrip(b"0")
    return len(digits) > len(str(max_body)) or int(digits or b"0") > max_body


def json_error(message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def log_client_gone(path: str) -> None:
    _logger.info("%s: the client disconnected before sending its whole request", path)


def client_disconnected(path: str) -> Response:
    """What a request whose client went away mid-body gets: one log line, and 499 in the metrics (nobody reads it)."""
    log_client_gone(path)
    return Response(status_code=CLIENT_CLOSED)
