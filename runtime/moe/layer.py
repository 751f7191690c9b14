"""MoELayer: route → dispatch → experts → combine, plus the router's auxiliary losses and stats.

Legend: T tokens (flattened leading dims), H hidden, E experts, M modalities, k slots, R rows.

Precision: under autocast the rows are cast once to the autocast dtype before the permute, so the
permute, the all-to-all payload, the expert GEMMs and the combine all run in bf16; the router, the
routing sums and the losses run with autocast off, in float32 (a bf16 softmax over E experts and
bf16 balance sums move the top-k picks and the loss). Host syncs: none here on the dropless path
(the imbalance cap included); the dispatcher's one (rows per expert, or the EP split sizes) is the
layer's only one, repeated when activation checkpointing recomputes the layer in backward.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .capacity import plan_capacity
from .config import MoEConfig
from .dispatch import LocalDispatcher, TokenDispatcher
from .ep_dispatch import AllToAllDispatcher
from .experts import MLP, GroupedExperts
from .losses import router_losses
from .router import build_router
from .stats import RoutingStats, RoutingSums, count_groups

__all__ = ["MoELayer", "MoEAux", "CheckpointCall", "compute_dtype", "moe_layers"]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's when it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@dataclass
class MoEAux:
    loss: Tensor  # Σ coef · aux term, a scalar with grad
    stats: RoutingStats


@dataclass
class CheckpointCall:
    """One activation-checkpointed call (models/activation_checkpoint.py): its forward and each
    recompute in backward run with this call current, so a layer with side effects can tell the two
    apart and hand its recompute what the forward saw. The recompute's outputs are thrown away, so
    stats and aux losses cannot be counted twice; what must not repeat is a change to the layer's
    own state (the router bias update)."""

    recomputing: bool = False
    saved: dict = field(default_factory=dict)  # per layer: what its forward leaves for the recompute

    def contexts(self) -> tuple[_Current, _Current]:
        """``torch.utils.checkpoint``'s ``context_fn``: (the forward's context, the recompute's)."""
        return _Current(self, False), _Current(self, True)

    @staticmethod
    def current() -> CheckpointCall | None:
        return _CALL.get()


_CALL: ContextVar[CheckpointCall | None] = ContextVar("modalmoe_checkpoint_call", default=None)


class _Current:
    """Makes ``call`` current (re-enterable: a second backward recomputes again)."""

    def __init__(self, call: CheckpointCall, recomputing: bool):
        self.call, self.recomputing, self.tokens = call, recomputing, []

    def __enter__(self) -> CheckpointCall:
        self.call.recomputing = self.recomputing
        self.tokens.append(_CALL.set(self.call))
        return self.call

    def __exit__(self, *exc) -> None:
        _CALL.reset(self.tokens.pop())


