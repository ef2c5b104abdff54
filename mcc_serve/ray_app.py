"""mcc-serve on Ray Serve (the ``mcc[ray]`` extra): N replicas of the same app, behind Ray's HTTP proxy.

    serve run mcc_serve.ray_app:build bundle=bundles/demo num_replicas=2
    serve run mcc_serve.ray_app:build bundle=bundles/demo min_replicas=1 max_replicas=4 target_ongoing_requests=32
    serve deploy deploy/ray/serve_config.yaml

Each replica runs the whole mcc-serve app (``mcc_serve.main.create_app``): the same routes, limits, metrics, errors
and its own dynamic batcher, so there is one layer of batching (Ray's ``@serve.batch`` is not used). The builder
takes mcc-serve's settings by their names (``max_batch_size=64``, ``precision=int8``, ...) plus Ray's:
``num_replicas``, or ``min_replicas``/``max_replicas``/``target_ongoing_requests`` for Ray's autoscaling on ongoing
requests, ``max_ongoing_requests`` per replica, and ``num_cpus`` per replica. The bundle is checked once, in the
builder, as mcc-serve checks it before its workers start: a bad bundle or option fails the deploy with one line.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application

from .runtime.bundle import BundleError
from .runtime.service import load_bundle, run_zeros
from .settings import ServeSettings


class RayOptions(BaseModel):
    """Ray Serve's part of the builder's arguments."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(None, ge=1, description="fixed replica count (default 1 without autoscaling)")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling: the fewest replicas")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling: the most replicas")
    target_ongoing_requests: float = Field(32, gt=0, description="autoscaling: ongoing requests a replica aims at")
    max_ongoing_requests: int = Field(256, ge=1, description="requests Ray sends one replica at once")
    num_cpus: float = Field(1, gt=0, description="CPUs Ray reserves per replica")

    def deployment_options(self) -> dict:
        options = {"max_ongoing_requests": self.max_ongoing_requests, "ray_actor_options": {"num_cpus": self.num_cpus}}
        if self.min_replicas is not None or self.max_replicas is not None:
            if self.num_replicas is not None:
                raise ValueError("num_replicas: give it, or min_replicas/max_replicas for autoscaling, not both")
            low = self.min_replicas if self.min_replicas is not None else 1
            high = self.max_replicas if self.max_replicas is not None else max(low, 1)
            if high < low:
                raise ValueError(f"max_replicas {high} is below min_replicas {low}")
            options["autoscaling_config"] = {
                "min_replicas": low,
                "max_replicas": high,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


@serve.ingress()
class MccServe:
    """One replica: the mcc-serve ASGI app, its lifespan run by Ray (engine, batcher, warm-up)."""

    def __init__(self, settings: dict):
        self.settings = ServeSettings(**settings)

    def __serve_build_asgi_app__(self):
        from .main import create_app

        self.mcc_app = create_app(self.settings)  # NOTE: not ``self.app``, a property of Ray's ingress wrapper
        return self.mcc_app

    def check_health(self) -> None:
        """Ray's health check: a replica whose batcher has stopped is replaced (the model itself ran at warm-up)."""
        classifier = getattr(self.mcc_app.state, "classifier", None)
        task = getattr(getattr(classifier, "batcher", None), "_task", None)
        if task is not None and task.done():
            raise RuntimeError("the replica's batcher has stopped")


def build(args: dict) -> Application:
    """The Ray Serve application for ``args`` (``serve run mcc_serve.ray_app:build KEY=VALUE ...``).

    Raises:
        ValueError: an unknown or out-of-range argument, or a bundle mcc-serve would refuse (one line).
    """
    ray_keys = set(RayOptions.model_fields)
    try:
        options = RayOptions(**{k: v for k, v in args.items() if k in ray_keys})
        settings = ServeSettings(**{k: v for k, v in args.items() if k not in ray_keys})
        deployment_options = options.deployment_options()
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    unknown = set(args) - ray_keys - set(ServeSettings.model_fields)
    if unknown:
        raise ValueError(f"unknown argument(s) {sorted(unknown)}; mcc-serve's settings and {sorted(ray_keys)} apply")
    try:
        run_zeros(load_bundle(settings.bundle, "cpu", settings.precision, 1, 1))
    except BundleError as e:
        raise ValueError(str(e)) from None
    plain = settings.model_dump(exclude={"api_key"})
    if settings.api_key is not None:
        plain["api_key"] = settings.api_key.get_secret_value()
    return serve.deployment(MccServe, name="mcc", **deployment_options).bind(plain)
