"""What DeepSpeed must be told about our process groups and parameters, so that it uses our layout
(:mod:`.parallel_state`) instead of building its own: the ``mpu`` adapter, the expert-group names,
the registration of our groups in ``deepspeed.utils.groups``, the expert-parameter marks, and the
marker module that makes its engine treat the model as MoE. DeepSpeed itself is imported only
inside the functions that need it.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from .parallel_state import ParallelState

__all__ = [
    "DeepSpeedMPU",
    "deepspeed_group_name",
    "expert_group_name",
    "register_with_deepspeed",
    "mark_expert_params",
    "deepspeed_moe_marker",
]


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
    groups.mpu = DeepSpeedMPU(state)
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
