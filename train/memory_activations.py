"""What one micro-batch keeps for backward, tensor by tensor, read off the model's own forward.

Legend: B batch, P patches, L text length, S = P + L, T = B·S tokens, D hidden, V vocab, N local heads,
F local FFN width, R rows this rank routes (T·k), X rows its experts compute (R balanced; more when the
EP peers' tokens crowd onto its experts), r residual bytes (float32: the weights and the residual stream
stay float32), c compute bytes (2 under bf16 autocast, else 4).

The inventory follows the ops in ``models/`` and ``runtime/moe/`` (checked against torch's saved-tensor
hooks by tests/test_memory_plan.py): RMSNorm (the composite ``F.rms_norm``) keeps its input, the
normalised input and rstd, and the next linear keeps its output; attention keeps q, k, v (after
rotary), its output, the output re-laid for ``wo`` and the log-sum-exp, and SDPA turns the bool mask
into a [B, 1, S, S] additive mask of the compute dtype in every layer (FlexAttention keeps none); an
FFN keeps its pre-activation and activation; the MoE layer keeps the permuted rows, the experts'
pre-activation and activation, their output rows and the router's [T, E] probabilities; the loss keeps
the [B, L-1, V] float32 log-softmax. A checkpointed sublayer keeps only its input and recomputes the
rest during backward, one layer at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..models.config import ModelConfig

__all__ = ["ActivationPlan", "CHECKPOINT_MODES", "activation_plan", "expert_rows"]

CHECKPOINT_MODES = ("none", "moe", "attention", "full")
F32 = 4


@dataclass(frozen=True)
class ActivationPlan:
    saved: int  # kept for backward at the end of the forward pass
    transient: int  # live on top of ``saved`` at the worst moment: the loss's logits, a recomputed layer
    all_to_all: int  # EP rows in flight in one MoE layer: the send buffer and the received copy
    logits: int  # the part of saved + transient that is the [B, L, V] head and its loss
    rows_routed: int  # R per MoE layer
    rows_computed: int  # X per MoE layer


def expert_rows(cfg: ModelConfig, tokens: int, ep: int, worst: bool) -> int:
    """Rows one rank's experts compute in one MoE layer. Balanced: T·k (each rank's share of the EP
    group's slots). Worst case: every token of the ``ep`` peers picks min(k, local experts) experts here,
    each expert capped per sending rank by the capacity, or by ``imbalance_cap_ratio`` × the mean."""
    moe = cfg.moe
    k, E = moe.max_top_k, moe.num_experts
    local = E // ep
    slots = tokens * k
    if not worst:
        return slots
    per_expert = tokens  # one expert takes each token at most once
    if moe.capacity_factor is not None:
        per_expert = min(per_expert, max(1, math.ceil(moe.capacity_factor * slots / E)))
    if moe.imbalance_cap_ratio is not None:
        per_expert = min(per_expert, math.ceil(moe.imbalance_cap_ratio * slots / E))
    return ep * min(tokens * min(k, local), local * per_expert)


def _norm(T: int, D: int) -> int:
    return 2 * T * D * F32 + T * F32  # input, normalised input, rstd (its output is the next op's input)


def _attention(cfg: ModelConfig, B: int, S: int, tp: int, c: int, flex: bool) -> int:
    T, Dl, N = B * S, cfg.hidden_size // tp, cfg.num_heads // tp
    mask = 0 if flex else B * S * S * c
    # rotary makes q and k contiguous [B, N, S, K], so the output follows that layout and re-laying
    # it [B, S, N·K] for wo is a copy; without rotary it is a view of the output
    relaid = T * Dl * c if cfg.pos == "rope" else 0
    return 4 * T * Dl * c + relaid + B * N * S * F32 + mask


def _mlp(T: int, width: int, activation: str, c: int, fused_swiglu: bool = False) -> int:
    """Pre-activation and activation; the reference SwiGLU also keeps silu(gate) (the CPU bf16 op
    keeps only its input)."""
    if activation != "swiglu":
        return 2 * T * width * c
    return T * width * c * (3 if fused_swiglu else 4)


@dataclass(frozen=True)
class _Rank:
    """How one rank holds a layer: its TP/EP share, the dtype and kernels it runs."""

    tp: int
    ep: int
    c: int
    expert_tp: bool
    flex: bool
    fused_swiglu: bool
    worst: bool


def _moe(cfg: ModelConfig, T: int, rk: _Rank) -> int:
    moe, D, c = cfg.moe, cfg.hidden_size, rk.c
    k, E = moe.max_top_k, moe.num_experts
    R, X = T * k, expert_rows(cfg, T, rk.ep, rk.worst)
    split = rk.tp if rk.expert_tp else 1
    router = T * E * F32 * 4 + R * (8 + 1 + F32) + T * (3 * F32 + 1) + R * 8 * 2  # probs, picks, plan
    rows = X * D * c + _mlp(X, moe.ffn_hidden_size // split, moe.activation, c, rk.fused_swiglu) + R * D * c
    if rk.ep > 1:
        rows += X * 8 * 2  # the peer-major <-> expert-major index pair
    shared = 0
    if moe.num_shared_experts:
        width = moe.num_shared_experts * (moe.shared_ffn_hidden_size or moe.ffn_hidden_size)
        shared = _mlp(T, width // split, moe.activation, c, rk.fused_swiglu) + (T * D * c if c != F32 else 0)
    return router + rows + shared


def _trunk(cfg: ModelConfig, B: int, S: int, rk: _Rank, mode: str) -> tuple[int, int]:
    """(saved, largest recomputed layer) over all blocks for a pass of B sequences of length S."""
    T, D, c = B * S, cfg.hidden_size, rk.c
    saved = recompute = 0
    for i in range(cfg.num_layers):
        moe = cfg.is_moe_layer(i)
        attn_in = T * D * c  # the norm's output as the q/k/v linears keep it
        attn = _attention(cfg, B, S, rk.tp, c, rk.flex)
        if moe:
            ffn_in = T * D * F32  # the router reads the float32 norm output
            ffn = _moe(cfg, T, rk)
        else:
            ffn_in = T * D * c
            ffn = _mlp(T, cfg.ffn_hidden_size // rk.tp, cfg.activation, c, rk.fused_swiglu)
        block = 2 * _norm(T, D) + attn_in + attn + ffn_in + ffn
        if mode == "full":
            kept, redo = T * D * F32, block  # the block's input
        elif mode == "attention":
            kept, redo = block - attn - attn_in + T * D * F32, attn + attn_in
        elif mode == "moe" and moe:
            kept, redo = block - ffn, ffn
        else:
            kept, redo = block, 0
        saved += kept
        recompute = max(recompute, redo)
    if mode in ("full", "attention") and not rk.flex:
        saved += B * S * S  # the bool mask the checkpointed sublayers are handed, kept once
    return saved, recompute


def activation_plan(cfg: ModelConfig, batch: int, *, tp: int = 1, ep: int = 1, expert_tp: bool = False,
                    compute_bytes: int = F32, mode: str = "none", flex: bool = False,
                    fused_swiglu: bool = False, worst: bool = False) -> ActivationPlan:
    """The activation memory of one micro-batch of ``batch`` full-length samples on one rank."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"unknown activation checkpointing mode {mode!r}; choose one of {CHECKPOINT_MODES}")
    B, P, L, D, V, c = batch, cfg.num_patches, cfg.max_text_len, cfg.hidden_size, cfg.vocab_size, compute_bytes
    rk = _Rank(tp, ep, c, expert_tp, flex, fused_swiglu, worst)
    saved, recompute = _trunk(cfg, B, P + L, rk, mode)
    if cfg.contrastive_coef > 0:  # the text-only pass runs the trunk again over the captions
        text_saved, text_redo = _trunk(cfg, B, L, rk, mode)
        saved += text_saved + _norm(B * L, D) + 2 * B * D * F32  # + its final norm, pooled rows
        recompute = max(recompute, text_redo)
    head_in = _norm(B * (P + L), D) + B * L * D * c  # final norm, the text states the head reads
    log_softmax = B * (L - 1) * V * F32
    # the loss's peak: the [B, L, V] logits and their float32 flattened copy beside the log-softmax in
    # forward; in backward the log-softmax's incoming and outgoing gradients. A recomputed layer comes
    # later in backward, when the loss's buffers are gone: the larger of the two counts
    logits_peak = B * L * V * c + B * (L - 1) * V * F32
    T = B * (P + L)
    X = expert_rows(cfg, T, ep, worst) if cfg.moe_layers else 0
    R = T * cfg.moe.max_top_k if cfg.moe_layers else 0
    return ActivationPlan(
        saved=saved + head_in + log_softmax,
        transient=max(logits_peak, recompute),
        all_to_all=(R + X) * D * c if ep > 1 else 0,
        logits=log_softmax + logits_peak,
        rows_routed=R,
        rows_computed=X,
    )
