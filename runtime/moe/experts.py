"""Routed experts as grouped weights, and the always-on shared experts.

Legend: R permuted rows (grouped by expert), H hidden, F expert FFN width, E local experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import ops
from ..param_init import Init, normal

__all__ = ["GroupedExperts", "MLP", "activate"]


def activate(h: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        return ops.swiglu(h)  # silu(gate) * up for h = [gate | up]; one pass each way on CPU in bf16
    if activation == "silu":
        return F.silu(h)
    return F.gelu(h, approximate="tanh")


def _init_from_rules(module: nn.Module) -> None:
    """A module built on its own draws from torch's global generator by its ``param_inits`` (the
    rules the model's per-parameter init reads too), in their order."""
    for name, rule in module.param_inits().items():
        nn.init.normal_(module.get_parameter(name), std=rule.std)


class GroupedExperts(nn.Module):
    """E expert MLPs stored as stacked weights and run as one grouped GEMM over expert-sorted rows.
    ``first_expert``: the global index of local expert 0 (not 0 once expert parallelism keeps a slice)."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, activation: str, init_std: float):
        super().__init__()
        self.activation = activation
        self.init_std = init_std
        self.first_expert = 0
        up = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.w1_EHF = nn.Parameter(torch.empty(num_experts, hidden_size, up))
        self.w2_EFH = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        # On CPU the weights' gradients reuse these between steps instead of a fresh mmap each.
        self.grad_buffers = ops.GradBuffers()
        _init_from_rules(self)

    def param_inits(self) -> dict[str, Init]:
        return {"w1_EHF": normal(self.init_std), "w2_EFH": normal(self.init_std / math.sqrt(2))}

    @property
    def num_experts(self) -> int:
        return self.w1_EHF.shape[0]

    @torch.no_grad()
    def keep_experts(self, first: int, count: int) -> None:
        """Keep experts ``[first, first + count)`` only (expert parallelism). Each weight becomes a
        new parameter holding a copy of its slice, with the old one's attributes (such as
        ``tensor_model_parallel``), so the full tensors can be freed; an optimizer built before
        this call would still hold the old ones. On the meta device nothing is allocated."""
        if not (0 <= first and count >= 1 and first + count <= self.num_experts):
            raise ValueError(f"experts [{first}, {first + count}) are not within the {self.num_experts} held here")
        for name, p in list(self.named_parameters(recurse=False)):
            local = nn.Parameter(p[first : first + count].clone(), requires_grad=p.requires_grad)
            vars(local).update(vars(p))
            setattr(self, name, local)
        self.first_expert += first
        self.grad_buffers.clear()

    def forward(self, x_RH: Tensor, counts_E: Tensor | list[int]) -> Tensor:
        counts = ops.group_offsets(counts_E, x_RH.device)  # device offsets on CUDA, else one host copy
        kept = self.grad_buffers
        h_RF = activate(ops.grouped_mm(x_RH, self.w1_EHF.to(x_RH.dtype), counts, grad_buffers=kept), self.activation)
        return ops.grouped_mm(h_RF, self.w2_EFH.to(x_RH.dtype), counts, grad_buffers=kept)


class MLP(nn.Module):
    """A dense FFN: the shared experts of DeepSeekMoE, or the FFN of a non-MoE block."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str, init_std: float):
        super().__init__()
        self.activation = activation
        self.init_std = init_std
        up = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.up = nn.Linear(hidden_size, up, bias=False)
        self.down = nn.Linear(ffn_hidden_size, hidden_size, bias=False)
        _init_from_rules(self)

    def param_inits(self) -> dict[str, Init]:
        return {"up.weight": normal(self.init_std), "down.weight": normal(self.init_std / math.sqrt(2))}

    def forward(self, x: Tensor) -> Tensor:
        return self.down(activate(self.up(x), self.activation))
