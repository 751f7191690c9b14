"""How one full tensor is split over the ranks of a TP group, and put back together.

A tensor is cut along one dim into ``world`` equal shards in rank order. A stacked tensor (the
[gate; up] halves of a SwiGLU projection) is first cut into ``chunks`` equal blocks along that dim
and each block is split on its own, so every rank holds [gate shard; up shard] and the local
``activate`` still finds its gate in the first half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["ShardSpec", "TPSharded"]


@dataclass(frozen=True)
class ShardSpec:
    dim: int
    chunks: int = 1  # 2 for [gate; up] stacked along ``dim``

    def check(self, size: int, world: int, what: str) -> None:
        if size % (self.chunks * world):
            raise ValueError(
                f"{what}: size {size} on dim {self.dim} does not split into {self.chunks} block(s) "
                f"x {world} TP ranks"
            )

    def shard(self, full: Tensor, rank: int, world: int) -> Tensor:
        """This rank's shard of ``full`` (a fresh contiguous tensor)."""
        self.check(full.shape[self.dim], world, "shard")
        blocks = full.chunk(self.chunks, dim=self.dim)
        return torch.cat([b.chunk(world, dim=self.dim)[rank] for b in blocks], dim=self.dim).contiguous()

    def unshard(self, shards: list[Tensor]) -> Tensor:
        """The full tensor from every rank's shard, given in rank order."""
        per_rank = [s.chunk(self.chunks, dim=self.dim) for s in shards]
        return torch.cat([p[c] for c in range(self.chunks) for p in per_rank], dim=self.dim)


@runtime_checkable
class TPSharded(Protocol):
    """A module that holds shards of some of its parameters: names them (local names) with their spec."""

    def tp_shard_specs(self) -> dict[str, ShardSpec]: ...
