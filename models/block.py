"""Pre-norm transformer block whose FFN is either dense or a Mixture-of-Experts layer.

Legend: B batch, S sequence, D hidden.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..runtime.moe import MoELayer
from ..runtime.moe.experts import MLP
from .attention import Attention
from .config import ModelConfig
from .masks import AttentionMask
from .norm import RMSNorm

__all__ = ["TransformerBlock"]


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x)). A MoE FFN also returns its aux (loss + routing stats).

    The dense FFN is the MoE runtime's own ``MLP`` (the one shared experts use), so dense and expert
    FFNs compute the same function and differ only in routing.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.is_moe = cfg.is_moe_layer(layer_id)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn = (
            MoELayer(cfg.moe) if self.is_moe
            else MLP(cfg.hidden_size, cfg.ffn_hidden_size, cfg.activation, cfg.init_std)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x_BSD: Tensor,
        modality_BS: Tensor,
        mask_BS: Tensor,
        attn_mask_B1SS: AttentionMask,  # dense bool [B, 1, S, S] or a FlexAttention BlockMask
        rotary: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, Any | None]:
        x_BSD = x_BSD + self.drop(self.attn(self.attn_norm(x_BSD), attn_mask_B1SS, rotary))
        h_BSD = self.ffn_norm(x_BSD)
        if self.is_moe:
            y_BSD, aux = self.ffn(h_BSD, modality_BS, mask_BS)
        else:
            y_BSD, aux = self.ffn(h_BSD), None
        return x_BSD + self.drop(y_BSD), aux
