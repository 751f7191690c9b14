"""Lost-rank watchdog: heartbeats through the job's own rendezvous store, so that when one rank dies
the others stop within seconds, naming it, instead of waiting in a collective.

Why not only the collective timeout: gloo and NCCL report a dead peer as an anonymous socket error
or, if the peer hangs, only after ``train.collective_timeout_s``; under srun or mpirun there is no
agent to kill the survivors. Every rank here bumps a counter in the torch store that the process
group was built on (``hb/<rank>``) and watches one neighbour (rank + 1, a ring, so the store sees
O(world) requests per interval). A neighbour whose process is gone (same host) or whose counter
has not moved for ``timeout_s`` is lost: the first rank to notice writes a verdict that every rank
reads, and a rank that fails with an exception writes one naming itself. The main thread, usually
woken by a socket error, asks :meth:`Watchdog.diagnose` and raises ``PeerLostError``; if it stays
stuck, the monitor thread ends the process with ``EXIT_PEER_LOST`` after ``grace_s``.
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

__all__ = ["Watchdog", "looks_distributed"]

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
        self.interval_s = interval_s or max(0.2, min(5.0, timeout_s / 5))
        self.grace_s = grace_s if grace_s is not None else min(10.0, max(2 * self.interval_s, timeout_s / 4))
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
        self._stop.set()
        if done:
            try:
                self.store.set(f"hb/{self.rank}", _DONE)
            except Exception:  # noqa: BLE001, S110 - the store may already be gone; nothing to tell then
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval_s + 1)

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
                msg = self._read_verdict() or self._check_peer()
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
        if self._peer_value == _DONE:
            return None
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
            if not msg.startswith(f"rank {self.rank} failed"):
                self._publish(msg)
            log.error("%s", msg)
            if self._stop.wait(self.grace_s):
                return  # the main thread saw it too and is handling it
            self.on_lost(msg)
            return
