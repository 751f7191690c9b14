"""CPU training: let glibc keep freed memory for the next step instead of handing it back.

With glibc's defaults every buffer of 32 MiB or more is a fresh ``mmap``: each step pays a page
fault per 4 KiB of every large activation and gradient (what it costs the benchmarks' MoE layer:
docs/benchmarks.md). On GPU the CUDA caching allocator avoids the same cost; on CPU
PyTorch's advice is a caching malloc (jemalloc/tcmalloc via LD_PRELOAD). This does the cheap
equivalent in-process: large blocks come from the heap and stay there once freed, so the
resident size settles at the step's peak, as it would under a caching allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["keep_freed_memory"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Raise glibc's mmap and trim thresholds (process-wide, idempotent). Returns False, and
    changes nothing, where the C library is not glibc."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.debug("keep_freed_memory: %s has no mallopt; leaving the allocator alone", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    _done = ok
    return ok
