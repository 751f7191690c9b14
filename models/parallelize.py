"""Shard a built ``MultimodalTransformer`` for this rank's layout: the TP rewrite, then EP (each MoE
layer's own :meth:`~modalmoe.runtime.moe.layer.MoELayer.apply_ep`), then the parameter marks
DeepSpeed reads.

Every layout starts from the single-process weights, which is what the parity tests compare
against. :func:`build_local_model` gets there without the whole model: it builds on the meta device,
shards there (TP rewrite, ``apply_ep``), then allocates only this rank's shards and fills each from
the per-parameter init (or a consolidated checkpoint's slices), equal to the slices of the
single-process tensors. ``meta=False`` is the reference: the whole model on every rank, then sliced.

Tensor parallelism follows the model's ``tp_plan()``. What is sharded over the TP group:
- attention: q/k/v column-parallel (whole heads per rank: each rank runs num_heads/W of them),
  output projection row-parallel; q, k and v enter the TP region once, together;
- dense FFN: ``up`` column-parallel (``colwise_gated``: gate and up halves split separately),
  ``down`` row-parallel;
- MoE FFN, only with ``expert_tp``: every routed expert split column/row over TP
  (:class:`TensorParallelGroupedExperts`) and the shared experts like a dense FFN.

What stays replicated (full copy on every TP rank): embeddings and ``lm_head`` (the tied token
table included; vocab-parallel would also need a vocab-parallel cross-entropy), norms, the router,
and without ``expert_tp`` the whole MoE layer. Every TP rank sees the same tokens and the collectives
make activations and gradients outside the TP regions identical, so replicated parameters get
identical gradients and stay in step; a data-parallel all-reduce must not also run over TP ranks.

Every TP rank must have built the model from the same seed and must keep drawing the same random
numbers (dropout, noisy routing) on replicated data.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from ..runtime.config import check
from ..runtime.deepspeed_groups import expert_group_name, mark_expert_params
from ..runtime.materialize import materialize
from ..runtime.moe.experts import MLP
from ..runtime.moe.layer import MoELayer, moe_layers
from ..runtime.parallel_state import ParallelState
from ..runtime.tensor_parallel.collectives import copy_to_tp_region
from ..runtime.tensor_parallel.experts import TensorParallelGroupedExperts
from ..runtime.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from ..runtime.tensor_parallel.sharding import TPSharded
from ..runtime.tensor_parallel.state_dict import tp_shard_specs
from .attention import Attention
from .config import ModelConfig
from .transformer import MultimodalTransformer, TPStyle, build_model

__all__ = ["parallelize", "parallelize_model", "build_local_model", "check_tp_divisibility", "REPLICATED"]

REPLICATED = frozenset({"embed.tokens", "lm_head"})  # in tp_plan(), but kept whole on purpose


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _require_divides(tp: int, n: int, field: str, why: str, world_size: int | None) -> None:
    msg = (f"tp={tp} must divide {field}={n} ({why}); set parallel.tp to one of {_divisors(n)} "
           f"or change {field} to a multiple of {tp}")
    if world_size is not None:
        fits = [d for d in _divisors(n) if world_size % d == 0]
        msg += f"; on {world_size} ranks: use a multiple of {tp} for `{field}` or tp in {fits}"
    check(n % tp == 0, "parallel.tp", msg)


def check_tp_divisibility(cfg: ModelConfig, tp: int, expert_tp: bool, world_size: int | None = None) -> None:
    """Raise ConfigError (field ``parallel.tp``) unless every dimension split over TP divides evenly:
    the one check of what TP splits, run by the trainer before any process group exists (with the
    launched ``world_size``, to suggest tp values that fit it too) and by :func:`parallelize_model`.
    ``model.ffn_hidden_size`` is checked even when every layer is MoE, so switching layers to dense
    never turns a valid layout invalid."""
    check(tp >= 1, "parallel.tp", f"must be >= 1, got {tp}")

    def require(n: int, field: str, why: str) -> None:
        _require_divides(tp, n, field, why, world_size)

    require(cfg.hidden_size, "model.hidden_size", "q/k/v outputs and wo inputs are split over TP ranks")
    require(cfg.num_heads, "model.num_heads", "attention heads are split over TP ranks")
    require(cfg.ffn_hidden_size, "model.ffn_hidden_size", "the dense FFN is split over TP ranks")
    if expert_tp and cfg.moe_layers:
        moe = cfg.moe
        require(moe.ffn_hidden_size, "model.moe.ffn_hidden_size",
                "expert tensor parallelism splits every expert's FFN over TP ranks")
        if moe.num_shared_experts > 0:
            width = moe.num_shared_experts * (moe.shared_ffn_hidden_size or moe.ffn_hidden_size)
            field = "model.moe.shared_ffn_hidden_size" if moe.shared_ffn_hidden_size else "model.moe.ffn_hidden_size"
            require(width, f"the shared-expert width ({field} x num_shared_experts)",
                    "expert tensor parallelism splits the shared experts too")


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _shard_linear(root: nn.Module, name: str, style: TPStyle, group: ProcessGroup) -> None:
    linear = root.get_submodule(name)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"tp_plan names {name!r} as {style}, but it is a {type(linear).__name__}, not nn.Linear")
    if style == "rowwise":
        new: nn.Module = RowParallelLinear.from_full(linear, group)
    elif style in ("colwise", "colwise_gated"):
        new = ColumnParallelLinear.from_full(linear, group, chunks=2 if style == "colwise_gated" else 1)
    else:
        raise ValueError(f"unknown TP style {style!r} for {name!r}")
    _replace(root, name, new)


def _enter_tp_region_once(group: ProcessGroup):
    """Forward pre-hook: the attention input enters the TP region here, once for q, k and v."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (copy_to_tp_region(args[0], group), *args[1:]), kwargs
        x: Tensor = kwargs["x_BSD"]
        return args, {**kwargs, "x_BSD": copy_to_tp_region(x, group)}

    return hook


