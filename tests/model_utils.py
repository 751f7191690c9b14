"""A model-input batch for the model and tensor-parallel tests: B samples of image patches and a
caption padded to the config's max_text_len."""

from __future__ import annotations

import torch
from modalmoe.models import IMAGE, TEXT, ModelConfig


def make_batch(cfg: ModelConfig, B: int = 3, lengths: list[int] | None = None, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    L, P = cfg.max_text_len, cfg.num_patches
    lengths = lengths or [L, L - 2, 4][:B]
    text_BL = torch.randint(3, cfg.vocab_size, (B, L), generator=g)
    text_mask_BL = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    text_BL = text_BL.masked_fill(~text_mask_BL, 0)
    return {
        "patches": torch.randn(B, P, cfg.patch_dim, generator=g),
        "text": text_BL,
        "text_mask": text_mask_BL,
        "modality": torch.cat([torch.full((B, P), IMAGE), torch.full((B, L), TEXT)], 1),
        "mask": torch.cat([torch.ones(B, P, dtype=torch.bool), text_mask_BL], 1),
    }
