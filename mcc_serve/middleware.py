"""The ASGI middleware in front of every route: HEAD answered as GET without a body, the body limit (413), and
request metrics."""

from __future__ import annotations

import time

from .errors import json_error
from .metrics import Metrics
from .settings import ServeSettings


class BodyTooLargeError(Exception):
    pass


class LimitsAndMetrics:
    """Refuses bodies over the limit (413, chunked ones too) and records every request's status and latency."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.max_body = app, settings.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics: Metrics | None = getattr(scope["app"].state, "metrics", None)
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
            message = f"request body over the limit of {self.max_body:,} bytes"
            await json_error(message, 413)(scope, receive, tracking_send)
        finally:
            if metrics:
                endpoint = getattr(scope.get("route"), "path", "unmatched")  # the route matched
                metrics.in_flight.dec()
                metrics.observe_request(endpoint, status, time.perf_counter() - started)


def declared_over(content_length: bytes, max_body: int) -> bool:
    """A Content-Length that declares more than ``max_body`` bytes. NOTE: by its digits first: ``int()`` of more than
    4,300 digits raises (Python's limit), and httptools passes ``000...0001`` of any length within the header limit."""
    if not content_length.isdigit():
        return False  # not a length; the server's HTTP parser has the final word on it
    digits = content_length.lstrip(b"0")
    return len(digits) > len(str(max_body)) or int(digits or b"0") > max_body


class HeadAsGet:
    """HEAD on any route answers as GET would, without the body (health checks and probes use HEAD)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def head_send(message) -> None:
            if message["type"] != "http.response.body":
                await send(message)
            elif not message.get("more_body", False):
                await send({"type": "http.response.body", "body": b""})

        await self.app({**scope, "method": "GET"}, receive, head_send)
