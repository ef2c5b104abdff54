"""Serving preprocesses exactly as timm's eval transform did in training."""

import io

import numpy as np
import pytest
from PIL import Image
from timm.data import create_transform

from mcc_serve.preprocess import ImageError, Preprocessor


def real_images():
    from sklearn.datasets import load_digits

    digits = load_digits().images[:10]
    yield from (Image.fromarray(np.round(d * 255 / 16).astype(np.uint8)) for d in digits)  # 8x8 grayscale
    rng = np.random.default_rng(0)
    for w, h in [(37, 53), (64, 48), (20, 20), (101, 67), (300, 200)]:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
        yield Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    from mcc_train.data import FASHION_MNIST_DIR, load_data

    try:
        val = load_data(f"fashion-mnist:{FASHION_MNIST_DIR}").val
        yield from (val[i][0] for i in range(0, 10000, 1000))
    except Exception:
        return


@pytest.mark.parametrize("size, crop_pct, interpolation, in_chans", [
    (32, 1.0, "bicubic", 1), (16, 1.0, "bilinear", 1), (28, 0.875, "bicubic", 3), (24, 0.9, "bilinear", 3),
    (64, 0.95, "nearest", 3),
])  # fmt: skip
def test_matches_timm_eval_transform(size, crop_pct, interpolation, in_chans):
    mean, std = ((0.449,), (0.226,)) if in_chans == 1 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    meta = {"preprocess": {"input_size": [in_chans, size, size], "mean": list(mean), "std": list(std),
                           "interpolation": interpolation, "crop_pct": crop_pct, "crop_mode": "center"}}  # fmt: skip
    ours = Preprocessor.from_model_json(meta, max_pixels=10**8)
    timm_tf = create_transform((in_chans, size, size), is_training=False, interpolation=interpolation, mean=mean,
                               std=std, crop_pct=crop_pct)  # fmt: skip
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
    assert count >= 15


def test_bad_images_are_named():
    meta = {"preprocess": {"input_size": [3, 8, 8], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                           "crop_pct": 1.0}}  # fmt: skip
    pre = Preprocessor.from_model_json(meta, max_pixels=100 * 100)
    with pytest.raises(ImageError, match="not an image format"):
        pre.load(b"hello", "a.txt")
    buf = io.BytesIO()
    Image.new("RGB", (50, 50), "red").save(buf, format="PNG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        pre.load(buf.getvalue()[:-30], "cut.png")
    Image.new("RGB", (101, 100)).save(buf := io.BytesIO(), format="PNG")
    with pytest.raises(ImageError, match="more than the limit") as e:
        pre.load(buf.getvalue(), "big.png")
    assert e.value.status == 413
