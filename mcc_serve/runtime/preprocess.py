"""timm's eval transform in numpy and Pillow, no torch: decode, resize, center-crop, scale, normalise.

Matches ``timm.data.create_transform(is_training=False, ...)`` for crop_mode ``center`` and ``squash``:
resize (shorter side, or both sides for squash) to ``floor(size / crop_pct)`` with Pillow, center-crop with
torchvision's rounding, divide by 255 and normalise in float32.
"""

from __future__ import annotations

import io
import math
import struct
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from .choices import HIGH_BIT_MODES, INTERPOLATIONS, MAX_IMAGE_PIXELS
from .errors import ImageError, ImageTooLargeError

# what Pillow's decoders raise on a malformed file, besides UnidentifiedImageError: the client's error, never a 500
UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error)
INTERPOLATION = {name: Image.Resampling[name.upper()] for name in INTERPOLATIONS}  # timm's names -> Pillow's


RESIZE_BUDGET_PIXELS = 1 << 24  # a resize to more pixels than this resizes only the region the crop keeps


def to_8bit(img: Image.Image) -> Image.Image:
    """A high-bit-depth image as the 8-bit ``L`` image an 8-bit copy of it holds; other modes unchanged.

    Integer modes are read as 16-bit (0..65535 -> 0..255, i.e. round(v / 257)), ``F`` as 0..1 floats. Pillow's own
    ``convert("L")`` clips them at 255 instead, which turns a 16-bit PNG nearly white. ``mcc_train.data`` applies
    the same rule to training images (a test holds the two to the same pixels).
    """
    if img.mode not in HIGH_BIT_MODES:
        return img
    x = np.asarray(img, dtype=np.float64)  # (H, W)
    x = x * 255.0 if img.mode == "F" else x * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.round(x), 0, 255).astype(np.uint8))  # (H, W) uint8: mode L


