"""How a job fails: one exception type and one process exit code per kind of fault.

A scheduler or a wrapper script can tell from the exit code alone whether to fix the config (2),
look at the data (3), lower the learning rate (4) or just requeue the job (6: a peer rank died).
Also the step-skipping bookkeeping for non-finite losses and gradients, and the safety net that
keeps anything but tensors and plain containers out of checkpoint files.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from .data.counts import BadDataError

__all__ = [
    "EXIT_BAD_DATA",
    "EXIT_CONFIG",
    "EXIT_NONFINITE",
    "EXIT_PEER_LOST",
    "JOB_ERRORS",
    "JobError",
    "NonFiniteError",
    "NonFiniteTracker",
    "PeerLostError",
    "describe",
    "exit_code_for",
    "weights_only_safe",
]

EXIT_CONFIG = 2  # ConfigError / CheckpointError: fix the config or the run folder, then rerun
EXIT_BAD_DATA = 3  # BadDataError: the data stream is mostly broken
EXIT_NONFINITE = 4  # NonFiniteError: train.max_nonfinite_steps non-finite steps in a row
EXIT_PEER_LOST = 6  # PeerLostError / watchdog: another rank died or failed; requeue or look at that rank


class JobError(RuntimeError):
    """A fault that ends the job with a known exit code and a message naming the cause and the fix."""

    exit_code = 1


class NonFiniteError(JobError, FloatingPointError):
    exit_code = EXIT_NONFINITE


class PeerLostError(JobError):
    exit_code = EXIT_PEER_LOST


JOB_ERRORS: tuple[type[BaseException], ...] = (JobError, BadDataError)


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, BadDataError):
        return EXIT_BAD_DATA
    return getattr(exc, "exit_code", 1)


def describe(exc: BaseException) -> str:
    """The message without the worker traceback a DataLoader wraps around an exception it re-raises."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        name = type(exc).__name__
        text = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return text


class NonFiniteTracker:
    """Counts skipped steps; ``record`` says when ``max_in_row`` skips in a row must stop the job."""

    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0
        self.window = 0

    def record(self, skipped: bool) -> bool:
        if not skipped:
            self.in_row = 0
            return False
        self.in_row += 1
        self.total += 1
        self.window += 1
        return self.in_row >= self.max_in_row

    def take_window(self) -> int:
        n, self.window = self.window, 0
        return n

    def state_dict(self) -> dict[str, int]:
        return {"in_row": self.in_row, "total": self.total}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.in_row, self.total = int(sd.get("in_row", 0)), int(sd.get("total", 0))


_PLAIN = (bool, int, float, str, type(None))


def weights_only_safe(obj: Any, path: str = "", dropped: list[str] | None = None) -> Any:
    """A copy of ``obj`` that ``torch.load(weights_only=True)`` accepts: tensors, plain scalars and
    strings, lists, tuples and dicts of them. Enums become their values; any other object under a
    dict key is dropped (its path appended to ``dropped``), e.g. DeepSpeed's loss-scaler object."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, enum.Enum):
        return weights_only_safe(obj.value, path, dropped)
    if isinstance(obj, np.generic):
        return obj.item()
    if type(obj) in _PLAIN:
        return obj
    if isinstance(obj, (list, tuple)):
        items = [weights_only_safe(v, f"{path}[{i}]", dropped) for i, v in enumerate(obj)]
        if any(v is _DROP for v in items):
            raise TypeError(f"{path or 'state'} holds an object torch cannot load with weights_only=True: {obj!r:.200}")
        return type(obj)(items) if type(obj) in (list, tuple) else list(items)
    if isinstance(obj, dict):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            key = k.value if isinstance(k, enum.Enum) else k
            if type(key) not in _PLAIN:
                raise TypeError(f"{path or 'state'} has a key of type {type(k).__name__}, which weights_only loading refuses")
            safe = weights_only_safe(v, f"{path}.{key}" if path else str(key), dropped)
            if safe is _DROP:
                if dropped is not None:
                    dropped.append(f"{path}.{key}" if path else str(key))
                continue
            out[key] = safe
        return out
    return _DROP


_DROP = object()
