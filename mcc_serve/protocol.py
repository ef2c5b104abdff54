"""uvicorn's httptools protocol with the connection limits uvicorn does not have.

uvicorn bounds the idle time between requests (``--keep-alive-s``) but not the size of a request's headers, the
time a client may take to send them (a connection that sends nothing, or one byte a minute, is kept forever), or
the time to send a body shorter than its Content-Length. These live below ASGI, where an app cannot see them, so
they are enforced here, in the protocol class uvicorn is given (``http=BoundedHttpToolsProtocol``):

- headers over ``--max-header-bytes``: 431, connection closed;
- headers not complete ``--header-timeout-s`` after the connection opens or the request's first byte: 408, closed;
- a body not complete ``--body-timeout-s`` after its headers: the connection is closed (the app sees the client
  gone and counts a 499).
"""

from __future__ import annotations

import json
from functools import cache

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .settings import ServeSettings

_STATUS = {408: b"408 Request Timeout", 431: b"431 Request Header Fields Too Large"}


@cache
def limits() -> tuple[int, float, float]:
    """(max header bytes, header timeout s, body timeout s) of this process, from the MCC_* settings."""
    s = ServeSettings()
    return s.max_header_bytes, s.header_timeout_s, s.body_timeout_s


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._max_head, self._head_timeout, self._body_timeout = limits()
        self._head_bytes, self._tail, self._reading_head = 0, b"", True
        self._timer = self.loop.call_later(self._head_timeout, self._too_slow, "headers")

    def connection_lost(self, exc) -> None:
        self._timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._reading_head:  # count the bytes up to the blank line that ends the headers
            seen = self._tail + data
            end = seen.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
            self._tail = seen[-3:]
            if self._head_bytes > self._max_head:
                self._refuse(431, f"request headers over the limit of {self._max_head:,} bytes")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._restart_timer(self._head_timeout, "headers")

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._restart_timer(self._body_timeout, "body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._timer.cancel()
        self._head_bytes, self._tail, self._reading_head = 0, b"", True  # the next request's headers
        super().on_message_complete()

    def _restart_timer(self, seconds: float, what: str) -> None:
        self._timer.cancel()
        self._timer = self.loop.call_later(seconds, self._too_slow, what)

    def _too_slow(self, what: str) -> None:
        if what == "headers" and (self.cycle is None or self.cycle.response_complete):
            self._refuse(408, f"request headers not complete within {self._head_timeout:g}s")
        elif what == "body":
            self.logger.info("closing a connection whose request body was not complete within %gs", self._body_timeout)
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        head = [
            b"HTTP/1.1 " + _STATUS[status],
            b"content-type: application/json",
            b"content-length: " + str(len(body)).encode(),
            b"connection: close",
        ]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()
