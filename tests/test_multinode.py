"""The multi-node launch paths, run for real on one machine: two "nodes" the test makes itself.

node1 and node2 are two network namespaces joined by a veth pair, each with its own hostname and a
hosts file naming both (tests/netns_utils.py); they share the filesystem, so the same Python and
paths, as cluster nodes share a home directory. On them run sshd (keys made here) for the deepspeed
launcher's pdsh runner and Open MPI, and a two-node SLURM cluster (slurmctld on node1, a slurmd on
each). Every job is a tiny model for a few steps on gloo:

- deepspeed with a hostfile made from launch/hostfile.example: EP=2 over 2 nodes × 1 rank, and
  DP=2×EP=2 over 2 × 2 ranks through launch/deepspeed.sh; a variable set only in .deepspeed_env
  reaches the rank on node2; the EP=2 run across the nodes reproduces the single-process loss curve
  (tests/test_parity.py's tolerance); a node lost mid-run (every process in its namespace killed)
  makes the survivor exit 6 naming the lost rank within the watchdog's bound.
- sbatch launch/slurm/multinode.sbatch on 2 nodes × 2 tasks (COMPLETED, every rank's checkpoint
  shard), and × 1 task with SIGUSR1 mid-run: checkpoint, requeue, resume, COMPLETED.
- launch/mpirun.sh with a hostfile naming both nodes.

Making the namespaces needs root (CI runs as root): where it is refused the tests fail under
CI=true with the reason and skip elsewhere; a missing program (sshd, pdsh, slurm) likewise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns_utils import NamespaceUnavailable, Sshd, TwoNodes, TwoNodeSlurm
from test_launchers import (IN_CI, JOB_TIMEOUT, SBIN, TINY, _assert_trained, _require, _require_mpi4py, _train_args,
                            _usr1_once_training)

REPO = Path(__file__).resolve().parents[1]
PROBE = "MODALMOE_MULTINODE_PROBE"  # set only in .deepspeed_env: the ranks on both nodes must see it
PARITY_STEPS = 4
HEARTBEAT_S = 4.0
EXIT_SLACK_S = 10.0  # the survivor's own exit after the verdict (gloo and DeepSpeed teardown), on a loaded 2-core machine


def _unavailable(msg: str) -> None:
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


NODE_PROGRAMS = {"ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux", "ssh": "openssh-client",
                 "ssh-keygen": "openssh-client", "sshd": "openssh-server", "pdsh": "pdsh"}


def _make_nodes(root: Path) -> tuple[TwoNodes, Sshd]:
    missing = sorted({pkg for prog, pkg in NODE_PROGRAMS.items() if shutil.which(prog, path=SBIN) is None})
    if missing:
        _unavailable(f"the two-node tests need apt-get install {' '.join(missing)} (.ci/run installs them in CI)")
    if os.geteuid() != 0:
        _unavailable("the two-node tests make network namespaces and run sshd and slurmd as root; run them as root")
    nodes = TwoNodes(root)
    try:
        nodes.start()
        ssh = Sshd(nodes)
        ssh.start()
    except NamespaceUnavailable as e:
        nodes.stop()
        _unavailable(str(e))
    except BaseException:
        nodes.stop()
        raise
    return nodes, ssh


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes, ssh = _make_nodes(tmp_path_factory.mktemp("nodes"))
    try:
        yield nodes, ssh
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    from modalmoe.launch.cli import main

    d = tmp_path_factory.mktemp("demo")
    assert main(["data", "make-demo", str(d), "--n-train", "128", "--n-eval", "32"]) == 0
    return d


def _hostfile(path: Path) -> Path:
    """launch/hostfile.example with its two node names replaced by this test's."""
    text = (REPO / "launch" / "hostfile.example").read_text()
    assert "node001 slots=" in text and "node002 slots=" in text
    path.write_text(text.replace("node001", "node1").replace("node002", "node2"))
    return path


def _on_node(log: str, rank: int, world: int, node: str) -> None:
    """Rank ``rank``'s launch line came through pdsh from ``node``."""
    line = re.search(rf"^(\w+): .*launched by deepspeed: {world} processes on 2 node\(s\); rank {rank} of {world},", log, re.M)
    assert line and line.group(1) == node, f"rank {rank} not on {node}:\n{log[-4000:]}"


