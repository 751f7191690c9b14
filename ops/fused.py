"""Row-wise fused ops on CPU: SwiGLU in one pass each way, and the router's top-k in one pass."""

from __future__ import annotations

import torch

from . import extension, reference

__all__ = ["swiglu", "top_k_rows"]


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU of ``h [..., 2F]`` -> ``[..., F]``, equal to :func:`swiglu_reference` in h's dtype.

    For bfloat16 on CPU the compiled op reads h once and writes the output once (backward: one pass,
    saving only h) instead of torch's silu and product, then two products, silu_backward and a cat;
    its results are torch's bit for bit but for exp's last float bit (bf16 rounding hides it).
    Other dtypes and devices run the reference. Not twice differentiable on the op path.
    """
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim, got {tuple(h.shape)}")
    if not (h.dtype == torch.bfloat16 and h.device.type == "cpu" and extension.kernels_for("cpu", "swiglu")):
        return reference.swiglu_reference(h)
    return torch.ops.modalmoe.swiglu(h)


def top_k_rows(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [T, k] int64 of each row's k largest scores, largest first, ties to the lower index.

    On CPU (k <= min(8, E)) one pass over the rows; otherwise :func:`top_k_rows_reference`. No grad.
    """
    if scores_TE.dim() != 2 or k < 1:
        raise ValueError(f"top_k_rows needs scores [T, E] and k >= 1, got {tuple(scores_TE.shape)}, k={k}")
    on_cpu = scores_TE.device.type == "cpu" and extension.kernels_for("cpu", "top_k_rows")
    if not (on_cpu and k <= min(8, scores_TE.shape[1])):
        return reference.top_k_rows_reference(scores_TE, k)
    return torch.ops.modalmoe.top_k_rows(scores_TE.detach(), k)
