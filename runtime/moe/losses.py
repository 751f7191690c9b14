"""Auxiliary losses and regularisers of the router, each switched on by a non-zero coefficient.

Legend: T tokens, E experts, M modalities, H hidden. All terms use real tokens only, and the
load-balance terms use the top-k choice before any capacity drop. Every batch-dependent term is
a function of the :class:`RoutingSums` only, so all-reduced sums give the global-batch losses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import MoEConfig
from .router import Routing
from .stats import RoutingSums, token_entropy

__all__ = ["router_losses", "block_diagonal_mask"]


def _entropy(p_E: Tensor) -> Tensor:
    return token_entropy(p_E[None])[0]


def _balance(load_E: Tensor, prob_sum_E: Tensor, tokens: Tensor, target_E: Tensor) -> Tensor:
    """Switch-style Σ_e f_e · P_e / q_e: equals E·Σ f·P for a uniform target q = 1/E."""
    f_E = load_E / load_E.sum().clamp_min(1)
    P_E = prob_sum_E / tokens.clamp_min(1)
    return (f_E * P_E / target_E).sum()


def block_diagonal_mask(num_experts: int, hidden_size: int, groups: int) -> Tensor:
    """True where router weight (expert e, hidden h) lies off the block diagonal."""
    e_group = torch.arange(num_experts) // (num_experts // groups)
    h_group = torch.arange(hidden_size) // (hidden_size // groups)
    return e_group[:, None] != h_group[None, :]


def router_losses(
    cfg: MoEConfig,
    routing: Routing,
    sums: RoutingSums,
    valid_T: Tensor,
    allowed_ME: Tensor,
    weight_EH: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Returns (Σ coef·term, {name: unweighted term}); only switched-on terms are computed."""
    terms: dict[str, Tensor] = {}
    total = routing.probs_TE.new_zeros(())
    present_M = sums.tokens_M > 0
    n_present = present_M.sum().clamp_min(1)
    E = cfg.num_experts

    def add(name: str, coef: float, value: Tensor) -> None:
        nonlocal total
        terms[name] = value
        total = total + coef * value

    if cfg.lb_coef > 0:
        uniform_E = routing.probs_TE.new_full((E,), 1.0 / E)
        add("load_balance", cfg.lb_coef, _balance(sums.load_ME.sum(0), sums.prob_sum_ME.sum(0), sums.tokens_M.sum(), uniform_E))
    if cfg.lb_modality_coef > 0:
        if cfg.lb_modality_target is not None:
            target_ME = torch.tensor(cfg.lb_modality_target, device=allowed_ME.device, dtype=torch.float32)
            target_ME = target_ME / target_ME.sum(1, keepdim=True)
        else:
            target_ME = allowed_ME.float() / allowed_ME.sum(1, keepdim=True)
        per_m = [
            _balance(sums.load_ME[m], sums.prob_sum_ME[m], sums.tokens_M[m], target_ME[m].clamp_min(1e-9))
            for m in range(cfg.num_modalities)
        ]
        add("load_balance_modality", cfg.lb_modality_coef, (torch.stack(per_m) * present_M).sum() / n_present)
    if cfg.z_loss_coef > 0:
        add("z_loss", cfg.z_loss_coef, sums.z_sum / sums.tokens_M.sum().clamp_min(1))
    if cfg.limoe_local_coef > 0:
        local_M = sums.entropy_sum_M / sums.tokens_M.clamp_min(1)
        add("limoe_local", cfg.limoe_local_coef, (local_M * present_M).sum() / n_present)
    if cfg.limoe_global_coef > 0:
        pbar_ME = sums.prob_sum_ME / sums.tokens_M[:, None].clamp_min(1)
        h_M = torch.stack([_entropy(pbar_ME[m]) for m in range(cfg.num_modalities)])
        if cfg.limoe_global_threshold is None:
            g_M = -h_M
        else:
            g_M = torch.relu(cfg.limoe_global_threshold - h_M)
        add("limoe_global", cfg.limoe_global_coef, (g_M * present_M).sum() / n_present)
    pbar_E = sums.prob_sum_ME.sum(0) / sums.tokens_M.sum().clamp_min(1)
    if cfg.entropy_floor_coef > 0:
        add("entropy_floor", cfg.entropy_floor_coef, torch.relu(cfg.entropy_floor - _entropy(pbar_E)))
    if cfg.min_util_coef > 0:
        add("min_util", cfg.min_util_coef, torch.relu(cfg.min_util - pbar_E).sum())
    if cfg.block_diag_coef > 0:
        off_EH = block_diagonal_mask(E, cfg.hidden_size, cfg.block_diag_groups).to(weight_EH.device)
        w = weight_EH.float()
        add("block_diag", cfg.block_diag_coef, (w[off_EH] ** 2).sum() / (w**2).sum().clamp_min(1e-12))
    return total, terms
