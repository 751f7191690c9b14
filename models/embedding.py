"""Early-fusion input embedding: image patches and text tokens become one token sequence.

Legend: B batch, P patches, C patch_dim (patch_size² · channels), L text length, S sequence, D hidden.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..runtime.modality import NUM_MODALITIES
from .config import ModelConfig

__all__ = ["MultimodalEmbedding"]


class MultimodalEmbedding(nn.Module):
    """ViT-style linear patch embedding + token embedding, plus a learned modality embedding on every
    token (so shared attention and FFN weights can tell the modalities apart in the hidden state itself),
    plus learned absolute positions when ``pos == "learned"`` (rotary positions live in attention)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.patch = nn.Linear(cfg.patch_dim, D, bias=False)
        self.tokens = nn.Embedding(cfg.vocab_size, D)
        self.modality = nn.Embedding(NUM_MODALITIES, D)
        self.position = nn.Embedding(cfg.max_seq_len, D) if cfg.pos == "learned" else None

    def forward(
        self,
        patches_BPC: Tensor | None,
        text_BL: Tensor | None,
        modality_BS: Tensor,
        positions_S: Tensor,
    ) -> Tensor:
        """Either part may be None (image-only or text-only pass); the sequence is image then text."""
        parts = []
        if patches_BPC is not None:
            parts.append(self.patch(patches_BPC.to(self.patch.weight.dtype)))
        if text_BL is not None:
            parts.append(self.tokens(text_BL))
        x_BSD = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        x_BSD = x_BSD + self.modality(modality_BS)
        if self.position is not None:
            x_BSD = x_BSD + self.position(positions_S)
        return x_BSD