def _deepspeed(cluster, work: Path, cmd_tail: list[str], *, gpus: int, script: bool = False,
               stdout=None) -> subprocess.Popen | subprocess.CompletedProcess:
    """The deepspeed launcher started on node1 with this test's hostfile, as a user on the first node would."""
    nodes, ssh = cluster
    ds = _require("deepspeed")["deepspeed"]
    hostfile = _hostfile(work / "hostfile")
    env = ssh.env()
    if script:
        env.update(HOSTFILE=str(hostfile), NUM_NODES="2", NUM_GPUS=str(gpus), PATH=f"{Path(ds).parent}{os.pathsep}{env['PATH']}")
        cmd = ["bash", str(REPO / "launch" / "deepspeed.sh"), *cmd_tail]
    else:
        cmd = [ds, "--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", str(gpus), *cmd_tail]
    if stdout is not None:
        return nodes.popen("node1", cmd, cwd=work, env=env, stdout=stdout, stderr=subprocess.STDOUT)
    return nodes.run("node1", cmd, cwd=work, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)


def _ok(out: subprocess.CompletedProcess, t0: float) -> str:
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"exited {out.returncode} after {time.perf_counter() - t0:.0f}s:\n{log[-6000:]}"
    return log


# ---- deepspeed: hostfile, pdsh over ssh -----------------------------------------------------------


@pytest.mark.parametrize("layout", ["ep2-2x1", "dp2xep2-2x2"])
def test_deepspeed_hostfile_two_nodes(cluster, demo_dir, tmp_path, layout):
    """``deepspeed --hostfile ... --num_nodes 2 --num_gpus N --module modalmoe.launch.train``; the
    2 × 2 layout goes through launch/deepspeed.sh (HOSTFILE, NUM_NODES, NUM_GPUS)."""
    gpus = 1 if layout == "ep2-2x1" else 2
    world = 2 * gpus
    run = tmp_path / "run"
    t0 = time.perf_counter()
    tail = ["--module", "modalmoe.launch.train"] if gpus == 1 else []
    out = _deepspeed(cluster, tmp_path, [*tail, *_train_args(demo_dir, run, "parallel.ep=2")], gpus=gpus, script=gpus == 2)
    log = _ok(out, t0)
    _assert_trained(run, log, "deepspeed", ranks=world)
    for r in range(world):
        _on_node(log, r, world, "node1" if r < gpus else "node2")
    assert f"world {world} = tp 1 × dp {world} (dp = ep 2 × edp {world // 2})" in log, log[-3000:]


def test_deepspeed_ep2_across_nodes_matches_single_process_and_gets_deepspeed_env(cluster, demo, tmp_path):
    """tests/parity_utils.py's fixed batches on EP=2, one rank per node, against one process; the
    probe variable exists only in .deepspeed_env in the launcher's directory."""
    from parity_utils import data_overrides, train_run
    from test_parity import NORM_RTOL, RTOL

    (tmp_path / ".deepspeed_env").write_text(f"{PROBE}=from-deepspeed-env\n")
    assert PROBE not in os.environ
    t0 = time.perf_counter()
    out = _deepspeed(cluster, tmp_path, [str(Path(__file__).resolve()), "--parity-rank", "--out", str(tmp_path),
                                         "--demo", str(demo)], gpus=1)
    log = _ok(out, t0)
    assert "deepspeed_env file = ./.deepspeed_env" in log, log[-3000:]  # the runner's cwd: tmp_path
    probes = [json.loads((tmp_path / f"probe-rank{r}.json").read_text()) for r in range(2)]
    assert [(p["host"], p["probe"]) for p in probes] == [("node1", "from-deepspeed-env"), ("node2", "from-deepspeed-env")]
    assert all("launched by deepspeed: 2 processes on 2 node(s)" in p["launch"] for p in probes), probes

    curve = json.loads((tmp_path / "curve.json").read_text())
    reference = train_run(0, 1, data_overrides(demo) + [f"train.steps={PARITY_STEPS}"], str(tmp_path / "single"))
    assert len(curve) == len(reference) == PARITY_STEPS
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(curve, reference):
        assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), f"step {step}: loss {loss!r} across nodes vs {ref_loss!r}"
        assert abs(norm - ref_norm) <= NORM_RTOL * ref_norm, f"step {step}: grad norm {norm!r} across nodes vs {ref_norm!r}"


