"""Token permutation for MoE layers and the grouped matmul of expert MLPs.

``permute`` groups each token's routed slots by expert so the expert MLPs see contiguous row blocks;
``unpermute`` puts the expert outputs back and mixes them with the router weights. The plan is a
stable counting sort (histogram, prefix sum, scatter) done by the C++/CUDA ops in ``modalmoe._C``;
the pure-PyTorch ``*_reference`` functions beside them define the semantics, serve the tests and
are the fallback when the extension cannot be loaded.

Shape legend: T tokens, k routed slots per token (top-k), S = T*k slots (slot s = t*k + j),
E experts, H hidden size, R rows of the permuted buffer (real rows + padding rows),
K / N grouped-matmul in / out features.

Each call checks that ``modalmoe._C`` has kernels for its tensors' device (:func:`kernels_for`): an
extension built without nvcc serves CPU tensors only, and CUDA tensors then run the references
(with one warning) instead of failing in the dispatcher. On CUDA, :func:`group_offsets` and
:func:`grouped_mm` use torch's grouped matmul (``torch._grouped_mm``) for bf16 with no host sync.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "HAS_EXTENSION",
    "PermutePlan",
    "kernels_for",
    "permute",
    "unpermute",
    "group_offsets",
    "grouped_mm",
    "plan_reference",
    "permute_reference",
    "unpermute_reference",
    "grouped_mm_reference",
]

logger = logging.getLogger(__name__)


def _load_extension() -> bool:
    """Import modalmoe._C (which registers torch.ops.modalmoe.*); warn loudly once if that fails."""
    if os.environ.get("MODALMOE_DISABLE_EXTENSION", "0") == "1":
        reason = "MODALMOE_DISABLE_EXTENSION=1"
    else:
        try:
            from . import _C  # noqa: F401
        except ImportError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        else:
            return True
    message = (
        f"modalmoe.ops: the compiled extension modalmoe._C is unavailable ({reason}); falling back to "
        "the slow pure-PyTorch reference kernels. Rebuild with `pip install --no-build-isolation -e .`."
    )
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    logger.warning(message)
    return False


HAS_EXTENSION: bool = _load_extension()

_KERNELS: dict[tuple[str, str], bool] = {}  # (device type, op) -> modalmoe._C serves it
_FALLBACK_WARNED: set[str] = set()  # device types already warned about


def kernels_for(device_type: str, op: str = "permute_rows") -> bool:
    """Whether ``modalmoe._C`` has a kernel for ``modalmoe::<op>`` on tensors of ``device_type``.

    CPU always does when the extension loaded; CUDA only when setup.py found nvcc. grouped_mm is
    composite over at::mm, so it serves CUDA tensors even from a CPU-only build.
    """
    if not HAS_EXTENSION:
        return False
    key = (device_type, op)
    if key not in _KERNELS:
        try:
            dispatch_key = torch._C._dispatch_key_for_device(device_type)
            _KERNELS[key] = torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"modalmoe::{op}", dispatch_key)
        except RuntimeError:
            _KERNELS[key] = False
    return _KERNELS[key]


def _use_kernels(t: torch.Tensor, op: str = "permute_rows") -> bool:
    """True when the compiled op serves ``t``'s device; otherwise warn once and use the reference."""
    if not HAS_EXTENSION:
        return False  # _load_extension already warned
    device_type = t.device.type
    if kernels_for(device_type, op):
        return True
    if device_type not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(device_type)
        message = (
            f"modalmoe.ops: modalmoe._C has no {device_type} kernels (for CUDA: it was built without nvcc, "
            f"e.g. no CUDA toolkit / CUDA_HOME at build time, or MODALMOE_NO_CUDA=1); {device_type} tensors "
            "fall back to the slow pure-PyTorch reference kernels. Rebuild with the CUDA toolkit that matches "
            "torch.version.cuda: `CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .` "
            "(MODALMOE_REQUIRE_CUDA=1 makes a CPU-only build an error)."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        logger.warning(message)
    return False


# Filled now so that torch.compile(fullgraph=True) reads constants instead of tracing the dispatcher.
for _device_type in ("cpu", "cuda"):
    for _op in ("permute_rows", "combine_rows", "grouped_mm"):
        kernels_for(_device_type, _op)


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

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    @property
    def num_rows(self) -> int:
        return self.src_slot.shape[0]


def _check_permute_args(
    x_TH: torch.Tensor, topk_idx_Tk: torch.Tensor, num_experts: int, pad_multiple: int, capacity: int | None
) -> None:
    if x_TH.dim() != 2 or topk_idx_Tk.dim() != 2 or x_TH.shape[0] != topk_idx_Tk.shape[0]:
        raise ValueError(f"permute expects x [T, H] and topk_idx [T, k], got {tuple(x_TH.shape)} and "
                         f"{tuple(topk_idx_Tk.shape)}")
    if topk_idx_Tk.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_idx must be int32 or int64, got {topk_idx_Tk.dtype}")
    if num_experts < 1 or pad_multiple < 1 or (capacity is not None and capacity < 0):
        raise ValueError(f"need num_experts >= 1, pad_multiple >= 1, capacity None or >= 0; got "
                         f"{num_experts}, {pad_multiple}, {capacity}")


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch references (argsort + index_select / index_add): the semantics, and the fallback.
# ----------------------------------------------------------------------------------------------


def plan_reference(
    topk_idx_Tk: torch.Tensor, num_experts: int, *, pad_multiple: int = 1, capacity: int | None = None
) -> PermutePlan:
    """Argsort-based plan; the counting-sort kernels must reproduce it exactly."""
    T, k = topk_idx_Tk.shape
    E, device = num_experts, topk_idx_Tk.device
    idx_S = topk_idx_Tk.reshape(-1).long()
    if bool(((idx_S < -1) | (idx_S >= E)).any()):
        raise ValueError(f"topk_idx entries must be -1 or in [0, {E})")
    routed_S = idx_S >= 0
    key_S = torch.where(routed_S, idx_S, E)
    order_S = torch.argsort(key_S, stable=True)
    routed_counts_E = torch.bincount(idx_S[routed_S], minlength=E)
    first_E1 = torch.cat([routed_counts_E.new_zeros(1), routed_counts_E.cumsum(0)])
    rank_S = torch.empty_like(idx_S)
    rank_S[order_S] = torch.arange(idx_S.numel(), device=device) - first_E1[key_S[order_S]]
    cap = idx_S.numel() if capacity is None else capacity
    keep_S = routed_S & (rank_S < cap)
    counts_E = routed_counts_E.clamp(max=cap)
    padded_E = (counts_E + pad_multiple - 1) // pad_multiple * pad_multiple
    offsets_E1 = torch.cat([padded_E.new_zeros(1), padded_E.cumsum(0)])
    row_of_S = torch.where(keep_S, offsets_E1[key_S.clamp(max=E - 1)] + rank_S, -1)
    src_slot_R = torch.full((int(offsets_E1[-1]),), -1, dtype=torch.int64, device=device)
    src_slot_R[row_of_S[keep_S]] = torch.arange(idx_S.numel(), device=device)[keep_S]
    return PermutePlan(
        counts=counts_E,
        padded_counts=padded_E,
        offsets=offsets_E1,
        row_of=row_of_S.view(T, k),
        src_slot=src_slot_R,
        dropped=(routed_S & ~keep_S).view(T, k),
        num_tokens=T,
        top_k=k,
    )


def permute_reference(
    x_TH: torch.Tensor,
    topk_idx_Tk: torch.Tensor,
    num_experts: int,
    *,
    pad_multiple: int = 1,
    capacity: int | None = None,
) -> tuple[torch.Tensor, PermutePlan]:
    """Reference for :func:`permute` built from index_select / index_copy (autograd by torch)."""
    _check_permute_args(x_TH, topk_idx_Tk, num_experts, pad_multiple, capacity)
    plan = plan_reference(topk_idx_Tk, num_experts, pad_multiple=pad_multiple, capacity=capacity)
    rows_R = plan.src_slot >= 0
    tokens_n = plan.src_slot[rows_R] // plan.top_k
    x_perm_RH = x_TH.new_zeros(plan.num_rows, x_TH.shape[1]).index_copy(
        0, rows_R.nonzero().squeeze(1), x_TH.index_select(0, tokens_n)
    )
    return x_perm_RH, plan


def unpermute_reference(
    y_perm_RH: torch.Tensor, plan: PermutePlan, topk_weights_Tk: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference for :func:`unpermute` built from index_select / index_add, summed in float32+."""
    acc_dtype = torch.float64 if y_perm_RH.dtype == torch.float64 else torch.float32
    row_of_S = plan.row_of.reshape(-1)
    kept_S = row_of_S >= 0
    slots_n = kept_S.nonzero().squeeze(1)
    contrib_nH = y_perm_RH.index_select(0, row_of_S[kept_S]).to(acc_dtype)
    if topk_weights_Tk is not None:
        contrib_nH = contrib_nH * topk_weights_Tk.reshape(-1)[slots_n].to(acc_dtype).unsqueeze(1)
    y_TH = contrib_nH.new_zeros(plan.num_tokens, y_perm_RH.shape[1])
    return y_TH.index_add(0, slots_n // plan.top_k, contrib_nH).to(y_perm_RH.dtype)


def grouped_mm_reference(x_RK: torch.Tensor, w_EKN: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """The naive per-expert loop that :func:`grouped_mm` must match."""
    return torch.cat([x_RK[offsets[e] : offsets[e + 1]] @ w_EKN[e] for e in range(w_EKN.shape[0])])


# ----------------------------------------------------------------------------------------------
# Public API (compiled ops when available).
# ----------------------------------------------------------------------------------------------


def permute(
    x_TH: torch.Tensor,
    topk_idx_Tk: torch.Tensor,
    num_experts: int,
    *,
    pad_multiple: int = 1,
    capacity: int | None = None,
) -> tuple[torch.Tensor, PermutePlan]:
    """Group the routed rows of ``x`` by expert: returns ``x_perm [R, H]`` and its plan.

    Rows come in ascending expert order and, within an expert, in slot order (token, then j).
    ``topk_idx == -1`` marks unrouted slots. ``capacity`` keeps the first ``capacity`` slots of each
    expert in that order and drops the rest; each expert block is zero-padded to ``pad_multiple``.
    """
    _check_permute_args(x_TH, topk_idx_Tk, num_experts, pad_multiple, capacity)
    if not _use_kernels(x_TH, "permute_rows"):
        return permute_reference(x_TH, topk_idx_Tk, num_experts, pad_multiple=pad_multiple, capacity=capacity)
    x_perm_RH, counts, padded, offsets, row_of, src_slot, dropped = torch.ops.modalmoe.permute_rows(
        x_TH, topk_idx_Tk, num_experts, pad_multiple, -1 if capacity is None else capacity
    )
    plan = PermutePlan(
        counts=counts,
        padded_counts=padded,
        offsets=offsets,
        row_of=row_of,
        src_slot=src_slot,
        dropped=dropped,
        num_tokens=topk_idx_Tk.shape[0],
        top_k=topk_idx_Tk.shape[1],
    )
    return x_perm_RH, plan


def unpermute(
    y_perm_RH: torch.Tensor, plan: PermutePlan, topk_weights_Tk: torch.Tensor | None = None
) -> torch.Tensor:
    """``y[t] = sum_j w[t, j] * y_perm[row_of[t, j]]`` over kept slots; dtype of ``y_perm``.

    Sums in float32 for bfloat16 rows; ``topk_weights`` may be float32 with bfloat16 rows (router
    math stays float32) and its gradient comes back in its own dtype.
    """
    if y_perm_RH.dim() != 2 or y_perm_RH.shape[0] != plan.num_rows:
        raise ValueError(f"y_perm must be [{plan.num_rows}, H], got {tuple(y_perm_RH.shape)}")
    if topk_weights_Tk is not None and topk_weights_Tk.shape != plan.row_of.shape:
        raise ValueError(f"topk_weights must be {tuple(plan.row_of.shape)}, got {tuple(topk_weights_Tk.shape)}")
    if not _use_kernels(y_perm_RH, "combine_rows"):
        return unpermute_reference(y_perm_RH, plan, topk_weights_Tk)
    return torch.ops.modalmoe.combine_rows(y_perm_RH, plan.row_of, plan.src_slot, topk_weights_Tk)


# Device types whose grouped GEMMs run through torch's grouped matmul (when its constraints hold).
_TORCH_GROUPED_MM_DEVICES: frozenset[str] = frozenset({"cuda"})


@torch.compiler.assume_constant_result
def _cuda_sm80(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


def _torch_grouped_mm_for(device: torch.device) -> bool:
    if device.type not in _TORCH_GROUPED_MM_DEVICES or not hasattr(torch, "_grouped_mm"):
        return False
    return device.type != "cuda" or _cuda_sm80(torch.cuda.current_device() if device.index is None else device.index)


def group_offsets(counts_E: torch.Tensor | Sequence[int], device: torch.device | str) -> torch.Tensor | list[int]:
    """What :func:`grouped_mm` wants for rows grouped by ``counts_E [E]`` on ``device``.

    Where torch's grouped matmul serves ``device`` (CUDA, sm80+): the cumulative row ends as an
    int32 tensor [E] on it, computed there (no host sync). Otherwise the E+1 offsets as a list
    (one host sync for a device tensor).
    """
    device = torch.device(device)
    if _torch_grouped_mm_for(device):
        if isinstance(counts_E, torch.Tensor):
            return counts_E.to(device, non_blocking=True).cumsum(0).to(torch.int32)
        return torch.tensor(counts_E, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
    counts = counts_E.tolist() if isinstance(counts_E, torch.Tensor) else list(counts_E)
    return _offsets_list(counts, len(counts))


def _is_group_ends(arg: object, num_groups: int) -> bool:
    """An int32 tensor of E values: torch's ``offs`` convention (cumulative row ends), as group_offsets gives."""
    return isinstance(arg, torch.Tensor) and arg.dtype == torch.int32 and arg.shape == (num_groups,)


def _device_group_ends(arg: object, x_RK: torch.Tensor, num_groups: int) -> torch.Tensor | None:
    """Row ends [E] int32 on x's device from a tensor already there (no host sync), else None."""
    if isinstance(arg, PermutePlan):
        arg = arg.offsets
    if not isinstance(arg, torch.Tensor) or arg.device != x_RK.device or arg.dim() != 1:
        return None
    if _is_group_ends(arg, num_groups):
        return arg
    if arg.shape[0] == num_groups:
        return arg.cumsum(0).to(torch.int32)
    if arg.shape[0] == num_groups + 1:
        return arg[1:].to(torch.int32)
    return None


def _torch_grouped_mm_fits(x_RK: torch.Tensor, w_EKN: torch.Tensor, ends_E: torch.Tensor) -> bool:
    """torch._grouped_mm's constraints for x [R, K] @ w [E, K, N]: bf16 on a served device, row-major x,
    w row- or column-major per expert, strides and base addresses on 16 bytes."""
    if not (x_RK.dim() == 2 and w_EKN.dim() == 3 and x_RK.shape[1] == w_EKN.shape[1] and x_RK.shape[0] > 0):
        return False
    if not (x_RK.dtype == w_EKN.dtype == torch.bfloat16 and x_RK.device == w_EKN.device == ends_E.device):
        return False
    if not _torch_grouped_mm_for(x_RK.device):
        return False
    align = 16 // x_RK.element_size()
    K, N = w_EKN.shape[1], w_EKN.shape[2]
    x_ok = x_RK.stride(1) == 1 and x_RK.stride(0) >= K and x_RK.stride(0) % align == 0 and K % align == 0
    w_ok = (w_EKN.stride(2) == 1 and w_EKN.stride(1) >= N and w_EKN.stride(1) % align == 0) or (
        w_EKN.stride(1) == 1 and w_EKN.stride(2) >= K and w_EKN.stride(2) % align == 0
    )
    # torch's allocators align storages to 16+ bytes, so the offsets decide; dynamo cannot trace
    # storage_offset(), and compiled graphs hand over fresh (aligned) buffers or fail loudly in torch.
    ptrs_ok = torch.compiler.is_compiling() or (
        x_RK.storage_offset() % align == 0 and w_EKN.storage_offset() % align == 0
    )
    return x_ok and w_ok and ptrs_ok and N % align == 0 and w_EKN.stride(0) % align == 0


def _offsets_list(counts_or_offsets: Sequence[int] | torch.Tensor | PermutePlan, num_groups: int) -> list[int]:
    if isinstance(counts_or_offsets, PermutePlan):
        counts_or_offsets = counts_or_offsets.offsets
    if _is_group_ends(counts_or_offsets, num_groups):
        return [0, *(int(v) for v in counts_or_offsets.tolist())]
    values = [int(v) for v in (
        counts_or_offsets.tolist() if isinstance(counts_or_offsets, torch.Tensor) else counts_or_offsets
    )]
    if len(values) == num_groups:
        offsets = [0]
        for n in values:
            offsets.append(offsets[-1] + n)
        return offsets
    if len(values) == num_groups + 1:
        return values
    raise ValueError(f"expected {num_groups} counts or {num_groups + 1} offsets, got {len(values)} values")


def grouped_mm(
    x_RK: torch.Tensor,
    w_EKN: torch.Tensor,
    counts_or_offsets: Sequence[int] | torch.Tensor | PermutePlan,
) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e]`` for row blocks given as counts [E] or offsets [E+1].

    Also takes :func:`group_offsets`' int32 tensor of cumulative row ends [E]. On CUDA, such ends,
    or counts / offsets / a PermutePlan whose tensor is on x's device, go to ``torch._grouped_mm``
    with no host sync when it fits (bf16, 16-byte strides; autograd by torch); the offsets are then
    trusted, not checked (that would sync). Otherwise one mm per expert written into a preallocated
    output (and preallocated dx / dw in backward): no per-expert weight-slice gradients and no
    cat/split copies. A tensor of counts or offsets costs one host sync there; a PermutePlan uses
    its padded offsets.
    """
    E = w_EKN.shape[0]
    if _torch_grouped_mm_for(x_RK.device):
        ends_E = _device_group_ends(counts_or_offsets, x_RK, E)
        if ends_E is not None and _torch_grouped_mm_fits(x_RK, w_EKN, ends_E):
            return torch._grouped_mm(x_RK, w_EKN, offs=ends_E)
    offsets = _offsets_list(counts_or_offsets, E)
    if offsets[0] != 0 or offsets[-1] != x_RK.shape[0] or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"grouped_mm: offsets must rise from 0 to {x_RK.shape[0]} rows, got {offsets}")
    if not _use_kernels(x_RK, "grouped_mm"):
        return grouped_mm_reference(x_RK, w_EKN, offsets)
    return torch.ops.modalmoe.grouped_mm(x_RK, w_EKN, offsets)


# ----------------------------------------------------------------------------------------------
# Fake (meta) kernels and autograd for the compiled ops.
# ----------------------------------------------------------------------------------------------


def _register_python_kernels() -> None:
    """Fake kernels for torch.compile / opcheck and autograd formulas, defined in terms of the ops."""
    ops = torch.ops.modalmoe

    @torch.library.register_fake("modalmoe::build_plan")
    def _(topk_idx_Tk, num_experts, pad_multiple, capacity):
        num_rows = torch.library.get_ctx().new_dynamic_size()
        i64 = {"dtype": torch.int64}
        return (
            topk_idx_Tk.new_empty(num_experts, **i64),
            topk_idx_Tk.new_empty(num_experts, **i64),
            topk_idx_Tk.new_empty(num_experts + 1, **i64),
            topk_idx_Tk.new_empty(topk_idx_Tk.shape, **i64),
            topk_idx_Tk.new_empty(num_rows, **i64),
            topk_idx_Tk.new_empty(topk_idx_Tk.shape, dtype=torch.bool),
        )

    @torch.library.register_fake("modalmoe::permute_rows")
    def _(x_TH, topk_idx_Tk, num_experts, pad_multiple, capacity):
        torch._check(x_TH.shape[0] == topk_idx_Tk.shape[0])
        plan = torch.ops.modalmoe.build_plan.default(topk_idx_Tk, num_experts, pad_multiple, capacity)
        return (x_TH.new_empty(plan[4].shape[0], x_TH.shape[1]), *plan)

    @torch.library.register_fake("modalmoe::gather_rows")
    def _(x_TH, src_slot_R, row_of_Tk, weights_Tk):
        torch._check(x_TH.shape[0] == row_of_Tk.shape[0])
        return x_TH.new_empty(src_slot_R.shape[0], x_TH.shape[1])

    @torch.library.register_fake("modalmoe::combine_rows")
    def _(y_RH, row_of_Tk, src_slot_R, weights_Tk):
        torch._check(y_RH.shape[0] == src_slot_R.shape[0])
        return y_RH.new_empty(row_of_Tk.shape[0], y_RH.shape[1])

    @torch.library.register_fake("modalmoe::slot_dot")
    def _(tokens_TH, rows_RH, row_of_Tk, dtype):
        return tokens_TH.new_empty(row_of_Tk.shape, dtype=dtype)

    @torch.library.register_fake("modalmoe::grouped_mm")
    def _(x_RK, w_EKN, offsets):
        return x_RK.new_empty(x_RK.shape[0], w_EKN.shape[2])

    @torch.library.register_fake("modalmoe::grouped_mm_weight_grad")
    def _(x_RK, grad_RN, offsets):
        return x_RK.new_empty(len(offsets) - 1, x_RK.shape[1], grad_RN.shape[1])

    # gather_rows and combine_rows are adjoint: each one's input gradient is the other op.
    def save_rows_plan_weights(ctx, inputs, output):
        values, first_map, second_map, weights = inputs
        ctx.save_for_backward(values, first_map, second_map, weights)

    def gather_rows_backward(ctx, grad_RH):
        x_TH, src_slot_R, row_of_Tk, weights_Tk = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.combine_rows(grad_RH, row_of_Tk, src_slot_R, weights_Tk)
        if weights_Tk is not None and ctx.needs_input_grad[3]:
            grad_w = ops.slot_dot(x_TH, grad_RH, row_of_Tk, weights_Tk.dtype)
        return grad_x, None, None, grad_w

    def combine_rows_backward(ctx, grad_TH):
        y_RH, row_of_Tk, src_slot_R, weights_Tk = ctx.saved_tensors
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = ops.gather_rows(grad_TH, src_slot_R, row_of_Tk, weights_Tk)
        if weights_Tk is not None and ctx.needs_input_grad[3]:
            grad_w = ops.slot_dot(grad_TH, y_RH, row_of_Tk, weights_Tk.dtype)
        return grad_y, None, None, grad_w

    def permute_rows_setup(ctx, inputs, output):
        ctx.save_for_backward(output[4], output[5])  # row_of, src_slot

    def permute_rows_backward(ctx, grad_RH, *_plan_grads):
        row_of_Tk, src_slot_R = ctx.saved_tensors
        grad_x = ops.combine_rows(grad_RH, row_of_Tk, src_slot_R, None) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None

    torch.library.register_autograd("modalmoe::permute_rows", permute_rows_backward, setup_context=permute_rows_setup)
    torch.library.register_autograd(
        "modalmoe::gather_rows", gather_rows_backward, setup_context=save_rows_plan_weights
    )
    torch.library.register_autograd(
        "modalmoe::combine_rows", combine_rows_backward, setup_context=save_rows_plan_weights
    )

    def grouped_mm_setup(ctx, inputs, output):
        x_RK, w_EKN, offsets = inputs
        ctx.save_for_backward(x_RK, w_EKN)
        ctx.offsets = offsets

    def grouped_mm_backward(ctx, grad_RN):
        x_RK, w_EKN = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.grouped_mm(grad_RN, w_EKN.transpose(1, 2), ctx.offsets)
        if ctx.needs_input_grad[1]:
            grad_w = ops.grouped_mm_weight_grad(x_RK, grad_RN, ctx.offsets)
        return grad_x, grad_w, None

    torch.library.register_autograd("modalmoe::grouped_mm", grouped_mm_backward, setup_context=grouped_mm_setup)


if HAS_EXTENSION:
    _register_python_kernels()


# ----------------------------------------------------------------------------------------------
# SwiGLU: silu(gate) * up in one pass forward and one backward (CPU kernel; reference elsewhere).
# ----------------------------------------------------------------------------------------------

__all__ += ["swiglu", "swiglu_reference", "top_k_rows", "top_k_rows_reference"]


def swiglu_reference(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``h = [gate | up]`` on the last dim: the semantics of :func:`swiglu`."""
    gate, up = h.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU of ``h [..., 2F]`` -> ``[..., F]``, equal to :func:`swiglu_reference` in h's dtype.

    For bfloat16 on CPU the compiled op reads h once and writes the output once (backward: one pass,
    saving only h) instead of torch's silu and product, then two products, silu_backward and a cat;
    its results are torch's bit for bit but for exp's last float bit (bf16 rounding hides it).
    Other dtypes and devices run the reference. Not twice differentiable on the op path.
    """
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim, got {tuple(h.shape)}")
    if not (h.dtype == torch.bfloat16 and h.device.type == "cpu" and kernels_for("cpu", "swiglu")):
        return swiglu_reference(h)
    return torch.ops.modalmoe.swiglu(h)


def top_k_rows_reference(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """k passes of argmax, each pick then set to -inf: the semantics of :func:`top_k_rows`."""
    picks, s = [], scores_TE.detach()
    for j in range(k):
        idx_T = s.argmax(-1)
        picks.append(idx_T)
        if j + 1 < k:
            s = s.scatter(1, idx_T[:, None], float("-inf"))
    return torch.stack(picks, 1)


def top_k_rows(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [T, k] int64 of each row's k largest scores, largest first, ties to the lower index.

    On CPU (k <= min(8, E)) one pass over the rows; otherwise :func:`top_k_rows_reference`. No grad.
    """
    if scores_TE.dim() != 2 or k < 1:
        raise ValueError(f"top_k_rows needs scores [T, E] and k >= 1, got {tuple(scores_TE.shape)}, k={k}")
    on_cpu = scores_TE.device.type == "cpu" and kernels_for("cpu", "top_k_rows")
    if not (on_cpu and k <= min(8, scores_TE.shape[1])):
        return top_k_rows_reference(scores_TE, k)
    return torch.ops.modalmoe.top_k_rows(scores_TE.detach(), k)


def _register_swiglu_and_top_k_kernels() -> None:
    @torch.library.register_fake("modalmoe::top_k_rows")
    def _(scores, k):
        return scores.new_empty(scores.shape[0], k, dtype=torch.int64)

    @torch.library.register_fake("modalmoe::swiglu")
    def _(h):
        return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)

    @torch.library.register_fake("modalmoe::swiglu_backward")
    def _(grad, h):
        return h.new_empty(h.shape)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return torch.ops.modalmoe.swiglu_backward(grad.contiguous(), h)

    torch.library.register_autograd("modalmoe::swiglu", backward, setup_context=setup)


if HAS_EXTENSION:
    for _op in ("swiglu", "top_k_rows"):
        kernels_for("cpu", _op)
    _register_swiglu_and_top_k_kernels()
