"""The FastAPI app: the service loaded in the lifespan, the routers, limits, metrics and JSON errors."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from . import __version__
from .deps import get_classifier, require_api_key
from .errors import add_handlers
from .metrics import Metrics
from .middleware import HeadAsGet, LimitsAndMetrics
from .routes import predict, v2
from .runtime.bundle import BundleError
from .runtime.service import Classifier, load_bundle
from .schemas import ErrorResponse
from .settings import ServeSettings

_logger = logging.getLogger("mcc_serve")


def build_classifier(settings: ServeSettings, metrics: Metrics) -> Classifier:
    s = settings
    formats = tuple(s.image_formats.split(","))
    model = load_bundle(
        s.bundle, s.device, s.precision, s.intra_op_threads, s.inter_op_threads, s.max_image_pixels, formats
    )
    return Classifier(
        model,
        max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_delay_ms / 1000,
        max_queue=settings.max_queue,
        max_images=settings.max_images_per_request,
        timeout_s=settings.request_timeout_s,
        preprocess_threads=settings.preprocess_threads,
        on_batch=metrics.observe_batch,
    )


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: ServeSettings = app.state.settings
    metrics = Metrics(settings.max_batch_size)
    classifier = build_classifier(settings, metrics)
    app.state.model_name = settings.model_name or classifier.model.name  # the arch, else the bundle folder
    app.state.metrics, app.state.classifier = metrics, classifier
    # Everything loaded so far lives as long as the process: keep it out of the cyclic GC's full collections,
    # each of which would walk all of it to reclaim only per-request garbage.
    gc.collect()
    gc.freeze()
    classifier.start()

    async def warm_up():
        try:
            await classifier.warm_up(settings.warmup_runs, (1, min(settings.max_batch_size, 64)))
        except BundleError as e:  # mcc-serve checked one run before starting; this is a worker that cannot
            _logger.error("not ready, and will not be: %s", e)
            return
        _logger.info("ready: %s", app.state.model_name)

    warm = asyncio.create_task(warm_up())
    watch = asyncio.create_task(metrics.watch_loop())
    drain_on_signals(classifier, settings.drain_s)
    yield
    warm.cancel()
    watch.cancel()
    await classifier.stop()  # uvicorn has stopped accepting and let in-flight requests finish; drain the queue
    metrics.close()
    gc.unfreeze()


DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # what stops a worker; each drains first


def drain_on_signals(classifier: Classifier, drain_s: float) -> None:
    """On SIGTERM, SIGINT or SIGHUP, turn readiness 503 at once and keep serving for ``drain_s`` before uvicorn's
    graceful shutdown (stop accepting, finish what is in flight and queued, exit 0). A second signal stops at once.

    A load balancer or Kubernetes sees the 503 and stops sending; requests already on their way still get answers.
    NOTE: this replaces uvicorn's own handler (installed before the lifespan starts) and sets its server's
    ``should_exit``, as uvicorn's programmatic API does, so the process exits 0 instead of re-raising the signal
    (uvicorn's default for SIGTERM and SIGINT; SIGHUP would have killed it).
    """
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    if threading.current_thread() is not threading.main_thread() or not hasattr(server, "should_exit"):
        return  # not under uvicorn's signal handling (tests, other servers): leave it alone
    loop = asyncio.get_running_loop()

    def stop() -> None:
        server.should_exit = True

    def on_signal(sig, frame) -> None:
        if classifier.draining or drain_s <= 0:
            stop()
            return
        classifier.draining = True
        name = signal.Signals(sig).name
        _logger.info("%s: readiness is 503 now; serving %gs more, then finishing what is in flight", name, drain_s)
        loop.call_soon_threadsafe(loop.call_later, drain_s, stop)

    for sig in DRAIN_SIGNALS:
        signal.signal(sig, on_signal)


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    app = FastAPI(
        title="mcc-serve",
        version=__version__,
        description="Image classification with an ONNX model exported by mcc-export, batched dynamically.",
        lifespan=lifespan,
        redirect_slashes=False,  # a redirect would echo the request's Host header into Location; 404 instead
    )
    app.state.settings = settings or ServeSettings()
    app.add_middleware(LimitsAndMetrics, settings=app.state.settings)
    app.add_middleware(HeadAsGet)
    app.include_router(predict.router)
    app.include_router(v2.health)
    app.include_router(v2.router)
    add_handlers(app)

    @app.get(
        "/metrics",
        tags=["ops"],
        dependencies=[Depends(require_api_key), Depends(get_classifier)],  # 503 before the lifespan
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={401: {"model": ErrorResponse}},
    )
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes: settings come from MCC_* environment variables."""
    return create_app(ServeSettings())