def _parity_rank(argv: list[str]) -> None:
    """One rank of the parity run, started by the deepspeed launcher on either node."""
    p = argparse.ArgumentParser()
    p.add_argument("--parity-rank", action="store_true")
    p.add_argument("--out", type=Path)
    p.add_argument("--demo", type=Path)
    p.add_argument("--local_rank", type=int)
    a = p.parse_args(argv)
    from modalmoe.launch.environment import setup_environment
    from parity_utils import data_overrides, train_run

    info = setup_environment(a.local_rank)
    probe = {"host": socket.gethostname(), "probe": os.environ.get(PROBE), "launch": info.describe()}
    (a.out / f"probe-rank{info.rank}.json").write_text(json.dumps(probe))
    overrides = data_overrides(a.demo) + ["parallel.ep=2", f"train.steps={PARITY_STEPS}"]
    curve = train_run(info.rank, info.world_size, overrides, str(a.out / "run"))
    if curve is not None:
        (a.out / "curve.json").write_text(json.dumps(curve))


# ---- SLURM: multinode.sbatch on node[1-2] ---------------------------------------------------------


@pytest.fixture(scope="module")
def slurm2(cluster, tmp_path_factory):
    programs = _require("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "srun", path=SBIN)
    nodes, _ = cluster
    s = TwoNodeSlurm(tmp_path_factory.mktemp("slurm2"), programs, nodes)
    try:
        s.start()
        yield s
    finally:
        s.stop()


def _sbatch(slurm: TwoNodeSlurm, demo_dir: Path, work: Path, run: Path, tasks: int, *train_args: str) -> str:
    """launch/slurm/multinode.sbatch with only the site lines (partition, nodes, tasks, GPUs, time)
    overridden on the sbatch command line, as a user does on a cluster."""
    env = {**slurm.env, "PYTHON": sys.executable, "PRESET": "smoke", "DEMO_DIR": str(demo_dir), "RUN_DIR": str(run)}
    cmd = ["sbatch", "--parsable", "--partition=ci", "--nodes=2", f"--ntasks-per-node={tasks}", "--cpus-per-task=1",
           "--gpus-per-node=0", "--time=10", f"--chdir={work}", f"--output={work}/slurm-%j.out",
           str(REPO / "launch" / "slurm" / "multinode.sbatch"), "--set", *TINY, *train_args]
    return slurm.cmd(*cmd, env=env).strip().split(";")[0]


def _slurm_ranks(log: str, job: str, world: int, per_node: int) -> None:
    """Every rank said how it was started; local ranks restart at 0 on the second node."""
    for r in range(world):
        want = rf"launched by slurm: job {job}, {world} tasks on 2 node\(s\); rank {r} of {world}, local rank {r % per_node}, rendezvous node1:"
        assert re.search(want, log), f"no launch line for rank {r}:\n{log[-4000:]}"


def test_slurm_multinode_sbatch_two_nodes_two_tasks_each(slurm2, demo_dir, tmp_path):
    run = tmp_path / "run"
    job = _sbatch(slurm2, demo_dir, tmp_path, run, 2, "parallel.ep=2")
    info = slurm2.wait(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", f"job {job}: {info['JobState']} {info.get('ExitCode')}\n{log[-6000:]}\n{slurm2.logs()}"
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2", info
    _slurm_ranks(log, job, 4, 2)
    _assert_trained(run, log, "slurm", ranks=4)


def test_slurm_multinode_preemption_requeues_and_resumes_on_both_nodes(slurm2, demo_dir, tmp_path):
    """SIGUSR1 to every task of the job (what --signal=USR1@300 sends): both nodes' ranks stop after
    the same step with one checkpoint, the script requeues, the second run resumes and completes."""
    run, steps = tmp_path / "run", 100
    job = _sbatch(slurm2, demo_dir, tmp_path, run, 1, "parallel.ep=2", f"train.steps={steps}")
    metrics = run / "metrics.jsonl"
    _usr1_once_training(slurm2, job, metrics)
    info = slurm2.wait(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log[-6000:]}\n{slurm2.logs()}"
    stops = re.findall(r"stopped by SIGUSR1 after step (\d+)", log)
    assert len(stops) == 2 and stops[0] == stops[1] and int(stops[0]) < steps, log[-6000:]
    ckpt = run / "checkpoints" / f"step_{int(stops[0]):08d}"
    assert sorted(p.name for p in ckpt.glob("rank*.pt")) == ["rank00000.pt", "rank00001.pt"]
    assert "requeueing it" in log and "(restart 1)" in log
    assert re.search(rf"resumed from \S+step_{int(stops[0]):08d} at step {stops[0]}", log), log[-6000:]
    _slurm_ranks(log, job, 2, 1)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, steps + 1))


