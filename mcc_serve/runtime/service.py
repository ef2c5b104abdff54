"""The classification service: one object that decodes, preprocesses, batches and runs images for every transport.

HTTP (``/v1/predict``, the Open Inference Protocol routes), Ray Serve and ``mcc-predict`` all call a ``Classifier``
and map its domain errors (``mcc_serve.runtime.errors``) to their own answers. It is torch-free and owns no event
loop: ``start`` it inside the loop that will await ``predict`` and ``infer``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .batcher import DynamicBatcher
from .bundle import BundleError
from .choices import MAX_IMAGE_PIXELS
from .engine import Engine, softmax
from .errors import DeadlineError, InvalidArgumentError, NotReadyError, TooManyImagesError
from .preprocess import Preprocessor

INLINE_PIXELS = 256 * 256  # decode and resize this many pixels in the caller's thread; more goes to the pool
DEFAULT_TOP_K = 5  # labels per image when the caller names no number (at most the class count)


@dataclass
class Model:
    """What the service runs: a bundle's ONNX session (``load_bundle``), or any runner with the same contract."""

    name: str  # the architecture, or where it was loaded from
    class_names: list[str]
    preprocess: Preprocessor
    run: Callable[[np.ndarray], np.ndarray]  # (N, C, H, W) float32 -> (N, num_classes) logits; thread-safe
    input_name: str = "input"
    output_name: str = "logits"
    meta: dict[str, Any] = field(default_factory=dict)  # a bundle's model.json

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.preprocess.in_chans, self.preprocess.size, self.preprocess.size  # (C, H, W)


def load_bundle(
    path: str | Path,
    device: str = "auto",
    precision: str = "fp32",
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    image_formats: tuple[str, ...] | None = None,
) -> Model:
    """A bundle's ONNX model of ``precision`` in one onnxruntime session (BundleError when it cannot be used)."""
    engine = Engine.load(path, device, intra_op_threads, inter_op_threads, precision)
    meta = engine.meta
    return Model(
        name=meta.get("arch") or Path(path).name,
        class_names=list(meta["class_names"]),
        preprocess=Preprocessor.from_model_json(meta, max_image_pixels, image_formats),
        run=engine.run,
        input_name=engine.input_name,
        output_name=engine.output_name,
        meta=meta,
    )


def run_zeros(model: Model, runs: int = 1, batch_sizes: Sequence[int] = (1,)) -> None:
    """Run the model on zeros: BundleError for a graph that loads but does not run."""
    for batch in batch_sizes:
        x = np.zeros((batch, *model.input_shape), np.float32)  # (B, C, H, W)
        for _ in range(runs):
            try:
                model.run(x)
            except Exception as e:  # onnxruntime's own exception types
                raise BundleError(f"the model fails on a batch of {batch}: {str(e).splitlines()[0][:200]}") from None


class Label(NamedTuple):
    index: int
    label: str
    probability: float


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) probabilities -> each row's k most probable classes, most probable first: (N, k) indices, (N, k) probs."""
    index = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k)
    return index, np.take_along_axis(probs, index, axis=1)


