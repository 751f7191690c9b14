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


class ImageTransform:
    """RGB, shorter side resized to ``image_size``, center crop, normalise, cut into patches."""

    def __init__(self, image_size: int, patch_size: int, mean: Sequence[float], std: Sequence[float]):
        self.image_size = image_size
        self.patch_size = patch_size
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 1, 3)

    def to_pixels(self, image: Image.Image) -> np.ndarray:
        """[H, W, 3] float32 in [0, 1] at the model's resolution."""
        s = self.image_size
        image = image.convert("RGB")
        w, h = image.size
        if (w, h) != (s, s):
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            image = image.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - s) // 2, (nh - s) // 2
            image = image.crop((left, top, left + s, top + s))
        return np.asarray(image, dtype=np.float32) / 255.0

    def __call__(self, image: Image.Image) -> np.ndarray:
        pixels = (self.to_pixels(image) - self.mean) / self.std  # [H, W, 3]
        return patchify(pixels.astype(np.float32, copy=False), self.patch_size)


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