# ---- Open MPI: a hostfile naming both nodes -------------------------------------------------------


def test_mpirun_hostfile_two_nodes(cluster, demo_dir, tmp_path):
    _require("mpirun")
    _require_mpi4py()
    nodes, ssh = cluster
    (tmp_path / "hosts").write_text("node1 slots=1\nnode2 slots=1\n")
    run = tmp_path / "run"
    env = ssh.env(NP="2", HOSTFILE=str(tmp_path / "hosts"), PYTHON=sys.executable)
    t0 = time.perf_counter()
    out = nodes.run("node1", ["bash", str(REPO / "launch" / "mpirun.sh"), *_train_args(demo_dir, run, "parallel.ep=2")],
                    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    log = _ok(out, t0)
    _assert_trained(run, log, "mpirun")
    for r in range(2):
        assert re.search(rf"launched by mpirun: Open MPI, 2 processes, 1 on this node, rendezvous from mpi4py; rank {r} of 2, "
                         r"local rank 0, rendezvous node1:", log), log[-4000:]


# ---- a node lost mid-run --------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def test_a_lost_node_makes_the_survivor_exit_6_naming_the_lost_rank(demo_dir, tmp_path):
    """Every process of node2 killed (its rank, launcher, sshd): rank 0 on node1 names rank 1 and
    exits 6 within ``watchdog.stop_bound_s`` of a silent peer (node2 is another host), its own exit aside."""
    from modalmoe.runtime.watchdog import stop_bound_s

    nodes, ssh = _make_nodes(tmp_path / "nodes")  # its own pair: this test destroys node2
    try:
        run, out = tmp_path / "run", tmp_path / "launcher.log"
        args = _train_args(demo_dir, run, "parallel.ep=2", "train.steps=5000", f"train.heartbeat_timeout_s={HEARTBEAT_S}")
        with open(out, "w") as f:
            proc = _deepspeed((nodes, ssh), tmp_path, ["--module", "modalmoe.launch.train", *args], gpus=1, stdout=f)
        try:
            metrics = run / "metrics.jsonl"
            deadline = time.monotonic() + JOB_TIMEOUT
            while not (metrics.is_file() and metrics.stat().st_size > 0):
                assert proc.poll() is None and time.monotonic() < deadline, f"never trained:\n{out.read_text()[-4000:]}"
                time.sleep(0.2)
            rank0 = re.search(r"^node1: .*process (\d+) spawned with command: \[.*'--local_rank=0'", out.read_text(), re.M)
            assert rank0, out.read_text()[-4000:]
            pid = int(rank0.group(1))
            assert _alive(pid) and pid in nodes.pids("node1")
            killed = nodes.kill("node2")
            t_kill = time.monotonic()
            while _alive(pid) and time.monotonic() - t_kill < 120:
                time.sleep(0.05)
            took = time.monotonic() - t_kill
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        log = out.read_text()
        bound = stop_bound_s(HEARTBEAT_S, silent=True)
        assert len(killed) >= 3, killed  # at least sshd, the launcher and the rank
        assert re.search(r"^node1: error: rank 1 lost \(no heartbeat for \d+ s\); rank 0 stops too", log, re.M), log[-4000:]
        assert re.search(r"^node1: .*exits with return code = 6$", log, re.M), log[-4000:]
        assert took <= bound + EXIT_SLACK_S, f"rank 0 stopped {took:.1f} s after node2 was lost (bound {bound:.1f} s + exit)"
        print(f"lost node: rank 0 gone {took:.1f} s after node2 was killed; watchdog bound {bound:.1f} s")
    finally:
        nodes.stop()


if __name__ == "__main__" and "--parity-rank" in sys.argv:
    _parity_rank(sys.argv[1:])