def _localize_attention(attn: Attention, group: ProcessGroup, tp: int) -> None:
    for proj in (attn.wq, attn.wk, attn.wv):
        if not isinstance(proj, ColumnParallelLinear):
            raise TypeError("tp_plan() must make q/k/v column-parallel before the heads are split over TP")
        proj.copy_input = False
    attn.num_heads //= tp
    attn.register_forward_pre_hook(_enter_tp_region_once(group), with_kwargs=True)


def _shard_mlp(mlp: MLP, group: ProcessGroup) -> None:
    style: TPStyle = "colwise_gated" if mlp.activation == "swiglu" else "colwise"
    _shard_linear(mlp, "up", style, group)
    _shard_linear(mlp, "down", "rowwise", group)


def _shard_moe(moe: MoELayer, group: ProcessGroup) -> None:
    moe.experts = TensorParallelGroupedExperts.from_full(moe.experts, group)
    if moe.shared is not None:
        _shard_mlp(moe.shared, group)


def parallelize_model(model: MultimodalTransformer, tp_group: ProcessGroup, expert_tp: bool = False) -> MultimodalTransformer:
    """Shard ``model`` (built identically on every rank of ``tp_group``) in place; returns it.

    ``expert_tp=False`` keeps MoE layers whole on every TP rank (no collective; expert parallelism
    is what spreads experts); ``True`` splits each expert's FFN over TP as well.
    """
    if any(isinstance(m, TPSharded) for m in model.modules()):
        raise ValueError("model is already tensor-parallel; parallelize_model runs once on a freshly built model")
    tp = dist.get_world_size(tp_group)
    check_tp_divisibility(model.cfg, tp, expert_tp)
    for name, style in model.tp_plan().items():
        if name not in REPLICATED:
            _shard_linear(model, name, style, tp_group)
    for block in model.layers:
        _localize_attention(block.attn, tp_group, tp)
        if block.is_moe and expert_tp:
            _shard_moe(block.ffn, tp_group)
    return model


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
    for layer in moe_layers(model):
        if ep > 1:
            layer.apply_ep(state.ep_group)
        layer.stats_group = state.dp_group if dp > 1 else None
        mark_expert_params(layer.experts, expert_group_name(state))
    return model


def build_local_model(
    cfg: ModelConfig,
    state: ParallelState | None,
    *,
    expert_tp: bool = False,
    device: torch.device | str = "cpu",
    seed: int | None = None,
    weights=None,
    meta: bool = True,
) -> MultimodalTransformer:
    """This rank's model for ``state``'s layout (None: one process), on ``device``, holding only its
    own TP shards and EP experts plus the replicated parts; the values are the slices of
    ``build_model(cfg, seed)``. ``weights``: an object with ``load_into(model)`` that fills a model of
    any layout from a full checkpoint by slices (``runtime.consolidate.Consolidated``) instead of the
    init. ``meta=False`` builds the whole model first and slices it (the reference path)."""
    if not meta:
        model = build_model(cfg, seed=seed, device="cpu")
        if weights is not None:
            weights.load_into(model)
        if state is not None:
            parallelize(model, state, expert_tp=expert_tp)
        return model.to(device)
    with torch.device("meta"):
        model = MultimodalTransformer(cfg, seed=seed)
    if state is not None:
        parallelize(model, state, expert_tp=expert_tp)
    materialize(model, device)
    if weights is None:
        model.reset_parameters()
    else:
        weights.load_into(model)
    return model
