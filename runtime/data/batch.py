"""Collate decoded samples into one token stream per sample: image patches, then caption tokens.

The model embeds patches and text ids itself; the batch carries them together with the per-token
modality ids (routing can depend on them) and the attention/loss mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .decode import Sample

from ..modality import IMAGE as MODALITY_IMAGE
from ..modality import TEXT as MODALITY_TEXT

__all__ = ["MODALITY_IMAGE", "MODALITY_TEXT", "Batch", "collate"]



@dataclass
class Batch:
    """Stream layout per sample: positions [0, P) are image patches, [P, P+L) are text tokens.

    ``bad_counts`` holds the skips (reason -> count) the producing worker saw since its previous
    batch, and ``bad_shards`` the unreadable shards it met first since then (url -> error); the
    loader turns those into ``bad_counts["bad_shard"]``, the distinct shards it counts first with
    this batch. ``worker``/``raw_consumed`` let the loader record an exact resume point.
    """

    patches: torch.Tensor  # [B, P, patch_dim] float32
    text: torch.Tensor  # [B, L] int64, pad_id after the caption
    text_mask: torch.Tensor  # [B, L] bool, True on real text tokens
    modality: torch.Tensor  # [B, P+L] int64
    mask: torch.Tensor  # [B, P+L] bool, True on every image token and real text token
    keys: list[str]
    bad_counts: dict[str, int] = field(default_factory=dict)
    bad_shards: dict[str, str] = field(default_factory=dict)
    worker: int = 0
    raw_consumed: int = 0

    @property
    def size(self) -> int:
        return self.patches.shape[0]

    @property
    def num_patches(self) -> int:
        return self.patches.shape[1]

    def _map(self, fn) -> Batch:
        return replace(
            self,
            patches=fn(self.patches),
            text=fn(self.text),
            text_mask=fn(self.text_mask),
            modality=fn(self.modality),
            mask=fn(self.mask),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by torch's DataLoader when ``pin_memory=True``."""
        return self._map(lambda t: t.pin_memory())


def collate(samples: Sequence[Sample], pad_id: int, pad_to: int | None = None) -> Batch:
    """Stack samples; text is padded to the longest caption, or to ``pad_to`` when given."""
    b = len(samples)
    lengths = [len(s.ids) for s in samples]
    length = pad_to if pad_to is not None else max(lengths)
    patches = torch.from_numpy(np.stack([s.patches for s in samples]))  # [B, P, D]
    text = torch.full((b, length), pad_id, dtype=torch.long)  # [B, L]
    for i, s in enumerate(samples):
        text[i, : len(s.ids)] = torch.tensor(s.ids[:length], dtype=torch.long)
    text_mask = torch.arange(length).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # [B, L]
    p = patches.shape[1]
    modality = torch.cat(
        [
            torch.full((b, p), MODALITY_IMAGE, dtype=torch.long),
            torch.full((b, length), MODALITY_TEXT, dtype=torch.long),
        ],
        dim=1,
    )  # [B, P+L]
    mask = torch.cat([torch.ones(b, p, dtype=torch.bool), text_mask], dim=1)  # [B, P+L]
    return Batch(
        patches=patches,
        text=text,
        text_mask=text_mask,
        modality=modality,
        mask=mask,
        keys=[s.key for s in samples],
    )
