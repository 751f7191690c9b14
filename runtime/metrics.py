"""Metrics sinks: JSONL (one record per log step) and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

__all__ = ["MetricsWriter", "get_logger", "warn_once"]

_warned: set[str] = set()


def get_logger(name: str = "modalmoe") -> logging.Logger:
    """A ``modalmoe.*`` logger. Our own handler is added only when the application configured no
    logging (then nothing would print INFO); records still propagate, so a user's or pytest's
    handlers see them and nothing prints twice."""
    logger = logging.getLogger(name)
    ours = logging.getLogger("modalmoe")
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)
        if not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s", "%H:%M:%S"))
            ours.addHandler(handler)
    return logger


def warn_once(logger: logging.Logger, msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Appends ``{"step": n, "split": ..., **scalars}`` lines to metrics.jsonl and mirrors them to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, split: str, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: _clean(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
