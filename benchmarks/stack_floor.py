"""The serving stack's floor: what uvicorn, Pillow, the dynamic batcher and onnxruntime reach without mcc-serve.

A bare ASGI app under the same uvicorn (httptools, uvloop, no access log, each answer in one write as
mcc_serve.protocol.CorkedTransport sends it, the heap frozen after start-up) does only what answering /v1/predict
cannot do without: read the body, take the files out of the multipart body, decode and preprocess
them (mcc_serve.runtime.preprocess), run them through the same DynamicBatcher and onnxruntime session (mcc_serve.runtime.engine,
same session options) and answer each image's top-1 class index as JSON. Everything else mcc-serve does is left
out: body, header and slow-client limits, auth, readiness, top_k, labels and probabilities, metrics, request
deadlines and error answers (a bad request here is a 500). It is a benchmark configuration, not a server:
``benchmarks/serve_load.py`` runs it beside mcc-serve so that the cost of those features shows in one run.

    python benchmarks/stack_floor.py BUNDLE --port 8000 [--precision int8]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvicorn  # noqa: E402
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # noqa: E402

from mcc_serve.multipart import read_files  # noqa: E402
from mcc_serve.protocol import CorkedTransport  # noqa: E402
from mcc_serve.runtime.batcher import DynamicBatcher  # noqa: E402
from mcc_serve.runtime.engine import Engine  # noqa: E402
from mcc_serve.runtime.preprocess import Preprocessor  # noqa: E402


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with mcc-serve's one write per answer, without its header and slow-client
    limits (mcc_serve.protocol.BoundedHttpToolsProtocol)."""

    def connection_made(self, transport) -> None:
        super().connection_made(CorkedTransport(transport, self.loop))


def make_app(bundle: str, max_batch_size: int = 32, precision: str = "fp32"):
    engine = Engine.load(bundle, precision=precision)
    engine.warmup(3, (1, max_batch_size))
    preprocess = Preprocessor.from_model_json(engine.meta, 10**8)
    batcher = DynamicBatcher(engine.run, max_batch_size)
    json_headers = [(b"content-type", b"application/json")]

    async def answer(send, status: int, body: bytes) -> None:
        headers = [(b"content-length", str(len(body)).encode()), *json_headers]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    gc.collect()  # as mcc-serve's lifespan: the start-up's objects out of the collector's way
                    gc.freeze()
                    batcher.start()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await batcher.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["method"] != "POST":  # readiness probes: the model is warm before uvicorn starts
            await answer(send, 200, b"{}")
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        content_type = next(v for k, v in scope["headers"] if k == b"content-type").decode("latin-1")
        files = read_files(b"".join(chunks), content_type, 64)
        x = preprocess.load_many([preprocess.decode_header(data) for _, data in files])  # (N, C, H, W)
        logits = await batcher.submit(x, 10.0)  # (N, num_classes)
        top1 = ",".join(f'{{"index":{j}}}' for j in logits.argmax(axis=1).tolist())
        await answer(send, 200, f'{{"predictions":[{top1}]}}'.encode())

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32", help="the bundle's model to serve")
    args = parser.parse_args()
    app = make_app(args.bundle, precision=args.precision)
    uvicorn.run(app, host="127.0.0.1", port=args.port, http=CorkedHttpToolsProtocol, loop="uvloop",
                access_log=False, log_level="warning", server_header=False)  # fmt: skip


if __name__ == "__main__":
    main()
