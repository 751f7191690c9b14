"""Pure-PyTorch references for every op (argsort + index_select / index_add and friends): they
define the semantics the kernels must reproduce, serve the tests, and are the fallback where the
extension has no kernel."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .plan import PermutePlan, check_permute_args

__all__ = ["plan_reference", "permute_reference", "gather_rows_reference", "unpermute_reference",
           "combine_rows_backward_reference", "grouped_mm_reference", "swiglu_reference", "top_k_rows_reference"]


def plan_reference(
    topk_idx_Tk: torch.Tensor, num_experts: int, *, pad_multiple: int = 1, capacity: int | None = None
) -> PermutePlan:
    """Argsort-based plan; the counting-sort kernels must reproduce it exactly."""
    T, k = topk_idx_Tk.shape
    E, device = num_experts, topk_idx_Tk.device
    idx_S = topk_idx_Tk.reshape(-1).long()
    if bool(((idx_S < -1) | (idx_S >= E)).any()):
        raise ValueError(f"topk_idx entries must be -1 or in [0, {E})")
    routed_S = idx_S >= 0
    key_S = torch.where(routed_S, idx_S, E)
    order_S = torch.argsort(key_S, stable=True)
    routed_counts_E = torch.bincount(idx_S[routed_S], minlength=E)
    first_E1 = torch.cat([routed_counts_E.new_zeros(1), routed_counts_E.cumsum(0)])
    rank_S = torch.empty_like(idx_S)
    rank_S[order_S] = torch.arange(idx_S.numel(), device=device) - first_E1[key_S[order_S]]
    cap = idx_S.numel() if capacity is None else capacity
    keep_S = routed_S & (rank_S < cap)
    counts_E = routed_counts_E.clamp(max=cap)
    padded_E = (counts_E + pad_multiple - 1) // pad_multiple * pad_multiple
    offsets_E1 = torch.cat([padded_E.new_zeros(1), padded_E.cumsum(0)])
    row_of_S = torch.where(keep_S, offsets_E1[key_S.clamp(max=E - 1)] + rank_S, -1)
    src_slot_R = torch.full((int(offsets_E1[-1]),), -1, dtype=torch.int64, device=device)
    src_slot_R[row_of_S[keep_S]] = torch.arange(idx_S.numel(), device=device)[keep_S]
    return PermutePlan(
        counts=counts_E,
        padded_counts=padded_E,
        offsets=offsets_E1,
        row_of=row_of_S.view(T, k),
        src_slot=src_slot_R,
        dropped=(routed_S & ~keep_S).view(T, k),
        num_tokens=T,
        top_k=k,
    )


def permute_reference(
    x_TH: torch.Tensor,
    topk_idx_Tk: torch.Tensor,
    num_experts: int,
    *,
    pad_multiple: int = 1,
    capacity: int | None = None,
) -> tuple[torch.Tensor, PermutePlan]:
    """Reference for :func:`permute` built from index_select / index_copy (autograd by torch)."""
    check_permute_args(x_TH, topk_idx_Tk, num_experts, pad_multiple, capacity)
    plan = plan_reference(topk_idx_Tk, num_experts, pad_multiple=pad_multiple, capacity=capacity)
    rows_R = plan.src_slot >= 0
    tokens_n = plan.src_slot[rows_R] // plan.top_k
    x_perm_RH = x_TH.new_zeros(plan.num_rows, x_TH.shape[1]).index_copy(
        0, rows_R.nonzero().squeeze(1), x_TH.index_select(0, tokens_n)
    )
    return x_perm_RH, plan


def gather_rows_reference(
    x_TH: torch.Tensor, src_slot_R: torch.Tensor, row_of_Tk: torch.Tensor, weights_Tk: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference for :func:`gather_rows` (index_select and a mask: no host sync, autograd by torch)."""
    k = row_of_Tk.shape[1]
    slot_R = src_slot_R.clamp_min(0)
    rows_RH = x_TH.index_select(0, slot_R // k)
    if weights_Tk is not None:
        acc_dtype = torch.float64 if x_TH.dtype == torch.float64 else torch.float32
        w_R1 = weights_Tk.reshape(-1).index_select(0, slot_R).to(acc_dtype).unsqueeze(1)
        rows_RH = (rows_RH.to(acc_dtype) * w_R1).to(x_TH.dtype)
    return torch.where((src_slot_R >= 0).unsqueeze(1), rows_RH, rows_RH.new_zeros(()))


def unpermute_reference(
    y_perm_RH: torch.Tensor, plan: PermutePlan, topk_weights_Tk: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference for :func:`unpermute` built from index_select / index_add, summed in float32+."""
    acc_dtype = torch.float64 if y_perm_RH.dtype == torch.float64 else torch.float32
    row_of_S = plan.row_of.reshape(-1)
    kept_S = row_of_S >= 0
    slots_n = kept_S.nonzero().squeeze(1)
    contrib_nH = y_perm_RH.index_select(0, row_of_S[kept_S]).to(acc_dtype)
    if topk_weights_Tk is not None:
        contrib_nH = contrib_nH * topk_weights_Tk.reshape(-1)[slots_n].to(acc_dtype).unsqueeze(1)
    y_TH = contrib_nH.new_zeros(plan.num_tokens, y_perm_RH.shape[1])
    return y_TH.index_add(0, slots_n // plan.top_k, contrib_nH).to(y_perm_RH.dtype)


def combine_rows_backward_reference(
    grad_TH: torch.Tensor, y_RH: torch.Tensor, row_of_Tk: torch.Tensor, src_slot_R: torch.Tensor,
    weights_Tk: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``modalmoe::combine_rows_backward``, the gradients of the weighted combine:
    ``grad_y[r] = w[s] * grad[s // k]`` for ``s = src_slot[r]`` (zero rows where s = -1) in y's dtype,
    and ``grad_w[s] = <grad[s // k], y[row_of[s]]>`` (zero where row_of = -1), summed in float32+, in
    the weights' dtype."""
    T, k = row_of_Tk.shape
    acc_dtype = torch.float64 if y_RH.dtype == torch.float64 else torch.float32
    grad_y_RH = gather_rows_reference(grad_TH, src_slot_R, row_of_Tk, weights_Tk)
    row_of_S = row_of_Tk.reshape(-1)
    y_SH = y_RH.index_select(0, row_of_S.clamp_min(0)).to(acc_dtype)
    g_SH = grad_TH.to(acc_dtype).repeat_interleave(k, dim=0)
    dot_S = torch.where(row_of_S >= 0, (g_SH * y_SH).sum(1), 0.0)
    return grad_y_RH, dot_S.view(T, k).to(weights_Tk.dtype)


def grouped_mm_reference(x_RK: torch.Tensor, w_EKN: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """The naive per-expert loop that :func:`grouped_mm` must match."""
    return torch.cat([x_RK[offsets[e] : offsets[e + 1]] @ w_EKN[e] for e in range(w_EKN.shape[0])])


def swiglu_reference(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``h = [gate | up]`` on the last dim: the semantics of :func:`swiglu`."""
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def top_k_rows_reference(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """k passes of argmax, each pick then set to -inf: the semantics of :func:`top_k_rows`."""
    picks, s = [], scores_TE.detach()
    for j in range(k):
        idx_T = s.argmax(-1)
        picks.append(idx_T)
        if j + 1 < k:
            s = s.scatter(1, idx_T[:, None], float("-inf"))
    return torch.stack(picks, 1)
