"""Run a function on N gloo ranks in fresh processes, for the multi-process tests.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, joins them into one
gloo group and calls ``fn(rank, world_size, *args)`` in each; it returns the per-rank results in
rank order. A rank that raises makes the call raise with that rank's traceback (the other ranks,
possibly stuck in a collective, are killed); a run that outlives ``timeout`` is killed and reported.
``fn`` and its arguments must be picklable (a module-level function of the test file).
"""

from __future__ import annotations

import os
import queue as queue_lib
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed", "DistributedTestError", "free_port", "LAUNCH_ENV", "restore_launch_env"]

# what launchers (and DeepSpeed's init) set in os.environ for a process of a job
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class DistributedTestError(RuntimeError):
    """A rank failed, died or timed out; the message carries the rank's traceback."""


def restore_launch_env(saved: dict[str, str | None]) -> list[str]:
    """Put the launcher variables back as ``saved`` (``{k: os.environ.get(k) for k in LAUNCH_ENV}``
    taken earlier); returns the names that had changed."""
    changed = [k for k, v in saved.items() if os.environ.get(k) != v]
    for k in changed:
        if saved[k] is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = saved[k]
    return changed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, init_file, port, args, results, timeout, threads):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    try:
        # a file rendezvous: no port to race for with the other test runs on this machine
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        out = fn(rank, world_size, *args)
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 90.0, threads: int = 1
) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, one process each."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="modalmoe_dist_") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        port = free_port()  # only for code that reads MASTER_PORT; the group uses the file
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, init_file, port, args, results, timeout, threads),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        outs: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(outs) < world_size:
                try:
                    rank, ok, payload = results.get(timeout=0.2)
                except queue_lib.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outs]
                    if dead:
                        raise DistributedTestError(
                            f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} without reporting"
                        ) from None
                    if time.monotonic() > deadline:
                        missing = sorted(set(range(world_size)) - set(outs))
                        raise DistributedTestError(
                            f"timed out after {timeout:.0f} s; ranks {missing} never finished "
                            "(a collective that not every rank called?)"
                        ) from None
                    continue
                if not ok:
                    raise DistributedTestError(f"rank {rank} of {world_size} failed:\n{payload}")
                outs[rank] = payload
        finally:
            for p in procs:
                p.join(timeout=5 if len(outs) == world_size else 0.1)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
    return [outs[r] for r in range(world_size)]
