"""Routing statistics per call, per modality: what the trainer logs and the losses are built from.

Legend: T tokens, E experts, M modalities, k slots. Only real (non-padding) tokens are counted.
Stats are detached tensors so they can be summed over micro-batches and all-reduced over ranks
before anything is copied to the host. Under data parallelism the losses need the sums of the whole
(global) batch, not of one rank's shard: :meth:`RoutingSums.across` gives them, with grad.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..distributed import shared_loss_sum
from .router import Routing

__all__ = ["RoutingSums", "RoutingStats", "token_entropy", "specialisation_index", "count_groups"]


def count_groups(group: Tensor, keep: Tensor, num_groups: int) -> Tensor:
    """float32 [num_groups]: how many kept entries fall in each group. A scatter-add, not
    ``bincount(group[keep])``: boolean indexing and CUDA's bincount both wait for the device."""
    return torch.zeros(num_groups, dtype=torch.float32, device=group.device).index_add_(
        0, group.reshape(-1), keep.reshape(-1).to(torch.float32)
    )


def token_entropy(probs_TE: Tensor) -> Tensor:
    """Entropy in nats of each row; 0·log 0 = 0 (partitioned routers leave zeros).

    log is taken of p clamped to the smallest normal float, not via ``xlogy``, whose gradient at
    p = 0 is 0/0 = NaN and poisons the router grads of partitioned routers.
    """
    return -(probs_TE * probs_TE.clamp_min(torch.finfo(probs_TE.dtype).tiny).log()).sum(-1)


@dataclass
class RoutingSums:
    """Per-modality sums over real tokens, shared by the losses (with grad) and the stats."""

    onehot_TM: Tensor  # float32, zero rows for padding tokens
    tokens_M: Tensor  # float32 real tokens per modality
    load_ME: Tensor  # float32 routed slots per (modality, expert), before any capacity drop
    prob_sum_ME: Tensor  # float32 Σ_t probs over the modality's tokens (differentiable)
    entropy_sum_M: Tensor  # float32 Σ_t H(p_t) over the modality's tokens (differentiable)
    z_sum: Tensor  # float32 scalar Σ_t logsumexp(logits_t)² over real tokens (differentiable)

    @classmethod
    def compute(cls, routing: Routing, modality_T: Tensor, valid_T: Tensor, num_modalities: int) -> RoutingSums:
        probs_TE = routing.probs_TE
        E = probs_TE.shape[1]
        onehot_TM = torch.nn.functional.one_hot(modality_T, num_modalities).float() * valid_T[:, None]
        routed_Tk = (routing.idx_Tk >= 0) & valid_T[:, None]
        group_Tk = modality_T[:, None] * E + routing.idx_Tk.clamp_min(0)
        load_ME = count_groups(group_Tk, routed_Tk, num_modalities * E).view(num_modalities, E)
        z_T = torch.logsumexp(routing.logits_TE, dim=-1) ** 2
        return cls(
            onehot_TM=onehot_TM,
            tokens_M=onehot_TM.sum(0),
            load_ME=load_ME,
            prob_sum_ME=onehot_TM.t() @ probs_TE,
            entropy_sum_M=onehot_TM.t() @ token_entropy(probs_TE),
            z_sum=(z_T * valid_T).sum(),
        )

    def across(self, group, extra: Tensor | None = None) -> tuple[RoutingSums, Tensor | None]:
        """The sums over every rank of ``group`` (the DP group), in one all-gather that can also
        carry a small per-rank ``extra`` vector (the EP dispatcher's expert counts).

        Differentiable: each rank's router gets dp × its share of the global-loss gradient, and
        DP gradient averaging (÷ dp) then yields exactly the single-process gradient. The backward
        needs no collective because every rank builds the same losses from these same sums
        (:func:`~..distributed.shared_loss_sum`). ``onehot_TM`` stays local (it is per token).
        Returns (global sums, every rank's ``extra`` as float64 rows, or None).
        """
        parts = [self.tokens_M, self.load_ME, self.prob_sum_ME, self.entropy_sum_M, self.z_sum]
        flat, extras = shared_loss_sum(torch.cat([p.reshape(-1) for p in parts]), group, extra)
        tokens_M, load_ME, prob_sum_ME, entropy_sum_M, z_sum = (
            f.view_as(p) for f, p in zip(flat.split([p.numel() for p in parts]), parts)
        )
        sums = RoutingSums(
            onehot_TM=self.onehot_TM,
            tokens_M=tokens_M.detach(),
            load_ME=load_ME.detach(),
            prob_sum_ME=prob_sum_ME,
            entropy_sum_M=entropy_sum_M,
            z_sum=z_sum,
        )
        return sums, (extras if extra is not None else None)


