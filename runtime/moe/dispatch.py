"""Dispatch: move routed token copies to their experts and bring the results back.

Legend: T tokens, k slots, H hidden, R permuted rows, E experts. The local dispatcher is a permute
into expert order and a weighted un-permute; an expert-parallel dispatcher adds the all-to-all
between the two and keeps the same interface, so the layer does not know which one it has.
"""

from __future__ import annotations

from torch import Tensor

from ... import ops

__all__ = ["LocalDispatcher"]


class LocalDispatcher:
    """All experts live on this rank."""

    def __init__(self, num_experts: int, pad_multiple: int = 1):
        self.num_experts = num_experts
        self.pad_multiple = pad_multiple

    def dispatch(self, x_TH: Tensor, idx_Tk: Tensor, capacity: int | None) -> tuple[Tensor, "ops.PermutePlan", Tensor]:
        """Returns (rows for the local experts, the plan, rows per local expert)."""
        x_RH, plan = ops.permute(x_TH, idx_Tk, self.num_experts, pad_multiple=self.pad_multiple, capacity=capacity)
        return x_RH, plan, plan.padded_counts

    def combine(self, y_RH: Tensor, plan: "ops.PermutePlan", weights_Tk: Tensor) -> Tensor:
        return ops.unpermute(y_RH, plan, weights_Tk)