class Classifier:
    """Images in, top-k labels out, through one dynamic batcher.

    Args:
        model: what runs.
        max_batch_size, max_delay_s, max_queue: the batcher's (``DynamicBatcher``).
        max_images: images one request may carry.
        timeout_s: a request's deadline, preprocessing and the model together, unless the caller gives one.
        preprocess_threads: threads that decode and resize images larger than ``inline_pixels`` (they bound how
            many large images are in memory at once); 0 decodes every image in the caller's thread.
        inline_pixels: requests whose images touch at most this many pixels are preprocessed in the caller's
            thread, cheaper than a hop to the pool.
        on_batch: called with (batch size, queue waits in seconds) after each model run, for metrics.
    """

    def __init__(
        self,
        model: Model,
        *,
        max_batch_size: int = 32,
        max_delay_s: float = 0.0,
        max_queue: int = 256,
        max_images: int = 64,
        timeout_s: float = 30.0,
        preprocess_threads: int = 2,
        inline_pixels: int = INLINE_PIXELS,
        on_batch: Callable[[int, list[float]], None] | None = None,
    ):
        self.model, self.max_images, self.max_queue, self.timeout_s = model, max_images, max_queue, timeout_s
        self.inline_pixels = inline_pixels if preprocess_threads else None
        self.batcher = DynamicBatcher(model.run, max_batch_size, max_delay_s, max_queue, on_batch)
        self.pool = ThreadPoolExecutor(preprocess_threads, "mcc-preprocess") if preprocess_threads else None
        self.ready = False  # true once warmed up
        self.draining = False  # shutting down: not ready, but still answering

    def start(self) -> None:
        """Start the batcher in the running event loop."""
        self.batcher.start()

    async def stop(self) -> None:
        """Finish everything queued, then release the threads."""
        await self.batcher.stop()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    async def warm_up(self, runs: int = 1, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run the model on zeros, then turn ready (BundleError for a graph that loads but does not run)."""
        await asyncio.to_thread(run_zeros, self.model, runs, batch_sizes)
        self.ready = True

    @property
    def serving(self) -> bool:
        """Ready and not shutting down: what a readiness probe reports."""
        return self.ready and not self.draining

    def check_ready(self) -> None:
        if not self.ready:
            raise NotReadyError("the model is warming up; retry shortly")

    def check_count(self, n: int) -> None:
        """TooManyImagesError for more images than one request may carry or than the queue can ever hold: checked
        before any image is decoded, since a retry could never succeed."""
        if n > self.max_images:
            raise TooManyImagesError(f"{n} images in one request; the limit is {self.max_images}")
        if n > self.max_queue:
            raise TooManyImagesError(f"{n} images in one request; the queue holds at most {self.max_queue}")

    def check_top_k(self, k: int | None) -> int:
        """``k`` labels per image, DEFAULT_TOP_K (or the class count, if fewer) when None."""
        if k is None:
            return min(DEFAULT_TOP_K, self.model.num_classes)
        if not isinstance(k, int) or not 1 <= k <= self.model.num_classes:
            raise InvalidArgumentError(self.top_k_error(k))
        return k

    def top_k_error(self, k) -> str:
        return f"top_k must be an integer from 1 to {self.model.num_classes} (the class count), got {k!r}"

    def deadline(self) -> float:
        """The default deadline of a request that starts now, on ``time.monotonic()``."""
        return time.monotonic() + self.timeout_s

    async def preprocess(self, images: Sequence[tuple[str, bytes]], deadline: float | None = None) -> np.ndarray:
        """(name, encoded bytes) of each image -> float32 (N, C, H, W), every image checked from its header first.

        Raises:
            ImageError: an image that is empty, unreadable, corrupt, or (ImageTooLargeError) over the pixel limit.
            DeadlineError: preprocessing passed ``deadline``; the answer comes then, even while one slow image is
                still being decoded (its thread stops at the next image).
        """
        deadline = self.deadline() if deadline is None else deadline
        pre = self.model.preprocess
        opened = [pre.decode_header(data, name) for name, data in images]
        try:
            if self.inline_pixels is None or sum(map(pre.work_pixels, opened)) <= self.inline_pixels:
                return pre.load_many(opened, deadline)
            job = asyncio.get_running_loop().run_in_executor(self.pool, pre.load_many, opened, deadline)
            return await asyncio.wait_for(job, max(0.0, deadline - time.monotonic()))
        except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11 on; wait_for's own on 3.10
            raise DeadlineError(f"no answer within {self.timeout_s:g}s (preprocessing)") from None

    async def infer(self, x: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """(N, C, H, W) float32 -> (N, num_classes) logits through the dynamic batcher, by ``deadline``.

        A caller that builds ``x`` from a request counts its images with ``check_count`` first, before the work.

        Raises:
            TooManyImagesError, QueueFullError: the batcher's limits.
            DeadlineError: no answer by ``deadline``.
        """
        timeout = (self.deadline() if deadline is None else deadline) - time.monotonic()
        try:
            if timeout <= 0:
                raise TimeoutError
            return await self.batcher.submit(x, timeout if math.isfinite(timeout) else None)
        except TimeoutError:
            raise DeadlineError(f"no answer within {self.timeout_s:g}s") from None

    async def predict(
        self, images: Sequence[tuple[str, bytes]], k: int | None = None, deadline: float | None = None
    ) -> list[list[Label]]:
        """The top ``k`` labels of each image, most probable first, in input order."""
        k = self.check_top_k(k)
        self.check_count(len(images))
        deadline = self.deadline() if deadline is None else deadline
        probs = softmax(await self.infer(await self.preprocess(images, deadline), deadline))  # (N, num_classes)
        index, top_probs = top_k(probs, k)  # (N, k), (N, k)
        names = self.model.class_names
        return [
            [Label(j, names[j], p) for j, p in zip(row, ps, strict=True)]
            for row, ps in zip(index.tolist(), top_probs.tolist(), strict=True)
        ]
