"""Lost-rank watchdog: heartbeats through the job's own rendezvous store, so that when one rank dies
the others stop within seconds, naming it, instead of waiting in a collective.

Why not only the collective timeout: gloo and NCCL report a dead peer as an anonymous socket error
or, if the peer hangs, only after ``train.collective_timeout_s``; under srun or mpirun there is no
agent to kill the survivors. Every rank here bumps a counter in the torch store that the process
group was built on (``hb/<rank>``) and watches one neighbour (rank + 1, a ring, so the store sees
O(world) requests per interval). A neighbour whose process is gone (same host) or whose counter
has not moved for ``timeout_s`` is lost: the rank that notices writes a verdict at once (it may be
the only one watching that rank, and about to exit), every rank reads it, and a rank that fails
with an exception writes one naming itself. The main thread, usually woken by a socket error, asks
:meth:`Watchdog.diagnose` and raises ``PeerLostError``; if it stays stuck, the monitor thread ends
the process with ``EXIT_PEER_LOST`` after ``grace_s``. Rank 0 hosts the store, so it leaves last:
it waits (at most ``2 * interval_s``) until the others have read the verdict, or they would blame
rank 0 for the vanished store. :func:`stop_bound_s` is how long all this takes at most.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from .faults import EXIT_PEER_LOST

__all__ = ["Watchdog", "cadence", "looks_distributed", "stop_bound_s"]

log = logging.getLogger("modalmoe.watchdog")

_DONE = b"done"
_generation = 0  # one key namespace per watchdog of this process group: fit() may run more than once


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def cadence(timeout_s: float, interval_s: float | None = None) -> tuple[float, float]:
    """The default ``(interval_s, grace_s)`` for a heartbeat timeout: about five checks per timeout,
    and a grace that lets a main thread woken by a socket error report the verdict itself."""
    interval = interval_s or max(0.2, min(5.0, timeout_s / 5))
    return interval, min(10.0, max(2 * interval, timeout_s / 4))


def stop_bound_s(timeout_s: float, *, silent: bool, store_host: bool = False) -> float:
    """The longest time from a rank's loss to the last survivor ending, process teardown aside
    (README, "When things go wrong"). Its watcher sees it within one interval when its process is
    gone (same host), or ``timeout_s`` + two intervals after it fell silent (its last beat up to an
    interval before, seen up to an interval after); the verdict is written at once, every other rank
    reads it within one interval, and one stuck in a collective ends ``grace_s`` later. Rank 0's
    wait for the others (≤ 2 intervals) fits in ``grace_s`` (≥ 2 intervals). When the lost rank
    hosted the store (killed; a silent host is not bounded here), the others blame it once the store
    failed for three intervals, first seen within one, declared within one more: 5 intervals + grace."""
    interval, grace = cadence(timeout_s)
    if store_host:
        if silent:
            raise ValueError("no bound for a silent store host: each store call first waits out its own timeout")
        return 5 * interval + grace
    return (timeout_s + 3 * interval if silent else 2 * interval) + grace


def _exit_process(message: str) -> None:
    log.error("%s; ending this process (exit code %d)", message, EXIT_PEER_LOST)
    print(f"error: {message}", file=sys.stderr, flush=True)
    for h in logging.getLogger("modalmoe").handlers:
        h.flush()
    os._exit(EXIT_PEER_LOST)


def looks_distributed(exc: BaseException) -> bool:
    """Whether an exception is what a collective raises when a peer vanished (gloo: a bare RuntimeError)."""
    return isinstance(exc, dist.DistError) or type(exc) is RuntimeError


class Watchdog:
    """Heartbeat + neighbour monitor for one rank; ``start`` after the process group exists, ``stop``
    (or ``fail``) before the process ends, so a finished rank is never mistaken for a lost one."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world: int,
        *,
        timeout_s: float,
        interval_s: float | None = None,
        grace_s: float | None = None,
        on_lost: Callable[[str], None] | None = None,
        namespace: str = "0",
        agent_store: bool = False,
    ):
        self.rank, self.world = rank, world
        self.peer = (rank + 1) % world
        self.timeout_s = timeout_s
        self.interval_s, default_grace = cadence(timeout_s, interval_s)
        self.grace_s = grace_s if grace_s is not None else default_grace
        client = store.clone() if hasattr(store, "clone") else store
        client.set_timeout(timedelta(seconds=max(5.0, 4 * self.interval_s)))
        self.store = dist.PrefixStore(f"modalmoe/watchdog/{namespace}/", client)
        self.on_lost = on_lost or _exit_process
        self.agent_store = agent_store  # torchrun's agent hosts the store, not rank 0 (LaunchInfo.agent_store)
        self.host = socket.gethostname()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._peer_value: bytes | None = None
        self._peer_changed = time.monotonic()
        self._peer_who: tuple[str, int] | None = None
        self._store_failing_since: float | None = None
        self._published: str | None = None
        self.verdict: str | None = None

    @classmethod
    def for_job(cls, timeout_s: float, **kw) -> Watchdog | None:
        """A watchdog on the default process group's store, or None (one process, or ``timeout_s`` 0).
        ``kw`` go to the constructor; pass ``agent_store`` from the job's LaunchInfo."""
        global _generation
        if timeout_s <= 0 or not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        _generation += 1  # every rank makes its watchdogs in the same order, so the numbers agree
        store = dist.distributed_c10d._get_default_store()
        return cls(store, dist.get_rank(), dist.get_world_size(), timeout_s=timeout_s, namespace=str(_generation), **kw)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Watchdog:
        self.store.set(f"who/{self.rank}", f"{self.host} {os.getpid()}")
        self._beat()
        self._peer_changed = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"modalmoe-watchdog-{self.rank}", daemon=True)
        self._thread.start()
        return self

    def stop(self, done: bool = True) -> None:
        """``done=False``: leaving on an error; with a verdict to tell, the store host stays until it is read."""
        self._stop.set()
        if done:
            try:
                self.store.set(f"hb/{self.rank}", _DONE)
            except Exception:  # noqa: BLE001, S110 - the store may already be gone; nothing to tell then
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval_s + 1)
        if not done and (self.verdict is not None or self._published is not None):
            self._linger()

    def fail(self, reason: str) -> None:
        """This rank is going down with an error: tell the others now rather than after ``timeout_s``."""
        self._publish(f"rank {self.rank} failed: {reason}")
        self.stop(done=False)

    # ---- checks -------------------------------------------------------------------------------

    def check(self) -> str | None:
        """One look: a verdict another rank wrote, or this rank's neighbour gone or silent; else None."""
        with self._lock:
            if self.verdict is not None:
                return self.verdict
            try:
                msg = self._read_verdict()
                if msg is None and (msg := self._check_peer()) is not None:
                    self._publish(msg)  # now: only this rank watches that peer, and it may be about to exit
                if msg is not None:
                    self._count_seen()
                self._store_failing_since = None
            except Exception as e:  # noqa: BLE001 - any store failure is a finding, not a crash
                msg = self._store_lost(e)
            if msg is not None:
                self.verdict = msg
            return msg

    def diagnose(self, wait_s: float = 0.0) -> str | None:
        """Called by the main thread after a collective failed: the lost rank's verdict, waiting up
        to ``wait_s`` for one (a silent peer on another host takes ``timeout_s`` to be declared)."""
        deadline = time.monotonic() + wait_s
        while True:
            msg = self.check()
            if msg is not None or time.monotonic() >= deadline:
                return msg
            time.sleep(min(self.interval_s, max(0.0, deadline - time.monotonic())))

    def _read_verdict(self) -> str | None:
        if not self.store.check(["verdict"]):
            return None
        text = self.store.get("verdict").decode(errors="replace")
        return None if text == self._published else text

    def _peer_process_gone(self) -> str | None:
        if self._peer_who is None and self.store.check([f"who/{self.peer}"]):
            host, pid = self.store.get(f"who/{self.peer}").decode().rsplit(" ", 1)
            self._peer_who = (host, int(pid))
        if self._peer_who is not None and self._peer_who[0] == self.host and not _pid_alive(self._peer_who[1]):
            return f"rank {self.peer} lost: its process (pid {self._peer_who[1]} on {self.host}) is gone"
        return None

    def _check_peer(self) -> str | None:
        key = f"hb/{self.peer}"
        value = self.store.get(key) if self.store.check([key]) else None
        if value == _DONE:
            self._peer_value = value
            return None
        gone = self._peer_process_gone()
        if gone:
            return gone
        now = time.monotonic()
        if value != self._peer_value:
            self._peer_value, self._peer_changed = value, now
            return None
        silent = now - self._peer_changed
        if silent > self.timeout_s:
            return f"rank {self.peer} lost (no heartbeat for {silent:.0f} s)"
        return None

    def _store_lost(self, exc: Exception) -> str | None:
        """The store does not answer. Watching its host, this rank sees at once from its pid whether
        it is gone; any other neighbour found gone now most likely left because the host did."""
        if self._peer_value == _DONE:
            return None
        if self.peer == 0 and not self.agent_store:
            try:
                gone = self._peer_process_gone()
            except Exception:  # noqa: BLE001
                gone = None
            if gone:
                return gone
        now = time.monotonic()
        if self._store_failing_since is None:
            self._store_failing_since = now
        if now - self._store_failing_since < min(self.timeout_s, 3 * self.interval_s):
            return None
        what = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if self.agent_store:
            return f"the launcher's rendezvous store is unreachable ({what}): the torchrun agent or its node is lost"
        return f"rank 0 lost: the rendezvous store it hosts is unreachable ({what})"

    # ---- the thread ---------------------------------------------------------------------------

    def _beat(self) -> None:
        self._seq += 1
        self.store.set(f"hb/{self.rank}", str(self._seq))

    def _publish(self, msg: str) -> None:
        self._published = msg
        try:
            self.store.compare_set("verdict", "", msg)
        except Exception:  # noqa: BLE001, S110 - the store itself may be what was lost
            pass

    def _count_seen(self) -> None:
        try:
            self.store.add("seen", 1)
        except Exception:  # noqa: BLE001, S110 - the store host then waits out its deadline
            pass

    def _linger(self) -> None:
        """Rank 0 hosts the store (unless torchrun's agent does): keep it up until every other rank but
        the lost one has read the verdict, at most ``2 * interval_s`` (each reads within one)."""
        if self.agent_store or self.rank != 0:
            return
        deadline = time.monotonic() + 2 * self.interval_s
        while time.monotonic() < deadline:
            try:
                if self.store.add("seen", 0) >= self.world - 1:
                    return
            except Exception:  # noqa: BLE001 - nobody can read it then
                return
            time.sleep(0.02)

    def _learn_peer(self) -> None:
        """The neighbour's pid, as soon as it is published: if the neighbour is rank 0 and dies, the
        store dies with it and can no longer be asked."""
        with self._lock:
            try:
                self._peer_process_gone()
            except Exception:  # noqa: BLE001, S110 - not there yet, or the store failed: check() reports that
                pass

    def _run(self) -> None:
        next_check = time.monotonic()
        while True:
            if self._stop.wait(0.05 if self._peer_who is None else max(0.0, next_check - time.monotonic())):
                return
            if self._peer_who is None:
                self._learn_peer()
            if time.monotonic() < next_check:
                continue
            next_check = time.monotonic() + self.interval_s
            try:
                self._beat()
            except Exception:  # noqa: BLE001, S110 - check() below reports a failing store
                pass
            msg = self.check()
            if msg is None:
                continue
            log.error("%s", msg)
            if self._stop.wait(self.grace_s):
                return  # the main thread saw it too and is handling it
            self.on_lost(msg)
            return
