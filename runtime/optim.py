"""The optimizer (AdamW, or Adafactor when its state must be small), its parameter groups and the
learning-rate schedule: one builder for both engines, so the plain PyTorch engine and DeepSpeed step
with the same groups and hyperparameters."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from .distributed import is_expert_param

__all__ = ["build_optimizer", "param_groups", "lr_lambda"]

# DeepSpeed's own MoE group splitter caps each expert group at this many elements; we keep its cap
MAX_EXPERT_GROUP_NUMEL = 178956971


def build_optimizer(model: nn.Module, train_cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """``train.optimizer`` over :func:`param_groups` with the warmup/cosine schedule of :func:`lr_lambda`.

    AdamW runs over float32 parameters (the master weights under bf16 autocast): on CUDA the fused
    kernel (one launch for all parameters), elsewhere the multi-tensor ``foreach`` one. DeepSpeed
    takes this optimizer as the client optimizer and, under ZeRO 1/2, wraps it.

    Adafactor (torch's) keeps a row and a column of second-moment statistics per matrix (per
    expert for the stacked ``[E, F, D]`` expert weights) instead of AdamW's two full moments, and
    no first moment. Its step is relative: ``lr`` (here the schedule's) times the tensor's RMS, so
    its ``train.lr`` is of the order of 1e-2, not AdamW's 1e-4. It runs one tensor at a time
    (``foreach=False``): the step's temporaries are one tensor's size, not the model's, which is
    why one picks it. The RMS and the update clipping are per tensor, so under EP or TP (a rank
    holds part of a tensor) the steps are not the single-process ones, unlike AdamW's."""
    t = train_cfg
    groups = param_groups(model, t.weight_decay)
    if t.optimizer == "adafactor":
        optimizer = torch.optim.Adafactor(groups, lr=t.lr, foreach=False)
    else:
        fused = next(model.parameters()).device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=1e-8,
                                      fused=fused or None, foreach=None if fused else True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.warmup_steps, t.steps, t.min_lr_ratio))
    return optimizer, scheduler


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave norms, biases, embeddings' modality/position tables and gates' biases alone.

    Expert parameters (``allreduce = False``, set by expert parallelism) go into groups of their
    own, one per expert-data-parallel group and decay setting, named after that group and marked
    ``moe``: DeepSpeed's ZeRO reduces and partitions such a group over that group's ranks. In one
    process there are none, and the two plain groups are all there is."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    plain = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    groups, experts = [], []
    for g in plain:
        by_group: dict[str, list[nn.Parameter]] = defaultdict(list)
        for p in g["params"]:
            if is_expert_param(p):
                by_group[p.group_name].append(p)
        groups.append({**g, "params": [p for p in g["params"] if not is_expert_param(p)]})
        for group_name, params in by_group.items():
            experts += [{**g, "name": group_name, "moe": True, "params": chunk} for chunk in _chunks(params)]
    return groups + experts


def _chunks(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    out, size = [[]], 0
    for p in params:
        if out[-1] and size + p.numel() > MAX_EXPERT_GROUP_NUMEL:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p.numel()
    return out


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warmup, then cosine decay to ``min_ratio`` of the peak."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
