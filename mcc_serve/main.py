"""The FastAPI app: resources loaded in the lifespan, routers, limits, metrics and uniform JSON errors."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__
from .batcher import DynamicBatcher
from .deps import Resources, require_api_key
from .engine import Engine
from .metrics import Metrics
from .preprocess import Preprocessor
from .routes import predict, v2
from .settings import ServeSettings

_logger = logging.getLogger("mcc_serve")


class BodyTooLargeError(Exception):
    pass


class LimitsAndMetrics:
    """ASGI middleware: refuses bodies over the limit (413, even when chunked) and records request metrics."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.max_body = app, settings.max_body_bytes
        self._paths: dict | None = None

    def route_path(self, scope) -> str:
        """The path template of the route that handled the request (a metrics label), or "unmatched"."""
        if "route" in scope:  # FastAPI's routes
            return scope["route"].path
        if self._paths is None:  # plain Starlette routes leave only their endpoint in the scope
            self._paths = {r.endpoint: r.path for r in scope["app"].routes if hasattr(r, "endpoint")}
        return self._paths.get(scope.get("endpoint"), "unmatched")

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
            if length is not None and length.isdigit() and int(length) > self.max_body:
                raise BodyTooLargeError
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLargeError:
            await json_error(f"request body over the limit of {self.max_body:,} bytes", 413)(
                scope, receive, tracking_send
            )
        finally:
            if metrics:
                endpoint = self.route_path(scope)
                metrics.in_flight.dec()
                metrics.requests.labels(endpoint, str(status)).inc()
                metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def json_error(message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: ServeSettings = app.state.settings
    engine = Engine.load(settings.bundle, settings.device, settings.intra_op_threads, settings.inter_op_threads)
    metrics = Metrics(settings.max_batch_size)
    batcher = DynamicBatcher(
        engine.run, settings.max_batch_size, settings.max_delay_ms / 1000, settings.max_queue, metrics.observe_batch
    )
    resources = Resources(
        settings, engine, Preprocessor.from_model_json(engine.meta, settings.max_image_pixels), batcher, metrics,
        settings.model_name or engine.meta.get("arch", Path(settings.bundle).name),
    )  # fmt: skip
    app.state.resources = resources
    batcher.start()

    async def warm_up():
        await asyncio.to_thread(engine.warmup, settings.warmup_runs, (1, min(settings.max_batch_size, 64)))
        resources.ready = True
        _logger.info("ready: %s on %s", resources.model_name, engine.provider)

    warm = asyncio.create_task(warm_up())
    yield
    warm.cancel()
    await batcher.stop()  # uvicorn has stopped accepting and let in-flight requests finish; drain the queue


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    app = FastAPI(
        title="mcc-serve",
        version=__version__,
        description="Image classification with an ONNX model exported by mcc-export, batched dynamically.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_middleware(LimitsAndMetrics, settings=settings)
    app.add_route("/v1/predict", predict.predict, methods=["POST"])
    app.include_router(v2.health)
    app.include_router(v2.router)

    app.openapi = with_predict_docs(app)

    @app.get("/metrics", tags=["ops"], dependencies=[Depends(require_api_key)], summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(request.app.state.resources.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return json_error(str(exc.detail), exc.status_code, getattr(exc, "headers", None))

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

    return app


def with_predict_docs(app: FastAPI) -> Callable[[], dict]:
    """app.openapi, extended by the plain Starlette route POST /v1/predict (FastAPI documents its own only)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            operation, components = predict.openapi_operation()
            schema["paths"] = {"/v1/predict": {"post": operation}, **schema["paths"]}
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: settings come from MCC_* environment variables."""
    return create_app(ServeSettings())
