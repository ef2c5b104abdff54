"""The in-memory multipart reader: the same files as Starlette's form parser, and clear errors otherwise."""

import asyncio
import random

import httpx
import pytest
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.requests import Request

from mcc_serve.multipart import _PLAIN_DISPOSITION, MultipartError, disposition_options, read_files


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


def test_the_plain_header_fast_path_reads_what_the_full_parser_reads():
    rng = random.Random(1)
    pieces = ["a", "Z", "0", ".png", " ", ";", '"', "\\", "é", "=", "*", "C:\\\\x", "\t", "%20"]
    values = [b'form-data; name="files"; filename="0.png"', b'form-data; name="note"', b'form-data; name=""',
              b'form-data; name="files"; filename=""', b'form-data; name="files"; filename*=utf-8\'\'x.png',
              b'Form-Data; Name="files"; FileName="a.png"', b'form-data;name="files";filename="a.png"']  # fmt: skip
    for _ in range(3000):
        name, filename = ("".join(rng.choices(pieces, k=rng.randint(0, 4))) for _ in range(2))
        value = f'form-data; name="{name}"' + (f'; filename="{filename}"' if rng.random() < 0.7 else "")
        values.append(value.encode("utf-8") if rng.random() < 0.5 else value.encode("latin-1", "replace"))
    fast = 0
    for value in values:
        assert disposition_options(value) == parse_options_header(value)[1], value
        fast += _PLAIN_DISPOSITION.fullmatch(value) is not None
    assert fast > 300  # the fast path was taken, and agreed

    for boundary in ["b", "----WebKitFormBoundary7MA4YWxkTrZu0gW", "a=b", "x" * 70, "x" * 71, '"quoted"', "a b"]:
        for sep in ["; ", ";", ";\t", " ; "]:
            content_type = f"multipart/form-data{sep}boundary={boundary}"
            expected = parse_options_header(content_type)[1].get(b"boundary", b"")  # what the full parser reads
            body = b"--" + expected + b'\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\n'
            body += b"x\r\n--" + expected + b"--\r\n"
            if 1 <= len(expected) <= 70:
                assert read_files(body, content_type, 4) == [("a", b"x")], content_type
            else:
                with pytest.raises(MultipartError, match="boundary of 1 to 70"):
                    read_files(body, content_type, 4)
