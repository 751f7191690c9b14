"""Small torch.distributed helpers: process-group init from the launch description, differentiable
collectives that behave the same on gloo and NCCL, and DeepSpeed's gradient-reduction rule.

Legend: R rows (permuted token copies), H hidden. Every collective takes its group explicitly.
The autograd collectives are written here rather than taken from ``torch.distributed.nn`` so that
their backward is exactly the one the parity tests rely on (all-reduce: SUM of the grads;
all-to-all: the reverse exchange with swapped splits) and so that rows on the wire can be counted.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from .launch_info import LaunchInfo

__all__ = [
    "init_process_group",
    "init_from_env",
    "polled",
    "set_busy_wait",
    "all_reduce_sum",
    "shared_loss_sum",
    "all_to_all_rows",
    "reduce_gradients",
    "is_expert_param",
]


def init_process_group(launch: LaunchInfo, backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the job ``launch`` describes, rendezvousing at its master address and port (default
    127.0.0.1:29500, the torch.distributed default, when the launcher named none).

    Returns (rank, world_size). Does nothing but report if a group is already initialised.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    host = launch.master_addr or "127.0.0.1"
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    dist.init_process_group(
        backend, init_method=f"tcp://{host}:{launch.master_port or 29500}", rank=launch.rank,
        world_size=launch.world_size, timeout=timedelta(seconds=timeout_s),
    )
    return launch.rank, launch.world_size


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """:func:`init_process_group` for the job ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
    describe (torchrun, the deepspeed launcher); a lone process with none of them set becomes a world of one."""
    return init_process_group(LaunchInfo.from_env(), backend, timeout_s)


_busy_wait = True


def set_busy_wait(enabled: bool) -> None:
    """Whether :func:`polled` gloo collectives poll for completion (``parallel.busy_wait``)."""
    global _busy_wait
    _busy_wait = enabled


def polled(collective: Callable, *args, group=None, **kwargs) -> None:
    """Run a blocking ``torch.distributed`` collective; on gloo, wait for it by polling.

    A rank that sleeps in a gloo collective must be woken by its I/O thread when the peer's data
    lands, which costs the rank arriving last a wake-up per collective. Polling (yielding the core
    between polls, so the I/O thread runs at once) keeps the core awake, as MPI libraries do by
    default; what it saved on the EP=2 step is in docs/benchmarks.md. NCCL and
    ``set_busy_wait(False)`` keep the plain blocking call; the trainer turns polling off when the
    local ranks' threads outnumber the cores (a polling rank would then take a computing rank's).
    """
    if not _busy_wait or dist.get_backend(group) != "gloo":
        collective(*args, group=group, **kwargs)
        return
    work = collective(*args, group=group, async_op=True, **kwargs)
    while not work.is_completed():
        os.sched_yield()
    work.wait()  # raises what the collective raised (a timeout, a lost peer)


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_ranks x. Every rank's loss depends on y, so dL/dx on one rank is Σ_ranks dL_r/dy."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        y = x.clone()
        polled(dist.all_reduce, y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous().clone()
        polled(dist.all_reduce, g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def all_reduce_sum(x: Tensor, group) -> Tensor:
    """Differentiable SUM all-reduce over ``group`` (out of place)."""
    return _AllReduceSum.apply(x, group)


# torch 2.13 renamed all_gather_into_tensor (which now warns on every job) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _SharedLossSum(torch.autograd.Function):
    """y = Σ_ranks x, computed by an all-gather that also carries one ``extra`` row per rank.

    Backward has no collective. It is only valid for sums that every rank turns into the same
    loss with the same weight (the MoE routing sums: all ranks build the aux loss from the same
    global y and add it unscaled), so dL/dy is identical everywhere and the all-reduce backward,
    Σ_ranks dL_r/dy, equals n · dL/dy computed locally.
    """

    @staticmethod
    def forward(ctx, x: Tensor, extra: Tensor | None, group) -> tuple[Tensor, Tensor]:
        n = dist.get_world_size(group)
        ctx.n = n
        row = x.reshape(-1).double() if extra is None else torch.cat([x.reshape(-1).double(), extra.reshape(-1).double()])
        rows = row.new_empty(n * row.numel())
        polled(_all_gather_single, rows, row, group=group)
        rows = rows.view(n, -1)
        extras = rows[:, x.numel():]
        ctx.mark_non_differentiable(extras)
        return rows[:, : x.numel()].sum(0).to(x.dtype).view_as(x), extras

    @staticmethod
    def backward(ctx, g: Tensor, _extras_grad):
        return g * ctx.n, None, None


def shared_loss_sum(x: Tensor, group, extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(Σ_ranks x, every rank's ``extra`` as float64 rows [n, extra.numel()]) in one collective.
    Exact for integer extras below 2**53; see :class:`_SharedLossSum` for when its gradient holds."""
    return _SharedLossSum.apply(x, extra, group)


