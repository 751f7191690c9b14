"""MoEConfig: every knob of one MoE layer; ``validate()`` only checks, the job validates once at start."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError, check

__all__ = ["MoEConfig", "ROUTERS", "ROUTER_CLASSES"]

# The one router registry: config name -> the class in router.py that implements it. Validation
# reads the names, build_router the classes; naming the classes keeps this module below router.py.
ROUTER_CLASSES: dict[str, str] = {
    "topk": "Router",  # softmax top-k (GShard / Mixtral)
    "sigmoid": "SigmoidRouter",  # sigmoid scores, top-k, weights normalised over the chosen (DeepSeek-V3)
    "noisy": "NoisyRouter",  # noisy top-k gating (Shazeer et al. 2017)
    "switch": "SwitchRouter",  # top-1 (Switch Transformer)
    "expert_choice": "ExpertChoiceRouter",  # each expert picks its top tokens under a budget (Zhou et al. 2022)
    "random": "RandomRouter",  # frozen random router
    "modality": "ModalityEmbeddingRouter",  # learned modality embedding added to the router input
    "modality_gate": "ModalityGateRouter",  # a separate gate per modality
}
ROUTERS = tuple(ROUTER_CLASSES)


@dataclass
class MoEConfig:
    hidden_size: int = 0  # 0 = the model's hidden size (inside a model config); set it for a bare layer
    ffn_hidden_size: int = 128
    num_experts: int = 8
    top_k: int = 2
    router: str = "topk"
    num_modalities: int = 2
    activation: Literal["gelu", "silu", "swiglu"] = "gelu"

    # per-modality routing: top_k and capacity per modality id; experts partitioned by modality
    modality_top_k: list[int] | None = None
    modality_capacity_factor: list[float] | None = None
    # experts owned by each modality, in order (sum = num_experts); each modality routes only within
    # its own group (multiway / BEiT-3, MoMa)
    modality_partition: list[int] | None = None

    normalize_topk: bool = True
    # None = dropless (default). Otherwise rows per expert = ceil(cf * routed slots / E).
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    drop_policy: Literal["position", "probability"] = "position"
    # expert-choice budget: each expert takes ceil(cf * T * top_k / E) tokens
    expert_choice_capacity_factor: float = 1.0
    # dropless imbalance guard: warn (once per layer and expert) when one expert receives more than
    # this multiple of the mean rows per expert in a step (0 = never); with imbalance_cap_ratio set,
    # rows beyond that multiple of the mean are dropped (counted as dropped) instead of computed
    imbalance_warn_ratio: float = 4.0
    imbalance_cap_ratio: float | None = None

    num_shared_experts: int = 0
    shared_ffn_hidden_size: int | None = None

    # auxiliary losses / regularisers (0 = off)
    lb_coef: float = 0.01
    lb_modality_coef: float = 0.0
    lb_modality_target: list[list[float]] | None = None
    z_loss_coef: float = 0.0
    limoe_local_coef: float = 0.0
    limoe_global_coef: float = 0.0
    limoe_global_threshold: float | None = None
    bias_update_rate: float = 0.0
    entropy_floor_coef: float = 0.0
    entropy_floor: float = 1.0
    min_util_coef: float = 0.0
    min_util: float = 0.0
    block_diag_coef: float = 0.0
    block_diag_groups: int = 2

    init_std: float = 0.02

    def top_k_of(self, modality: int) -> int:
        return self.modality_top_k[modality] if self.modality_top_k else self.top_k

    @property
    def max_top_k(self) -> int:
        return max(self.modality_top_k) if self.modality_top_k else self.top_k

    def validate(self, prefix: str = "moe") -> MoEConfig:
        p = prefix
        check(self.hidden_size > 0, f"{p}.hidden_size", f"must be positive (a bare MoE layer has no model to inherit it from), got {self.hidden_size}")
        check(self.ffn_hidden_size > 0, f"{p}.ffn_hidden_size", f"must be positive, got {self.ffn_hidden_size}")
        check(self.num_experts >= 1, f"{p}.num_experts", f"must be >= 1, got {self.num_experts}")
        check(self.num_modalities >= 1, f"{p}.num_modalities", f"must be >= 1, got {self.num_modalities}")
        if self.router not in ROUTERS:
            raise ConfigError(
                f"config field `{p}.router`: unknown router {self.router!r}; choose one of {list(ROUTERS)}"
            )
        check(self.top_k >= 1, f"{p}.top_k", f"must be >= 1, got {self.top_k}")
        check(
            self.top_k <= self.num_experts,
            f"{p}.top_k",
            f"top_k={self.top_k} is larger than num_experts={self.num_experts}; lower top_k or add experts",
        )
        if self.router == "switch":
            check(self.max_top_k == 1, f"{p}.top_k", "the switch router is top-1: set top_k=1 (and modality_top_k to 1s)")
        if self.modality_top_k is not None:
            check(
                len(self.modality_top_k) == self.num_modalities,
                f"{p}.modality_top_k",
                f"needs one entry per modality ({self.num_modalities}), got {self.modality_top_k}",
            )
            for m, k in enumerate(self.modality_top_k):
                check(1 <= k <= self.num_experts, f"{p}.modality_top_k[{m}]", f"must be in [1, num_experts], got {k}")
        if self.modality_capacity_factor is not None:
            check(
                len(self.modality_capacity_factor) == self.num_modalities,
                f"{p}.modality_capacity_factor",
                f"needs one entry per modality ({self.num_modalities})",
            )
            check(all(c > 0 for c in self.modality_capacity_factor), f"{p}.modality_capacity_factor", "entries must be > 0")
        if self.modality_partition is not None:
            part = self.modality_partition
            check(len(part) == self.num_modalities, f"{p}.modality_partition", f"needs one group size per modality ({self.num_modalities}), got {part}")
            check(sum(part) == self.num_experts, f"{p}.modality_partition", f"group sizes {part} must add up to num_experts={self.num_experts}")
            for m, n in enumerate(part):
                check(n >= self.top_k_of(m), f"{p}.modality_partition[{m}]", f"modality {m} has {n} experts but routes top-{self.top_k_of(m)}")
            check(self.router != "expert_choice", f"{p}.modality_partition", "is not supported with the expert_choice router")
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            check(v is None or v > 0, f"{p}.{name}", f"must be > 0 or null (dropless), got {v}")
        check(self.expert_choice_capacity_factor > 0, f"{p}.expert_choice_capacity_factor", "must be > 0")
        check(self.imbalance_warn_ratio == 0 or self.imbalance_warn_ratio >= 1, f"{p}.imbalance_warn_ratio",
              f"must be 0 (no warning) or >= 1 (a multiple of the mean rows per expert), got {self.imbalance_warn_ratio}")
        check(self.imbalance_cap_ratio is None or self.imbalance_cap_ratio >= 1, f"{p}.imbalance_cap_ratio",
              f"must be null (no cap) or >= 1 (a multiple of the mean rows per expert), got {self.imbalance_cap_ratio}")
        check(self.num_shared_experts >= 0, f"{p}.num_shared_experts", "must be >= 0")
        for name in (
            "lb_coef", "lb_modality_coef", "z_loss_coef", "limoe_local_coef", "limoe_global_coef",
            "bias_update_rate", "entropy_floor_coef", "min_util_coef", "block_diag_coef", "min_util",
        ):
            v = getattr(self, name)
            check(v >= 0, f"{p}.{name}", f"coefficients must be >= 0 (0 switches it off), got {v}")
        if self.lb_modality_target is not None:
            t = self.lb_modality_target
            check(
                len(t) == self.num_modalities and all(len(r) == self.num_experts for r in t),
                f"{p}.lb_modality_target",
                f"must be [num_modalities][num_experts] = [{self.num_modalities}][{self.num_experts}]",
            )
            check(all(x > 0 for r in t for x in r), f"{p}.lb_modality_target", "entries must be > 0 (they are target shares)")
        if self.block_diag_coef > 0:
            g = self.block_diag_groups
            check(g >= 2, f"{p}.block_diag_groups", "must be >= 2")
            check(self.num_experts % g == 0 and self.hidden_size % g == 0, f"{p}.block_diag_groups",
                  f"{g} must divide num_experts ({self.num_experts}) and hidden_size ({self.hidden_size})")
        return self
