"""Datasets read from local files only, and timm's train/eval transforms.

``--data`` specs: ``digits`` (scikit-learn's bundled set), ``fashion-mnist[:DIR]`` (IDX gzip files),
``imagefolder:ROOT`` (ROOT/train/<class>/**/*, ROOT/val/<class>/**/*: a class folder's images are found
recursively), ``cifar10:DIR``, ``cifar100:DIR`` (the python-pickle CIFAR files). Nothing is ever downloaded.

An image folder is checked before training starts: every file's header is read (the val images are decoded in
full), in parallel, and all unreadable files are reported at once (or skipped with ``skip_bad_images``). The channel
count comes from all files: any colour image makes the data colour.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from torch.utils.data import Dataset

from mcc_serve.runtime.choices import HIGH_BIT_MODES, IMAGE_SUFFIXES

from .errors import UsageError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DATA_KINDS = ("digits", "fashion-mnist", "imagefolder", "cifar10", "cifar100")
GRAYSCALE_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}  # palette (P) counts as colour

_logger = logging.getLogger("mcc_train")


def to_8bit(img: Image.Image) -> Image.Image:
    """A high-bit-depth image as the 8-bit ``L`` image an 8-bit copy of it holds; other modes unchanged.

    Integer modes are read as 16-bit (0..65535 -> 0..255, i.e. round(v / 257)), ``F`` as 0..1 floats; Pillow's
    ``convert("L")`` would clip them at 255. The serving preprocessing (``mcc_serve.runtime.preprocess.to_8bit``, which
    cannot import this package) applies the same rule; a test holds the two to the same pixels.
    """
    if img.mode not in HIGH_BIT_MODES:
        return img
    x = np.asarray(img, dtype=np.float64)  # (H, W)
    x = x * 255.0 if img.mode == "F" else x * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8))  # (H, W) uint8: mode L


class ArrayDataset(Dataset):
    """Images held in memory as uint8 (N, H, W) or (N, H, W, 3), labels (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None, mode: str = "RGB"):
        self.images, self.labels, self.transform, self.mode = images, labels, transform, mode

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i]).convert(self.mode)
        return (self.transform(img) if self.transform else img), int(self.labels[i])


class FolderDataset(Dataset):
    """Image files on disk with their labels.

    A file that fails to decode (its header read at start, its pixels truncated) stops the run with one line, or
    with ``skip_bad`` is replaced by the next readable file of the same class (logged once per file).
    """

    def __init__(self, samples: list[tuple[Path, int]], transform=None, mode: str = "RGB", skip_bad: bool = False):
        self.samples, self.transform, self.mode, self.skip_bad = samples, transform, mode, skip_bad
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.reported: set[Path] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        for j in range(i, i + len(self.samples)):
            path, label = self.samples[j % len(self.samples)]
            if label != self.samples[i][1]:
                continue
            try:
                with Image.open(path) as img:
                    img = to_8bit(img).convert(self.mode)
                return (self.transform(img) if self.transform else img), label
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
                if not self.skip_bad:
                    raise UsageError(
                        f"unreadable image {path}: {e}; remove or replace it, or pass --skip-bad-images"
                    ) from None
                if path not in self.reported:  # once per file (and per loader worker)
                    self.reported.add(path)
                    _logger.warning("skipping unreadable image: %s (%s); another of its class stands in", path, e)
        raise UsageError(f"no readable image of class {self.samples[i][1]} left; check the data")


@dataclass
class DataSplits:
    train: ArrayDataset | FolderDataset
    val: ArrayDataset | FolderDataset
    class_names: list[str]
    grayscale: bool  # every source image is single-channel
    name: str  # digits, fashion-mnist, ...
    channels_note: str = ""  # why grayscale is what it is, for the start-up line
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (skip_bad_images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_data(
    spec: str, subset: int | None = None, skip_bad_images: bool = False, only: str | None = None
) -> DataSplits:
    """Load the train and val splits named by a ``--data`` spec, without transforms.

    Args:
        spec: ``digits``, ``fashion-mnist[:DIR]``, ``imagefolder:ROOT``, ``cifar10:DIR`` or ``cifar100:DIR``.
        subset: keep only this many training images (a fixed random subset).
        skip_bad_images: leave unreadable image files out (listed in ``DataSplits.skipped``) instead of refusing.
        only: ``"train"`` or ``"val"``: an image folder needs (and checks) only that split; the other is empty.
    """
    kind, _, arg = spec.partition(":")
    if kind not in DATA_KINDS:
        raise UsageError(f"--data {spec}: unknown dataset {kind!r}; use one of {', '.join(DATA_KINDS)}")
    if kind in ("imagefolder", "cifar10", "cifar100") and not arg:
        raise UsageError(f"--data {spec}: {kind} needs a directory, e.g. --data {kind}:/path/to/data")
    if kind == "digits":
        splits = _digits()
    elif kind == "fashion-mnist":
        splits = _fashion_mnist(Path(arg or FASHION_MNIST_DIR), spec)
    elif kind == "imagefolder":
        splits = _imagefolder(Path(arg), spec, skip_bad_images, (only,) if only else ("train", "val"))
    else:
        splits = _cifar(Path(arg), kind, spec)
    if subset is not None and subset < len(splits.train):
        keep = np.sort(np.random.default_rng(0).permutation(len(splits.train))[:subset])
        splits.train = torch.utils.data.Subset(splits.train, keep.tolist())
    return splits


def _digits() -> DataSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8), values 0..16 -> 0..255
    x_tr, x_va, y_tr, y_va = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )  # a fixed split, the same for every training seed
    names = [str(i) for i in range(10)]
    return DataSplits(ArrayDataset(x_tr, y_tr), ArrayDataset(x_va, y_va), names, True, "digits", "digits is grayscale")


