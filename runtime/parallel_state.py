"""The process layout of a job: which ranks form the TP, DP, EP and expert-DP groups.

Megatron ordering, TP innermost: ``world = tp × dp`` and the EP groups are carved out of DP,
``dp = ep × edp``, so ``rank = ((edp_idx · ep + ep_idx) · tp + tp_idx)``.

* DP group: the ranks sharing ``tp_idx`` (size dp); dense grads are averaged over it.
* EP group: the ranks sharing ``tp_idx`` and ``edp_idx`` (size ep); the MoE all-to-all runs in it,
  and its ranks hold different experts and different tokens.
* EDP group: the ranks sharing ``tp_idx`` and ``ep_idx`` (size dp/ep); they hold the same experts,
  so expert grads are reduced over it only.

:class:`Layout` is pure arithmetic (validate, list every group) so a 512-rank layout can be checked
in one process with no process group; :meth:`ParallelState.build` then creates the groups, in the
same order on every rank. This matches DeepSpeed's own expert layout
(``deepspeed.utils.groups._get_expert_parallel_ranks``); what DeepSpeed is told about these groups
lives in :mod:`.deepspeed_groups`. What the layout splits in the model is checked by the model side
(``models.parallelize.check_tp_divisibility``) and, for experts, by :meth:`Layout.validate_num_experts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from .config import ConfigError, check

__all__ = ["GROUP_KINDS", "Layout", "Coords", "ParallelState", "check_experts_divide"]

GROUP_KINDS = ("tp", "dp", "ep", "edp")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_experts_divide(num_experts: int, ep: int, dp: int | None = None,
                         field_name: str = "model.moe.num_experts") -> None:
    """Every EP rank holds num_experts / ep experts; the ep values suggested also divide dp when known."""
    fits = [d for d in _divisors(num_experts) if dp is None or dp % d == 0]
    check(
        num_experts % ep == 0,
        field_name,
        f"num_experts={num_experts} is not divisible by parallel.ep={ep}; every EP rank must hold "
        f"the same number of experts: use a multiple of {ep} experts or ep in {fits}",
    )


@dataclass(frozen=True)
class Coords:
    """A rank's position on each axis; ``dp = edp · ep + ep`` index within its DP group."""

    tp: int
    dp: int
    ep: int
    edp: int


