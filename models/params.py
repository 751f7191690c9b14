"""Parameter counts: total, and active per token (what one token's forward pass actually multiplies)."""

from __future__ import annotations

from torch import nn

from ..runtime.moe import MoELayer

__all__ = ["count_parameters"]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(total, active_per_token)``. Active = everything except routed experts, plus top_k/num_experts
    of the routed expert weights (the largest per-modality top_k when they differ). Tied weights are
    counted once. Under expert parallelism the experts are this rank's local ones."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for module in model.modules():
        if isinstance(module, MoELayer):
            routed = sum(p.numel() for p in module.experts.parameters())
            inactive += routed * (1.0 - module.cfg.max_top_k / module.cfg.num_experts)
    return total, total - round(inactive)