@dataclass(frozen=True)
class Preprocessor:
    in_chans: int
    size: int  # square crop, H == W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "center"
    max_pixels: int = MAX_IMAGE_PIXELS
    formats: tuple[str, ...] | None = None  # Pillow's format names it decodes; None: every format Pillow reads

    def __post_init__(self):
        # timm's ToTensor and Normalize, (v / 255 - mean) / std in float32, for each of the 256 values a channel
        # can hold: looking a pixel up gives the bits computing it would, and costs less
        values = np.arange(256, dtype=np.float32) / np.float32(255)  # (256,)
        mean, std = np.asarray(self.mean, np.float32)[:, None], np.asarray(self.std, np.float32)[:, None]
        object.__setattr__(self, "_lut", (values[None, :] - mean) / std)  # (C, 256) float32
        object.__setattr__(self, "_mode", "L" if self.in_chans == 1 else "RGB")

    @classmethod
    def from_model_json(
        cls, meta: dict, max_pixels: int = MAX_IMAGE_PIXELS, formats: tuple[str, ...] | None = None
    ) -> Preprocessor:
        """The preprocessing a model.json records (validated by the bundle schema: square, known interpolation)."""
        pre = meta["preprocess"]
        c, size, _ = pre["input_size"]
        mean, std = tuple(pre["mean"]), tuple(pre["std"])
        if len(mean) == 1:
            mean, std = mean * c, std * c
        crop_mode = pre.get("crop_mode", "center")
        return cls(c, size, mean, std, pre["interpolation"], pre["crop_pct"], crop_mode, max_pixels, formats)

    def decode_header(self, data: bytes, name: str = "image") -> Image.Image:
        """Open an image lazily (header only) and check its size against the pixel limit."""
        if not data:
            raise ImageError(f"{name} is empty")
        try:
            img = Image.open(io.BytesIO(data), formats=self.formats)
        except Image.DecompressionBombError:
            raise ImageTooLargeError(f"{name} has too many pixels") from None
        except (UnidentifiedImageError, *UNREADABLE):
            readable = ", ".join(self.formats) if self.formats else "PNG, JPEG, WebP, ..."
            raise ImageError(f"{name} is not an image format read here ({readable})") from None
        if img.width * img.height > self.max_pixels:
            raise ImageTooLargeError(
                f"{name} is {img.width}x{img.height} = {img.width * img.height:,} pixels, more than the limit of "
                f"{self.max_pixels:,}"
            )
        img.info["mcc_name"] = name
        return img

    def decode(self, img: Image.Image) -> Image.Image:
        """Decode the pixels of a lazily opened image into the model's mode (L or RGB)."""
        try:
            img.load()
            img = to_8bit(img)
            return img if img.mode == self._mode else img.convert(self._mode)
        except UNREADABLE as e:
            name = img.info.get("mcc_name", "image")
            raise ImageError(
                f"{name} is a corrupt or truncated {img.format or ''} image ({e})".replace("  ", " ")
            ) from None

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) timm's eval transform resizes a w x h image to, before its center crop."""
        scale = math.floor(self.size / self.crop_pct)
        if self.crop_mode == "squash":
            return scale, scale
        return (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)

    def work_pixels(self, img: Image.Image) -> int:
        """Pixels that decoding and resizing ``img`` touch: the measure of its CPU cost (from the header alone)."""
        new_w, new_h = self.resized_size(*img.size)
        resized = new_w * new_h if new_w * new_h <= RESIZE_BUDGET_PIXELS else self.size * self.size
        return img.width * img.height + resized

    def __call__(self, img: Image.Image) -> np.ndarray:
        """A decoded image -> float32 (C, H, W), exactly as timm's eval transform."""
        out = np.empty((self.in_chans, self.size, self.size), np.float32)  # (C, H, W)
        self._into(img, out)
        return out

    def _into(self, img: Image.Image, out: np.ndarray) -> None:
        """Preprocess a decoded image into ``out``, float32 (C, H, W)."""
        w, h = img.size
        new_w, new_h = self.resized_size(w, h)
        if new_w * new_h > RESIZE_BUDGET_PIXELS:
            # An extreme aspect ratio (a 1 x 300,000 strip, resized to 256 px wide, is 77M pixels long): resize
            # only the region the center crop keeps. The same sampling positions; Pillow rounds the two passes of
            # a box resize a little differently, so a pixel can move by a few grey levels (tested).
            left, top = int(round((new_w - self.size) / 2.0)), int(round((new_h - self.size) / 2.0))
            sx, sy = w / new_w, h / new_h
            box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
            img = img.resize((self.size, self.size), INTERPOLATION[self.interpolation], box=box)
        elif (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), INTERPOLATION[self.interpolation])
        x = np.asarray(_center_crop(img, self.size), dtype=np.uint8)  # (H, W) for L, (H, W, C) for RGB
        if x.ndim == 2:
            np.take(self._lut[0], x, out=out[0], mode="clip")  # uint8 indices are always in range
        else:
            for c in range(self.in_chans):
                np.take(self._lut[c], x[:, :, c], out=out[c], mode="clip")

    def load(self, data: bytes, name: str = "image") -> np.ndarray:
        """Encoded image bytes -> float32 (C, H, W)."""
        return self(self.decode(self.decode_header(data, name)))

    def load_many(self, images: list[Image.Image], deadline: float | None = None) -> np.ndarray:
        """Lazily opened images -> float32 (N, C, H, W), one image in memory at a time.

        Raises:
            TimeoutError: ``time.monotonic()`` passed ``deadline`` before the last image was done.
        """
        out = np.empty((len(images), self.in_chans, self.size, self.size), np.float32)  # (N, C, H, W)
        for i in range(len(images)):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"preprocessing passed the request deadline after {i} of {len(images)} images")
            img, images[i] = images[i], None  # the caller's list lets go of it too
            try:
                self._into(self.decode(img), out[i])
            finally:
                # its decoded pixels go now, not when the whole request is done; some decoders (WebP) keep a
                # frame buffer of their own until the image object itself is gone
                img.close()
                del img
        return out


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's center_crop: zero-pad if smaller, then crop at round((dim - size) / 2)."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    if size > w or size > h:
        padded = Image.new(img.mode, (max(w, size), max(h, size)), 0)
        padded.paste(img, ((size - w) // 2 if size > w else 0, (size - h) // 2 if size > h else 0))
        img, (w, h) = padded, padded.size
        if (w, h) == (size, size):
            return img
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))
