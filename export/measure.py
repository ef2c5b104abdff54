"""Measurements that are reported, never a reason to refuse a bundle: onnxruntime latency against the baseline's
export, the fp16 model's error, and the int8 model's top-1 beside fp32's. parity.json records them; docs/benchmarks.md's
benchmark sections (``benchmarks/export_parity.py``, ``benchmarks/int8.py``) say what they gave."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mcc_serve.runtime.session import create_session

from .images import preprocessed_batches
from .onnx_graph import INPUT_NAME

EVAL_IMAGES = 10_000  # the most validation images --int8 scores both models on (all of Fashion-MNIST's val split)
WARMUP_RUNS = 5


def measure_latency(ours: Path, vanilla: Path, input_size, runs: int, batches=(1,)) -> dict:
    """Median ORT latency of both models, same session options, runs interleaved; ratio ours / vanilla (the
    baseline's export, the cosine one for a cosine bundle; parity.json's keys keep the name).

    Which model runs first alternates from pair to pair, so neither always runs on caches the other warmed.
    """
    sessions = {"ours": create_session(ours), "vanilla": create_session(vanilla)}
    result = {}
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, *input_size), dtype=np.float32)
        times = {k: [] for k in sessions}
        for i in range(runs + WARMUP_RUNS):
            order = list(sessions.items()) if i % 2 == 0 else list(sessions.items())[::-1]
            for k, s in order:
                start = time.perf_counter()
                s.run(None, {INPUT_NAME: x})
                if i >= WARMUP_RUNS:
                    times[k].append(time.perf_counter() - start)
        med = {k: 1000 * statistics.median(v) for k, v in times.items()}
        result[str(batch)] = {
            "ours_ms": med["ours"],
            "vanilla_ms": med["vanilla"],
            "ratio": med["ours"] / med["vanilla"],
        }
    return result


def agreement(reference: Path, other: Path, images: np.ndarray) -> tuple[float, float]:
    """How closely the ONNX model ``other`` follows ``reference`` on ``images`` (N, C, H, W): the fraction of images
    both give the same class, and the largest logit difference."""
    a = create_session(reference).run(None, {INPUT_NAME: images})[0]  # (N, classes)
    b = create_session(other).run(None, {INPUT_NAME: images})[0]
    return float((a.argmax(1) == b.argmax(1)).mean()), float(np.abs(a - b).max())


def fp16_report(fp32: Path, fp16: Path, images: torch.Tensor) -> dict:
    """The fp16 model beside the fp32 one on ``images``: parity.json's ``fp16``."""
    top1_agreement, max_abs = agreement(fp32, fp16, images.numpy())
    return {"max_abs": max_abs, "top1_agreement": top1_agreement, "images": len(images)}


def top1_report(fp32_path: Path, int8_path: Path, meta: dict, spec: str, count: int = EVAL_IMAGES) -> dict:
    """Top-1 of the fp32 and the int8 model on up to ``count`` validation images of ``spec``, their agreement, and
    how far apart their logits are."""
    sessions = {"fp32": create_session(fp32_path), "int8": create_session(int8_path)}
    outputs, labels = {k: [] for k in sessions}, []
    for images, y in preprocessed_batches(meta, spec, "val", count):
        labels.append(y)
        for name, sess in sessions.items():
            outputs[name].append(sess.run(None, {INPUT_NAME: images.numpy()})[0])  # (n, C)
    labels = np.concatenate(labels)
    outputs = {k: np.concatenate(v) for k, v in outputs.items()}
    pred = {k: v.argmax(1) for k, v in outputs.items()}
    # paired by image: d_i = int8 right - fp32 right (-1, 0, 1); its mean is the top-1 change
    diff = 100 * ((pred["int8"] == labels).astype(float) - (pred["fp32"] == labels))
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return {
        "val_images": len(labels),
        "top1_fp32": 100 * float((pred["fp32"] == labels).mean()),
        "top1_int8": 100 * float((pred["int8"] == labels).mean()),
        "top1_change_ci95": [float(diff.mean() - half), float(diff.mean() + half)],  # points, paired by image
        "top1_agreement": float((pred["fp32"] == pred["int8"]).mean()),
        "max_abs_logit_error": float(np.abs(outputs["fp32"] - outputs["int8"]).max()),
    }
