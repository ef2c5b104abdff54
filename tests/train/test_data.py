"""Local datasets and timm's transforms."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcc_train import UsageError, create_model
from mcc_train.data import FASHION_MNIST_DIR, build_data_config, build_transforms, load_data, set_transforms


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_digits_is_a_fixed_stratified_split():
    a, b = load_data("digits"), load_data("digits")
    assert (len(a.train), len(a.val)) == (1437, 360) and a.class_names == [str(i) for i in range(10)]
    assert np.array_equal(a.val.labels, b.val.labels) and a.grayscale
    assert np.bincount(a.val.labels).min() >= 35
    img, label = a.train[0]
    assert isinstance(img, Image.Image) and img.size == (8, 8) and 0 <= label < 10


def test_fashion_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(20) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    splits = load_data(f"fashion-mnist:{tmp_path}", subset=8)
    assert (len(splits.train), len(splits.val), splits.num_classes) == (8, 5, 10)
    assert splits.class_names[9] == "Ankle boot"
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="t10k-labels-idx1-ubyte.gz"):
        load_data(f"fashion-mnist:{tmp_path}")


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_debian_fashion_mnist_is_the_full_split():
    splits = load_data("fashion-mnist")
    assert (len(splits.train), len(splits.val)) == (60000, 10000)
    assert np.bincount(splits.val.labels).tolist() == [1000] * 10


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_python_pickles(tmp_path, kind):
    rng = np.random.default_rng(0)
    folder = tmp_path / {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[kind]
    folder.mkdir()
    key = b"labels" if kind == "cifar10" else b"fine_labels"

    def batch(n):
        return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: list(rng.integers(0, 3, n))}

    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if kind == "cifar10" else ["train", "test"]
    for name in files:
        with open(folder / name, "wb") as f:
            pickle.dump(batch(4), f)
    meta, names_key = ("batches.meta", b"label_names") if kind == "cifar10" else ("meta", b"fine_label_names")
    with open(folder / meta, "wb") as f:
        pickle.dump({names_key: [b"a", b"b", b"c"]}, f)
    splits = load_data(f"{kind}:{tmp_path}")
    assert splits.class_names == ["a", "b", "c"] and not splits.grayscale
    assert len(splits.val) == 4 and len(splits.train) == (20 if kind == "cifar10" else 4)
    assert splits.train[0][0].size == (32, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="missing"):
        load_data(f"{kind}:{tmp_path / 'empty'}")


def test_timm_transforms_for_grayscale_and_rgb():
    splits = load_data("digits")
    model = create_model("resnet10t", 10, in_chans=1)
    dc = build_data_config(model, 24, 1, 0.875, "bilinear")
    assert dc["input_size"] == (1, 24, 24) and len(dc["mean"]) == 1 and dc["crop_pct"] == 0.875
    set_transforms(splits, *build_transforms(dc, 0.0, (0.5, 1.0)), in_chans=1)
    x, _ = splits.val[0]
    assert x.shape == (1, 24, 24) and x.dtype == torch.float32
    set_transforms(splits, *build_transforms({**dc, "input_size": (3, 24, 24)}, 0.5, (0.5, 1.0)), in_chans=3)
    assert splits.train[0][0].shape == (3, 24, 24)
