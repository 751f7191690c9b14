"""Megatron-style linear layers that hold only this rank's shard of the weight.

Legend: I in_features, O out_features, W TP world size; ``…`` any leading dims.
A column-parallel layer splits the output features (weight rows of [O, I]) and produces a
feature-sharded activation; a row-parallel layer splits the input features (weight columns) and
sums the partial products over the group. Chained column → row, the pair needs one all-reduce
forward (the row layer's) and one backward (the column layer's).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from .collectives import copy_to_tp_region, gather_from_tp_region, reduce_from_tp_region
from .sharding import ShardSpec

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]


def _group_info(group: ProcessGroup) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


class _ShardedLinear(nn.Module):
    """What both parallel linears share: building this rank's shard from a full ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, tp_group: ProcessGroup, spec: ShardSpec, what: str):
        super().__init__()
        self.tp_group = tp_group
        self.tp_rank, self.tp_size = _group_info(tp_group)
        self.spec = spec
        size = out_features if spec.dim == 0 else in_features
        self.spec.check(size, self.tp_size, f"{type(self).__name__} {what}={size}")
        self.in_features, self.out_features = in_features, out_features

    def tp_shard_specs(self) -> dict[str, ShardSpec]:
        raise NotImplementedError

    @classmethod
    def from_full(cls, linear: nn.Linear, tp_group: ProcessGroup, **kwargs):
        """This rank's shard of a full ``nn.Linear`` (same on every rank), for parity and conversion:
        sharded parameters are cut by their spec, replicated ones copied whole."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, tp_group, bias=linear.bias is not None,
                    device=w.device, dtype=w.dtype, **kwargs)
        specs = layer.tp_shard_specs()
        with torch.no_grad():
            for name, p in layer.named_parameters():
                full = getattr(linear, name)
                p.copy_(specs[name].shard(full, layer.tp_rank, layer.tp_size) if name in specs else full)
        return layer


class ColumnParallelLinear(_ShardedLinear):
    """``y[…, O/W] = x[…, I] @ weight[O/W, I]ᵀ (+ bias[O/W])``: this rank's slice of the outputs.

    ``chunks=2`` for a stacked [gate; up] projection, so each rank keeps [gate shard; up shard].
    ``copy_input=False`` when the caller already entered the TP region once for several column
    layers that read the same input (q, k, v): one backward all-reduce instead of one per layer.
    ``gather_output`` all-gathers the full [O] outputs, for a column layer not followed by a row one.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp_group: ProcessGroup,
        *,
        bias: bool = False,
        chunks: int = 1,
        copy_input: bool = True,
        gather_output: bool = False,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, tp_group, ShardSpec(dim=0, chunks=chunks), "out_features")
        self.copy_input, self.gather_output = copy_input, gather_output
        if gather_output and chunks != 1:
            raise ValueError("gather_output with chunks > 1 would interleave the stacked blocks; gather per block")
        local_out = out_features // self.tp_size
        self.weight = nn.Parameter(torch.empty(local_out, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(local_out, device=device, dtype=dtype)) if bias else None
        nn.init.normal_(self.weight, std=init_std)

    def tp_shard_specs(self) -> dict[str, ShardSpec]:
        specs = {"weight": self.spec}
        if self.bias is not None:
            specs["bias"] = self.spec
        return specs

    def forward(self, x: Tensor) -> Tensor:
        if self.copy_input:
            x = copy_to_tp_region(x, self.tp_group)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tp_region(y, self.tp_group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {self.weight.shape[0]}), tp={self.tp_size}, chunks={self.spec.chunks}, "
                f"bias={self.bias is not None}")


class RowParallelLinear(_ShardedLinear):
    """``y[…, O] = Σ_ranks x[…, I/W] @ weight[O, I/W]ᵀ (+ bias[O])``: takes a feature-sharded input
    (a column-parallel layer's output) and returns the full, replicated output. The bias is
    replicated and added once, after the sum."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tp_group: ProcessGroup,
        *,
        bias: bool = False,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, tp_group, ShardSpec(dim=1), "in_features")
        self.weight = nn.Parameter(torch.empty(out_features, in_features // self.tp_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        nn.init.normal_(self.weight, std=init_std)

    def tp_shard_specs(self) -> dict[str, ShardSpec]:
        return {"weight": self.spec}

    def forward(self, x: Tensor) -> Tensor:
        y = reduce_from_tp_region(F.linear(x, self.weight), self.tp_group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.weight.shape[1]}), "
                f"out_features={self.out_features}, tp={self.tp_size}, bias={self.bias is not None}")
