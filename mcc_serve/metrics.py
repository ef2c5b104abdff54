"""Prometheus metrics, one registry per app (so tests and workers never share global state).

With several workers (``mcc-serve --workers N``) every worker writes its metrics to files in
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode, which the CLI turns on) and a scrape,
whichever worker answers it, adds up all of them.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def forget_dead_workers(path: str) -> None:
    """Drop the live gauges (requests in flight) of workers that are gone: a worker killed with SIGKILL never runs
    its own ``close``, and its last value would stay in every scrape."""
    for file in Path(path).glob("gauge_live*_*.db"):
        pid = file.stem.rpartition("_")[2]
        if pid.isdigit() and not alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), path)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: not ours to judge
    return True


class Metrics:
    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mcc_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "mcc_request_latency_seconds",
            "request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.queue_wait = Histogram(
            "mcc_queue_wait_seconds",
            "time a request waited before its batch ran",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, max_batch_size})
        self.batch_size = Histogram(
            "mcc_batch_size",
            "images per model run",
            registry=self.registry,
            buckets=[b for b in buckets if b <= max_batch_size],
        )
        self.loop_lag = Histogram(
            "mcc_event_loop_lag_seconds",
            "how late the event loop ran a timer: the time every request on this worker waited on a busy loop",
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.in_flight = Gauge(
            "mcc_requests_in_flight", "requests being handled", registry=self.registry, multiprocess_mode="livesum"
        )

        self._children: dict[tuple, tuple] = {}

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """One answered request. NOTE: the labelled children are looked up once per (endpoint, status), not per
        request (``labels()`` builds, validates and locks its key each call)."""
        key = (endpoint, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(endpoint, str(status)), self.latency.labels(endpoint))
            self._children[key] = children  # bounded: route paths (or "unmatched") times HTTP statuses
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, size: int, waits: list[float]) -> None:
        self.batch_size.observe(size)
        for wait in waits:
            self.queue_wait.observe(wait)

    async def watch_loop(self, every_s: float = 0.1) -> None:
        """Observe the event loop's lag until cancelled: how much later than asked a sleep of ``every_s`` returns."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + every_s
            await asyncio.sleep(every_s)
            self.loop_lag.observe(max(0.0, loop.time() - asked))

    def exposition(self) -> bytes:
        """The Prometheus text format: this process's metrics, or every worker's in multiprocess mode."""
        if multiprocess_dir():
            forget_dead_workers(multiprocess_dir())
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def close(self) -> None:
        """At a worker's exit: its in-flight gauge leaves the sum (its counters and histograms stay)."""
        if multiprocess_dir():
            multiprocess.mark_process_dead(os.getpid())
