"""Loading ``modalmoe._C`` and deciding, per device and op, whether its kernels serve a call.

An extension built without nvcc serves CPU tensors only; CUDA tensors then run the references (with
one warning) instead of failing in the dispatcher. ``MODALMOE_DISABLE_EXTENSION=1`` forces the
references everywhere.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

__all__ = ["HAS_EXTENSION", "kernels_for", "use_kernels"]

logger = logging.getLogger(__name__)


def _load_extension() -> bool:
    """Import modalmoe._C (which registers torch.ops.modalmoe.*); warn loudly once if that fails."""
    if os.environ.get("MODALMOE_DISABLE_EXTENSION", "0") == "1":
        reason = "MODALMOE_DISABLE_EXTENSION=1"
    else:
        try:
            from .. import _C  # noqa: F401
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


def use_kernels(t: torch.Tensor, op: str = "permute_rows") -> bool:
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
    for _op in ("build_plan", "permute_rows", "gather_rows", "combine_rows", "grouped_mm"):
        kernels_for(_device_type, _op)
for _op in ("swiglu", "top_k_rows"):
    kernels_for("cpu", _op)
