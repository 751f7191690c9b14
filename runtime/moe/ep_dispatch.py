"""Expert-parallel dispatch: the experts are spread over an EP group and token copies travel to them
by all-to-all. A :class:`~.dispatch.TokenDispatcher` like the local one, so the layer is unchanged;
:meth:`~.layer.MoELayer.apply_ep` installs it.

Legend: T tokens, k slots, H hidden, E experts (global), L = E / ep local experts, P = ep peers,
R rows this rank sends (its kept slots, grouped by global expert), N rows it receives.
Global expert e lives on EP rank ``e // L`` as local expert ``e % L``.

Path: ``ops.permute`` over global expert ids (rows come out grouped by destination peer) →
the per-expert counts reach the peers (riding the layer's all-gather of the routing sums over the
DP group, which contains the EP group; or an all-to-all of the [P, L] count matrix) → all-to-all
of exactly the R real rows (variable splits, no capacity padding on the wire) → regroup the N
received rows from peer-major to local-expert-major with one gather → experts → the reverse gather
and all-to-all → ``ops.unpermute`` with the gate weights. Capacity, when set, is applied by each
rank to its own slots (per-rank capacity, as in every EP system); dropless needs no agreement
between ranks at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ... import ops
from ..distributed import all_to_all_rows
from ..parallel_state import check_experts_divide
from .dispatch import TokenDispatcher

__all__ = ["AllToAllDispatcher", "EPPlan"]


@dataclass
class EPPlan:
    """What combine needs to send each expert output back and un-permute it."""

    plan: ops.PermutePlan  # the local permute over global experts
    send_splits: list[int]  # [P] rows sent to each peer in dispatch
    recv_splits: list[int]  # [P] rows received from each peer in dispatch
    to_expert_major_N: Tensor  # [N] received (peer-major) row feeding each expert-major row
    to_peer_major_N: Tensor  # [N] its inverse

    @property
    def dropped(self) -> Tensor:
        return self.plan.dropped


def _expert_major_order(counts_PL: Tensor, num_rows: int) -> Tensor:
    """Rows arrive as blocks (peer p, local expert l) in peer-major order; list, for each row of the
    (l, p)-ordered buffer, the arriving row that fills it. O(N + P·L), no host sync."""
    P, L = counts_PL.shape
    start_PL = (counts_PL.flatten().cumsum(0) - counts_PL.flatten()).view(P, L)
    counts_LP, start_LP = counts_PL.t().flatten(), start_PL.t().flatten()
    dest_start_LP = counts_LP.cumsum(0) - counts_LP
    shift_N = torch.repeat_interleave(start_LP - dest_start_LP, counts_LP, output_size=num_rows)
    return shift_N + torch.arange(num_rows, device=counts_PL.device)


def _reorder_rows(x_NH: Tensor, take_N: Tensor, put_N: Tensor) -> Tensor:
    """``x[take]`` for a permutation ``take`` with inverse ``put``, as a k = 1 gather whose backward
    is the inverse gather (see :func:`~modalmoe.ops.gather_rows`)."""
    return ops.gather_rows(x_NH, take_N, put_N.view(-1, 1))


class AllToAllDispatcher(TokenDispatcher):
    """Experts split evenly over ``group`` (the EP group); see the module docstring for the path.

    ``bytes_sent`` accumulates the row bytes this rank hands to the all-to-alls, per phase
    (``dispatch_fwd``, ``combine_fwd``, ``dispatch_bwd``, ``combine_bwd``), the block kept for
    itself included; ``meta_bytes`` counts the [P, L] int64 count matrices.
    """

    def __init__(self, num_experts: int, group):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        check_experts_divide(num_experts, self.ep_size)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.bytes_sent = dict.fromkeys(("dispatch_fwd", "combine_fwd", "dispatch_bwd", "combine_bwd"), 0)
        self.meta_bytes = 0
        self._positions: dict = {}

    @property
    def total_bytes_sent(self) -> int:
        return sum(self.bytes_sent.values())

    def reset_counters(self) -> None:
        self.bytes_sent = dict.fromkeys(self.bytes_sent, 0)
        self.meta_bytes = 0

    def _counter(self, phase: str):
        def on_send(direction: str, nbytes: int) -> None:
            self.bytes_sent[f"{phase}_{direction}"] += nbytes

        return on_send

    def permute(self, x_TH: Tensor, idx_Tk: Tensor, capacity: int | None) -> tuple[Tensor, ops.PermutePlan]:
        """Rows grouped by global expert, hence by destination peer."""
        return ops.permute(x_TH, idx_Tk, self.num_experts, capacity=capacity)

    def shared_counts(self, plan: ops.PermutePlan) -> Tensor:
        """What every peer must learn from this rank before the rows move: rows per global expert."""
        return plan.counts

    def _peer_positions(self, rows_group) -> list[int]:
        """Where each EP peer's row sits in a gather over ``rows_group`` (which must contain them)."""
        if rows_group not in self._positions:
            members = dist.get_process_group_ranks(rows_group)
            peers = dist.get_process_group_ranks(self.group)
            missing = [r for r in peers if r not in members]
            if missing:
                raise ValueError(f"EP peers {missing} are not in the group the expert counts were gathered over")
            self._positions[rows_group] = [members.index(r) for r in peers]
        return self._positions[rows_group]

    def send(self, x_RH: Tensor, plan: ops.PermutePlan, counts_rows: Tensor | None = None, rows_group=None):
        """Exchange the rows; returns (rows for the local experts, expert-major; the plan; rows per
        local expert [L]). ``counts_rows`` are the peers' :meth:`shared_counts` gathered over
        ``rows_group`` (by the layer, with the routing sums); without them the counts go by an
        all-to-all of their own."""
        P, L = self.ep_size, self.num_local_experts
        send_PL = plan.counts.view(P, L).contiguous()  # rows for peer p's local expert l
        if counts_rows is None:
            recv_PL = torch.empty_like(send_PL)  # rows from peer p for my local expert l
            dist.all_to_all_single(recv_PL, send_PL, group=self.group)
        else:
            mine = counts_rows[:, self.ep_rank * L : (self.ep_rank + 1) * L]
            recv_PL = mine[self._peer_positions(rows_group)].to(torch.int64)
        self.meta_bytes += send_PL.numel() * send_PL.element_size()
        # the layer's one host sync: the split sizes, and the rows per local expert with them
        host = torch.cat([send_PL.sum(1), recv_PL.sum(1), recv_PL.sum(0)]).tolist()
        splits = [host[:P], host[P : 2 * P]]
        x_NH = all_to_all_rows(x_RH, splits[0], splits[1], self.group, self._counter("dispatch"))
        order_N = _expert_major_order(recv_PL, x_NH.shape[0])
        inverse_N = torch.empty_like(order_N)
        inverse_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
        ep_plan = EPPlan(plan, splits[0], splits[1], order_N, inverse_N)
        return _reorder_rows(x_NH, order_N, inverse_N), ep_plan, host[2 * P :]

    def combine(self, y_NH: Tensor, ep_plan: EPPlan, weights_Tk: Tensor) -> Tensor:
        y_peer_NH = _reorder_rows(y_NH, ep_plan.to_peer_major_N, ep_plan.to_expert_major_N)
        y_RH = all_to_all_rows(y_peer_NH, ep_plan.recv_splits, ep_plan.send_splits, self.group, self._counter("combine"))
        return ops.unpermute(y_RH, ep_plan.plan, weights_Tk)
