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
(``deepspeed.utils.groups._get_expert_parallel_ranks``), and :func:`register_with_deepspeed`
hands our groups to DeepSpeed so it never builds its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch import nn

from .config import ConfigError, check

__all__ = [
    "GROUP_KINDS",
    "Layout",
    "Coords",
    "ParallelState",
    "DeepSpeedMPU",
    "deepspeed_group_name",
    "expert_group_name",
    "register_with_deepspeed",
    "mark_expert_params",
    "deepspeed_moe_marker",
]

GROUP_KINDS = ("tp", "dp", "ep", "edp")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


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
        check(
            num_experts % self.ep == 0,
            field_name,
            f"num_experts={num_experts} is not divisible by parallel.ep={self.ep}; every EP rank must hold "
            f"the same number of experts: use a multiple of {self.ep} experts or ep in "
            f"{[d for d in _divisors(num_experts) if self.dp % d == 0]}",
        )

    def validate_model(self, num_heads: int, hidden_size: int, ffn_hidden_size: int, num_experts: int) -> None:
        """The model shapes this layout splits: TP shards heads and FFN widths, EP shards experts."""
        for value, name in (
            (num_heads, "model.num_heads"),
            (hidden_size, "model.hidden_size"),
            (ffn_hidden_size, "model.ffn_hidden_size"),
        ):
            fits = [d for d in _divisors(value) if self.world_size % d == 0]
            check(
                value % self.tp == 0,
                name,
                f"{name.split('.')[-1]}={value} is not divisible by parallel.tp={self.tp}; tensor parallelism "
                f"splits it evenly: use a multiple of {self.tp} or tp in {fits}",
            )
        if num_experts > 0:
            self.validate_num_experts(num_experts)

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

    @property
    def mpu(self) -> DeepSpeedMPU:
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """The ``mpu`` object ``deepspeed.initialize(mpu=...)`` queries (Megatron's names).

    DeepSpeed 0.19 calls the ``get_model_parallel_*``, ``get_tensor_model_parallel_*`` and
    ``get_data_parallel_*`` methods (engine, ZeRO 1/2, grad clipping, checkpoint metadata) and
    ``get_pipeline_model_parallel_world_size/rank`` (we have no pipeline: 1 and 0). It must NOT
    have ``initialize_sequence_parallel`` or ``get_sequence_parallel_*``: their presence switches
    ``deepspeed.utils.groups`` to its Ulysses code path.
    """

    def __init__(self, state: ParallelState):
        self._s = state

    def get_model_parallel_rank(self) -> int:
        return self._s.rank_in("tp")

    def get_model_parallel_world_size(self) -> int:
        return self._s.size("tp")

    def get_model_parallel_group(self):
        return self._s.groups["tp"]

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._s.ranks["tp"][0]

    def get_data_parallel_rank(self) -> int:
        return self._s.rank_in("dp")

    def get_data_parallel_world_size(self) -> int:
        return self._s.size("dp")

    def get_data_parallel_group(self):
        return self._s.groups["dp"]

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._s.ranks["dp"])

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


def deepspeed_group_name(ep: int) -> str:
    """DeepSpeed keys expert groups ``ep_size_<ep>`` and parses the number back out of the name
    (``groups._get_max_expert_size``), so our groups must be registered under that pattern."""
    return f"ep_size_{ep}"


def expert_group_name(state: ParallelState) -> str:
    return deepspeed_group_name(state.size("ep"))


def register_with_deepspeed(state: ParallelState) -> str:
    """Install our groups into ``deepspeed.utils.groups`` so DeepSpeed uses them instead of its own.

    Sets ``_EXPERT_PARALLEL_GROUP[name]`` / ``_EXPERT_DATA_PARALLEL_GROUP[name]`` (and their
    ``*_RANKS``), the TP/DP/model-parallel globals and ``groups.mpu``. DeepSpeed only ever creates
    expert groups for a name missing from those dicts (``MoE._create_process_groups``,
    ``_create_expert_and_data_parallel``), and its engine reads the dicts afterwards
    (``expert_data_parallel_group``), so registering before ``deepspeed.initialize`` is enough.
    Returns the group name to give :func:`mark_expert_params`. Needs no collective; attaches
    ``deepspeed.comm`` to the already-initialised torch process group if it is not yet.
    """
    import deepspeed.comm as ds_comm
    from deepspeed.utils import groups

    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)

    name = deepspeed_group_name(state.layout.ep)
    for table, ranks_table, kind in (
        (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS, "ep"),
        (groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS, "edp"),
    ):
        existing = ranks_table.get(name)
        if existing is not None and list(existing) != state.ranks[kind]:
            raise RuntimeError(
                f"DeepSpeed already has a {kind} group {name!r} with ranks {list(existing)}; ours is "
                f"{state.ranks[kind]}: register before anything creates DeepSpeed MoE groups"
            )
        table[name] = state.groups[kind]
        ranks_table[name] = list(state.ranks[kind])
    groups._TENSOR_MODEL_PARALLEL_GROUP = state.groups["tp"]
    groups._MODEL_PARALLEL_GROUP = state.groups["tp"]
    groups._DATA_PARALLEL_GROUP = state.groups["dp"]
    groups.mpu = state.mpu
    return name


def mark_expert_params(module: nn.Module, group_name: str) -> int:
    """Tag every parameter of ``module`` as an expert parameter exactly as DeepSpeed's ``Experts``
    does: ``allreduce = False`` (all that the function ``deepspeed.moe.utils.is_moe_param`` tests)
    and ``group_name`` (which ``_EXPERT_DATA_PARALLEL_GROUP`` entry reduces its grads and, under
    ZeRO 1/2, partitions its optimizer state). Returns the number of tensors tagged."""
    n = 0
    for p in module.parameters():
        p.allreduce = False
        p.group_name = group_name
        n += 1
    return n


def deepspeed_moe_marker(num_experts: int, ep: int, group_name: str) -> nn.Module:
    """A parameter-free submodule that makes DeepSpeed 0.19's engine treat the model as MoE.

    The engine sets ``has_moe_layers`` only when it finds an instance of
    ``deepspeed.moe.layer.MoE`` (``_configure_distributed_model``); without it, parameters tagged
    by :func:`mark_expert_params` crash the gradient all-reduce (``KeyError`` on ``group_name``
    in ``_get_gradients_for_reduction``) and ZeRO 1/2 gets no expert-data-parallel groups.
    Attach one to the model (``model.ds_moe_marker = ...``) before ``deepspeed.initialize``; its
    ``set_deepspeed_parallelism`` does nothing (the groups come from :func:`register_with_deepspeed`)
    and it is never called. DeepSpeed's own MoE checkpoint format is not supported through it.
    """
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEMarker(MoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)  # skip MoE.__init__: no gate, no experts, no groups
            self.num_experts = num_experts
            self.ep_size = ep
            self.num_local_experts = num_experts // ep
            self.expert_group_name = group_name

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            return None

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEMarker only flags the model as MoE for DeepSpeed; it is not a layer")

    return DeepSpeedMoEMarker()
