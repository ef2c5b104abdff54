"""Images of a ``--data`` split through a bundle's own preprocessing (timm's eval transform, what the server applies):
what INT8 calibration, the proof and the int8 top-1 report feed the models."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from timm.data import create_transform

from mcc_train.data import load_data


def preprocessed_batches(
    meta: dict, spec: str, split: str, count: int, batch: int = 64
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Up to ``count`` images of one split of ``--data spec`` (evenly spaced) through the bundle's preprocessing,
    ``batch`` at a time: yields (images (n, C, H, W), labels (n,)), so a whole validation split at 224 never sits in
    memory at once.

    Raises:
        UsageError: the data cannot be read here.
    """
    pre = meta["preprocess"]
    splits = load_data(spec, only=split)
    dataset = getattr(splits, split)
    dataset.mode = "L" if meta["in_chans"] == 1 else "RGB"
    dataset.transform = create_transform(
        tuple(pre["input_size"]),
        is_training=False,
        interpolation=pre["interpolation"],
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        crop_pct=pre["crop_pct"],
        crop_mode=pre.get("crop_mode"),
    )
    index = np.unique(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).astype(int))
    for start in range(0, len(index), batch):
        pairs = [dataset[int(i)] for i in index[start : start + batch]]
        yield torch.stack([x for x, _ in pairs]), np.array([int(y) for _, y in pairs])


def preprocessed(meta: dict, spec: str, split: str, count: int) -> tuple[torch.Tensor, np.ndarray]:
    """All of ``preprocessed_batches`` at once, (N, C, H, W) and (N,): for the few hundred images of calibration and
    the proof."""
    batches = list(preprocessed_batches(meta, spec, split, count))
    return torch.cat([x for x, _ in batches]), np.concatenate([y for _, y in batches])
