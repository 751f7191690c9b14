"""Tensor parallelism (Megatron style): sharded linears, their collectives, expert TP and the
conversion between sharded and full state. The TP process group is always passed in; the rewrite of
a particular model into these layers lives with the model (``models/parallelize.py``)."""

from .collectives import copy_to_tp_region, gather_from_tp_region, reduce_from_tp_region
from .experts import TensorParallelGroupedExperts
from .layers import ColumnParallelLinear, RowParallelLinear
from .sharding import ShardSpec, TPSharded
from .state_dict import (
    gather_full_grads,
    gather_full_state_dict,
    load_full_state_dict,
    shard_state_dict,
    tp_shard_specs,
)

__all__ = [
    "copy_to_tp_region",
    "reduce_from_tp_region",
    "gather_from_tp_region",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TensorParallelGroupedExperts",
    "ShardSpec",
    "TPSharded",
    "tp_shard_specs",
    "gather_full_state_dict",
    "gather_full_grads",
    "shard_state_dict",
    "load_full_state_dict",
]