def _row_bytes(x: Tensor) -> int:
    return math.prod(x.shape[1:]) * x.element_size()


class _AllToAllRows(torch.autograd.Function):
    """Variable-split all-to-all of rows; backward sends the grads back along the same routes."""

    @staticmethod
    def forward(ctx, x_RH: Tensor, send_splits: list[int], recv_splits: list[int], group, on_send) -> Tensor:
        ctx.group, ctx.send_splits, ctx.recv_splits, ctx.on_send = group, send_splits, recv_splits, on_send
        out_RH = x_RH.new_empty(sum(recv_splits), *x_RH.shape[1:])
        polled(dist.all_to_all_single, out_RH, x_RH.contiguous(), recv_splits, send_splits, group=group)
        if on_send is not None:
            on_send("fwd", sum(send_splits) * _row_bytes(x_RH))
        return out_RH

    @staticmethod
    def backward(ctx, g_RH: Tensor):
        g_RH = g_RH.contiguous()
        out_RH = g_RH.new_empty(sum(ctx.send_splits), *g_RH.shape[1:])
        polled(dist.all_to_all_single, out_RH, g_RH, ctx.send_splits, ctx.recv_splits, group=ctx.group)
        if ctx.on_send is not None:
            ctx.on_send("bwd", sum(ctx.recv_splits) * _row_bytes(g_RH))
        return out_RH, None, None, None, None


def all_to_all_rows(
    x_RH: Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group,
    on_send: Callable[[str, int], None] | None = None,
) -> Tensor:
    """Send ``x_RH[block i]`` (``send_splits[i]`` rows) to group rank i; receive ``recv_splits[j]``
    rows from group rank j, concatenated in rank order. Differentiable.

    ``on_send(direction, nbytes)`` is told the bytes this rank hands to the collective, in the
    forward ("fwd") and backward ("bwd") exchange, including the block it keeps for itself.
    """
    if len(send_splits) != len(recv_splits) or sum(send_splits) != x_RH.shape[0]:
        raise ValueError(f"splits {send_splits} / {recv_splits} do not fit {x_RH.shape[0]} rows")
    return _AllToAllRows.apply(x_RH, list(send_splits), list(recv_splits), group, on_send)


def is_expert_param(p: Tensor) -> bool:
    """DeepSpeed's test (``deepspeed.moe.utils.is_moe_param``): an ``allreduce = False`` attribute."""
    return getattr(p, "allreduce", True) is False


@torch.no_grad()
def reduce_gradients(params: Iterable[Tensor], dp_group, edp_group, dp_size: int | None = None) -> None:
    """Data-parallel gradient averaging the way DeepSpeed's engine does it.

    Dense grads: SUM over the DP group / dp. Expert grads (``is_expert_param``): SUM over the
    expert-data-parallel group / dp as well (not / edp): an expert's grad already holds the
    contributions of the ``ep`` ranks whose tokens it served (through the all-to-all backward),
    so the EDP sum covers all dp ranks' tokens exactly once.
    """
    dp = dp_size if dp_size is not None else dist.get_world_size(dp_group)
    for p in params:
        if p.grad is None:
            continue
        polled(dist.all_reduce, p.grad, op=dist.ReduceOp.SUM, group=edp_group if is_expert_param(p) else dp_group)
        p.grad.div_(dp)
