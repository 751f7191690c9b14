"""Preemption: stop at a step boundary with a checkpoint when the scheduler says time is up.

SLURM warns a job before killing it: SIGUSR1 ahead of the time limit (``#SBATCH --signal=USR1@120``)
and SIGTERM on preemption or ``scancel`` (then SIGKILL after the cluster's grace time). The handler
only records the signal; :func:`agreed_signal`, called by the trainer after every step, takes the MAX
of that record over all ranks, so every rank stops after the same step (a rank that alone stopped
would leave the others waiting in a collective forever). The trainer then saves a checkpoint and
raises :class:`Preempted`; ``modalmoe train`` exits with :data:`PREEMPTED_EXIT_CODE` (75,
``EX_TEMPFAIL``: "try again"), which ``launch/slurm/train.sbatch`` answers with ``scontrol requeue``;
the requeued job resumes from that checkpoint in the same run folder.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from typing import Self  # 3.11+; only read by type checkers here

__all__ = ["PREEMPTED_EXIT_CODE", "PREEMPT_SIGNALS", "Preempted", "PreemptionHandler", "agreed_signal"]

PREEMPTED_EXIT_CODE = 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_active: PreemptionHandler | None = None


class Preempted(Exception):
    """Training stopped early on a scheduler's signal after saving ``checkpoint`` at ``step``."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}; "
            f"exiting with code {PREEMPTED_EXIT_CODE}: requeue or rerun the job with the same run folder to resume there"
        )


class PreemptionHandler:
    """Records the first SIGTERM/SIGUSR1 while installed (``with PreemptionHandler(): trainer.fit()``)
    and puts the previous handlers back on exit, so a process that outlives the run is unchanged."""

    def __init__(self, signals: tuple[int, ...] = PREEMPT_SIGNALS):
        self.signals = signals
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if not self.signum:
            self.signum = signum

    def install(self) -> Self:
        global _active
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread; train from the main thread")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._record)
            signal.siginterrupt(s, False)  # restart system calls (gloo/NCCL sockets) the signal lands in
        _active = self
        return self

    def uninstall(self) -> None:
        global _active
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
        if _active is self:
            _active = None

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


def agreed_signal() -> int:
    """The signal some rank received (0: none, or no handler installed), the same on every rank.
    One small all-reduce over the default group per call when the process group is up."""
    if _active is None:
        return 0
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _active.signum
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([_active.signum], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())
