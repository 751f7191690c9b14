"""Rotary position embedding (RoPE): rotates query/key channel pairs by a position-dependent angle.

Legend: B batch, N heads, S sequence, K head_dim.
Image patches take positions 0..P-1 (raster order) and text tokens P..P+L-1, so a text-only pass
reuses the positions text has in the joint sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Rotary", "apply_rotary"]


class Rotary(nn.Module):
    """Holds the cos/sin tables for every position up to ``max_len`` (float32, not checkpointed)."""

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles_SK2 = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos_SK2", angles_SK2.cos().float(), persistent=False)
        self.register_buffer("sin_SK2", angles_SK2.sin().float(), persistent=False)

    def forward(self, positions_S: Tensor) -> tuple[Tensor, Tensor]:
        return self.cos_SK2[positions_S], self.sin_SK2[positions_S]


def apply_rotary(x_BNSK: Tensor, cos_SK2: Tensor, sin_SK2: Tensor) -> Tensor:
    """Rotate the pairs (x[..., i], x[..., i + K/2]) in float32, return in x's dtype."""
    x1, x2 = x_BNSK.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos_SK2 - x2 * sin_SK2, x2 * cos_SK2 + x1 * sin_SK2), dim=-1)
    return out.to(x_BNSK.dtype)