@dataclass
class RoutingStats:
    """What one MoE layer did, summable across calls (``+``) and ranks (all-reduce the tensors)."""

    tokens_M: Tensor  # real tokens per modality
    load_ME: Tensor  # routed slots per (modality, expert) before capacity drop
    kept_ME: Tensor  # slots actually computed per (modality, expert)
    entropy_sum_M: Tensor  # Σ per-token routing entropy (nats)
    losses: dict[str, Tensor] = field(default_factory=dict)  # unweighted aux terms, summed over calls
    calls: int = 1

    @classmethod
    def from_sums(cls, sums: RoutingSums, kept_ME: Tensor, losses: dict[str, Tensor]) -> RoutingStats:
        return cls(
            tokens_M=sums.tokens_M.detach(),
            load_ME=sums.load_ME.detach(),
            kept_ME=kept_ME.detach().float(),
            entropy_sum_M=sums.entropy_sum_M.detach(),
            losses={k: v.detach().float() for k, v in losses.items()},
        )

    def __add__(self, other: RoutingStats) -> RoutingStats:
        keys = set(self.losses) | set(other.losses)
        zero = self.tokens_M.new_zeros(())
        return RoutingStats(
            tokens_M=self.tokens_M + other.tokens_M,
            load_ME=self.load_ME + other.load_ME,
            kept_ME=self.kept_ME + other.kept_ME,
            entropy_sum_M=self.entropy_sum_M + other.entropy_sum_M,
            losses={k: self.losses.get(k, zero) + other.losses.get(k, zero) for k in keys},
            calls=self.calls + other.calls,
        )

    def tensors(self) -> list[Tensor]:
        """The tensors to all-reduce (SUM) across ranks, in a fixed order."""
        return [self.tokens_M, self.load_ME, self.kept_ME, self.entropy_sum_M] + [
            self.losses[k] for k in sorted(self.losses)
        ]

    def load_share_ME(self) -> Tensor:
        """Fraction of each modality's routed slots that each expert received."""
        return self.load_ME / self.load_ME.sum(1, keepdim=True).clamp_min(1)

    def dropped_fraction_M(self) -> Tensor:
        routed_M = self.load_ME.sum(1)
        return (routed_M - self.kept_ME.sum(1)) / routed_M.clamp_min(1)

    def entropy_M(self) -> Tensor:
        """Mean per-token routing entropy (nats) per modality."""
        return self.entropy_sum_M / self.tokens_M.clamp_min(1)

    def balance(self) -> float:
        """One number for a progress bar: load of the busiest expert over the mean load (1 = even)."""
        load_E = self.load_ME.sum(0)
        return float(load_E.max() / load_E.mean().clamp_min(1e-9)) if load_E.sum() > 0 else 1.0

    def summary(self, modality_names: list[str] | None = None) -> dict[str, float]:
        """Flat, host-side scalars for logging (keys like ``entropy/text``)."""
        M = self.tokens_M.numel()
        names = modality_names or [str(m) for m in range(M)]
        out: dict[str, float] = {"balance": self.balance()}
        share = self.load_share_ME()
        drop = self.dropped_fraction_M()
        ent = self.entropy_M()
        for m, name in enumerate(names[:M]):
            out[f"entropy/{name}"] = float(ent[m])
            out[f"dropped/{name}"] = float(drop[m])
            out[f"max_share/{name}"] = float(share[m].max())
        for k, v in self.losses.items():
            out[f"loss/{k}"] = float(v) / self.calls
        return out


def specialisation_index(load_ME: Tensor) -> float:
    """I(modality; expert) / H(modality) from a routed-slot count table: 0 = experts ignore modality,
    1 = the chosen expert reveals the modality. Modalities are weighted by their slot counts."""
    joint = load_ME.double() / load_ME.sum().clamp_min(1)
    p_m = joint.sum(1, keepdim=True)
    p_e = joint.sum(0, keepdim=True)
    mi = (joint * (joint / (p_m * p_e)).log()).nan_to_num(0.0).sum()
    h_m = -(torch.special.xlogy(p_m, p_m)).sum()
    return float(mi / h_m) if h_m > 0 else 0.0
