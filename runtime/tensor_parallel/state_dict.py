"""Between a TP-sharded model's state and the full single-process state dict.

Every TP rank iterates the same keys in the same order, so gathering is one all-gather per sharded
tensor; sharding a full dict is local slicing (every rank holds the full dict), no communication.
Replicated entries pass through untouched and, like ``state_dict()``, alias the live tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from .sharding import ShardSpec, TPSharded

__all__ = [
    "tp_shard_specs",
    "gather_full_state_dict",
    "gather_full_grads",
    "shard_state_dict",
    "load_full_state_dict",
]


def tp_shard_specs(model: nn.Module) -> dict[str, ShardSpec]:
    """Fully qualified name → spec for every sharded parameter; names absent are replicated.
    (Also what a gradient-norm or DP gradient reduction needs to tell sharded from replicated.)"""
    specs: dict[str, ShardSpec] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, TPSharded):
            for name, spec in module.tp_shard_specs().items():
                specs[f"{prefix}.{name}" if prefix else name] = spec
    return specs


def _gather(named: Mapping[str, Tensor], specs: Mapping[str, ShardSpec], group: ProcessGroup) -> dict[str, Tensor]:
    world = dist.get_world_size(group)
    full: dict[str, Tensor] = {}
    for name, t in named.items():
        spec = specs.get(name)
        if spec is None or world == 1:
            full[name] = t
            continue
        shards = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(shards, t.detach().contiguous(), group=group)
        full[name] = spec.unshard(shards)
    return full


def gather_full_state_dict(model: nn.Module, tp_group: ProcessGroup) -> dict[str, Tensor]:
    """The state dict the unsharded model would have, on every TP rank (collective: call on all)."""
    return _gather(model.state_dict(), tp_shard_specs(model), tp_group)


def gather_full_grads(model: nn.Module, tp_group: ProcessGroup) -> dict[str, Tensor]:
    """Parameter name → full gradient, for parameters that have one (collective: call on all ranks)."""
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return _gather(grads, tp_shard_specs(model), tp_group)


def shard_state_dict(full: Mapping[str, Tensor], model: nn.Module, tp_group: ProcessGroup) -> dict[str, Tensor]:
    """This rank's slice of a full (single-process) state dict, keyed like ``model.state_dict()``."""
    rank, world = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    specs = tp_shard_specs(model)
    return {k: specs[k].shard(v, rank, world) if k in specs else v for k, v in full.items()}


def load_full_state_dict(model: nn.Module, full: Mapping[str, Tensor], tp_group: ProcessGroup, strict: bool = True):
    """Load a full (single-process) state dict into a TP-sharded model; returns ``load_state_dict``'s result."""
    return model.load_state_dict(shard_state_dict(full, model, tp_group), strict=strict)
