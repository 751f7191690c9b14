"""Compute per modality: the active FLOPs a token of each modality costs, and the share of the expert
slots each modality gets, for the per-modality top-k experiment.

Counted (forward, 2 FLOPs per multiply-add, summed over the MoE layers): the routed experts, k_m
slots per token of modality m (``moe.top_k_of(m)``) × one expert's matmuls (H·F in, F·H out; 2·H·F
in for SwiGLU), the shared experts, and the router's H·E logits. Attention, the dense layers,
embeddings and the LM head are the same in every arm of a study and left out, so arms differ only
in what is counted. Measured (eval probe tokens, dropless): the slots each modality really routes
per token and its share of all slots, which checks the nominal k_m and shows the capacity split.
"""

from __future__ import annotations

import numpy as np

from ..models.config import ModelConfig
from ..runtime.modality import MODALITY_NAMES

__all__ = ["moe_flops_per_token", "capacity_record"]


def moe_flops_per_token(cfg: ModelConfig) -> dict[str, float]:
    """{modality name: forward FLOPs of its tokens in the MoE layers} (experts + router)."""
    moe, H = cfg.moe, cfg.hidden_size
    F = moe.ffn_hidden_size
    up = 2 * F if moe.activation == "swiglu" else F
    expert = 2 * (H * up + F * H)
    shared_F = moe.shared_ffn_hidden_size or F
    shared_up = 2 * shared_F if moe.activation == "swiglu" else shared_F
    shared = moe.num_shared_experts * 2 * (H * shared_up + shared_F * H)
    router = 2 * H * moe.num_experts
    layers = len(cfg.moe_layers)
    return {name: float(layers * (moe.top_k_of(m) * expert + shared + router)) for m, name in enumerate(MODALITY_NAMES)}


def capacity_record(cfg: ModelConfig, layers: list[dict], modality_N: np.ndarray) -> dict[str, float]:
    """Scalars for one run: nominal top-k and MoE FLOPs per token of each modality, the token-weighted
    mean FLOPs, and, from the probe (``layers``: its per-layer ``load_ME``), each modality's slots per
    token, share of the tokens and share of all expert slots (mean over MoE layers)."""
    flops = moe_flops_per_token(cfg)
    counts = np.bincount(np.asarray(modality_N, dtype=np.int64), minlength=len(MODALITY_NAMES)).astype(np.float64)
    token_share = counts / max(counts.sum(), 1.0)
    slots_LM = np.array([np.asarray(lay["load_ME"], dtype=np.float64).sum(1) for lay in layers])
    rec: dict[str, float] = {"moe_flops": float(sum(token_share[m] * flops[n] for m, n in enumerate(MODALITY_NAMES)))}
    for m, name in enumerate(MODALITY_NAMES):
        rec[f"top_k_{name}"] = float(cfg.moe.top_k_of(m))
        rec[f"moe_flops_{name}"] = flops[name]
        rec[f"token_share_{name}"] = float(token_share[m])
        rec[f"slots_per_token_{name}"] = float(np.mean(slots_LM[:, m] / max(counts[m], 1.0)))
        rec[f"slot_share_{name}"] = float(np.mean(slots_LM[:, m] / np.maximum(slots_LM.sum(1), 1.0)))
    return rec
