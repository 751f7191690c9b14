"""The image transform's fast paths: JPEG draft decoding (DCT-domain downscale) gives the size and,
within a few levels, the pixels of a full decode; resampling only the crop box gives the pixels of
resizing the whole image and cropping; the fused normalisation equals (x/255 - mean)/std."""

from __future__ import annotations

import io

import numpy as np
import pytest
from modalmoe.runtime.data.decode import ImageTransform, resize_then_crop
from PIL import Image

MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 90 * np.sin(x / (40 + 9 * c)) * np.cos(y / (31 - 5 * c)) for c in range(3)], -1)
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("size", [(512, 384), (384, 512), (640, 480), (300, 224), (1000, 224), (224, 224)])
def test_crop_box_resize_matches_resize_then_crop(size) -> None:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))  # worst case: noise
    got = ImageTransform(224, 16, MEAN, STD).to_pixels(image)
    want = resize_then_crop(image, 224)
    assert got.shape == want.shape == (224, 224, 3)
    diff = np.abs(got - want) * 255
    assert diff.max() <= 1.0 + 1e-4 and diff.mean() < 0.01  # box coordinates round in float: rare 1-level steps


@pytest.mark.parametrize("size,drafted", [((1024, 768), (512, 384)), ((2048, 1536), (512, 384)), ((768, 1024), (384, 512))])
def test_jpeg_draft_gives_the_full_decodes_size_and_close_pixels(size, drafted) -> None:
    source = _photo(*size)
    draft_image, full_image = _jpeg(source), _jpeg(source)
    got = ImageTransform(224, 16, MEAN, STD).to_pixels(draft_image)
    assert draft_image.size == drafted, "the JPEG was decoded at a reduced DCT scale"
    want = ImageTransform(224, 16, MEAN, STD, jpeg_draft=False).to_pixels(full_image)
    assert full_image.size == size
    assert got.shape == want.shape == (224, 224, 3)
    diff = np.abs(got - want) * 255
    assert diff.mean() < 1.0 and diff.max() <= 8, (diff.mean(), diff.max())  # seen here: 0.34 and 2 levels


def test_jpeg_under_twice_the_target_decodes_in_full() -> None:
    source = _photo(512, 384)
    a, b = _jpeg(source), _jpeg(source)
    got = ImageTransform(224, 16, MEAN, STD).to_pixels(a)
    assert a.size == (512, 384)
    np.testing.assert_array_equal(got, ImageTransform(224, 16, MEAN, STD, jpeg_draft=False).to_pixels(b))


def test_patches_equal_the_normalised_pixels() -> None:
    t = ImageTransform(224, 16, MEAN, STD)
    image = _photo(512, 384)
    pixels = (t.to_pixels(image) - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    grid = pixels.reshape(14, 16, 14, 16, 3).transpose(0, 2, 1, 3, 4).reshape(196, 768)
    np.testing.assert_allclose(t(image), grid, rtol=1e-5, atol=1e-5)
