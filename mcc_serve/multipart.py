"""Files out of a multipart/form-data body (RFC 7578) that is already in memory.

The server reads the whole body anyway (it is capped at ``max_body_bytes``), so the parts are found with
``bytes.find`` on the delimiter instead of a streaming parser: Starlette's form parser spools every file
into a SpooledTemporaryFile and python-multipart's state machine walks the headers byte by byte, which
together cost more CPU than decoding and classifying a small image. Header parameters (name, filename,
quoting, RFC 2231) are parsed by python-multipart's ``parse_options_header``, but for the plain form nearly every
client sends (``boundary=token``; ``form-data; name="files"; filename="a.png"`` without quotes or backslashes
inside), which a regular expression reads to the same values at a fifth of the CPU.
"""

from __future__ import annotations

import re

from python_multipart.multipart import parse_options_header

_PLAIN_CONTENT_TYPE = re.compile(r"multipart/form-data;[ \t]*boundary=([0-9A-Za-z'()+_,\-./:=?]{1,70})", re.IGNORECASE)
_PLAIN_DISPOSITION = re.compile(rb'form-data; name="([^"\\;]*)"(?:; filename="([^"\\;]*)")?')

MAX_HEADER_BYTES = 8 * 1024  # per part


class MultipartError(ValueError):
    """The body is not valid multipart/form-data (400), or holds more parts than allowed (413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def read_files(body: bytes, content_type: str, max_files: int, max_fields: int = 16) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every part with a filename, in order; parts without one (form fields) are skipped.

    Raises:
        MultipartError: no boundary, a malformed body, or more than ``max_files`` files / ``max_fields`` fields.
    """
    plain = _PLAIN_CONTENT_TYPE.fullmatch(content_type)
    boundary = plain[1].encode() if plain else parse_options_header(content_type)[1].get(b"boundary")
    if not boundary or len(boundary) > 70:
        raise MultipartError("multipart/form-data needs a boundary of 1 to 70 characters in its Content-Type")
    delimiter = b"--" + boundary
    files: list[tuple[str, bytes]] = []
    fields = 0
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:  # a preamble, ignored: the first delimiter is the first one that starts a line
        pos = body.find(b"\r\n" + delimiter)
        if pos < 0:
            raise MultipartError("the multipart/form-data body has no part with the boundary of its Content-Type")
        pos += 2 + len(delimiter)
    while True:
        # pos is just past a delimiter: "--" closes the body, anything else is a part
        if body.startswith(b"--", pos):
            return files
        line_end = body.find(b"\r\n", pos)
        if line_end < 0 or body[pos:line_end].strip(b" \t"):
            raise MultipartError("the multipart/form-data body is malformed: a boundary line has trailing bytes")
        headers_end = body.find(b"\r\n\r\n", line_end, line_end + MAX_HEADER_BYTES)
        if headers_end < 0:
            raise MultipartError("the multipart/form-data body is malformed: a part's headers do not end")
        data_end = body.find(b"\r\n" + delimiter, headers_end + 4)
        if data_end < 0:
            raise MultipartError("the multipart/form-data body ends before its closing boundary")
        disposition = b""
        for line in body[line_end + 2 : headers_end].split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-disposition":
                disposition = value.strip()
        options = disposition_options(disposition)
        if b"filename" in options:
            if len(files) >= max_files:
                raise MultipartError(f"too many images in one request; the limit is {max_files}", 413)
            name = options[b"filename"] or options.get(b"name", b"")
            files.append((name.decode("utf-8", "replace"), body[headers_end + 4 : data_end]))
        else:
            fields += 1
            if fields > max_fields:
                raise MultipartError(f"more than {max_fields} form fields besides the images", 413)
        pos = data_end + 2 + len(delimiter)


def disposition_options(value: bytes) -> dict[bytes, bytes]:
    """The parameters of a part's Content-Disposition, as ``parse_options_header`` gives them."""
    plain = _PLAIN_DISPOSITION.fullmatch(value)
    if plain is None:
        return parse_options_header(value)[1]
    return {b"name": plain[1]} if plain[2] is None else {b"name": plain[1], b"filename": plain[2]}
