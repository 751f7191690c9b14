"""Timing and result files shared by the gpu_check helpers.

On CUDA a call is timed with a pair of CUDA events around it (device time, launch gaps included);
on CPU with ``time.perf_counter``. Each candidate gets warm-up calls first and the median of the
timed calls is reported. Results go to one JSON file per stage that ``summary.py`` renders.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["median_ms", "write_figures", "device_from_arg", "cuda_kernels_registered"]


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in pairs]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def write_figures(path: str | Path | None, figures: dict) -> None:
    """Write the stage's figures (scalars, plus optional ``tables`` and ``notes``) as JSON."""
    text = json.dumps(figures, indent=1, default=str)
    print(text if len(text) < 4000 else text[:4000] + "\n...")
    if path:
        Path(path).write_text(text)


def device_from_arg(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    return torch.device(name)


def cuda_kernels_registered() -> bool:
    """True when modalmoe._C registered CUDA kernels (a CPU-only build registers CPU ones only)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("modalmoe::permute_rows", "CUDA")
    except RuntimeError:
        return False
