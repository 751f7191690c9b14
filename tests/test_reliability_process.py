"""Process faults in a real 2- or 4-rank CPU job, launched the way srun or mpirun would: one process
per rank with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set and no agent watching them.

* a rank killed (SIGKILL) mid-step: the survivor exits with EXIT_PEER_LOST, naming it, in seconds;
* a rank hung (SIGSTOP): the survivor's watchdog ends it after ``train.heartbeat_timeout_s``;
* the same at 4 ranks, for a rank only one survivor watches: every survivor names it in time;
* SIGTERM to the job: both ranks finish the step, checkpoint and exit 75 (preemption.py); the
  rerun resumes and its loss curve equals an uninterrupted run's, step by step;
* SIGUSR1, then SIGTERM, to one rank alone: every rank stops after the same step, one checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_utils import free_port
from modalmoe.runtime.checkpoint import CheckpointManager
from modalmoe.runtime.data import make_demo
from modalmoe.runtime.faults import EXIT_PEER_LOST
from modalmoe.runtime.preemption import PREEMPTED_EXIT_CODE
from modalmoe.runtime.watchdog import stop_bound_s

LIMIT_S = 120  # the bound on how long survivors may take
HEARTBEAT_S = 5.0
# On top of the watchdog's own bound (stop_bound_s): a survivor's exit after it has named the lost
# rank (unwinding, then the teardown of a torch + DeepSpeed + gloo process: 1-4 s measured with four
# ranks on two busy cores) and this test's polling.
TEARDOWN_S = 10.0
TINY = [
    "model.hidden_size=32", "model.num_heads=2", "model.num_layers=2", "model.ffn_hidden_size=64",
    "model.moe.ffn_hidden_size=32", "model.moe.num_experts=4",
    "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16", "data.eval_shards=[]",
    "train.log_every=1", "train.progress=false", "train.tensorboard=false", "train.report=false",
    "train.warmup_steps=2", "train.threads=1",
    "train.collective_timeout_s=100", f"train.heartbeat_timeout_s={HEARTBEAT_S:g}",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("demo")
    make_demo(d, n_train=128, n_eval=16, samples_per_shard=32)
    return d


class Job:
    """The rank processes of one ``modalmoe train`` job; stderr of rank r in ``run_dir/rank<r>.err``."""

    def __init__(self, demo: Path, run_dir: Path, *extra: str, world: int = 2):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        port = free_port()
        args = [f"data.train_shards=['{demo}/train-{{000000..000003}}.tar']", f"data.tokenizer={demo}/tokenizer.model",
                f"train.run_dir={run_dir}", *TINY, *extra]
        self.procs = []
        for r in range(world):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
            with open(run_dir / f"rank{r}.err", "w") as err:  # the child keeps its own copy of the descriptor
                self.procs.append(subprocess.Popen([sys.executable, "-m", "modalmoe.launch.train", "--set", *args],
                                                   env=env, stdout=subprocess.DEVNULL, stderr=err))

    def stderr(self, r: int) -> str:
        return (self.run_dir / f"rank{r}.err").read_text()

    @staticmethod
    def lines(run_dir: Path) -> int:
        path = run_dir / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def logged_steps(self) -> int:
        return self.lines(self.run_dir)

    def wait_for_steps(self, n: int, limit: float = 120) -> None:
        t0 = time.monotonic()
        while self.logged_steps() < n:
            assert all(p.poll() is None for p in self.procs), [self.stderr(r)[-2000:] for r in range(len(self.procs))]
            assert time.monotonic() - t0 < limit, "the job made no progress"
            time.sleep(0.05)

    def wait(self, r: int, limit: float) -> tuple[int, float]:
        t0 = time.monotonic()
        rc = self.procs[r].wait(timeout=limit)
        return rc, time.monotonic() - t0

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_mid_step_stops_the_other_naming_it(demo, tmp_path, victim):
    job = Job(demo, tmp_path / "run", "train.steps=100000")
    try:
        job.wait_for_steps(3)
        job.procs[victim].send_signal(signal.SIGKILL)
        survivor = 1 - victim
        rc, took = job.wait(survivor, LIMIT_S)
        err = job.stderr(survivor)
        assert rc == EXIT_PEER_LOST, err[-3000:]
        assert f"rank {victim} lost" in err and "error: " in err, err[-3000:]
        assert took < 30, took  # in practice a second or two: gloo's socket error + the pid check
    finally:
        job.kill_all()


def test_a_hung_rank_is_declared_lost_after_the_heartbeat_timeout(demo, tmp_path):
    job = Job(demo, tmp_path / "run", "train.steps=100000")
    try:
        job.wait_for_steps(3)
        job.procs[1].send_signal(signal.SIGSTOP)  # alive, holding its sockets, silent
        rc, took = job.wait(0, LIMIT_S)
        err = job.stderr(0)
        assert rc == EXIT_PEER_LOST, err[-3000:]
        assert "rank 1 lost (no heartbeat for" in err, err[-3000:]
        assert 5 <= took < 30, took
    finally:
        job.kill_all()


@pytest.mark.parametrize(("victim", "fault"), [(2, "killed"), (2, "stuck"), (0, "killed")])
def test_four_ranks_a_lost_rank_is_named_by_every_survivor_in_time(demo, tmp_path, victim, fault):
    """Rank r watches r + 1 (a ring), so rank 2 is watched by rank 1 alone: ranks 0 (the store host,
    watching 1) and 3 (watching 0) only learn of it from the verdict rank 1 writes. Killed: its process
    is gone; stuck (SIGSTOP: alive, its sockets open, silent): its heartbeat stalls. Rank 0 killed
    takes the store with it: rank 3 sees its pid gone, ranks 1 and 2 the store failing. Every
    survivor exits 6 naming the victim within ``stop_bound_s`` (at a 5 s heartbeat timeout: 4 s
    killed, 10 s stuck, 7 s for the store host) + TEARDOWN_S."""
    silent = fault == "stuck"
    job = Job(demo, tmp_path / "run", "train.steps=100000", world=4)
    try:
        job.wait_for_steps(3)
        t0 = time.monotonic()
        job.procs[victim].send_signal(signal.SIGSTOP if silent else signal.SIGKILL)
        took = {}
        for r in sorted(set(range(4)) - {victim}):
            rc, _ = job.wait(r, LIMIT_S)
            took[r] = time.monotonic() - t0
            err = job.stderr(r)
            named = [line for line in err.splitlines() if line.startswith("error: ")]
            want = f"error: rank {victim} lost"
            if victim != 0:
                want += " (no heartbeat for" if silent else f": its process (pid {job.procs[victim].pid}"
            assert rc == EXIT_PEER_LOST and named and named[0].startswith(want), (r, rc, err[-3000:])
        bound = stop_bound_s(HEARTBEAT_S, silent=silent, store_host=victim == 0) + TEARDOWN_S
        assert max(took.values()) < bound, (took, bound)
        if silent:  # nobody can tell a stuck rank from a slow one before the timeout
            assert min(took.values()) >= HEARTBEAT_S, took
    finally:
        job.kill_all()


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


STEPS = "train.steps=60"


@pytest.fixture(scope="module")
def full_curve(demo, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted 2-rank run that every preempted-and-resumed run must reproduce."""
    run = tmp_path_factory.mktemp("full")
    full = Job(demo, run, STEPS)
    try:
        assert [full.wait(r, 300)[0] for r in (0, 1)] == [0, 0], full.stderr(0)[-3000:]
    finally:
        full.kill_all()
    return _losses(run)


