"""Multi-head self-attention: ``F.scaled_dot_product_attention`` with an explicit bool mask, or
FlexAttention with a ``BlockMask`` (models/masks.py), whichever mask the forward pass built.

Legend: B batch, S sequence, D hidden, N heads, K head_dim (D = N·K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .masks import AttentionMask, BlockMask
from .rope import apply_rotary

__all__ = ["Attention", "flex_attention"]

_compiled_flex = None


def flex_attention(q_BNSK: Tensor, k_BNSK: Tensor, v_BNSK: Tensor, block_mask: BlockMask) -> Tensor:
    """FlexAttention, compiled on CUDA (eager flex is an unfused reference that materialises the
    scores). torch has no FlexAttention backward on CPU, so CPU training uses the SDPA path."""
    global _compiled_flex
    from torch.nn.attention import flex_attention as fa

    if q_BNSK.device.type != "cuda":
        try:
            return fa.flex_attention(q_BNSK, k_BNSK, v_BNSK, block_mask=block_mask)
        except NotImplementedError as e:  # e.g. no backward on CPU
            raise NotImplementedError(f"model.attention=flex on {q_BNSK.device.type}: {e} "
                                      "Train there with model.attention=auto or sdpa") from e
    if _compiled_flex is None:
        _compiled_flex = torch.compile(fa.flex_attention)
    return _compiled_flex(q_BNSK, k_BNSK, v_BNSK, block_mask=block_mask)


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
        attn_mask_B1SS: AttentionMask,
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
        if BlockMask is not None and isinstance(attn_mask_B1SS, BlockMask):
            # no attention dropout here: FlexAttention has none (config and masks.py keep them apart)
            o_BNSK = flex_attention(q_BNSK, k_BNSK, v_BNSK, attn_mask_B1SS)
        else:
            o_BNSK = F.scaled_dot_product_attention(
                q_BNSK, k_BNSK, v_BNSK,
                attn_mask=attn_mask_B1SS,
                dropout_p=self.dropout if self.training else 0.0,
            )
        # num_heads is the local head count under tensor parallelism, so the width is not always D
        return self.wo(o_BNSK.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))
