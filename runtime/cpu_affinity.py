"""CPU jobs: give each local rank its own cores, with gloo's threads on them.

A gloo collective is carried by three threads of the rank: the caller, a work thread that runs the
algorithm, and an I/O thread that moves the bytes. Left to the scheduler, the work and I/O threads
of one rank often wake on the core where the peer rank is computing and wait there for a time
slice; with every thread of a rank on the rank's own core they run as soon as the caller waits
(which it does by polling, ``distributed.polled``); the waits this removed are in
docs/benchmarks.md. Open MPI's ``--bind-to core`` binds ranks the same way.

Bound, one more effect shows: a few collectives per EP=2 smoke step stall for milliseconds while
the I/O thread spins in ``epoll_wait`` (pytorch/gloo#246). What the traces fit: woken by the peer's
bytes while the work thread holds the connection's lock (writing this rank's bytes), it cannot take
the lock, and having just woken it preempts the lock holder on the shared core for a time slice.
Under the SCHED_IDLE policy the I/O thread no longer preempts anything; it runs whenever the rank
waits (the polling caller yields). :func:`idle_io_threads` sets it once every process group
exists (measured effect: docs/benchmarks.md).

The price: an I/O thread under SCHED_IDLE gets almost no CPU while another busy process shares
the rank's core, so jobs that share their cores with other work should set
``parallel.bind_cores=false`` (which turns off both).

Data-loader workers are forked after the binding and would inherit it; :func:`worker_init_fn`
gives them back every core the job had, so decoding is not squeezed onto the rank's core.
"""

from __future__ import annotations

import functools
import os
import time

__all__ = ["bind_local_rank", "idle_io_threads", "worker_init_fn"]

IO_THREAD_NAME = "gloo_tcp_loop"  # what torch names gloo's TCP event-loop threads

_job_cpus: list[int] | None = None


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def bind_local_rank(local_rank: int, local_ranks: int, threads: int) -> list[int] | None:
    """Bind every thread of this process, and the threads it starts later, to cores
    ``[local_rank * threads, (local_rank + 1) * threads)`` of the cores it may use.

    Returns the cores, or None (nothing changed) where binding is impossible or unsafe: no
    ``sched_setaffinity``, or fewer usable cores than ``local_ranks * threads`` (the launcher
    or a cgroup already restricted the ranks, or the job oversubscribes the machine).
    """
    global _job_cpus
    if not hasattr(os, "sched_setaffinity") or not 0 <= local_rank < local_ranks or threads < 1:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if local_ranks * threads > len(allowed):
        return None
    mine = allowed[local_rank * threads : (local_rank + 1) * threads]
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, mine)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    _job_cpus = allowed
    return mine


def _named(name: str) -> list[int]:
    tids = []
    for tid in _threads():
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == name:
                    tids.append(tid)
        except OSError:  # a thread that ended meanwhile
            pass
    return tids


def idle_io_threads(name: str = IO_THREAD_NAME, wait_s: float = 0.0) -> int:
    """Put this process's threads called ``name`` under SCHED_IDLE; returns how many. Lowering a
    thread's policy needs no privilege; raising it back would, and is never needed.

    A new gloo group's event-loop thread names itself only once it first runs (on a loaded host,
    some time after ``init_process_group`` returned): ``wait_s`` > 0 waits up to that long for at
    least one such thread and for their count to hold still for 50 ms."""
    if not hasattr(os, "sched_setscheduler") or not hasattr(os, "SCHED_IDLE"):
        return 0
    deadline = time.monotonic() + wait_s
    tids = _named(name)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = _named(name)
        settled = bool(now) and len(now) == len(tids)
        tids = now
        if settled:
            break
    n = 0
    for tid in tids:
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            n += 1
        except OSError:  # a thread that ended meanwhile
            pass
    return n


def _spread(cpus: list[int], _worker_id: int) -> None:
    os.sched_setaffinity(0, cpus)


def worker_init_fn():
    """A ``DataLoader`` ``worker_init_fn`` that undoes :func:`bind_local_rank` in the worker, or
    None when this process was not bound."""
    return None if _job_cpus is None else functools.partial(_spread, list(_job_cpus))