def test_sigterm_checkpoints_and_the_rerun_continues_the_curve_exactly(demo, tmp_path, full_curve):
    steps = STEPS
    job = Job(demo, tmp_path / "part", steps)
    try:
        job.wait_for_steps(3)
        for p in job.procs:  # as SLURM does: every task gets it
            p.send_signal(signal.SIGTERM)
        rcs = [job.wait(r, LIMIT_S)[0] for r in (0, 1)]
        assert rcs == [PREEMPTED_EXIT_CODE] * 2, job.stderr(0)[-3000:]
    finally:
        job.kill_all()
    stopped = max(_losses(tmp_path / "part"))
    assert 3 <= stopped < 60, "the signal should land mid-run"
    latest = (tmp_path / "part" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped:08d}"
    rerun = Job(demo, tmp_path / "part", steps)
    try:
        assert [rerun.wait(r, 300)[0] for r in (0, 1)] == [0, 0], rerun.stderr(0)[-3000:]
    finally:
        rerun.kill_all()
    a, b = full_curve, _losses(tmp_path / "part")
    assert sorted(b) == list(range(1, 61))
    assert all(a[s] == b[s] for s in range(1, 61)), [(s, a[s], b[s]) for s in range(1, 61) if a[s] != b[s]][:5]


def _signal_one_rank(job: Job, rank: int, sig: signal.Signals) -> int:
    """``sig`` to ``rank`` alone: every rank exits 75 saying it stopped after the same step, returned."""
    job.procs[rank].send_signal(sig)
    rcs = [job.wait(r, LIMIT_S)[0] for r in range(len(job.procs))]
    errs = [job.stderr(r) for r in range(len(job.procs))]
    assert rcs == [PREEMPTED_EXIT_CODE] * len(rcs), (rcs, [e[-2000:] for e in errs])
    stops = [re.findall(rf"stopped by {sig.name} after step (\d+)", e) for e in errs]
    assert all(len(s) == 1 for s in stops) and len({s[0] for s in stops}) == 1, stops
    return int(stops[0][0])


