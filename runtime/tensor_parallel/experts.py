"""Expert tensor parallelism: every routed expert's FFN split over the TP group, Megatron style.

Legend: E local experts, R permuted rows, H hidden, F full expert FFN width, W TP world size.
Each rank keeps w1 [E, H, F/W] (columns; [gate; up] halves split separately under SwiGLU) and
w2 [E, F/W, H] (rows), runs the same grouped GEMMs on the same rows, and the partial outputs are
summed over TP before the combine. Summing the [R, H] expert rows rather than the combined [T, H]
output costs top_k times the bytes, but then the combine (and so the router's gradient through the
gate weights) sees full expert outputs and needs no collective of its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from ..moe.experts import GroupedExperts
from .collectives import copy_to_tp_region, reduce_from_tp_region
from .sharding import ShardSpec

__all__ = ["TensorParallelGroupedExperts"]


class TensorParallelGroupedExperts(GroupedExperts):
    """Drop-in for :class:`GroupedExperts` (same parameter names, same call) holding F/W per expert."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: str,
        init_std: float,
        tp_group: ProcessGroup,
    ):
        rank, world = dist.get_rank(tp_group), dist.get_world_size(tp_group)
        if ffn_hidden_size % world:
            raise ValueError(f"expert ffn_hidden_size={ffn_hidden_size} does not split over {world} TP ranks")
        super().__init__(num_experts, hidden_size, ffn_hidden_size // world, activation, init_std)
        self.tp_group, self.tp_rank, self.tp_size = tp_group, rank, world
        self.ffn_hidden_size = ffn_hidden_size
        self.w1_spec = ShardSpec(dim=2, chunks=2 if activation == "swiglu" else 1)
        self.w2_spec = ShardSpec(dim=1)

    @classmethod
    def from_full(cls, experts: GroupedExperts, tp_group: ProcessGroup) -> TensorParallelGroupedExperts:
        """This rank's shard of a full ``GroupedExperts`` (same on every rank); built on the full
        one's device, so a meta model stays unallocated."""
        E, H, _ = experts.w1_EHF.shape
        F = experts.w2_EFH.shape[1]
        with torch.device(experts.w1_EHF.device):
            layer = cls(E, H, F, experts.activation, experts.init_std, tp_group).to(experts.w1_EHF.dtype)
        layer.first_expert = experts.first_expert
        with torch.no_grad():
            layer.w1_EHF.copy_(layer.w1_spec.shard(experts.w1_EHF, layer.tp_rank, layer.tp_size))
            layer.w2_EFH.copy_(layer.w2_spec.shard(experts.w2_EFH, layer.tp_rank, layer.tp_size))
        return layer

    def tp_shard_specs(self) -> dict[str, ShardSpec]:
        return {"w1_EHF": self.w1_spec, "w2_EFH": self.w2_spec}

    def forward(self, x_RH: Tensor, counts_E: Tensor | list[int]) -> Tensor:
        partial_RH = super().forward(copy_to_tp_region(x_RH, self.tp_group), counts_E)
        return reduce_from_tp_region(partial_RH, self.tp_group)

    def extra_repr(self) -> str:
        E, F_local, H = self.w2_EFH.shape
        return f"experts={E}, hidden={H}, ffn={self.ffn_hidden_size} (local {F_local}), tp={self.tp_size}"
