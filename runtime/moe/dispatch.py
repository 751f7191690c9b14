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
    """All experts live on this rank.

    Dispatch comes in two halves so that an expert-parallel dispatcher can share one collective
    with the routing sums: :meth:`permute` (local), then :meth:`send` given what
    :meth:`shared_counts` asked to have gathered (nothing, here).
    """

    def __init__(self, num_experts: int, pad_multiple: int = 1):
        self.num_experts = num_experts
        self.pad_multiple = pad_multiple

    def permute(self, x_TH: Tensor, idx_Tk: Tensor, capacity: int | None) -> tuple[Tensor, ops.PermutePlan]:
        return ops.permute(x_TH, idx_Tk, self.num_experts, pad_multiple=self.pad_multiple, capacity=capacity)

    def shared_counts(self, plan: ops.PermutePlan) -> Tensor | None:
        return None

    def send(self, x_RH: Tensor, plan: ops.PermutePlan, counts_rows=None, rows_group=None):
        """Returns (rows for the local experts, what combine needs, rows per local expert: a tensor,
        or a list when the dispatcher already had to bring the counts to the host)."""
        return x_RH, plan, plan.padded_counts

    def combine(self, y_RH: Tensor, plan: ops.PermutePlan, weights_Tk: Tensor) -> Tensor:
        return ops.unpermute(y_RH, plan, weights_Tk)
