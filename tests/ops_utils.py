"""What the op tests share: the devices they run on, the extension requirement, random routings."""

from __future__ import annotations

import os

import pytest
import torch
from modalmoe import ops

__all__ = ["DEVICES", "REQUIRE_EXTENSION", "needs_extension", "random_topk"]

REQUIRE_EXTENSION = os.environ.get("MODALMOE_REQUIRE_EXTENSION", "0") == "1"

needs_extension = pytest.mark.skipif(
    not ops.HAS_EXTENSION and not REQUIRE_EXTENSION, reason="modalmoe._C not built and not required"
)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


def random_topk(
    T: int, k: int, E: int, *, gen: torch.Generator, unrouted: float = 0.0, experts_used: int | None = None,
    distinct: bool = True, dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """[T, k] routing; experts_used < E leaves the upper experts empty, unrouted sets slots to -1."""
    used = E if experts_used is None else experts_used
    if distinct and k <= used:
        idx_Tk = torch.rand(T, used, generator=gen).topk(k, dim=1).indices
    else:
        idx_Tk = torch.randint(0, used, (T, k), generator=gen)
    idx_Tk = torch.where(torch.rand(T, k, generator=gen) < unrouted, -1, idx_Tk)
    return idx_Tk.to(dtype)
