"""RMSNorm that uses NVIDIA apex's fused CUDA kernel when it is really there, torch's otherwise.

apex is optional and never a dependency: an unrelated PyPI package is also called ``apex``, so the
fused path is taken only when ``apex.normalization.FusedRMSNorm`` exists and the input is on CUDA.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RMSNorm", "apex_rms_norm"]


@functools.cache
def apex_rms_norm() -> Callable[..., Tensor] | None:
    """apex's ``fused_rms_norm_affine(x, weight, shape, eps)`` if NVIDIA apex is installed, else None."""
    try:
        from apex.normalization import FusedRMSNorm  # noqa: F401  (only NVIDIA's apex has it)
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine
    except Exception:
        return None
    return fused_rms_norm_affine


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        fused = apex_rms_norm() if x.is_cuda else None
        if fused is not None:
            return fused(x, self.weight, self.weight.shape, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
