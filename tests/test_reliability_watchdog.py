"""The lost-rank watchdog on its own: a silent peer, a dead process, a failing rank, a finished one.

Two Watchdog objects for ranks 0 and 1 share one FileStore in this process; ``on_lost`` records
the verdict instead of ending the process.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from dist_utils import free_port
from modalmoe.runtime.watchdog import Watchdog


@pytest.fixture
def store(tmp_path):
    return dist.FileStore(str(tmp_path / "store"), 2)


@pytest.fixture
def store_of_3(tmp_path):
    return dist.FileStore(str(tmp_path / "store"), 3)


def _pair(store, timeout_s=2.0, grace_s=0.2):
    lost: dict[int, list[str]] = {0: [], 1: []}
    dogs = [
        Watchdog(store, r, 2, timeout_s=timeout_s, interval_s=0.2, grace_s=grace_s, on_lost=lost[r].append)
        for r in (0, 1)
    ]
    return dogs, lost


def _wait(cond, limit: float) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < limit, "timed out"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_healthy_peers_are_left_alone_and_a_finished_one_is_not_lost(store):
    dogs, lost = _pair(store)
    for d in dogs:
        d.start()
    time.sleep(3.0)  # longer than timeout_s: heartbeats keep both alive
    assert lost == {0: [], 1: []}
    dogs[1].stop()  # finished: says so before it goes
    time.sleep(3.0)
    dogs[0].stop()
    assert lost == {0: [], 1: []}


def test_a_silent_peer_is_declared_lost_by_name(store):
    dogs, lost = _pair(store)
    for d in dogs:
        d.start()
    dogs[1].stop(done=False)  # stops beating without saying goodbye (hung, or SIGSTOPped)
    took = _wait(lambda: lost[0], limit=10)  # on_lost runs where the process would end: after grace_s
    assert lost[0][0].startswith("rank 1 lost (no heartbeat for") and 2.0 <= took < 5.0
    dogs[0].stop()


def test_a_dead_process_is_declared_lost_at_once(store):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dogs, lost = _pair(store, timeout_s=30.0)
    dogs[0].start()
    dogs[1].store.set("who/1", f"{dogs[1].host} {child.pid}")  # rank 1 is that process
    dogs[1].store.set("hb/1", "1")
    time.sleep(0.5)
    assert not lost[0]
    child.kill()  # not reaped yet: a zombie still counts as gone
    took = _wait(lambda: lost[0], limit=5)
    assert lost[0][0] == f"rank 1 lost: its process (pid {child.pid} on {dogs[0].host}) is gone" and took < 2.0
    child.wait()
    dogs[0].stop()


def test_a_failing_rank_tells_the_others_and_diagnose_reports_it(store):
    dogs, lost = _pair(store, timeout_s=30.0, grace_s=30.0)
    for d in dogs:
        d.start()
    dogs[1].fail("BadDataError: 8 of 8 samples were bad")
    assert dogs[0].diagnose(wait_s=5) == "rank 1 failed: BadDataError: 8 of 8 samples were bad"
    dogs[0].stop()
    assert lost == {0: [], 1: []}  # the main thread handled it within the grace period


_STORE_HOST = """
import sys, time, torch.distributed as dist
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=True, wait_for_workers=False)
print("up", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("agent_store", [False, True])
def test_a_lost_store_is_blamed_on_whoever_hosts_it(agent_store):
    """The rendezvous store gone: rank 0 hosts it, unless the LaunchInfo says torchrun's agent does."""
    port = free_port()
    host = subprocess.Popen([sys.executable, "-c", _STORE_HOST, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout.readline().strip() == "up"
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        lost: list[str] = []
        dog = Watchdog(store, 1, 2, timeout_s=30.0, interval_s=0.2, grace_s=60.0, on_lost=lost.append, agent_store=agent_store)
        dog.start()
    finally:
        host.kill()
        host.wait()
    verdict = dog.diagnose(wait_s=30)
    dog.stop(done=False)
    want = "the launcher's rendezvous store is unreachable" if agent_store else "rank 0 lost: the rendezvous store it hosts is unreachable"
    assert verdict is not None and verdict.startswith(want), verdict
    assert not lost


def test_a_verdict_the_main_thread_finds_reaches_ranks_that_do_not_watch_the_lost_one(store_of_3):
    """Rank 2 of 3 dies; only rank 1 watches it, and rank 1's main thread (woken by a socket error)
    finds it first and stops its watchdog to raise: the verdict must be in the store by then, or
    rank 0 would never hear why."""
    store = store_of_3
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lost: list[str] = []
    # intervals long enough that no monitor thread looks again during the test
    dogs = [Watchdog(store, r, 3, timeout_s=60.0, interval_s=30.0, grace_s=60.0, on_lost=lost.append) for r in (0, 1)]
    dogs[1].store.set("who/2", f"{dogs[1].host} {child.pid}")
    dogs[1].store.set("hb/2", "1")
    for d in dogs:
        d.start()
    time.sleep(0.3)
    child.kill()
    child.wait()
    verdict = f"rank 2 lost: its process (pid {child.pid} on {dogs[1].host}) is gone"
    assert dogs[1].diagnose() == verdict
    dogs[1].stop(done=False)
    assert dogs[0].diagnose() == verdict
    dogs[0].stop(done=False)  # the store host: both ranks that can read it have
    assert not lost


def test_the_store_host_leaves_only_once_the_others_read_the_verdict(store_of_3):
    """Rank 0 hosts the store: leaving on a verdict, it waits (≤ 2 intervals) until every other live
    rank has read it, or they would find the store gone and blame rank 0 instead."""
    lost: list[str] = []
    dogs = [Watchdog(store_of_3, r, 3, timeout_s=30.0, interval_s=0.5, grace_s=30.0, on_lost=lost.append) for r in range(3)]
    for d in dogs[:2]:
        d.start()
    time.sleep(0.2)
    dogs[2].fail("BadDataError: 8 of 8 samples were bad")
    assert dogs[0].diagnose() == "rank 2 failed: BadDataError: 8 of 8 samples were bad"
    t0 = time.monotonic()
    dogs[0].stop(done=False)
    assert dogs[1].verdict == "rank 2 failed: BadDataError: 8 of 8 samples were bad"
    assert time.monotonic() - t0 < 2 * 0.5 + 0.5
    dogs[1].stop()
    # the same with nobody left to read it (a job of its own, in its own namespace): 2 intervals at most
    alone = Watchdog(store_of_3, 0, 3, timeout_s=30.0, interval_s=0.5, grace_s=30.0, on_lost=lost.append, namespace="alone")
    alone.start()
    Watchdog(store_of_3, 2, 3, timeout_s=30.0, namespace="alone").fail("BadDataError: 8 of 8 samples were bad")
    assert alone.diagnose() is not None
    t0 = time.monotonic()
    alone.stop(done=False)
    assert 2 * 0.5 - 0.1 <= time.monotonic() - t0 < 2 * 0.5 + 0.5
    assert lost == []


def test_with_the_store_gone_a_vanished_neighbour_is_not_blamed_but_the_store_host(tmp_path):
    """Rank 0 (the store host) dies and rank 2 exits because of it: rank 1, watching 2, must name rank 0."""
    port = free_port()
    host = subprocess.Popen([sys.executable, "-c", _STORE_HOST, str(port)], stdout=subprocess.PIPE, text=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert host.stdout.readline().strip() == "up"
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        dog = Watchdog(store, 1, 3, timeout_s=30.0, interval_s=0.2, grace_s=60.0, on_lost=lambda m: None)
        dog.store.set("who/2", f"{dog.host} {child.pid}")
        dog.start()
        time.sleep(0.5)  # it has learnt rank 2's pid
    finally:
        host.kill()
        host.wait()
        child.kill()
        child.wait()
    verdict = dog.diagnose(wait_s=30)
    dog.stop(done=False)
    assert verdict is not None and verdict.startswith("rank 0 lost: the rendezvous store it hosts is unreachable"), verdict
