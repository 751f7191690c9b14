"""Multi-head self-attention through ``F.scaled_dot_product_attention`` with an explicit mask.

Legend: B batch, S sequence, D hidden, N heads, K head_dim (D = N·K).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .rope import apply_rotary

__all__ = ["Attention"]


class Attention(nn.Module):
    """Separate q/k/v projections (each column-parallel along heads; a fused QKV weight would mix q, k
    and v inside one tensor-parallel shard) and an output projection (row-parallel)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.dropout = cfg.dropout
        D = cfg.hidden_size
        self.wq = nn.Linear(D, D, bias=False)
        self.wk = nn.Linear(D, D, bias=False)
        self.wv = nn.Linear(D, D, bias=False)
        self.wo = nn.Linear(D, D, bias=False)

    def forward(
        self,
        x_BSD: Tensor,
        attn_mask_B1SS: Tensor,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        B, S, _ = x_BSD.shape
        q_BNSK, k_BNSK, v_BNSK = (
            w(x_BSD).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
            for w in (self.wq, self.wk, self.wv)
        )
        if rotary is not None:
            q_BNSK = apply_rotary(q_BNSK, *rotary)
            k_BNSK = apply_rotary(k_BNSK, *rotary)
        o_BNSK = F.scaled_dot_product_attention(
            q_BNSK, k_BNSK, v_BNSK,
            attn_mask=attn_mask_B1SS,
            dropout_p=self.dropout if self.training else 0.0,
        )
        # num_heads is the local head count under tensor parallelism, so the width is not always D
        return self.wo(o_BNSK.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))
