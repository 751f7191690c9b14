"""Core binding of CPU ranks (runtime/cpu_affinity.py, parallel.bind_cores).

Binding changes the calling process, so every check runs in a fresh process.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch
import torch.multiprocessing as mp
from dist_utils import run_distributed
from modalmoe.runtime.cpu_affinity import IO_THREAD_NAME
from parity_utils import MODEL, data_overrides

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux-only API")


def _thread_affinities() -> dict[int, set[int]]:
    return {int(t): os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")}


def _bind_in_child(local_ranks: int, out) -> None:
    from modalmoe.runtime.cpu_affinity import bind_local_rank, worker_init_fn

    allowed = os.sched_getaffinity(0)
    before = threading.Thread(target=threading.Event().wait, args=(30,), daemon=True)
    before.start()  # a thread that exists before binding (gloo's, in a job)
    got = bind_local_rank(local_ranks - 1, local_ranks, 1)
    later: dict = {}
    t = threading.Thread(target=lambda: later.update(aff=os.sched_getaffinity(0)))
    t.start()
    t.join()
    init = worker_init_fn()
    loader = torch.utils.data.DataLoader(_Affinity(), batch_size=None, num_workers=1, worker_init_fn=init)
    out.put({"allowed": allowed, "got": got, "threads": _thread_affinities(), "later": later["aff"],
             "worker": next(iter(loader)), "init_is_none": init is None})


class _Affinity(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield sorted(os.sched_getaffinity(0))


def _run_child(local_ranks: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_bind_in_child, args=(local_ranks, q))
    p.start()
    out = q.get(timeout=120)
    p.join(30)
    return out


def test_binding_covers_existing_and_later_threads_but_not_data_workers():
    allowed = sorted(os.sched_getaffinity(0))
    ranks = min(2, len(allowed))
    r = _run_child(ranks)
    mine = {allowed[ranks - 1]}
    assert r["got"] == sorted(mine)
    assert all(aff == mine for aff in r["threads"].values()), r["threads"]
    assert r["later"] == mine
    assert r["worker"] == allowed and not r["init_is_none"]


def test_no_binding_when_ranks_outnumber_cores():
    n = len(os.sched_getaffinity(0))
    r = _run_child(n + 1)
    assert r["got"] is None
    assert all(aff == r["allowed"] for aff in r["threads"].values())
    assert r["worker"] == sorted(r["allowed"]) and r["init_is_none"]


def _policies() -> dict[int, tuple[str, int]]:
    out = {}
    for t in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{t}/comm") as f:
            out[int(t)] = (f.read().strip(), os.sched_getscheduler(int(t)))
    return out


def _trainer_affinity(rank: int, world: int, overrides: list[str], run_dir: str):
    from modalmoe.train.job_config import load_job_config
    from modalmoe.train.trainer import Trainer

    cfg = load_job_config(None, MODEL + overrides + [f"train.run_dir={run_dir}/r{rank}", "parallel.ep=2"]).validate()
    Trainer(cfg, train_data=[])
    return sorted(os.sched_getaffinity(0)), [sorted(a) for a in _thread_affinities().values()], list(_policies().values())


@pytest.mark.parametrize("bind", [True, False])
def test_trainer_binds_each_local_rank_and_gloo_threads(demo, tmp_path, bind):
    """Two CPU ranks on a machine with at least two cores: each rank and all its threads (the
    gloo work and I/O threads included, which exist before the trainer) sit on one core of their
    own, and gloo's I/O threads, only they, run under SCHED_IDLE. ``parallel.bind_cores=false``
    leaves all of it as the launcher made it."""
    allowed = sorted(os.sched_getaffinity(0))
    out = run_distributed(_trainer_affinity, 2, data_overrides(demo) + [f"parallel.bind_cores={str(bind).lower()}"], str(tmp_path))
    for rank, (main, threads, policies) in enumerate(out):
        on = bind and len(allowed) >= 2
        want = [allowed[rank]] if on else allowed
        assert main == want
        assert len(threads) > 1 and all(t == want for t in threads)
        loops = [p for name, p in policies if name == IO_THREAD_NAME]
        assert len(loops) >= 1, policies
        assert all(p == (os.SCHED_IDLE if on else os.SCHED_OTHER) for p in loops), policies
        assert all(p == os.SCHED_OTHER for name, p in policies if name != IO_THREAD_NAME), policies


def _idle_in_child(out) -> None:
    import datetime

    import torch.distributed as dist
    from modalmoe.runtime.cpu_affinity import idle_io_threads

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    before = _policies()
    n = idle_io_threads(wait_s=10.0)  # the loop thread names itself once it runs: late on a loaded host
    out.put((before, n, _policies()))
    dist.destroy_process_group()


def test_idle_io_threads_changes_only_gloo_io_threads():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_idle_in_child, args=(q,))
    p.start()
    before, n, after = q.get(timeout=120)
    p.join(30)
    loops = [t for t, (name, _) in after.items() if name == IO_THREAD_NAME]
    assert n == len(loops) >= 1
    assert all(before[t][1] == os.SCHED_OTHER for t in loops)
    assert all(after[t][1] == os.SCHED_IDLE for t in loops)
    assert all(p == before[t][1] for t, (name, p) in after.items() if name != IO_THREAD_NAME and t in before)