@dataclass(frozen=True)
class Layout:
    """Parallel degrees for ``world_size`` ranks, validated on construction; ``dp=-1`` = derived."""

    world_size: int
    tp: int = 1
    ep: int = 1
    dp: int = -1

    def __post_init__(self) -> None:
        W, tp, ep, dp = self.world_size, self.tp, self.ep, self.dp
        check(W >= 1, "parallel", f"the world size must be >= 1, got {W}")
        check(tp >= 1, "parallel.tp", f"must be >= 1, got {tp}")
        check(ep >= 1, "parallel.ep", f"must be >= 1, got {ep}")
        check(dp == -1 or dp >= 1, "parallel.dp", f"must be >= 1 or -1 (derived from the world size), got {dp}")
        check(
            W % tp == 0,
            "parallel.tp",
            f"tp={tp} does not divide the world size {W}; use one of {_divisors(W)} (or launch a multiple of {tp} ranks)",
        )
        if dp == -1:
            dp = W // tp
            object.__setattr__(self, "dp", dp)
        check(
            dp * tp == W,
            "parallel.dp",
            f"tp × dp = {tp} × {dp} = {tp * dp} but the world size is {W}; set dp={W // tp} or dp=-1 to derive it",
        )
        check(
            dp % ep == 0,
            "parallel.ep",
            f"ep={ep} must divide the data-parallel degree dp={dp} (EP groups are carved out of DP); "
            f"use one of {_divisors(dp)}",
        )

    @classmethod
    def from_config(cls, parallel, world_size: int) -> Layout:
        """From a ``ParallelConfig`` (``tp``, ``ep``, ``dp``) and the launched world size."""
        return cls(world_size=world_size, tp=parallel.tp, ep=parallel.ep, dp=parallel.dp)

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    def rank_of(self, tp: int, ep: int, edp: int) -> int:
        return (edp * self.ep + ep) * self.tp + tp

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        tp, dp = rank % self.tp, rank // self.tp
        return Coords(tp=tp, dp=dp, ep=dp % self.ep, edp=dp // self.ep)

    def groups(self) -> dict[str, list[list[int]]]:
        """Every group of each kind, as rank lists in a fixed order (the order groups are created)."""
        tp, ep, edp, dp = self.tp, self.ep, self.edp, self.dp
        r = self.rank_of
        return {
            "tp": [[d * tp + t for t in range(tp)] for d in range(dp)],
            "dp": [[d * tp + t for d in range(dp)] for t in range(tp)],
            "ep": [[r(t, e, x) for e in range(ep)] for t in range(tp) for x in range(edp)],
            "edp": [[r(t, e, x) for x in range(edp)] for t in range(tp) for e in range(ep)],
        }

    def group_ranks(self, rank: int) -> dict[str, list[int]]:
        """The ranks of each group that ``rank`` belongs to."""
        c = self.coords(rank)
        return {
            "tp": [c.dp * self.tp + t for t in range(self.tp)],
            "dp": [d * self.tp + c.tp for d in range(self.dp)],
            "ep": [self.rank_of(c.tp, e, c.edp) for e in range(self.ep)],
            "edp": [self.rank_of(c.tp, c.ep, x) for x in range(self.edp)],
        }

    def validate_num_experts(self, num_experts: int, field_name: str = "model.moe.num_experts") -> None:
        check_experts_divide(num_experts, self.ep, self.dp, field_name)

    def describe(self, rank: int | None = None) -> str:
        text = f"world {self.world_size} = tp {self.tp} × dp {self.dp} (dp = ep {self.ep} × edp {self.edp})"
        if rank is not None:
            c, g = self.coords(rank), self.group_ranks(rank)
            text += (
                f"; rank {rank}: tp_idx {c.tp}, dp_idx {c.dp} (ep_idx {c.ep}, edp_idx {c.edp}); "
                + ", ".join(f"{k} group {_short(g[k])}" for k in GROUP_KINDS)
            )
        return text


def _short(ranks: list[int]) -> str:
    return str(ranks) if len(ranks) <= 8 else f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}] ({len(ranks)} ranks)"


@dataclass
class ParallelState:
    """This rank's view of a :class:`Layout`: its coordinates and its process-group handles."""

    layout: Layout
    rank: int
    coords: Coords
    ranks: dict[str, list[int]]  # kind → the ranks of this rank's group of that kind
    groups: dict[str, object] = field(repr=False)  # kind → ProcessGroup

    @classmethod
    def build(cls, layout: Layout, rank: int | None = None) -> ParallelState:
        """Create every group of every kind (collective: all ranks must call it with the same layout).

        Identical rank lists (e.g. EDP = DP when ep = 1) share one group handle.
        """
        if not dist.is_initialized():
            raise RuntimeError("ParallelState.build needs torch.distributed initialised (see distributed.init_from_env)")
        world = dist.get_world_size()
        if world != layout.world_size:
            raise ConfigError(
                f"config field `parallel`: the layout is for {layout.world_size} ranks but {world} were launched; "
                "launch that many ranks or change parallel.tp / parallel.dp"
            )
        rank = dist.get_rank() if rank is None else rank
        mine = layout.group_ranks(rank)
        made: dict[tuple[int, ...], object] = {}
        handles: dict[str, object] = {}
        for kind, rank_lists in layout.groups().items():
            for ranks in rank_lists:
                key = tuple(ranks)
                if key not in made:
                    made[key] = dist.new_group(ranks)
                if ranks == mine[kind]:
                    handles[kind] = made[key]
        return cls(layout=layout, rank=rank, coords=layout.coords(rank), ranks=mine, groups=handles)

    def group(self, kind: str):
        return self.groups[kind]

    def size(self, kind: str) -> int:
        return len(self.ranks[kind])

    def rank_in(self, kind: str) -> int:
        return self.ranks[kind].index(self.rank)

    @property
    def tp_group(self):
        return self.groups["tp"]

    @property
    def dp_group(self):
        return self.groups["dp"]

    @property
    def ep_group(self):
        return self.groups["ep"]

    @property
    def edp_group(self):
        return self.groups["edp"]

    def describe(self) -> str:
        return self.layout.describe(self.rank)
