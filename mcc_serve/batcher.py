"""Dynamic batching: concurrent requests are queued and run together on the model.

A batch closes when it holds ``max_batch_size`` images or ``max_delay`` has passed since its first request
arrived; the model runs in a worker thread, so the event loop keeps accepting requests meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


class QueueFullError(Exception):
    """More images are waiting than ``max_queue``; the caller should retry later (429)."""


@dataclass
class _Item:
    x: np.ndarray  # (n, C, H, W)
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int = 32,
        max_delay_s: float = 0.005,
        max_queue: int = 256,
        on_batch: Callable[[int, list[float]], None] | None = None,
    ):
        self.run, self.max_batch_size, self.max_delay_s, self.max_queue = run, max_batch_size, max_delay_s, max_queue
        self.on_batch = on_batch  # (batch size, queue waits in seconds) after each run, for metrics
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.queued_images = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcc-model")
        self._task: asyncio.Task | None = None
        self._carry: _Item | None = None
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

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """Queue (n, C, H, W) images; returns their (n, num_classes) outputs, in order.

        Raises:
            QueueFullError: the queue holds max_queue images already.
        """
        if self.queued_images + len(x) > self.max_queue:
            raise QueueFullError(f"{self.queued_images} images queued (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        chunks = [x[i : i + self.max_batch_size] for i in range(0, len(x), self.max_batch_size)]
        items = [_Item(chunk, loop.create_future()) for chunk in chunks]
        for item in items:
            self.queued_images += len(item.x)
            self.queue.put_nowait(item)
        try:
            return np.concatenate(await asyncio.gather(*(item.future for item in items)))
        except asyncio.CancelledError:  # timed out or the client left: drop what has not run yet
            for item in items:
                item.future.cancel()
            raise

    async def _next_batch(self) -> list[_Item]:
        first = self._carry or await self.queue.get()
        self._carry = None
        batch, size = [first], len(first.x)
        deadline = first.enqueued + self.max_delay_s
        while size < self.max_batch_size:
            try:
                timeout = deadline - time.perf_counter()
                item = self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if size + len(item.x) > self.max_batch_size:
                self._carry = item  # first of the next batch
                break
            batch.append(item)
            size += len(item.x)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            self.queued_images -= sum(len(item.x) for item in batch)
            live = [item for item in batch if not item.future.done()]
            if not live:
                continue
            started = time.perf_counter()
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
