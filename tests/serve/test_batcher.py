"""The dynamic batcher on its own: batch sizes, deadlines, splitting, order, failures and draining."""

import asyncio
import threading

import numpy as np
import pytest

from mcc_serve.runtime.batcher import DynamicBatcher, QueueFullError


class Model:
    """Records the batch sizes it ran; answers row i with (sum of image i, batch size)."""

    def __init__(self, delay_s: float = 0.0):
        self.batches: list[int] = []
        self.delay_s = delay_s
        self.release = threading.Event()
        self.release.set()

    def __call__(self, x: np.ndarray) -> np.ndarray:  # (N, 1, 2, 2) -> (N, 2)
        self.release.wait()
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        self.batches.append(len(x))
        return np.stack([x.reshape(len(x), -1).sum(1), np.full(len(x), len(x), np.float32)], axis=1)


def images(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 2, 2), np.float32)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def started(batcher: DynamicBatcher) -> DynamicBatcher:
    batcher.start()
    return batcher


@pytest.mark.parametrize("max_delay_s", [0.0, 0.05])
def test_requests_that_arrive_while_the_model_is_busy_run_together_and_each_gets_its_own_rows(max_delay_s):
    model = Model()

    async def main():
        b = await started(DynamicBatcher(model, max_batch_size=8, max_delay_s=max_delay_s))
        model.release.clear()  # hold the first batch so the rest queue up behind it
        first = asyncio.ensure_future(b.submit(images(1, 1000)))
        await asyncio.sleep(0.1)
        tasks = [asyncio.ensure_future(b.submit(images(1, i))) for i in range(40)]
        await asyncio.sleep(0.01)
        model.release.set()
        out = await asyncio.gather(first, *tasks)
        await b.stop()
        return out

    out = run(main())
    assert [o[0, 0] for o in out] == [4 * 1000] + [4 * i for i in range(40)]  # every request its own image, in order
    assert model.batches == [1, 8, 8, 8, 8, 8]  # the first ran alone; the 40 behind it in full batches


def test_a_full_batch_does_not_wait_for_the_delay_and_a_lone_request_waits_at_most_the_delay():
    async def main():
        full = await started(DynamicBatcher(Model(), max_batch_size=4, max_delay_s=3600))
        out = await asyncio.wait_for(full.submit(images(4)), 10)  # would hang for an hour if it waited
        await full.stop()
        lone = await started(DynamicBatcher(Model(), max_batch_size=4, max_delay_s=0.02))
        out1 = await asyncio.wait_for(lone.submit(images(1)), 10)
        await lone.stop()
        return out, out1

    out, out1 = run(main())
    assert out[:, 1].tolist() == [4] * 4 and out1[:, 1].tolist() == [1]


def test_a_request_larger_than_a_batch_is_split_and_reassembled_in_order():
    model = Model()

    async def main():
        b = await started(DynamicBatcher(model, max_batch_size=4, max_delay_s=0.001))
        out = await b.submit(images(10))
        await b.stop()
        return out

    out = run(main())
    assert out[:, 0].tolist() == [4.0 * i for i in range(10)] and max(model.batches) <= 4


def test_queue_limit_deadline_and_model_failure():
    async def main():
        slow = await started(DynamicBatcher(Model(delay_s=0.5), max_batch_size=1, max_delay_s=0, max_queue=2))
        with pytest.raises(TimeoutError):
            await slow.submit(images(1), timeout=0.05)
        waiting = [asyncio.ensure_future(slow.submit(images(1))) for _ in range(2)]  # the queue holds 2 images
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await slow.submit(images(1))
        await slow.stop()
        assert all(w.done() for w in waiting)

        def broken(x):
            raise RuntimeError("model failed")

        b = await started(DynamicBatcher(broken, max_batch_size=4, max_delay_s=0.01))
        results = await asyncio.gather(b.submit(images(1)), b.submit(images(1)), return_exceptions=True)
        await b.stop()
        return results

    results = run(main())
    assert all(isinstance(r, RuntimeError) and str(r) == "model failed" for r in results)


def test_a_cancelled_request_is_not_run_and_stop_finishes_what_is_queued():
    model = Model()

    async def main():
        b = await started(DynamicBatcher(model, max_batch_size=1, max_delay_s=0))
        model.release.clear()
        running = asyncio.ensure_future(b.submit(images(1, 1)))
        await asyncio.sleep(0.05)  # the first request is in the model
        gone = asyncio.ensure_future(b.submit(images(1, 2)))
        queued = asyncio.ensure_future(b.submit(images(1, 3)))
        await asyncio.sleep(0.01)
        gone.cancel()
        model.release.set()
        await b.stop()  # returns only once the queue is empty
        return running.result(), queued.result()

    first, third = run(main())
    assert first[0, 0] == 4 and third[0, 0] == 12 and model.batches == [1, 1]


class FrozenClock:
    """The batcher's clock, standing still: any wait the batcher arms is computed from it, not from wall time."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def recording_sleeps(batcher: DynamicBatcher) -> list:
    """The timeouts of every wait the collector arms (None: waiting for a first request, no timer)."""
    armed, sleep = [], batcher._sleep

    async def recorded(timeout):
        armed.append(timeout)
        await sleep(timeout)

    batcher._sleep = recorded
    return armed


def test_an_idle_model_runs_a_lone_request_at_once_and_a_delay_is_armed_only_when_asked_for():
    async def main():
        waits = []
        idle = DynamicBatcher(Model(), max_batch_size=32, clock=FrozenClock(), on_batch=lambda n, w: waits.extend(w))
        armed = recording_sleeps(idle)
        idle.start()
        for i in range(3):  # one client, back to back: the model is idle at every arrival
            assert (await idle.submit(images(1, i)))[0, 1] == 1
        await idle.stop()
        delayed = DynamicBatcher(Model(), max_batch_size=32, max_delay_s=0.005, clock=FrozenClock())
        armed_delayed = recording_sleeps(delayed)
        delayed.start()
        await delayed.submit(images(1))
        await delayed.stop()
        return waits, armed, armed_delayed

    waits, armed, armed_delayed = run(main())
    assert armed and all(t is None for t in armed)  # it only ever waited for requests, never on a timer
    assert len(waits) == 3  # three batches of one: each ran alone, as it came
    timed = [t for t in armed_delayed if t is not None]
    assert timed == [pytest.approx(0.005, abs=1e-9)]  # max_delay > 0: the whole delay, from the same frozen clock


def test_a_deadline_expires_a_queued_request_without_running_it():
    model = Model()

    async def main():
        b = await started(DynamicBatcher(model, max_batch_size=8))
        model.release.clear()
        busy = asyncio.ensure_future(b.submit(images(1, 1)))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await b.submit(images(2, 5), timeout=0.05)  # queued behind the busy model past its deadline
        model.release.set()
        await busy
        await b.stop()

    run(main())
    assert model.batches == [1]  # the expired request never reached the model
