"""Turn a full model, built identically on every rank, into this rank's shard: TP → EP → marks.

Building the whole model with one seed everywhere and then slicing it gives every layout the same
initial weights as the single-process run, which is what the parity tests compare against. (For
models too large to build whole on one device this would become a meta-device build + sharded
load; the slicing rules stay the same.)
"""

from __future__ import annotations

import torch
from torch import nn

from .moe import MoELayer
from .moe.ep_dispatch import AllToAllDispatcher
from .parallel_state import ParallelState, deepspeed_group_name, mark_expert_params
from .tensor_parallel import parallelize_model, tp_shard_specs

__all__ = ["parallelize", "moe_layers", "expert_group_name"]


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def expert_group_name(state: ParallelState) -> str:
    return deepspeed_group_name(state.size("ep"))


@torch.no_grad()
def parallelize(model: nn.Module, state: ParallelState, expert_tp: bool = False) -> nn.Module:
    """Shard ``model`` in place for ``state``'s layout and tag parameters for DeepSpeed:
    expert weights get ``allreduce=False`` + ``group_name`` (reduced over EDP), TP shards get
    ``tensor_model_parallel=True`` (counted on every TP rank by DeepSpeed's norm)."""
    tp, ep, dp = state.size("tp"), state.size("ep"), state.size("dp")
    if tp > 1:
        parallelize_model(model, state.tp_group, expert_tp=expert_tp)
        for name, p in model.named_parameters():
            if name in tp_shard_specs(model):
                p.tensor_model_parallel = True
    ep_rank = state.rank_in("ep")
    for layer in moe_layers(model):
        if ep > 1:
            layer.dispatcher = AllToAllDispatcher(layer.cfg.num_experts, state.ep_group)
            L = layer.cfg.num_experts // ep
            for name, p in list(layer.experts.named_parameters(recurse=False)):
                local = nn.Parameter(p.data[ep_rank * L : (ep_rank + 1) * L].clone(), requires_grad=p.requires_grad)
                for attr in ("tensor_model_parallel",):
                    if hasattr(p, attr):
                        setattr(local, attr, getattr(p, attr))
                setattr(layer.experts, name, local)
        layer.stats_group = state.dp_group if dp > 1 else None
        mark_expert_params(layer.experts, expert_group_name(state))
    return model
