"""This process's part in a training job: the engine it steps with, device and dtype, threads, the
process group, core binding and busy-wait, the parallel state; the data-parallel collectives the
loop needs; and the watchdog that turns a lost peer into an error naming it.

Everything about the job comes from the :class:`LaunchInfo` passed in, never from the environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..runtime.config import ConfigError
from ..runtime.cpu_affinity import bind_local_rank, idle_io_threads
from ..runtime.cpu_memory import keep_freed_memory
from ..runtime.distributed import init_process_group, polled, set_busy_wait
from ..runtime.faults import PeerLostError, describe
from ..runtime.launch_info import LaunchInfo
from ..runtime.metrics import get_logger
from ..runtime.parallel_state import Layout, ParallelState
from ..runtime.preemption import Preempted
from ..runtime.watchdog import Watchdog, looks_distributed
from .job_config import JobConfig

__all__ = ["JobProcess", "check_run_dir", "resolve_device", "setup_process", "uses_deepspeed"]

log = get_logger("modalmoe.train")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config field `train.device`: cuda was asked for but torch sees no GPU; use auto or cpu")
    return torch.device(name)


def check_run_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"config field `train.run_dir`: cannot write to {str(path)!r} ({e.strerror}); "
            "choose a writable folder with --set train.run_dir=PATH"
        ) from e


def uses_deepspeed(parallel_cfg, world: int) -> bool:
    """Whether the job steps through DeepSpeed: always with several processes, or when asked."""
    use = parallel_cfg.engine == "deepspeed" or (parallel_cfg.engine == "auto" and world > 1)
    if world > 1 and not use:
        raise ConfigError("config field `parallel.engine`: a multi-process job steps through DeepSpeed; set it to auto or deepspeed")
    return use


@dataclass
class JobProcess:
    """Where this process stands in the job. Without a parallel state (the plain engine) it is a
    world of one, whatever the launcher said, and every collective below is the identity."""

    launch: LaunchInfo
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    state: ParallelState | None = None
    bound: list[int] | None = None  # the cores this rank was bound to

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def world(self) -> int:
        return self.launch.world_size if self.state is not None else 1

    @property
    def dp_rank(self) -> int:
        return self.state.rank_in("dp") if self.state is not None else 0

    @property
    def dp_size(self) -> int:
        return self.state.size("dp") if self.state is not None else 1

    # ---- collectives over the data-parallel group (no-ops in one process) --------------------

    def dp_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.dp_size == 1:
            return x
        x = x.detach().clone().to("cuda" if dist.get_backend() == "nccl" else "cpu")
        polled(dist.all_reduce, x, group=self.state.dp_group)
        return x.to(self.device)

    def dp_min(self, n: int) -> int:
        if self.dp_size == 1:
            return n
        x = torch.tensor([n], dtype=torch.long, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.state.dp_group)
        return int(x)

    def barrier(self) -> None:
        if self.state is not None:
            dist.barrier()

    def idle_io_threads(self) -> None:
        """Once every process group exists (ours, DeepSpeed's): gloo's I/O threads of a bound rank
        go under SCHED_IDLE (``runtime.cpu_affinity``)."""
        if self.bound is not None:
            gloo = dist.is_initialized() and dist.get_backend() == "gloo"
            n_idle = idle_io_threads(wait_s=2.0 if gloo else 0.0)
            log.debug("rank %d: bound to cores %s; %d gloo I/O threads under SCHED_IDLE", self.rank, self.bound, n_idle)

    @contextmanager
    def watched(self, heartbeat_timeout_s: float) -> Iterator[None]:
        """Run the body under a watchdog in a multi-process job (README, "When things go wrong"): a
        collective that failed because a peer died becomes PeerLostError naming that peer; any other
        error is announced to the peers (so they stop now) and propagates unchanged."""
        wd = Watchdog.for_job(heartbeat_timeout_s, agent_store=self.launch.agent_store)
        if wd is None:
            yield
            return
        wd.start()
        try:
            yield
        except Preempted:
            wd.stop()
            raise
        except BaseException as exc:
            self._on_failure(wd, exc)
            raise
        wd.stop()

    def _on_failure(self, wd: Watchdog, exc: BaseException) -> None:
        verdict = wd.diagnose(wait_s=wd.timeout_s + 2 * wd.interval_s) if looks_distributed(exc) else None
        if verdict is None:
            wd.fail(f"{type(exc).__name__}: {describe(exc)}"[:400])
            return
        wd.stop(done=False)
        log.error("%s", verdict)
        first = str(exc).splitlines()[0].split(". ")[0][:200] if str(exc) else type(exc).__name__
        raise PeerLostError(
            f"{verdict}; rank {self.rank} stops too (its collective failed: {first}). Look at that rank's log "
            "for why it died; rerunning the job resumes from the latest checkpoint"
        ) from exc


def setup_process(cfg: JobConfig, launch: LaunchInfo, layout: Layout, use_deepspeed: bool) -> JobProcess:
    """Threads, device, dtype; under DeepSpeed also busy-wait, the process group, core binding
    (CPU jobs) and the parallel state of ``layout``."""
    t, par = cfg.train, cfg.parallel
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    if device.type == "cpu" and t.cpu_keep_freed_memory:
        keep_freed_memory()
    dtype = torch.bfloat16 if t.resolved_dtype(device.type) == "bfloat16" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
    proc = JobProcess(launch, device, dtype)
    if not use_deepspeed:
        return proc
    # polling only pays when each local rank's threads have cores of their own
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    set_busy_wait(par.busy_wait and launch.local_world_size * torch.get_num_threads() <= cores)
    proc.rank, _ = init_process_group(launch, timeout_s=t.collective_timeout_s)
    if device.type == "cpu" and par.bind_cores:
        # gloo's threads exist now and are bound too; groups made later inherit the binding
        proc.bound = bind_local_rank(launch.local_rank, launch.local_world_size, torch.get_num_threads())
    proc.state = ParallelState.build(layout)
    if proc.is_main:
        log.info("parallel layout: %s", proc.state.describe())
    return proc