def _read_idx(path: Path, spec: str) -> np.ndarray:
    """Read one IDX file (gzip or raw) into a uint8 array."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise UsageError(f"--data {spec}: cannot read {path} ({e}); is it an intact IDX file?") from None


def _fashion_mnist(root: Path, spec: str) -> DataSplits:
    if not root.is_dir():
        hint = " (install it with: apt-get install dataset-fashion-mnist)" if str(root) == FASHION_MNIST_DIR else ""
        raise UsageError(f"--data {spec}: no directory {root}{hint}")

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).is_file():
                return root / name
        raise UsageError(f"--data {spec}: missing {stem}.gz under {root}")

    arrays = {s: _read_idx(find(f"{s}-idx{n}-ubyte"), spec) for s, n in [("train-images", 3), ("train-labels", 1)]}
    arrays |= {s: _read_idx(find(f"{s}-idx{n}-ubyte"), spec) for s, n in [("t10k-images", 3), ("t10k-labels", 1)]}
    train = ArrayDataset(arrays["train-images"], arrays["train-labels"].astype(np.int64))
    val = ArrayDataset(arrays["t10k-images"], arrays["t10k-labels"].astype(np.int64))
    return DataSplits(train, val, list(FASHION_MNIST_CLASSES), True, "fashion-mnist", "Fashion-MNIST is grayscale")


def _imagefolder(root: Path, spec: str, skip_bad_images: bool, wanted: tuple[str, ...]) -> DataSplits:
    if not root.is_dir():
        raise UsageError(f"--data {spec}: no directory {root}")
    splits = {}
    for split in wanted:
        folder = root / split
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        if not classes:
            raise UsageError(f"--data {spec}: no class folders under {folder}; expected {folder}/<class>/<image>")
        splits[split] = classes
    if len(splits) == 2 and splits["val"] != splits["train"]:
        missing = sorted(set(splits["train"]) ^ set(splits["val"]))
        raise UsageError(f"--data {spec}: train and val class folders differ ({', '.join(missing[:5])})")
    classes = splits[wanted[0]]
    samples = {
        split: [(p, label) for label, name in enumerate(classes) for p in _image_files(root / split / name)]
        if split in wanted
        else []
        for split in ("train", "val")
    }
    started = time.monotonic()
    modes, bad = scan_images([p for p, _ in samples["train"]], [p for p, _ in samples["val"]])
    checked, seconds = len(modes) + len(bad), time.monotonic() - started
    _logger.info("checked %d image files in %.1fs (train headers, val decoded)", checked, seconds)
    if bad and not skip_bad_images:
        for path, reason in bad:
            _logger.error("unreadable image: %s (%s)", path, reason)
        raise UsageError(
            f"--data {spec}: {len(bad)} unreadable image file(s) ({bad[0][0]}{' ...' if len(bad) > 1 else ''}; all "
            "listed above); remove or replace them, or pass --skip-bad-images"
        )
    skipped = {p for p, _ in bad}
    for path, reason in bad:
        _logger.warning("skipping unreadable image: %s (%s)", path, reason)
    for split in wanted:
        samples[split] = [(p, label) for p, label in samples[split] if p not in skipped]
        empty = sorted(set(range(len(classes))) - {label for _, label in samples[split]})
        if empty:
            raise UsageError(
                f"--data {spec}: no readable images in class folder {root / split / classes[empty[0]]}; "
                "add images or remove the folder"
            )
    colour = [p for p, m in modes.items() if m not in GRAYSCALE_MODES and p not in skipped]
    total = len(samples["train"]) + len(samples["val"])
    if colour:
        note = f"{len(colour)} of {total} images are colour, e.g. {colour[0]}"
    else:
        note = f"all {total} images are grayscale"
    return DataSplits(
        FolderDataset(samples["train"], skip_bad=skip_bad_images),
        FolderDataset(samples["val"], skip_bad=skip_bad_images),
        classes,
        not colour,
        "imagefolder",
        channels_note=note,
        skipped=sorted(str(p) for p in skipped),
    )


def _image_files(folder: Path) -> list[Path]:
    """Image files under a class folder, found recursively (torchvision ImageFolder's convention), sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def scan_images(headers: list[Path], full: list[Path]) -> tuple[dict[Path, str], list[tuple[Path, str]]]:
    """Open every file in parallel: ``headers`` read the header only, ``full`` are decoded in full.

    Returns:
        (mode of each readable file, [(path, reason)] of the unreadable ones, in input order).
    """

    def check(job: tuple[Path, bool]) -> tuple[str | None, str | None]:  # (mode, why unreadable)
        path, decode = job
        try:
            with Image.open(path) as img:
                if decode:
                    img.load()
                return img.mode, None
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__

    jobs = [(p, False) for p in headers] + [(p, True) for p in full]
    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:  # I/O and Pillow's C code
        results = list(pool.map(check, jobs, chunksize=64))
    modes = {p: mode for (p, _), (mode, _) in zip(jobs, results, strict=True) if mode is not None}
    bad = [(p, why) for (p, _), (_, why) in zip(jobs, results, strict=True) if why is not None]
    return modes, bad


def _cifar(root: Path, kind: str, spec: str) -> DataSplits:
    sub = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[kind]
    if (root / sub).is_dir():
        root = root / sub
    if not root.is_dir():
        raise UsageError(f"--data {spec}: no directory {root}")
    if kind == "cifar10":
        train_files, test_file, meta_file, label_key, names_key = (
            [f"data_batch_{i}" for i in range(1, 6)],
            "test_batch",
            "batches.meta",
            b"labels",
            b"label_names",
        )
    else:
        train_files, test_file, meta_file, label_key, names_key = (
            ["train"],
            "test",
            "meta",
            b"fine_labels",
            b"fine_label_names",
        )

    def read(name: str) -> dict:
        path = root / name
        if not path.is_file():
            raise UsageError(f"--data {spec}: missing {path}; expected the python-pickle {kind} files in {root}")
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="bytes")
        except Exception as e:
            raise UsageError(f"--data {spec}: cannot read {path} ({type(e).__name__}); is it intact?") from None

    def arrays(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        batches = [read(n) for n in names]
        x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.concatenate([np.asarray(b[label_key]) for b in batches]).astype(np.int64)
        return np.ascontiguousarray(x), y  # (N, 32, 32, 3) uint8

    x_tr, y_tr = arrays(train_files)
    x_te, y_te = arrays([test_file])
    names = [n.decode() for n in read(meta_file)[names_key]]
    return DataSplits(ArrayDataset(x_tr, y_tr), ArrayDataset(x_te, y_te), names, False, kind, f"{kind} is colour")


def build_data_config(model: torch.nn.Module, img_size: int, in_chans: int, crop_pct: float, interpolation: str):
    """timm's data config for the model at our input size; grayscale gets one averaged mean/std."""
    cfg = resolve_data_config(
        {"input_size": (in_chans, img_size, img_size), "crop_pct": crop_pct, "interpolation": interpolation},
        model=model,
    )
    if in_chans == 1 and len(cfg["mean"]) == 3:
        cfg["mean"] = (float(np.mean(cfg["mean"])),)
        cfg["std"] = (float(np.mean(cfg["std"])),)
    cfg["mean"], cfg["std"] = tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"])
    return cfg


def build_transforms(data_config: dict, hflip: float, scale: tuple[float, float]):
    """(train, eval) transforms from timm's factory; the eval one is what the exported model expects."""
    common = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std")}
    train = create_transform(**common, is_training=True, scale=scale, hflip=hflip, color_jitter=0.0)
    val = create_transform(**common, is_training=False, crop_pct=data_config["crop_pct"])
    return train, val


def set_transforms(splits: DataSplits, train_tf, val_tf, in_chans: int) -> None:
    """Attach transforms and the PIL mode (``L`` or ``RGB``) every image is converted to."""
    mode = "L" if in_chans == 1 else "RGB"
    train = splits.train.dataset if isinstance(splits.train, torch.utils.data.Subset) else splits.train
    train.transform, train.mode = train_tf, mode
    splits.val.transform, splits.val.mode = val_tf, mode


def cache_in_memory(dataset, max_bytes: int = 512 * 2**20):
    """The eval set as one tensor when it fits in ``max_bytes``: its transform is deterministic, so every epoch's
    evaluation would decode and normalise the same images again."""
    if len(dataset) == 0:  # a rank whose val shard is empty
        return dataset
    first = dataset[0][0]
    if len(dataset) * first.numel() * first.element_size() > max_bytes:
        return dataset
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([image for image, _ in items])  # (N, C, H, W)
    labels = torch.tensor([label for _, label in items])  # (N,)
    return torch.utils.data.TensorDataset(images, labels)
