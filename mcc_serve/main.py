"""The ASGI app: resources loaded in the lifespan, /v1/predict, the FastAPI routers, limits, metrics, JSON errors."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import __version__
from .deps import Resources, require_api_key
from .metrics import Metrics
from .middleware import LimitsAndMetrics, client_disconnected, json_error
from .routes import predict, v2
from .runtime.batcher import DynamicBatcher
from .runtime.engine import BundleError, Engine
from .runtime.preprocess import Preprocessor
from .schemas import ErrorResponse
from .settings import ServeSettings

_logger = logging.getLogger("mcc_serve")


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: ServeSettings = app.state.settings
    engine = Engine.load(settings.bundle, settings.device, settings.intra_op_threads, settings.inter_op_threads,
                         settings.precision)  # fmt: skip
    metrics = Metrics(settings.max_batch_size)
    batcher = DynamicBatcher(
        engine.run, settings.max_batch_size, settings.max_delay_ms / 1000, settings.max_queue, metrics.observe_batch
    )
    resources = Resources(
        settings, engine, Preprocessor.from_model_json(engine.meta, settings.max_image_pixels), batcher, metrics,
        settings.model_name or engine.meta.get("arch", Path(settings.bundle).name),
        preprocess_pool=ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="mcc-preprocess"),
    )  # fmt: skip
    app.state.resources = resources
    # Everything loaded so far lives as long as the process: keep it out of the cyclic GC's full collections,
    # each of which walked all of it (tens of ms, a p99 spike) to reclaim only per-request garbage.
    gc.collect()
    gc.freeze()
    batcher.start()

    async def warm_up():
        try:
            await asyncio.to_thread(engine.warmup, settings.warmup_runs, (1, min(settings.max_batch_size, 64)))
        except BundleError as e:  # mcc-serve checked one run before starting; this is a worker that cannot
            _logger.error("not ready, and will not be: %s", e)
            return
        resources.ready = True
        _logger.info("ready: %s on %s", resources.model_name, engine.provider)

    warm = asyncio.create_task(warm_up())
    drain_on_sigterm(resources, settings.drain_s)
    yield
    warm.cancel()
    await batcher.stop()  # uvicorn has stopped accepting and let in-flight requests finish; drain the queue
    resources.preprocess_pool.shutdown(wait=True)
    metrics.close()
    gc.unfreeze()


def drain_on_sigterm(resources: Resources, drain_s: float) -> None:
    """On SIGTERM, turn readiness 503 at once and keep serving for ``drain_s`` before uvicorn's graceful shutdown
    (stop accepting, finish what is in flight and queued, exit 0). A second SIGTERM stops at once.

    A load balancer or Kubernetes sees the 503 and stops sending; requests already on their way still get answers.
    NOTE: this wraps uvicorn's own handler (installed before the lifespan starts) and sets its server's
    ``should_exit``, as uvicorn's programmatic API does, so the process exits 0 instead of re-raising the signal.
    """
    previous = signal.getsignal(signal.SIGTERM)
    server = getattr(previous, "__self__", None)
    if drain_s <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(server, "should_exit"):
        return  # not under uvicorn's signal handling (tests, other servers): leave it alone
    loop = asyncio.get_running_loop()

    def stop() -> None:
        server.should_exit = True

    def on_sigterm(sig, frame) -> None:
        if resources.draining:
            stop()
            return
        resources.draining = True
        _logger.info("SIGTERM: readiness is 503 now; serving %gs more, then finishing what is in flight", drain_s)
        loop.call_soon_threadsafe(loop.call_later, drain_s, stop)

    signal.signal(signal.SIGTERM, on_sigterm)


class ServeApp:
    """The ASGI application: /v1/predict straight to its handler, everything else to the FastAPI app ``api``.

    /v1/predict carries the load; FastAPI's middleware stack and router cost ~0.1 ms of CPU per request (a
    trivial endpoint under uvicorn: 0.20 ms behind them, 0.06 ms without), a third of what the event loop spends
    on a small image (benchmarks/serve_load.py). ``api`` owns the lifespan, ``state``, the other routes, /docs and
    /openapi.json (which documents /v1/predict too).
    """

    def __init__(self, api: FastAPI):
        self.api, self.state = api, api.state
        self.predict = predict.PredictApp(api.state.settings)  # its own body limit and metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/predict":
            scope["app"] = self.api
            await self.predict(scope, receive, send)
        elif scope["type"] == "http" and scope["method"] == "HEAD":
            await self.api({**scope, "method": "GET"}, receive, without_body(send))  # health checks use HEAD
        else:
            await self.api(scope, receive, send)


def without_body(send):
    """An ASGI send that passes the status and headers of a GET response on, and none of its body (HEAD)."""

    async def head_send(message) -> None:
        if message["type"] != "http.response.body":
            await send(message)
        elif not message.get("more_body", False):
            await send({"type": "http.response.body", "body": b""})

    return head_send


def create_app(settings: ServeSettings | None = None) -> ServeApp:
    settings = settings or ServeSettings()
    app = FastAPI(
        title="mcc-serve",
        version=__version__,
        description="Image classification with an ONNX model exported by mcc-export, batched dynamically.",
        lifespan=lifespan,
        redirect_slashes=False,  # a redirect would echo the request's Host header into Location; 404 instead
    )
    app.state.settings = settings
    app.add_middleware(LimitsAndMetrics, settings=settings)
    app.include_router(v2.health)
    app.include_router(v2.router)

    app.openapi = with_predict_docs(app)

    @app.get("/metrics", tags=["ops"], dependencies=[Depends(require_api_key)], summary="Prometheus metrics",
             response_class=PlainTextResponse, responses={401: {"model": ErrorResponse}})  # fmt: skip
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.resources.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and the router's own 404/405
    async def http_error(request: Request, exc: StarletteHTTPException):
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405 and headers.get("Allow", "").split(", ") == ["GET"]:
            headers["Allow"] = "GET, HEAD"  # ServeApp answers HEAD on every GET route
        return json_error(str(exc.detail), exc.status_code, headers or None)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect):
        return client_disconnected(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        status = 400 if request.url.path.startswith("/v2/") else 422
        return json_error(f"{where}: {err.get('msg', 'invalid')}", status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        _logger.exception("unhandled error on %s", request.url.path)
        return json_error("internal server error", 500)

    return ServeApp(app)


def with_predict_docs(app: FastAPI) -> Callable[[], dict]:
    """app.openapi, extended by POST /v1/predict (FastAPI documents its own routes only)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            operation, components = predict.openapi_operation()
            schema["paths"] = {"/v1/predict": {"post": operation}, **schema["paths"]}
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.update({**components, **v2.openapi_components()})
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def app_from_env() -> ServeApp:
    """uvicorn factory for worker processes: settings come from MCC_* environment variables."""
    return create_app(ServeSettings())
