"""Serving preprocesses exactly as timm's eval transform did in training."""

import io

import numpy as np
import pytest
from PIL import Image
from timm.data import create_transform

from mcc_serve.errors import status_of
from mcc_serve.runtime import preprocess
from mcc_serve.runtime.errors import ImageError, ImageTooLargeError
from mcc_serve.runtime.preprocess import Preprocessor

EXTREME = [(9, 700), (900, 7), (3, 260)]  # aspect ratios far from any photo's
MAX_LEVELS = 8  # the box resize's largest difference to timm, in grey levels (measured: 7, mean 0.03-0.05)


def preprocessor(in_chans, size, mean, std, interpolation, crop_pct, max_pixels) -> Preprocessor:
    """The serving preprocessing of a model.json with these settings."""
    pre = {"input_size": [in_chans, size, size], "mean": mean, "std": std, "interpolation": interpolation}
    return Preprocessor.from_model_json({"preprocess": {**pre, "crop_pct": crop_pct}}, max_pixels=max_pixels)


def real_images():
    from sklearn.datasets import load_digits

    digits = load_digits().images[:10]
    yield from (Image.fromarray(np.round(d * 255 / 16).astype(np.uint8)) for d in digits)  # 8x8 grayscale
    rng = np.random.default_rng(0)
    for w, h in [(37, 53), (64, 48), (20, 20), (101, 67), (300, 200), *EXTREME]:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
        yield Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    from mcc_train.data import FASHION_MNIST_DIR, load_data

    try:
        val = load_data(f"fashion-mnist:{FASHION_MNIST_DIR}").val
        yield from (val[i][0] for i in range(0, 10000, 1000))
    except Exception:
        return


@pytest.mark.parametrize(
    "size, crop_pct, interpolation, in_chans",
    [
        (32, 1.0, "bicubic", 1),
        (16, 1.0, "bilinear", 1),
        (28, 0.875, "bicubic", 3),
        (24, 0.9, "bilinear", 3),
        (64, 0.95, "nearest", 3),
    ],
)
def test_matches_timm_eval_transform(size, crop_pct, interpolation, in_chans):
    mean, std = ((0.449,), (0.226,)) if in_chans == 1 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    meta = {
        "preprocess": {
            "input_size": [in_chans, size, size],
            "mean": list(mean),
            "std": list(std),
            "interpolation": interpolation,
            "crop_pct": crop_pct,
            "crop_mode": "center",
        }
    }
    ours = Preprocessor.from_model_json(meta, max_pixels=10**8)
    timm_tf = create_transform(
        (in_chans, size, size), is_training=False, interpolation=interpolation, mean=mean, std=std, crop_pct=crop_pct
    )
    mode = "L" if in_chans == 1 else "RGB"
    count = 0
    for img in real_images():
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        x = ours.load(buf.getvalue())
        expected = timm_tf(img.convert(mode)).numpy()
        assert x.shape == expected.shape == (in_chans, size, size) and x.dtype == np.float32
        assert np.abs(x - expected).max() <= 1e-6
        count += 1
    assert count >= 18


def test_bad_images_are_named():
    pre = preprocessor(3, 8, [0.5] * 3, [0.5] * 3, "bilinear", 1.0, max_pixels=100 * 100)
    with pytest.raises(ImageError, match="not an image format"):
        pre.load(b"hello", "a.txt")
    buf = io.BytesIO()
    Image.new("RGB", (50, 50), "red").save(buf, format="PNG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        pre.load(buf.getvalue()[:-30], "cut.png")
    Image.new("RGB", (101, 100)).save(buf := io.BytesIO(), format="PNG")
    with pytest.raises(ImageError, match="more than the limit") as e:
        pre.load(buf.getvalue(), "big.png")
    assert isinstance(e.value, ImageTooLargeError) and status_of(e.value)[0] == 413  # the HTTP table's answer


@pytest.mark.parametrize(
    "size, crop_pct, interpolation", [(32, 1.0, "bicubic"), (28, 0.875, "bicubic"), (24, 0.9, "bilinear")]
)
def test_resizing_only_the_cropped_region_stays_close_to_timm(size, crop_pct, interpolation, monkeypatch):
    monkeypatch.setattr(preprocess, "RESIZE_BUDGET_PIXELS", 0)  # every image takes the cropped-region path
    ours = preprocessor(3, size, [0.5] * 3, [0.25] * 3, interpolation, crop_pct, max_pixels=10**8)
    timm_tf = create_transform(
        (3, size, size),
        is_training=False,
        interpolation=interpolation,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        crop_pct=crop_pct,
    )
    diffs = []
    for img in real_images():
        img.convert("RGB").save(buf := io.BytesIO(), format="PNG")
        diffs.append(np.abs(ours.load(buf.getvalue()) - timm_tf(img.convert("RGB")).numpy()) * 0.25 * 255)  # levels
    levels = np.concatenate([d.ravel() for d in diffs])
    assert levels.max() <= MAX_LEVELS and levels.mean() <= 0.1


def test_an_extreme_aspect_ratio_costs_no_more_than_the_crop(monkeypatch):
    pre = preprocessor(1, 16, [0.5], [0.5], "bicubic", 1.0, max_pixels=10**6)
    sizes, real_resize = [], Image.Image.resize
    monkeypatch.setattr(
        Image.Image, "resize", lambda self, size, *a, **k: (sizes.append(size), real_resize(self, size, *a, **k))[1]
    )
    strip = np.tile(np.arange(300_000, dtype=np.uint32) % 251, (1, 1)).astype(np.uint8)  # 1 x 300,000
    for array in (strip, strip.T):
        Image.fromarray(array).save(buf := io.BytesIO(), format="PNG")
        assert len(buf.getvalue()) < 5_000  # a few KB that a plain resize would blow up to 4.8M pixels
        x = pre.load(buf.getvalue())
        assert x.shape == (1, 16, 16) and np.isfinite(x).all()
    assert sizes and max(w * h for w, h in sizes) <= 16 * 16  # not the 16 x 4,800,000 a plain resize makes


def test_work_pixels_counts_the_resize_an_aspect_ratio_causes():
    pre = preprocessor(1, 16, [0.5], [0.5], "bicubic", 1.0, max_pixels=10**8)
    assert pre.work_pixels(Image.new("L", (32, 32))) == 32 * 32 + 16 * 16
    # 1 x 60,000: few pixels to decode, but a 16 x 960,000 resize: not a job for the event loop
    assert pre.work_pixels(Image.new("L", (1, 60_000))) == 60_000 + 16 * 960_000
    assert pre.work_pixels(Image.new("L", (1, 10**7))) == 10**7 + 16 * 16  # past the budget: only the crop


def test_load_many_lets_each_decoded_image_go_and_keeps_to_the_deadline():
    import time

    pre = preprocessor(1, 8, [0.5], [0.5], "bilinear", 1.0, max_pixels=10**6)
    Image.new("L", (40, 30), 128).save(buf := io.BytesIO(), format="PNG")
    images = [pre.decode_header(buf.getvalue(), f"{i}.png") for i in range(3)]
    x = pre.load_many(images)
    assert x.shape == (3, 1, 8, 8) and np.allclose(x, (128 / 255 - 0.5) / 0.5, atol=1e-6)
    assert images == [None, None, None]  # let go of: the decoded pixels are not held until the request ends
    with pytest.raises(TimeoutError, match="after 0 of 1 images"):
        pre.load_many([pre.decode_header(buf.getvalue())], deadline=time.monotonic() - 1)
