"""The optimizer, its parameter groups and the learning-rate schedule, shared by both engines."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["param_groups", "lr_lambda", "build_adamw"]


def build_adamw(groups: list[dict], train_cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW over float32 parameters (the master weights under bf16 autocast). On CUDA the fused
    kernel (one launch for all parameters); elsewhere the multi-tensor ``foreach`` one."""
    t = train_cfg
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=1e-8, fused=fused or None,
                             foreach=None if fused else True)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave norms, biases, embeddings' modality/position tables and gates' biases alone."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warmup, then cosine decay to ``min_ratio`` of the peak."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
