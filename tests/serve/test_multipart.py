"""The in-memory multipart reader: the same files as Starlette's form parser, and clear errors otherwise."""

import asyncio
import random

import httpx
import pytest
from starlette.datastructures import UploadFile
from starlette.requests import Request

from mcc_serve.multipart import MultipartError, read_files


def encode(files, data=None) -> tuple[bytes, str]:
    """A multipart body as httpx (the client most users have) writes it, and its Content-Type."""
    request = httpx.Request("POST", "http://test/", files=files, data=data)
    return request.read(), request.headers["content-type"]


def starlette_files(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def parse():
        request = Request(
            {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode())]}, receive
        )
        form = await request.form(max_files=1000, max_fields=1000)
        return [(v.filename or k, await v.read()) for k, v in form.multi_items() if isinstance(v, UploadFile)]

    return asyncio.run(parse())


def test_same_files_as_starlettes_parser_on_random_bodies():
    rng = random.Random(0)
    for _ in range(200):
        files = []
        for _ in range(rng.randint(1, 5)):
            data = rng.randbytes(rng.randint(0, 3000))
            if rng.random() < 0.3:  # bytes that look like a delimiter or a header end, inside a file
                data = b"\r\n--" + data + b"\r\n\r\n--"
            files.append(("files", (rng.choice(["a.png", "é t.png", 'q"uote.png', "x;y.png"]), data, "image/png")))
        body, content_type = encode(files, {"note": "hello"} if rng.random() < 0.5 else None)
        ours = read_files(body, content_type, max_files=100)
        assert ours == starlette_files(body, content_type)
        assert [data for _, data in ours] == [f[1][1] for f in files]


def test_preamble_and_epilogue_are_ignored():
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\nPNG\r\n--b--\r\n'
    assert read_files(b"preamble\r\n" + part + b"epilogue", "multipart/form-data; boundary=b", 4) == [("a.png", b"PNG")]


def test_fields_only_give_no_files():
    body, content_type = encode([("note", (None, b"no files"))])
    assert read_files(body, content_type, 4) == []


@pytest.mark.parametrize(
    "body, content_type, status, message",
    [
        (b"--b\r\n\r\nx\r\n--b--", "multipart/form-data", 400, "needs a boundary"),
        (b"no delimiter here", "multipart/form-data; boundary=b", 400, "no part"),
        (b'--b\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\ncut', "multipart/form-data; boundary=b",
         400, "ends before its closing boundary"),
        (b"--b\r\nContent-Disposition: form-data; name=f", "multipart/form-data; boundary=b", 400,
         "headers do not end"),
        (b"--bjunk\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b", 400, "trailing bytes"),
    ],
)  # fmt: skip
def test_malformed_bodies_are_named(body, content_type, status, message):
    with pytest.raises(MultipartError, match=message) as e:
        read_files(body, content_type, 4)
    assert e.value.status == status


def test_part_limits_are_413():
    body, content_type = encode([("files", (f"{i}.png", b"x", "image/png")) for i in range(4)])
    assert len(read_files(body, content_type, max_files=4)) == 4
    with pytest.raises(MultipartError, match="the limit is 3") as e:
        read_files(body, content_type, max_files=3)
    assert e.value.status == 413
    body, content_type = encode([(f"field{i}", (None, b"v")) for i in range(20)])
    with pytest.raises(MultipartError, match="more than 16 form fields") as e:
        read_files(body, content_type, max_files=3)
    assert e.value.status == 413
