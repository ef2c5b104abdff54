"""mcc-serve BUNDLE_DIR: check the bundle and options, then run uvicorn (settings reach workers as MCC_*)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from pydantic import ValidationError

from .protocol import BoundedHttpToolsProtocol
from .runtime.bundle import BundleError
from .runtime.service import load_bundle, run_zeros
from .runtime.session import providers_for
from .settings import ServeSettings

EPILOG = """every option can also be set as an environment variable: --max-batch-size 64 is MCC_MAX_BATCH_SIZE=64,
and the bearer token is MCC_API_KEY only (never a flag, so it stays out of process lists). Without --port or
MCC_PORT the port is PORT's (as Knative and KServe set it), else 8000.

examples:
  mcc-serve bundles/demo
  mcc-serve bundles/demo --host 0.0.0.0 --port 8080 --workers 2 --max-batch-size 64 --max-delay-ms 2
  mcc-serve bundles/demo-int8 --precision int8                # the bundle's model_int8.onnx (mcc-export --int8)
  MCC_API_KEY=secret mcc-serve bundles/demo
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcc-serve",
        description="Serve an mcc bundle over HTTP: /v1/predict, the Open Inference Protocol (/v2), /metrics, /docs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("bundle", nargs="?", help="bundle directory written by mcc-export (or MCC_BUNDLE)")
    for name, field in ServeSettings.model_fields.items():
        if name in ("bundle", "api_key"):
            continue
        default = field.default
        flag, help = "--" + name.replace("_", "-"), f"{field.description} (default: {default})"
        if isinstance(default, bool):
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help)
        else:
            p.add_argument(flag, dest=name, type={int: int, float: float}.get(type(default), str), help=help)
    return p


def unusable_metrics_dir() -> str | None:
    """Why PROMETHEUS_MULTIPROC_DIR, when set, cannot hold the workers' metrics (else None)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path is None:
        return None
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        return f"PROMETHEUS_MULTIPROC_DIR={path} is not a writable directory; create it, or unset it"
    return None


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    if "port" not in args and "MCC_PORT" not in os.environ and os.environ.get("PORT"):
        args["port"] = os.environ["PORT"]  # Knative and KServe tell the container its port in PORT
    try:
        settings = ServeSettings(**args)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err.get("loc") else "option"
        where = "MCC_API_KEY" if name == "api_key" else f"--{name.replace('_', '-')}"  # the key is never a flag
        print(f"mcc-serve: error: {where}: {err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    problem = unusable_metrics_dir()
    if problem:
        print(f"mcc-serve: error: {problem}", file=sys.stderr)
        return 2
    try:
        # the whole start-up check here, before any worker starts: a bundle that fails it exits 2, with N workers too.
        # On the CPU: the supervisor process must not hold a CUDA context for the life of the server.
        providers_for(settings.device)
        run_zeros(load_bundle(settings.bundle, "cpu", settings.precision, 1, 1))
    except BundleError as e:
        print(f"mcc-serve: error: {e}", file=sys.stderr)
        return 2
    for name, value in settings.model_dump(exclude={"api_key"}).items():
        if value is not None:
            os.environ[f"MCC_{name.upper()}"] = str(value)
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    # mcc_serve's own lines (ready, client gone, unhandled errors) through uvicorn's handler, at its level
    level = settings.log_level.upper().replace("TRACE", "DEBUG")
    loggers = {
        **LOGGING_CONFIG["loggers"],
        "mcc_serve": {"handlers": ["default"], "level": level, "propagate": False},
        "python_multipart": {"level": "ERROR"},  # its warning per malformed body is the client's: answered with a 400
    }
    log_config = {**LOGGING_CONFIG, "loggers": loggers}

    metrics_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # one /metrics for all workers: each writes its own files here, a scrape adds them up (mcc_serve.metrics)
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mcc-serve-metrics-")
    try:
        uvicorn.run(
            "mcc_serve.main:app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level,
            log_config=log_config,
            http=BoundedHttpToolsProtocol,  # header size and slow-client limits (mcc_serve/protocol.py)
            timeout_keep_alive=settings.keep_alive_s,
            timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
            server_header=False,  # no "server: uvicorn" on every answer: it tells a scanner what to try
            access_log=settings.access_log,  # off by default: /metrics counts requests without a line each
        )
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
