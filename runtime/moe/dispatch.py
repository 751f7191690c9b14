"""Dispatch: move routed token copies to their experts and bring the results back.

Legend: T tokens, k slots, H hidden, R permuted rows, E experts. :class:`TokenDispatcher` is what
the layer calls; the local dispatcher is a permute into expert order and a weighted un-permute, the
expert-parallel one (``ep_dispatch.AllToAllDispatcher``) adds the all-to-all between the two, so
the layer does not know which one it has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor

from ... import ops

__all__ = ["TokenDispatcher", "LocalDispatcher"]


class TokenDispatcher(ABC):
    """Dispatch comes in two halves so that an expert-parallel dispatcher can share one collective
    with the routing sums: :meth:`permute` (local), then :meth:`send` given what
    :meth:`shared_counts` asked to have gathered; :meth:`combine` undoes both."""

    num_experts: int  # global expert ids the router picks from

    @abstractmethod
    def permute(self, x_TH: Tensor, idx_Tk: Tensor, capacity: int | None) -> tuple[Tensor, ops.PermutePlan]:
        """Rows grouped by (global) expert and the plan; ``capacity`` caps each expert's slots."""

    @abstractmethod
    def shared_counts(self, plan: ops.PermutePlan) -> Tensor | None:
        """What every peer must learn from this rank before the rows move (None: nothing)."""

    @abstractmethod
    def send(self, x_RH: Tensor, plan: ops.PermutePlan, counts_rows: Tensor | None = None,
             rows_group=None) -> tuple[Tensor, Any, Tensor | list[int]]:
        """Returns (rows for the local experts, grouped by local expert; what :meth:`combine` needs;
        rows per local expert: a tensor, or a list when the dispatcher already had to bring the
        counts to the host). ``counts_rows`` are the peers' :meth:`shared_counts` gathered over
        ``rows_group``, or None."""

    @abstractmethod
    def combine(self, y_RH: Tensor, combine_plan: Any, weights_Tk: Tensor) -> Tensor:
        """Expert outputs back in token order [T, H], each token's rows mixed with its gate weights."""


class LocalDispatcher(TokenDispatcher):
    """All experts live on this rank: nothing to share, nothing to send."""

    def __init__(self, num_experts: int, pad_multiple: int = 1):
        self.num_experts = num_experts
        self.pad_multiple = pad_multiple

    def permute(self, x_TH: Tensor, idx_Tk: Tensor, capacity: int | None) -> tuple[Tensor, ops.PermutePlan]:
        return ops.permute(x_TH, idx_Tk, self.num_experts, pad_multiple=self.pad_multiple, capacity=capacity)

    def shared_counts(self, plan: ops.PermutePlan) -> Tensor | None:
        return None

    def send(self, x_RH: Tensor, plan: ops.PermutePlan, counts_rows: Tensor | None = None, rows_group=None):
        return x_RH, plan, plan.padded_counts

    def combine(self, y_RH: Tensor, plan: ops.PermutePlan, weights_Tk: Tensor) -> Tensor:
        return ops.unpermute(y_RH, plan, weights_Tk)
