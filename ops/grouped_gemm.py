"""The grouped matmul of the expert MLPs: one GEMM per expert's row block.

On CUDA (sm80+, bf16) it runs torch's grouped matmul with no host sync; elsewhere the extension's
kernel, which writes each expert's product into one preallocated output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import extension, reference
from .grad_buffers import GradBuffers
from .plan import PermutePlan

__all__ = ["group_offsets", "grouped_mm"]


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


class _GroupedMMIntoBuffers(torch.autograd.Function):
    """The extension's grouped_mm whose weight gradient lands in a kept buffer (CPU, eager only);
    the same formulas as the op's registered autograd (ops/registration.py)."""

    @staticmethod
    def forward(ctx, x_RK, w_EKN, offsets, buffers):
        ctx.save_for_backward(x_RK, w_EKN)
        ctx.offsets, ctx.buffers = offsets, buffers
        return torch.ops.modalmoe.grouped_mm(x_RK, w_EKN, offsets)

    @staticmethod
    def backward(ctx, grad_RN):
        x_RK, w_EKN = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.modalmoe.grouped_mm(grad_RN, w_EKN.transpose(1, 2), ctx.offsets)
        if ctx.needs_input_grad[1]:
            if torch.is_grad_enabled():  # create_graph: a plain tensor, no buffer kept
                grad_w = torch.ops.modalmoe.grouped_mm_weight_grad(x_RK, grad_RN, ctx.offsets)
            else:
                grad_w = ctx.buffers.take(w_EKN.shape, x_RK)
                torch.ops.modalmoe.grouped_mm_weight_grad_out(x_RK, grad_RN, ctx.offsets, grad_w)
        return grad_x, grad_w, None, None


def _into_buffers(x_RK: torch.Tensor, w_EKN: torch.Tensor, buffers: GradBuffers | None) -> bool:
    return (
        buffers is not None
        and x_RK.device.type == "cpu"
        and w_EKN.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and extension.kernels_for("cpu", "grouped_mm_weight_grad_out")
    )


def grouped_mm(
    x_RK: torch.Tensor,
    w_EKN: torch.Tensor,
    counts_or_offsets: Sequence[int] | torch.Tensor | PermutePlan,
    *,
    grad_buffers: GradBuffers | None = None,
) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e]`` for row blocks given as counts [E] or offsets [E+1].

    Also takes :func:`group_offsets`' int32 tensor of cumulative row ends [E]. On CUDA, such ends,
    or counts / offsets / a PermutePlan whose tensor is on x's device, go to ``torch._grouped_mm``
    with no host sync when it fits (bf16, 16-byte strides; autograd by torch); the offsets are then
    trusted, not checked (that would sync). Otherwise one mm per expert written into a preallocated
    output (and preallocated dx / dw in backward): no per-expert weight-slice gradients and no
    cat/split copies. A tensor of counts or offsets costs one host sync there; a PermutePlan uses
    its padded offsets.

    ``grad_buffers`` (CPU, eager): w's gradient is written into a buffer kept there between steps
    instead of a fresh allocation (ops/grad_buffers.py says why); elsewhere it is ignored.
    """
    E = w_EKN.shape[0]
    if _torch_grouped_mm_for(x_RK.device):
        ends_E = _device_group_ends(counts_or_offsets, x_RK, E)
        if ends_E is not None and _torch_grouped_mm_fits(x_RK, w_EKN, ends_E):
            return torch._grouped_mm(x_RK, w_EKN, offs=ends_E)
    offsets = _offsets_list(counts_or_offsets, E)
    if offsets[0] != 0 or offsets[-1] != x_RK.shape[0] or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"grouped_mm: offsets must rise from 0 to {x_RK.shape[0]} rows, got {offsets}")
    if not extension.use_kernels(x_RK, "grouped_mm"):
        return reference.grouped_mm_reference(x_RK, w_EKN, offsets)
    if _into_buffers(x_RK, w_EKN, grad_buffers):
        return _GroupedMMIntoBuffers.apply(x_RK, w_EKN, offsets, grad_buffers)
    return torch.ops.modalmoe.grouped_mm(x_RK, w_EKN, offsets)
