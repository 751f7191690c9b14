"""The communication at the edges of a tensor-parallel region, as autograd functions.

A TP region is the stretch between a column-parallel layer's input and a row-parallel layer's output,
where every rank holds a different slice of the features. Entering it, the activation is replicated,
so its gradient is a sum of per-rank partial gradients (identity forward, all-reduce backward);
leaving it, the per-rank partial outputs are summed (all-reduce forward, identity backward). Each
pair costs one all-reduce forward and one backward, and the activations and gradients outside the
region come out identical on every TP rank, which keeps replicated parameters in step.

The group is always passed in; a group of one rank makes every function an identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from ..distributed import polled

__all__ = ["copy_to_tp_region", "reduce_from_tp_region", "gather_from_tp_region"]


def _all_reduce(x: Tensor, group: ProcessGroup) -> Tensor:
    if dist.get_world_size(group) == 1:
        return x
    x = x.contiguous().clone()
    polled(dist.all_reduce, x, group=group)
    return x


def _all_gather_last(x: Tensor, group: ProcessGroup) -> Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    polled(dist.all_gather, parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _local_slice_last(x: Tensor, group: ProcessGroup) -> Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    return x.chunk(world, dim=-1)[dist.get_rank(group)].contiguous()


class _CopyToTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _GatherFromTPRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return _all_gather_last(x, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _local_slice_last(grad, ctx.group), None


def copy_to_tp_region(x: Tensor, group: ProcessGroup) -> Tensor:
    """Identity forward, all-reduce backward: where a replicated activation enters a TP region."""
    return _CopyToTPRegion.apply(x, group)


def reduce_from_tp_region(x: Tensor, group: ProcessGroup) -> Tensor:
    """All-reduce forward, identity backward: sums per-rank partial outputs when leaving a TP region."""
    return _ReduceFromTPRegion.apply(x, group)


def gather_from_tp_region(x: Tensor, group: ProcessGroup) -> Tensor:
    """All-gather on the last dim forward (rank order), keep this rank's slice backward: turns a
    feature-sharded activation into the full one when a column-parallel output is needed whole."""
    return _GatherFromTPRegion.apply(x, group)
