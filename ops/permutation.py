"""permute / unpermute: token rows into expert order and back, mixed with the gate weights.

The plan is a stable counting sort (histogram, prefix sum, scatter) done by the C++/CUDA ops in
``modalmoe._C``; :mod:`.reference` defines the semantics.
"""

from __future__ import annotations

import torch

from . import extension, reference
from .plan import PermutePlan, check_permute_args, check_plan_args

__all__ = ["permute", "build_plan", "gather_rows", "unpermute"]


def permute(
    x_TH: torch.Tensor,
    topk_idx_Tk: torch.Tensor,
    num_experts: int,
    *,
    pad_multiple: int = 1,
    capacity: int | None = None,
) -> tuple[torch.Tensor, PermutePlan]:
    """Group the routed rows of ``x`` by expert: returns ``x_perm [R, H]`` and its plan.

    Rows come in ascending expert order and, within an expert, in slot order (token, then j).
    ``topk_idx == -1`` marks unrouted slots. ``capacity`` keeps the first ``capacity`` slots of each
    expert in that order and drops the rest; each expert block is zero-padded to ``pad_multiple``.
    """
    check_permute_args(x_TH, topk_idx_Tk, num_experts, pad_multiple, capacity)
    if not extension.use_kernels(x_TH, "permute_rows"):
        return reference.permute_reference(x_TH, topk_idx_Tk, num_experts, pad_multiple=pad_multiple, capacity=capacity)
    x_perm_RH, *plan = torch.ops.modalmoe.permute_rows(
        x_TH, topk_idx_Tk, num_experts, pad_multiple, -1 if capacity is None else capacity
    )
    return x_perm_RH, PermutePlan.from_op(plan, topk_idx_Tk)


def build_plan(
    topk_idx_Tk: torch.Tensor, num_experts: int, *, pad_multiple: int = 1, capacity: int | None = None
) -> PermutePlan:
    """The plan :func:`permute` follows, without moving any row; :func:`plan_reference` is its semantics."""
    check_plan_args(topk_idx_Tk, num_experts, pad_multiple, capacity)
    if not extension.use_kernels(topk_idx_Tk, "build_plan"):
        return reference.plan_reference(topk_idx_Tk, num_experts, pad_multiple=pad_multiple, capacity=capacity)
    plan = torch.ops.modalmoe.build_plan(topk_idx_Tk, num_experts, pad_multiple, -1 if capacity is None else capacity)
    return PermutePlan.from_op(plan, topk_idx_Tk)


def gather_rows(
    x_TH: torch.Tensor, src_slot_R: torch.Tensor, row_of_Tk: torch.Tensor, weights_Tk: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[r] = w[s] · x[s // k]`` for ``s = src_slot[r]`` (``w`` = 1 without weights), zero where s = -1.

    ``row_of [T, k]`` is the inverse map (-1 where a slot has no row): the backward gathers through it
    (:func:`unpermute`'s op), so with k = 1 and a permutation ``take`` with inverse ``put``,
    ``gather_rows(x, take, put.view(-1, 1))`` is ``x[take]`` whose backward is another gather, where
    index_select's would zero-fill and scatter-add.
    """
    if x_TH.dim() != 2 or src_slot_R.dim() != 1 or row_of_Tk.dim() != 2 or x_TH.shape[0] != row_of_Tk.shape[0]:
        raise ValueError(f"gather_rows expects x [T, H], src_slot [R] and row_of [T, k], got {tuple(x_TH.shape)}, "
                         f"{tuple(src_slot_R.shape)} and {tuple(row_of_Tk.shape)}")
    if weights_Tk is not None and weights_Tk.shape != row_of_Tk.shape:
        raise ValueError(f"weights must be {tuple(row_of_Tk.shape)}, got {tuple(weights_Tk.shape)}")
    if not extension.use_kernels(x_TH, "gather_rows"):
        return reference.gather_rows_reference(x_TH, src_slot_R, row_of_Tk, weights_Tk)
    return torch.ops.modalmoe.gather_rows(x_TH, src_slot_R, row_of_Tk, weights_Tk)


def unpermute(
    y_perm_RH: torch.Tensor, plan: PermutePlan, topk_weights_Tk: torch.Tensor | None = None
) -> torch.Tensor:
    """``y[t] = sum_j w[t, j] * y_perm[row_of[t, j]]`` over kept slots; dtype of ``y_perm``.

    Sums in float32 for bfloat16 rows; ``topk_weights`` may be float32 with bfloat16 rows (router
    math stays float32) and its gradient comes back in its own dtype.
    """
    if y_perm_RH.dim() != 2 or y_perm_RH.shape[0] != plan.num_rows:
        raise ValueError(f"y_perm must be [{plan.num_rows}, H], got {tuple(y_perm_RH.shape)}")
    if topk_weights_Tk is not None and topk_weights_Tk.shape != plan.row_of.shape:
        raise ValueError(f"topk_weights must be {tuple(plan.row_of.shape)}, got {tuple(topk_weights_Tk.shape)}")
    if not extension.use_kernels(y_perm_RH, "combine_rows"):
        return reference.unpermute_reference(y_perm_RH, plan, topk_weights_Tk)
    return torch.ops.modalmoe.combine_rows(y_perm_RH, plan.row_of, plan.src_slot, topk_weights_Tk)
