"""One raw webdataset sample (``key.jpg`` + ``key.txt`` bytes) -> image patches + caption token ids.

Everything that can be wrong with a single sample is detected here and reported as a
:class:`BadSample` carrying one of ``counts.SAMPLE_REASONS``, so the pipeline can skip and count it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .tokenizer import Tokenizer

__all__ = [
    "IMAGE_EXTS",
    "BadSample",
    "Sample",
    "ImageTransform",
    "resize_then_crop",
    "SampleDecoder",
    "patchify",
    "unpatchify",
    "caption_ids",
]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Sample:
    key: str
    patches: np.ndarray  # [num_patches, patch_size*patch_size*3] float32
    ids: list[int]  # bos + caption + eos, at most max_text_len


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """[H, W, C] -> [H/p * W/p, p*p*C]: patches in raster order, each flattened row-major (y, x, c)."""
    h, w, c = image.shape
    p = patch_size
    grid = image.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)  # [H/p, W/p, p, p, C]
    return np.ascontiguousarray(grid.reshape((h // p) * (w // p), p * p * c))


def unpatchify(patches: np.ndarray, image_size: int, patch_size: int) -> np.ndarray:
    """Inverse of :func:`patchify` for square images: [P, p*p*3] -> [H, W, 3]."""
    g, p = image_size // patch_size, patch_size
    grid = patches.reshape(g, g, p, p, 3).transpose(0, 2, 1, 3, 4)  # [H/p, p, W/p, p, 3]
    return grid.reshape(image_size, image_size, 3)


def _resize_size(w: int, h: int, s: int) -> tuple[int, int]:
    """The size whose shorter side is ``s`` (aspect kept), before the center crop."""
    scale = s / min(w, h)
    return max(s, round(w * scale)), max(s, round(h * scale))


def resize_then_crop(image: Image.Image, s: int) -> np.ndarray:
    """The plain way, kept as the reference that :class:`ImageTransform` is tested and timed
    against: full decode, resize all of it, center crop; [s, s, 3] float32 in [0, 1]."""
    image = image.convert("RGB")
    nw, nh = _resize_size(*image.size, s)
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - s) // 2, (nh - s) // 2
    return np.asarray(image.crop((left, top, left + s, top + s)), dtype=np.float32) / 255.0


class ImageTransform:
    """RGB, shorter side resized to ``image_size``, center crop, normalise, cut into patches.

    ``jpeg_draft``: a JPEG at least twice the resize target on both sides is decoded at 1/2, 1/4 or
    1/8 scale (``Image.draft``: libjpeg scales in the DCT, still no smaller than the target), so
    the decode and the resize touch a fraction of the pixels; the result differs from a full
    decode by a few levels (tests/test_decode_draft.py). A 512x384 source at 224 px is under
    2x and decodes in full. Only the crop is resampled (``resize(box=...)``): the same sample
    positions as resizing all of it and cropping, without computing the discarded columns.
    """

    def __init__(
        self, image_size: int, patch_size: int, mean: Sequence[float], std: Sequence[float], *, jpeg_draft: bool = True
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.jpeg_draft = jpeg_draft
        mean_ = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
        std_ = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)
        self.mean, self.std = mean_, std_
        self._scale = (1.0 / (255.0 * std_)).astype(np.float32)  # (x/255 - mean)/std = x*scale - shift
        self._shift = (mean_ / std_).astype(np.float32)

    def _resized(self, image: Image.Image) -> Image.Image:
        s = self.image_size
        if self.jpeg_draft and image.format == "JPEG":
            image.draft("RGB", _resize_size(*image.size, s))  # no-op once loaded
        image = image.convert("RGB")
        w, h = image.size
        if (w, h) == (s, s):
            return image
        nw, nh = _resize_size(w, h, s)
        left, top = (nw - s) // 2, (nh - s) // 2
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + s) * sx, (top + s) * sy)
        return image.resize((s, s), Image.Resampling.BICUBIC, box=box)

    def to_pixels(self, image: Image.Image) -> np.ndarray:
        """[H, W, 3] float32 in [0, 1] at the model's resolution."""
        return np.asarray(self._resized(image), dtype=np.float32) / 255.0

    def __call__(self, image: Image.Image) -> np.ndarray:
        pixels = np.asarray(self._resized(image), dtype=np.float32)  # [H, W, 3], 0..255
        pixels *= self._scale
        pixels -= self._shift
        return patchify(pixels, self.patch_size)


def caption_ids(text: str, tokenizer: Tokenizer, max_text_len: int) -> list[int]:
    """bos + caption ids + eos; long captions lose their tail but keep eos, so generation learns to stop."""
    ids = tokenizer.encode(text)[: max_text_len - 2]
    return [tokenizer.bos_id, *ids, tokenizer.eos_id]


class SampleDecoder:
    """Callable turning a grouped tar sample dict into a :class:`Sample` or raising :class:`BadSample`."""

    def __init__(self, transform: ImageTransform, tokenizer: Tokenizer, max_text_len: int):
        self.transform = transform
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len

    def __call__(self, sample: dict) -> Sample:
        key = sample.get("__key__", "?")
        image_bytes = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if image_bytes is None:
            raise BadSample("missing_image", key)
        if "txt" not in sample:
            raise BadSample("missing_caption", key)
        try:
            text = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as exn:
            raise BadSample("bad_utf8", f"{key}: {exn}") from exn
        if not text:
            raise BadSample("empty_caption", key)
        try:
            with Image.open(io.BytesIO(image_bytes)) as image:
                patches = self.transform(image)
        except Exception as exn:  # PIL raises many types for corrupt data
            raise BadSample("bad_image", f"{key}: {type(exn).__name__}: {exn}") from exn
        return Sample(key=key, patches=patches, ids=caption_ids(text, self.tokenizer, self.max_text_len))
