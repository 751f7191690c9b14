"""Image patching and the token-stream layout of a collated batch."""

import numpy as np
import pytest
import torch
from modalmoe.runtime.data import (
    MODALITY_IMAGE,
    MODALITY_TEXT,
    ImageTransform,
    Sample,
    caption_ids,
    collate,
    patchify,
    unpatchify,
)
from PIL import Image


def test_patchify_order_and_inverse():
    image = np.arange(4 * 6 * 3, dtype=np.float32).reshape(4, 6, 3)  # [H, W, C]
    patches = patchify(image, 2)  # [2*3, 2*2*3]
    assert patches.shape == (6, 12)
    np.testing.assert_array_equal(patches[0], image[0:2, 0:2].reshape(-1))
    np.testing.assert_array_equal(patches[1], image[0:2, 2:4].reshape(-1))
    np.testing.assert_array_equal(patches[3], image[2:4, 0:2].reshape(-1))
    square = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(unpatchify(patchify(square, 4), 8, 4), square)


def test_transform_normalises_and_cuts_patches():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mean, std = [0.5, 0.25, 0.0], [0.5, 0.25, 2.0]
    patches = ImageTransform(16, 4, mean, std)(Image.fromarray(pixels))  # [16, 48]
    assert patches.shape == (16, 48) and patches.dtype == np.float32
    expected = (pixels / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(unpatchify(patches, 16, 4), expected, rtol=1e-5, atol=1e-6)


def test_transform_resizes_shorter_side_and_center_crops():
    # 40 wide x 20 high: left quarter red, middle half green, right quarter blue.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10, 0] = 255
    pixels[:, 10:30, 1] = 255
    pixels[:, 30:, 2] = 255
    t = ImageTransform(8, 4, [0, 0, 0], [1, 1, 1])
    out = t.to_pixels(Image.fromarray(pixels))  # shorter side 20 -> 8, width 16, crop middle 8
    assert out.shape == (8, 8, 3)
    assert out[:, 2:6, 1].min() > 0.9 and out[:, 2:6, [0, 2]].max() < 0.1
    gray = t.to_pixels(Image.fromarray(np.full((5, 5), 200, dtype=np.uint8)))
    assert gray.shape == (8, 8, 3)


class _Tok:
    bos_id, eos_id, pad_id = 2, 3, 0

    def encode(self, text):
        return [10 + len(w) for w in text.split()]


def test_caption_ids_truncate_but_keep_eos():
    assert caption_ids("a bb ccc", _Tok(), 8) == [2, 11, 12, 13, 3]
    assert caption_ids("a bb ccc dddd", _Tok(), 4) == [2, 11, 12, 3]


def _sample(key, ids, num_patches=4, dim=6):
    return Sample(key=key, patches=np.full((num_patches, dim), len(ids), dtype=np.float32), ids=ids)


@pytest.mark.parametrize("pad_to", [None, 7])
def test_collate_layout(pad_to):
    batch = collate([_sample("a", [2, 5, 3]), _sample("b", [2, 5, 6, 7, 3])], pad_id=0, pad_to=pad_to)
    length = 5 if pad_to is None else 7
    assert batch.keys == ["a", "b"] and batch.size == 2 and batch.num_patches == 4
    assert batch.patches.shape == (2, 4, 6) and batch.patches.dtype == torch.float32
    assert batch.text.shape == (2, length) and batch.text.dtype == torch.long
    assert batch.text[0].tolist() == [2, 5, 3] + [0] * (length - 3)
    assert batch.text_mask[0].tolist() == [True] * 3 + [False] * (length - 3)
    assert batch.text_mask[1].tolist() == [True] * 5 + [False] * (length - 5)
    assert batch.modality.shape == batch.mask.shape == (2, 4 + length)
    assert (batch.modality[:, :4] == MODALITY_IMAGE).all() and (batch.modality[:, 4:] == MODALITY_TEXT).all()
    assert batch.mask[:, :4].all()
    assert torch.equal(batch.mask[:, 4:], batch.text_mask)
    assert torch.equal(batch.mask[:, 4:], batch.text != 0)
    moved = batch.to("cpu")
    assert torch.equal(moved.text, batch.text) and moved.keys == batch.keys
