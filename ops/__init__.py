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

from .extension import HAS_EXTENSION, kernels_for
from .fused import swiglu, top_k_rows
from .grad_buffers import GradBuffers
from .grouped_gemm import group_offsets, grouped_mm
from .permutation import build_plan, gather_rows, permute, unpermute
from .plan import PermutePlan
from .reference import (
    gather_rows_reference,
    grouped_mm_reference,
    permute_reference,
    plan_reference,
    swiglu_reference,
    top_k_rows_reference,
    unpermute_reference,
)
from .registration import register_python_kernels

__all__ = [
    "HAS_EXTENSION",
    "GradBuffers",
    "PermutePlan",
    "kernels_for",
    "build_plan",
    "permute",
    "gather_rows",
    "unpermute",
    "group_offsets",
    "grouped_mm",
    "swiglu",
    "top_k_rows",
    "plan_reference",
    "permute_reference",
    "gather_rows_reference",
    "unpermute_reference",
    "grouped_mm_reference",
    "swiglu_reference",
    "top_k_rows_reference",
]

if HAS_EXTENSION:
    register_python_kernels()
