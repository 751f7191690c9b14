"""The permutation plan: where every routed slot of a top-k routing goes in expert order."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PermutePlan", "check_permute_args", "check_plan_args"]


@dataclass(frozen=True, eq=False)
class PermutePlan:
    """Where every routed slot went, so unpermute and the backward passes can invert permute."""

    counts: torch.Tensor  # [E] int64, real rows per expert (after the capacity drop)
    padded_counts: torch.Tensor  # [E] int64, counts rounded up to pad_multiple
    offsets: torch.Tensor  # [E+1] int64, first row of each expert block in x_perm
    row_of: torch.Tensor  # [T, k] int64, row of slot (t, j) in x_perm, -1 if unrouted or dropped
    src_slot: torch.Tensor  # [R] int64, slot t*k+j feeding each row, -1 for padding rows
    dropped: torch.Tensor  # [T, k] bool, slots dropped by the capacity limit
    num_tokens: int
    top_k: int

    @classmethod
    def from_op(cls, tensors, topk_idx_Tk: torch.Tensor) -> PermutePlan:
        """The plan from the six tensors ``modalmoe::build_plan`` returns (``permute_rows`` after its rows)."""
        return cls(*tensors, num_tokens=topk_idx_Tk.shape[0], top_k=topk_idx_Tk.shape[1])

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def num_rows(self) -> int:
        return self.src_slot.shape[0]


def check_permute_args(
    x_TH: torch.Tensor, topk_idx_Tk: torch.Tensor, num_experts: int, pad_multiple: int, capacity: int | None
) -> None:
    if x_TH.dim() != 2 or topk_idx_Tk.dim() != 2 or x_TH.shape[0] != topk_idx_Tk.shape[0]:
        raise ValueError(f"permute expects x [T, H] and topk_idx [T, k], got {tuple(x_TH.shape)} and "
                         f"{tuple(topk_idx_Tk.shape)}")
    check_plan_args(topk_idx_Tk, num_experts, pad_multiple, capacity)


def check_plan_args(topk_idx_Tk: torch.Tensor, num_experts: int, pad_multiple: int, capacity: int | None) -> None:
    if topk_idx_Tk.dim() != 2:
        raise ValueError(f"topk_idx must be [T, k], got {tuple(topk_idx_Tk.shape)}")
    if topk_idx_Tk.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_idx must be int32 or int64, got {topk_idx_Tk.dtype}")
    if num_experts < 1 or pad_multiple < 1 or (capacity is not None and capacity < 0):
        raise ValueError(f"need num_experts >= 1, pad_multiple >= 1, capacity None or >= 0; got "
                         f"{num_experts}, {pad_multiple}, {capacity}")
