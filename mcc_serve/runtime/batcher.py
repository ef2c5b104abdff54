"""Dynamic batching: concurrent requests are queued and run together on the model.

The model runs one batch at a time in a worker thread, so the event loop keeps accepting requests meanwhile.
When the model is idle a request runs at once; requests that arrive while it is busy queue and run together as
soon as it is free, up to ``max_batch_size`` images a batch: under load the batches fill by themselves, and a
lone request never waits for company that is not coming. ``max_delay`` (Triton's ``max_queue_delay``; 0 by
default) makes a batch that is not full wait up to that long after its first request for more, even with the
model idle: a latency cost some accelerators repay with fuller batches.
The collector sleeps on one future that ``submit`` resolves (first request, or a full batch) and each
request's deadline is one timer: no task per request, which is most of the per-request cost of
``asyncio.wait_for`` and a queue.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .errors import QueueFullError, TooManyImagesError


@dataclass
class _Item:
    x: np.ndarray  # (n, C, H, W)
    future: asyncio.Future
    enqueued: float  # the batcher's clock


class DynamicBatcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int = 32,
        max_delay_s: float = 0.0,
        max_queue: int = 256,
        on_batch: Callable[[int, list[float]], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.run, self.max_batch_size, self.max_delay_s, self.max_queue = run, max_batch_size, max_delay_s, max_queue
        self.on_batch = on_batch  # (batch size, queue waits in seconds) after each run, for metrics
        self.clock = clock  # enqueue times, the delay and the queue waits are on this clock (seconds)
        self.pending: deque[_Item] = deque()  # chunks of at most max_batch_size images, oldest first
        self.queued_images = 0  # images in ``pending``
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcc-model")
        self._task: asyncio.Task | None = None
        self._wakeup: asyncio.Future | None = None  # the collector sleeps on it: for a first item, or a full batch
        self._running = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="mcc-batcher")

    async def stop(self) -> None:
        """Finish everything queued, then stop."""
        while (self.queued_images or self._running) and self._task and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def submit(self, x: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """Queue (n, C, H, W) images; returns their (n, num_classes) outputs, in order.

        Raises:
            TooManyImagesError: ``x`` alone holds more than max_queue images.
            QueueFullError: the queue has no room for ``x`` now.
            TimeoutError: no answer within ``timeout`` seconds (what has not run yet never will).
        """
        if len(x) > self.max_queue:
            raise TooManyImagesError(
                f"{len(x)} images in one request; the queue holds at most {self.max_queue}; send fewer per request"
            )
        if self.queued_images + len(x) > self.max_queue:
            raise QueueFullError(
                f"server busy: {self.queued_images} images queued (limit {self.max_queue}); retry later"
            )
        loop = asyncio.get_running_loop()
        step = self.max_batch_size
        now = self.clock()
        items = [_Item(x[i : i + step], loop.create_future(), now) for i in range(0, len(x), step)]
        self.pending.extend(items)
        self.queued_images += len(x)
        if (
            self._wakeup is not None
            and not self._wakeup.done()
            and (len(self.pending) == len(items) or self.queued_images >= self.max_batch_size)
        ):
            self._wakeup.set_result(None)  # the first item, or a full batch
        # NOTE: a timer per request, not asyncio.wait_for: that wraps every request in a task of its own
        timer = None if timeout is None else loop.call_later(timeout, _expire, items)
        try:
            if len(items) == 1:
                return await items[0].future
            return np.concatenate(await asyncio.gather(*(item.future for item in items)))
        except asyncio.CancelledError:  # the client left: drop what has not run yet
            for item in items:
                item.future.cancel()
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def _sleep(self, timeout: float | None) -> None:
        """Until submit wakes the collector, or ``timeout`` seconds (None: no limit)."""
        loop = asyncio.get_running_loop()
        self._wakeup = wakeup = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _set_result, wakeup)
        try:
            await wakeup
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    async def _next_batch(self) -> list[_Item]:
        """The oldest requests, up to max_batch_size images: at once (the model is free when this runs), or with
        max_delay > 0 once the batch is full or max_delay has passed since the oldest arrived."""
        while not self.pending:
            await self._sleep(None)
        if self.max_delay_s > 0 and self.queued_images < self.max_batch_size:
            wait = self.pending[0].enqueued + self.max_delay_s - self.clock()
            if wait > 0:
                await self._sleep(wait)
        batch, size = [], 0
        while self.pending and size + len(self.pending[0].x) <= self.max_batch_size:
            item = self.pending.popleft()
            batch.append(item)
            size += len(item.x)
        self.queued_images -= size
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [item for item in batch if not item.future.done()]
            if not live:
                continue
            started = self.clock()
            x = live[0].x if len(live) == 1 else np.concatenate([item.x for item in live])  # (N, C, H, W)
            self._running = True
            try:
                out = await loop.run_in_executor(self.executor, self.run, x)  # (N, num_classes)
            except Exception as e:  # the model failed: every request in the batch gets the error
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            finally:
                self._running = False
            if self.on_batch:
                self.on_batch(len(x), [started - item.enqueued for item in live])
            offset = 0
            for item in live:
                if not item.future.done():
                    item.future.set_result(out[offset : offset + len(item.x)])
                offset += len(item.x)


def _expire(items: list[_Item]) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(TimeoutError())


def _set_result(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
