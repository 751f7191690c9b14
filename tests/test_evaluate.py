"""The eval's image-ablated baseline: captions scored with other samples' images."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from modalmoe.runtime.data.batch import Batch
from modalmoe.train.evaluate import _other_images, evaluate


def _batch(ids: list[int], P: int = 3, L: int = 4) -> Batch:
    """Sample b's image is filled with ids[b]; its caption is ids[b] repeated."""
    B = len(ids)
    patches = torch.tensor(ids, dtype=torch.float32)[:, None, None].expand(B, P, 2).clone()
    text = torch.tensor(ids)[:, None].expand(B, L).clone()
    return Batch(patches=patches, text=text, text_mask=torch.ones(B, L, dtype=torch.bool),
                 modality=torch.zeros(B, P + L, dtype=torch.long), mask=torch.ones(B, P + L, dtype=torch.bool),
                 keys=[str(i) for i in ids])


class _ImageReader(torch.nn.Module):
    """Caption NLL 0 per token when the image matches the caption, 1 otherwise (or always 0.5 when
    it ignores images): the ablated loss is then the share of mismatched pairs."""

    def __init__(self, reads_images: bool):
        super().__init__()
        self.reads_images = reads_images

    def forward(self, batch):
        targets = batch.text_mask[:, 1:]
        if self.reads_images:
            wrong = (batch.patches[:, 0, 0] != batch.text[:, 0].float()).double()
            nll = (wrong[:, None] * targets).sum()
        else:
            nll = 0.5 * targets.sum().double()
        return SimpleNamespace(caption_nll_sum=nll, num_text_tokens=targets.sum())


def _eval(model, batches):
    return evaluate(model, batches, torch.device("cpu"), max_batches=len(batches), retrieval_size=0,
                    pad_id=0, vocab_size=16)


def test_every_caption_gets_another_samples_image():
    collected = [_batch([1, 2, 3]), _batch([4]), _batch([5])]
    rolled, shuffled = _other_images(collected, 0)
    assert shuffled and rolled[:, 0, 0].tolist() == [3.0, 1.0, 2.0]
    other, shuffled = _other_images(collected, 1)  # one sample: the next batch of the same shape
    assert shuffled and other[0, 0, 0].item() == 5.0
    blank, shuffled = _other_images([_batch([7])], 0)
    assert not shuffled and blank.abs().sum() == 0


def test_the_ablated_loss_measures_what_the_image_explains():
    batches = [_batch([1, 2, 3, 4]), _batch([5, 6])]
    reader = _eval(_ImageReader(reads_images=True), batches)
    assert reader["caption_loss"] == 0.0
    assert reader["image_ablated_loss"] == pytest.approx(1.0)  # every swapped image is wrong
    assert reader["image_explained_loss"] == pytest.approx(1.0)
    assert reader["image_ablation_shuffled"] == 1.0
    blind = _eval(_ImageReader(reads_images=False), batches)
    assert blind["image_ablated_loss"] == blind["caption_loss"] == pytest.approx(0.5)
    assert blind["image_explained_loss"] == 0.0


def test_a_single_sample_is_ablated_with_a_blank_image_and_says_so():
    result = _eval(_ImageReader(reads_images=True), [_batch([3])])
    assert result["image_ablation_shuffled"] == 0.0
    assert result["image_ablated_loss"] == pytest.approx(1.0)  # blank (0) never matches caption 3