def _assert_one_consistent_checkpoint(ckpts: Path, step: int, world: int, before: set[str]) -> None:
    """The stop wrote exactly one checkpoint, of ``step``: ``latest`` names it, its manifest verifies
    and lists every rank's shard, and every shard holds that step."""
    name = f"step_{step:08d}"
    assert {p.name for p in ckpts.glob("step_*")} - before == {name}
    assert not list(ckpts.glob(".step_*")), "a temporary checkpoint folder was left behind"
    assert (ckpts / "latest").read_text().strip() == name
    manifest = CheckpointManager.verify(ckpts / name)
    shards = [f"rank{r:05d}.pt" for r in range(world)]
    assert manifest["step"] == step and set(shards) <= set(manifest["files"]), manifest["files"].keys()
    for shard in shards:
        assert torch.load(ckpts / name / shard, weights_only=True)["trainer"]["step"] == step, shard


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_and_the_curve_continues(demo, tmp_path, full_curve):
    """SIGUSR1 to rank 1 alone, then (in the rerun) SIGTERM to rank 0 alone: the all-reduced flag
    stops both ranks after the same step each time, with one complete checkpoint of that step; the
    last rerun finishes, and the three pieces make the uninterrupted run's loss curve exactly."""
    run, ckpts, stopped = tmp_path / "part", tmp_path / "part" / "checkpoints", 0
    for rank, sig in ((1, signal.SIGUSR1), (0, signal.SIGTERM)):
        before = {p.name for p in ckpts.glob("step_*")}
        seen = Job.lines(run)
        job = Job(demo, run, STEPS)
        try:
            job.wait_for_steps(seen + 3)
            step = _signal_one_rank(job, rank, sig)
        finally:
            job.kill_all()
        assert stopped + 3 <= step < 60, (stopped, step)
        assert max(_losses(run)) == step
        _assert_one_consistent_checkpoint(ckpts, step, 2, before)
        stopped = step
    rerun = Job(demo, run, STEPS)
    try:
        assert [rerun.wait(r, 300)[0] for r in (0, 1)] == [0, 0], rerun.stderr(0)[-3000:]
    finally:
        rerun.kill_all()
    b = _losses(run)
    assert sorted(b) == list(range(1, 61))
    assert all(full_curve[s] == b[s] for s in b), [(s, full_curve[s], b[s]) for s in b if full_curve[s] != b[s]][:5]
