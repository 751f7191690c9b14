"""Capacity limits: which routed slots an expert keeps when its rows are capped.

Legend: T tokens, k slots per token, E experts, M modalities. Dropless (no cap) is the default.
A uniform cap by position is handed to ``ops.permute`` (the kernel drops first-come-last);
per-modality caps and batch-prioritised routing (V-MoE: the most confident tokens first, all first
choices before any second choice) mark dropped slots here, as expert -1, before the permute.

The dropless imbalance cap (``imbalance_cap_ratio``) is a capacity factor that only a dropless layer
gets: an expert keeps at most ceil(ratio × this rank's routed slots / E) rows, so it bites only on
experts over that multiple of the mean. Its cap stays a device tensor (no host sync), and its drops
are counted like capacity drops (routed in ``load_ME``, not kept in ``kept_ME``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import MoEConfig

__all__ = ["CapacityPlan", "plan_capacity"]


class CapacityPlan:
    def __init__(self, idx_Tk: Tensor, kernel_capacity: int | None):
        self.idx_Tk = idx_Tk  # slots dropped here are already -1
        self.kernel_capacity = kernel_capacity  # a uniform cap by position left to the permute kernel


def _cap(cf: float, slots: int, num_experts: int) -> int:
    return max(1, math.ceil(cf * slots / num_experts))


def plan_capacity(
    cfg: MoEConfig, idx_Tk: Tensor, weights_Tk: Tensor, modality_T: Tensor, training: bool
) -> CapacityPlan:
    cf = cfg.capacity_factor if training else cfg.eval_capacity_factor
    if cfg.router == "expert_choice":  # balanced by construction: each expert takes its budget
        return CapacityPlan(idx_Tk, None)
    if cf is None:
        if cfg.imbalance_cap_ratio is None:
            return CapacityPlan(idx_Tk, None)
        return _imbalance_cap(cfg, idx_Tk, weights_Tk)
    E, M = cfg.num_experts, cfg.num_modalities
    routed_Tk = idx_Tk >= 0
    per_modality = cfg.modality_capacity_factor is not None
    if not per_modality and cfg.drop_policy == "position":
        return CapacityPlan(idx_Tk, _cap(cf, int(routed_Tk.sum()), E))

    T, k = idx_Tk.shape
    if per_modality:
        slots_M = torch.bincount(modality_T[:, None].expand(T, k)[routed_Tk], minlength=M).tolist()
        cap_G = torch.tensor(
            [_cap(cfg.modality_capacity_factor[m], slots_M[m], E) for m in range(M) for _ in range(E)],
            device=idx_Tk.device,
        )
        group_Tk = modality_T[:, None] * E + idx_Tk.clamp_min(0)
    else:
        cap_G = torch.full((E,), _cap(cf, int(routed_Tk.sum()), E), device=idx_Tk.device)
        group_Tk = idx_Tk.clamp_min(0)
    return _keep_within(cap_G, group_Tk, idx_Tk, _priority(cfg, weights_Tk, idx_Tk))


def _imbalance_cap(cfg: MoEConfig, idx_Tk: Tensor, weights_Tk: Tensor) -> CapacityPlan:
    """At most ceil(imbalance_cap_ratio × mean routed slots per expert) rows for every expert."""
    routed = (idx_Tk >= 0).sum().double()
    cap = torch.ceil(cfg.imbalance_cap_ratio * routed / cfg.num_experts).clamp_min(1).long()
    cap_G = cap.expand(cfg.num_experts)
    return _keep_within(cap_G, idx_Tk.clamp_min(0), idx_Tk, _priority(cfg, weights_Tk, idx_Tk))


def _priority(cfg: MoEConfig, weights_Tk: Tensor, idx_Tk: Tensor) -> Tensor:
    """[T, k] order in which slots claim room (lower first): by position, or (``probability``)
    every first choice before any second, most confident token first."""
    T, k = idx_Tk.shape
    if cfg.drop_policy == "probability":
        confidence_T = weights_Tk.max(dim=1).values
        token_rank_T = torch.argsort(confidence_T, descending=True, stable=True).argsort()
        return torch.arange(k, device=idx_Tk.device)[None, :] * T + token_rank_T[:, None]
    return torch.arange(T * k, device=idx_Tk.device).view(T, k)


def _keep_within(cap_G: Tensor, group_Tk: Tensor, idx_Tk: Tensor, priority_Tk: Tensor) -> CapacityPlan:
    """Mark -1 every routed slot beyond its group's cap ``cap_G`` (a device tensor), in priority order."""
    T, k = idx_Tk.shape
    routed_Tk = idx_Tk >= 0
    # order slots by (group, priority); a slot's rank in its group decides whether it fits
    n_groups = cap_G.numel()
    key = group_Tk.masked_fill(~routed_Tk, n_groups).flatten() * (T * k) + priority_Tk.flatten()
    order = torch.argsort(key)
    sorted_group = (key[order] // (T * k)).clamp_max(n_groups)
    starts = torch.searchsorted(sorted_group, torch.arange(n_groups + 1, device=key.device))
    rank_sorted = torch.arange(order.numel(), device=key.device) - starts[sorted_group]
    keep_sorted = (sorted_group < n_groups) & (rank_sorted < torch.cat([cap_G, cap_G.new_zeros(1)])[sorted_group])
    keep = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted).view(T, k)
    return CapacityPlan(idx_Tk.masked_fill(~keep, -1), None)