class MoELayer(nn.Module):
    """``stats_group`` (the DP group, None = single process): the routing sums behind the losses
    and the bias update are summed over it, so every rank computes the global-batch losses. Every
    rank must add ``aux.loss`` to its loss with the same weight (the trainer adds it unscaled): the
    sums' backward relies on that instead of a second collective."""

    def __init__(self, cfg: MoEConfig, stats_group=None):
        super().__init__()
        self.cfg = cfg
        self.stats_group = stats_group
        self.ep_group = None  # set by apply_ep
        self.router = build_router(cfg)
        self.dispatcher: TokenDispatcher = LocalDispatcher(cfg.num_experts)
        self.experts = GroupedExperts(
            cfg.num_experts, cfg.hidden_size, cfg.ffn_hidden_size, cfg.activation, cfg.init_std
        )
        self.shared = None
        if cfg.num_shared_experts > 0:
            width = cfg.num_shared_experts * (cfg.shared_ffn_hidden_size or cfg.ffn_hidden_size)
            self.shared = MLP(cfg.hidden_size, width, cfg.activation, cfg.init_std)

    def apply_ep(self, ep_group) -> None:
        """Spread the experts over ``ep_group``: this rank keeps global experts
        ``[r·L, (r+1)·L)`` (r its EP rank, L = num_experts / ep) and token copies reach them by
        all-to-all. Call once, on a layer that still holds every expert (plain or tensor-parallel)
        and was built identically on every EP rank, before an optimizer sees its parameters.

        Routing sums still cover only ``stats_group``: for the global-batch losses under data
        parallelism set it to the DP group, which contains the EP group (``parallelize`` does)."""
        E = self.cfg.num_experts
        if self.ep_group is not None:
            raise ValueError("this MoELayer is already expert-parallel; apply_ep runs once, on a layer "
                             "holding every expert")
        if self.experts.num_experts != E:
            raise ValueError(f"apply_ep needs all {E} experts on this rank; the layer holds {self.experts.num_experts}")
        dispatcher = AllToAllDispatcher(E, ep_group)  # refuses an uneven split before anything changes
        L = dispatcher.num_local_experts
        self.experts.keep_experts(dispatcher.ep_rank * L, L)
        self.dispatcher = dispatcher
        self.ep_group = ep_group

    def forward(self, x: Tensor, modality: Tensor, mask: Tensor | None = None) -> tuple[Tensor, MoEAux]:
        """Under activation checkpointing the router bias update (``bias_update_rate``) is the one
        side effect: the forward applies it once, and the recompute routes with the bias the forward
        routed with (else it picks other experts and its saved tensors no longer match) and leaves
        the updated bias as it found it."""
        call = CheckpointCall.current()
        if call is None or not (self.training and self.cfg.bias_update_rate > 0):
            return self._forward(x, modality, mask, update_bias=call is None or not call.recomputing)
        bias_E = self.router.expert_bias_E
        if not call.recomputing:
            call.saved[self] = bias_E.clone()
            return self._forward(x, modality, mask, update_bias=True)
        updated_E = bias_E.clone()
        bias_E.copy_(call.saved[self])
        try:  # the recompute may stop early (torch's early_stop) by raising: restore either way
            return self._forward(x, modality, mask, update_bias=False)
        finally:
            bias_E.copy_(updated_E)

    def _forward(self, x: Tensor, modality: Tensor, mask: Tensor | None, update_bias: bool) -> tuple[Tensor, MoEAux]:
        cfg = self.cfg
        H = x.shape[-1]
        x_TH = x.reshape(-1, H)
        modality_T = modality.reshape(-1).long()
        valid_T = mask.reshape(-1).bool() if mask is not None else torch.ones_like(modality_T, dtype=torch.bool)
        if modality_T.numel() != x_TH.shape[0]:
            raise ValueError(f"modality has {modality_T.numel()} entries for {x_TH.shape[0]} tokens; shapes must match x[..., H]")

        dtype = compute_dtype(x_TH)
        with torch.autocast(x_TH.device.type, enabled=False):
            routing = self.router(x_TH, modality_T, valid_T)
            sums = RoutingSums.compute(routing, modality_T, valid_T, cfg.num_modalities)
            cap = plan_capacity(cfg, routing.idx_Tk, routing.weights_Tk, modality_T, self.training)
        x_RH, plan = self.dispatcher.permute(x_TH.to(dtype), cap.idx_Tk, cap.kernel_capacity)
        # one collective gives the losses their global sums and the EP peers their row counts
        batch_sums, counts_rows = sums, None
        if self.stats_group is not None:
            batch_sums, counts_rows = sums.across(self.stats_group, self.dispatcher.shared_counts(plan))
        with torch.autocast(x_TH.device.type, enabled=False):
            aux_loss, terms = router_losses(cfg, routing, batch_sums, valid_T, self.router.allowed_ME, self.router.weight_EH)

        x_local, combine_plan, counts_E = self.dispatcher.send(x_RH, plan, counts_rows, self.stats_group)
        y_RH = self.experts(x_local, counts_E)
        y_TH = self.dispatcher.combine(y_RH, combine_plan, routing.weights_Tk)
        if self.shared is not None:
            y_TH = y_TH + self.shared(x_TH)

        kept_idx_Tk = cap.idx_Tk.masked_fill(plan.dropped, -1)
        E = cfg.num_experts
        kept_ME = count_groups(modality_T[:, None] * E + kept_idx_Tk.clamp_min(0), kept_idx_Tk >= 0,
                               cfg.num_modalities * E).view(cfg.num_modalities, E)
        if update_bias and self.training and cfg.bias_update_rate > 0:
            self.router.update_bias(batch_sums.load_ME.sum(0))
        stats = RoutingStats.from_sums(sums, kept_ME, terms)
        return y_TH.view(x.shape), MoEAux(loss=aux_loss, stats=stats)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]
