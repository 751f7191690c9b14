"""Process faults in a real 2-rank CPU job, launched the way srun or mpirun would: one process per
rank with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set and no agent watching them.

* a rank killed (SIGKILL) mid-step: the survivor exits with EXIT_PEER_LOST, naming it, in seconds;
* a rank hung (SIGSTOP): the survivor's watchdog ends it after ``train.heartbeat_timeout_s``;
* SIGTERM to the job: both ranks finish the step, checkpoint and exit 75 (preemption.py); the
  rerun resumes and its loss curve equals an uninterrupted run's, step by step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_utils import free_port
from modalmoe.runtime.data import make_demo
from modalmoe.runtime.faults import EXIT_PEER_LOST
from modalmoe.runtime.preemption import PREEMPTED_EXIT_CODE

LIMIT_S = 120  # the bound on how long survivors may take
TINY = [
    "model.hidden_size=32", "model.num_heads=2", "model.num_layers=2", "model.ffn_hidden_size=64",
    "model.moe.ffn_hidden_size=32", "model.moe.num_experts=4",
    "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16", "data.eval_shards=[]",
    "train.log_every=1", "train.progress=false", "train.tensorboard=false", "train.report=false",
    "train.warmup_steps=2", "train.threads=1",
    "train.collective_timeout_s=100", "train.heartbeat_timeout_s=5",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("demo")
    make_demo(d, n_train=128, n_eval=16, samples_per_shard=32)
    return d


class Job:
    """Two rank processes of ``modalmoe train``; stderr of rank r in ``run_dir/rank<r>.err``."""

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

    def logged_steps(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

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


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_sigterm_checkpoints_and_the_rerun_continues_the_curve_exactly(demo, tmp_path):
    steps = "train.steps=60"
    full = Job(demo, tmp_path / "full", steps)
    try:
        assert [full.wait(r, 300)[0] for r in (0, 1)] == [0, 0], full.stderr(0)[-3000:]
    finally:
        full.kill_all()
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
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(b) == list(range(1, 61))
    assert all(a[s] == b[s] for s in range(1, 61)), [(s, a[s], b[s]) for s in range(1, 61) if a[s] != b[s]][:5]
