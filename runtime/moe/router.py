"""Routers: score every (token, expert) pair and pick experts, all in float32.

Legend: T tokens (flattened), H hidden, E experts, M modalities, k slots per token.
Every router returns a :class:`Routing`; slots that are not routed (padding tokens, slots beyond a
modality's own top_k) hold expert -1 and weight 0, so dispatch and losses need no special cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import ops
from ..param_init import Init, constant, normal
from .config import ROUTER_CLASSES, MoEConfig

__all__ = ["Routing", "Router", "build_router"]


@dataclass
class Routing:
    logits_TE: Tensor  # float32 raw gate logits (for the z-loss); -inf outside a modality's partition
    probs_TE: Tensor  # float32 routing distribution over experts, rows sum to 1 on real tokens
    idx_Tk: Tensor  # int64 chosen experts, -1 = slot not routed
    weights_Tk: Tensor  # float32 gate weights, 0 on unrouted slots


def top_k(scores_TE: Tensor, k: int) -> Tensor:
    """Indices [T, k] of the k largest scores per row, largest first. For the small k of token-choice
    routing, k argmax passes (ties to the lower index), which on CPU run as one C++ pass over the
    rows, faster than both the passes in PyTorch and ``torch.topk`` (docs/benchmarks.md)."""
    if k > 4:
        return torch.topk(scores_TE, k, dim=-1).indices
    return ops.top_k_rows(scores_TE, k)


class Router(nn.Module):
    """Token-choice router; subclasses change how logits are made or how experts are picked."""

    score: str = "softmax"

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, H = cfg.num_experts, cfg.hidden_size
        self.weight_EH = nn.Parameter(torch.empty(E, H))
        nn.init.normal_(self.weight_EH, std=cfg.init_std)
        # aux-loss-free balancing (DeepSeek-V3): a bias that only steers selection, learned from load
        self.register_buffer("expert_bias_E", torch.zeros(E), persistent=True)
        self.register_buffer("allowed_ME", self._allowed_mask(cfg), persistent=False)
        self.register_buffer("top_k_M", self._top_k(cfg), persistent=False)

    def param_inits(self) -> dict[str, Init]:
        """What each parameter starts as (the model's deterministic init reads this)."""
        return {"weight_EH": normal(self.cfg.init_std)}

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The buffers as built, recomputed in place (after a meta build is materialised)."""
        self.expert_bias_E.zero_()
        self.allowed_ME.copy_(self._allowed_mask(self.cfg, "cpu"))
        self.top_k_M.copy_(self._top_k(self.cfg, "cpu"))

    @staticmethod
    def _top_k(cfg: MoEConfig, device: str | None = None) -> Tensor:
        return torch.tensor([cfg.top_k_of(m) for m in range(cfg.num_modalities)], dtype=torch.long, device=device)

    @staticmethod
    def _allowed_mask(cfg: MoEConfig, device: str | None = None) -> Tensor:
        allowed = torch.ones(cfg.num_modalities, cfg.num_experts, dtype=torch.bool, device=device)
        if cfg.modality_partition:
            allowed.zero_()
            start = 0
            for m, n in enumerate(cfg.modality_partition):
                allowed[m, start : start + n] = True
                start += n
        return allowed

    def logits(self, x_TH: Tensor, modality_T: Tensor) -> Tensor:
        return F.linear(x_TH, self.weight_EH.float())

    def forward(self, x_TH: Tensor, modality_T: Tensor, valid_T: Tensor) -> Routing:
        x_TH = x_TH.float()
        logits_TE = self.logits(x_TH, modality_T)
        if self.cfg.modality_partition:
            logits_TE = logits_TE.masked_fill(~self.allowed_ME[modality_T], float("-inf"))
        if self.score == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-9)
        else:
            scores_TE = probs_TE = torch.softmax(logits_TE, dim=-1)
        idx_Tk, weights_Tk = self.select(scores_TE, modality_T, valid_T)
        return Routing(logits_TE, probs_TE, idx_Tk, weights_Tk)

    def select(self, scores_TE: Tensor, modality_T: Tensor, valid_T: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        k = cfg.max_top_k
        choice_TE = scores_TE.detach() + self.expert_bias_E if cfg.bias_update_rate > 0 else scores_TE
        if cfg.modality_partition:
            choice_TE = choice_TE.masked_fill(~self.allowed_ME[modality_T], float("-inf"))
        idx_Tk = top_k(choice_TE, k)
        weights_Tk = scores_TE.gather(1, idx_Tk)
        keep_Tk = valid_T[:, None] & (
            torch.arange(k, device=idx_Tk.device)[None, :] < self.top_k_M[modality_T][:, None]
        )
        weights_Tk = weights_Tk * keep_Tk
        if (cfg.normalize_topk and k > 1) or self.score == "sigmoid":
            weights_Tk = weights_Tk / weights_Tk.sum(-1, keepdim=True).clamp_min(1e-9)
        return idx_Tk.masked_fill(~keep_Tk, -1), weights_Tk

    @torch.no_grad()
    def update_bias(self, load_E: Tensor) -> None:
        """Nudge the selection bias towards balance: under-loaded experts up, over-loaded down."""
        if self.cfg.bias_update_rate > 0:  # an empty batch gives sign(0) = 0: no nudge, and no host sync
            load_E = load_E.float()
            self.expert_bias_E += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)


class SigmoidRouter(Router):
    score = "sigmoid"


class SwitchRouter(Router):
    """Top-1; the gate weight is the raw probability (not renormalised), as in Switch."""

    def select(self, scores_TE, modality_T, valid_T):
        choice_TE = scores_TE.detach() + self.expert_bias_E if self.cfg.bias_update_rate > 0 else scores_TE
        if self.cfg.modality_partition:
            choice_TE = choice_TE.masked_fill(~self.allowed_ME[modality_T], float("-inf"))
        idx_T1 = choice_TE.argmax(-1, keepdim=True)
        weights_T1 = scores_TE.gather(1, idx_T1) * valid_T[:, None]
        return idx_T1.masked_fill(~valid_T[:, None], -1), weights_T1


class NoisyRouter(Router):
    """Noisy top-k gating: learned, input-dependent Gaussian noise on the logits while training."""

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.noise_EH = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))

    def param_inits(self) -> dict[str, Init]:
        return {**super().param_inits(), "noise_EH": constant(0.0)}

    def logits(self, x_TH, modality_T):
        logits_TE = super().logits(x_TH, modality_T)
        if self.training:
            std_TE = F.softplus(F.linear(x_TH, self.noise_EH.float()))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * std_TE
        return logits_TE


class RandomRouter(Router):
    """A frozen random projection: routing that depends on the token but is never learned."""

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        nn.init.normal_(self.weight_EH, std=1.0 / math.sqrt(cfg.hidden_size))
        self.weight_EH.requires_grad_(False)

    def param_inits(self) -> dict[str, Init]:
        return {"weight_EH": normal(1.0 / math.sqrt(self.cfg.hidden_size))}


class ModalityEmbeddingRouter(Router):
    """Modality-aware: a learned modality embedding is added to the router input."""

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.modality_MH = nn.Parameter(torch.zeros(cfg.num_modalities, cfg.hidden_size))
        nn.init.normal_(self.modality_MH, std=1.0)

    def param_inits(self) -> dict[str, Init]:
        return {**super().param_inits(), "modality_MH": normal(1.0)}

    def logits(self, x_TH, modality_T):
        return F.linear(x_TH + self.modality_MH.float()[modality_T], self.weight_EH.float())


class ModalityGateRouter(Router):
    """Modality-aware: one gate per modality; ``weight_EH`` is modality 0's gate."""

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        extra = torch.empty(cfg.num_modalities - 1, cfg.num_experts, cfg.hidden_size)
        self.extra_gates_MEH = nn.Parameter(nn.init.normal_(extra, std=cfg.init_std))

    def param_inits(self) -> dict[str, Init]:
        return {**super().param_inits(), "extra_gates_MEH": normal(self.cfg.init_std)}

    def logits(self, x_TH, modality_T):
        gates_MEH = torch.cat([self.weight_EH[None], self.extra_gates_MEH], 0).float()
        M, E, H = gates_MEH.shape
        all_TME = F.linear(x_TH, gates_MEH.reshape(M * E, H)).view(-1, M, E)
        return all_TME.gather(1, modality_T.view(-1, 1, 1).expand(-1, 1, E)).squeeze(1)


class ExpertChoiceRouter(Router):
    """Each expert takes its top-C real tokens; a token may get 0..E experts (Zhou et al. 2022)."""

    def select(self, scores_TE, modality_T, valid_T):
        T, E = scores_TE.shape
        n_real = int(valid_T.sum())
        budget = min(n_real, math.ceil(self.cfg.expert_choice_capacity_factor * n_real * self.cfg.top_k / E))
        if budget == 0:
            empty = scores_TE.new_zeros(T, 1)
            return empty.long() - 1, empty
        masked_TE = scores_TE.detach().masked_fill(~valid_T[:, None], float("-inf"))
        top_CE = torch.topk(masked_TE, budget, dim=0).indices  # [C, E] token ids per expert
        chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=scores_TE.device)
        chosen_TE.scatter_(0, top_CE, True)
        k = max(int(chosen_TE.sum(1).max()), 1)
        experts_E = torch.arange(E, device=scores_TE.device)
        order_TE = torch.where(chosen_TE, experts_E, E).sort(dim=1).values[:, :k]
        routed_Tk = order_TE < E
        idx_Tk = torch.where(routed_Tk, order_TE, -1)
        weights_Tk = scores_TE.gather(1, order_TE.clamp_max(E - 1)) * routed_Tk
        return idx_Tk, weights_Tk


# resolved at import, so a misspelt class name in the registry fails here, not at the first build
_CLASSES: dict[str, type[Router]] = {name: globals()[cls] for name, cls in ROUTER_CLASSES.items()}


def build_router(cfg: MoEConfig) -> Router:
    return _CLASSES[cfg.router](cfg)
