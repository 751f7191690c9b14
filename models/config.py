"""ModelConfig: the shape of the early-fusion multimodal transformer, validated once at start."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ..runtime.config import check
from ..runtime.modality import NUM_MODALITIES
from ..runtime.moe.config import MoEConfig

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    # hidden size of the dense (non-MoE) FFN layers; MoE experts use moe.ffn_hidden_size
    ffn_hidden_size: int = 256
    # layer i (0-based) is MoE when (i + 1) % moe_every == 0; 1 = every layer, 0 = all dense
    moe_every: int = 1
    image_size: int = 32
    patch_size: int = 8
    channels: int = 3
    max_text_len: int = 32
    pos: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    activation: Literal["gelu", "silu", "swiglu"] = "gelu"  # of the dense FFN layers
    tie_embeddings: bool = True
    contrastive_coef: float = 0.0
    dropout: float = 0.0
    init_std: float = 0.02
    norm_eps: float = 1e-6
    # auto: FlexAttention (fused kernel, block-sparse prefix-LM mask) on CUDA when available and
    # dropout is 0, else SDPA with a dense mask; flex has no attention dropout nor a CPU backward
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        # the MoE layers work on the model's hidden states: moe.hidden_size 0 (the default) is filled
        # in here, once, so that validate() only checks
        if self.moe.hidden_size == 0:
            self.moe = dataclasses.replace(self.moe, hidden_size=self.hidden_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

    @property
    def max_seq_len(self) -> int:
        return self.num_patches + self.max_text_len

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_every > 0 and (layer + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def validate(self, prefix: str = "model") -> ModelConfig:
        p = prefix
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size",
                     "image_size", "patch_size", "channels"):
            v = getattr(self, name)
            check(v > 0, f"{p}.{name}", f"must be positive, got {v}")
        check(
            self.hidden_size % self.num_heads == 0,
            f"{p}.num_heads",
            f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}; "
            f"pick a divisor such as {_divisor_near(self.hidden_size, self.num_heads)}",
        )
        if self.pos == "rope":
            check(self.head_dim % 2 == 0, f"{p}.num_heads",
                  f"rotary positions need an even head_dim, got hidden_size/num_heads={self.head_dim}")
            check(self.rope_theta > 0, f"{p}.rope_theta", f"must be > 0, got {self.rope_theta}")
        check(
            self.image_size % self.patch_size == 0,
            f"{p}.patch_size",
            f"patch_size={self.patch_size} must divide image_size={self.image_size}",
        )
        check(self.max_text_len >= 2, f"{p}.max_text_len",
              f"needs room for at least bos and eos, got {self.max_text_len}")
        check(self.moe_every >= 0, f"{p}.moe_every", f"must be >= 0 (0 = no MoE layers), got {self.moe_every}")
        check(self.contrastive_coef >= 0, f"{p}.contrastive_coef", f"must be >= 0 (0 = off), got {self.contrastive_coef}")
        check(0.0 <= self.dropout < 1.0, f"{p}.dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.init_std > 0, f"{p}.init_std", f"must be > 0, got {self.init_std}")
        check(self.norm_eps > 0, f"{p}.norm_eps", f"must be > 0, got {self.norm_eps}")
        check(self.attention in ("auto", "sdpa", "flex"), f"{p}.attention",
              f"choose one of auto, sdpa, flex; got {self.attention!r}")
        if self.attention == "flex":
            check(self.dropout == 0.0, f"{p}.attention",
                  f"flex has no attention dropout but {p}.dropout={self.dropout}; set it to 0 or use sdpa/auto")
            check(self.head_dim >= 16, f"{p}.attention",
                  f"flex's fused kernel needs head_dim >= 16 but hidden_size/num_heads={self.head_dim}; "
                  "use fewer heads, or sdpa/auto")
            check(_has_flex(), f"{p}.attention",
                  "flex needs torch.nn.attention.flex_attention (torch >= 2.5); use sdpa or auto")
        if self.moe_layers:
            check(
                self.moe.hidden_size == self.hidden_size,
                f"{p}.moe.hidden_size",
                f"is {self.moe.hidden_size} but model.hidden_size is {self.hidden_size}; "
                f"set {p}.moe.hidden_size={self.hidden_size} (the MoE layer works on the model's hidden states)",
            )
            check(
                self.moe.num_modalities == NUM_MODALITIES,
                f"{p}.moe.num_modalities",
                f"this model has exactly {NUM_MODALITIES} modalities (0 = image, 1 = text); "
                f"set it to {NUM_MODALITIES}, got {self.moe.num_modalities}",
            )
            self.moe.validate(f"{p}.moe")
        return self


def _has_flex() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))
