"""The launchers, run for real: the deepspeed launcher, Open MPI's mpirun, a one-node SLURM cluster on
localhost (munged + slurmctld + slurmd from Debian's slurm-wlm), the smoke script, and preemption
(a signal mid-run → a checkpoint, exit code 75, a rerun that resumes there).

Every distributed job is two CPU ranks (gloo) training a tiny model for two steps on a tiny demo set.
A program that is not installed skips its test with the reason, except in CI (``CI=true``), where it
fails: CI installs them (.ci/run), so a missing one is a broken CI, never a pass.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from modalmoe.launch.cli import main
from modalmoe.launch.environment import (
    free_port,
)
from modalmoe.runtime.preemption import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
TINY = [
    "model.hidden_size=32", "model.num_heads=2", "model.num_layers=2", "model.ffn_hidden_size=64",
    "model.moe.ffn_hidden_size=32", "model.moe.num_experts=4", "data.batch_size=8", "data.num_workers=0",
    "data.shuffle_buffer=50", "train.log_every=1", "train.eval_batches=1", "train.retrieval_size=8",
    "train.warmup_steps=1", "train.progress=false", "train.tensorboard=false", "train.report=false",
    "train.threads=1", "train.steps=2",
]
LAUNCHER_VARS = re.compile(
    r"^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|LOCAL_SIZE|MASTER_ADDR|MASTER_PORT|CROSS_RANK|CROSS_SIZE|"
    r"GROUP_RANK|SLURM_.*|OMPI_.*|PMI_.*|PMIX_.*|TORCHELASTIC_.*)$"
)
JOB_TIMEOUT = 240


def _require(*programs: str, path: str | None = None) -> dict[str, str]:
    found = {p: shutil.which(p, path=path) for p in programs}
    missing = [p for p, where in found.items() if where is None]
    if missing:
        fix = {"deepspeed": "pip install -r requirements.txt", "mpirun": "apt-get install openmpi-bin libopenmpi-dev",
               "munged": "apt-get install munge"}
        hints = sorted({fix.get(p, "apt-get install slurm-wlm") for p in missing})
        msg = f"{', '.join(missing)} not installed: {'; '.join(hints)} (.ci/run installs them in CI)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return found  # type: ignore[return-value]


def _require_mpi4py() -> None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        msg = "mpi4py not installed: apt-get install libopenmpi-dev && pip install mpi4py (.ci/run does this in CI)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


def _free_port() -> int:
    """Below the ephemeral range, like the launch scripts' ports; a random start keeps two picks apart."""
    return free_port(start=random.randrange(20000, 32000))


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables (the tests may run inside one)."""
    env = {k: v for k, v in os.environ.items() if not LAUNCHER_VARS.match(k)}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("demo")
    assert main(["data", "make-demo", str(d), "--n-train", "128", "--n-eval", "32"]) == 0
    return d


def _train_args(demo_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--demo-dir", str(demo_dir), "--set", *TINY, f"train.run_dir={run_dir}", *extra]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = JOB_TIMEOUT) -> str:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"{cmd[0]} exited {out.returncode} after {time.perf_counter() - t0:.0f}s:\n{log[-6000:]}"
    return log


def _assert_trained(run_dir: Path, log: str, launcher: str, ranks: int = 2, steps: int = 2) -> None:
    """Every rank said how it was started, trained to the end and wrote its part of the checkpoint."""
    for r in range(ranks):
        assert re.search(rf"launched by {launcher}: .*rank {r} of {ranks},", log), f"no rank {r} launch line:\n{log[-4000:]}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, steps + 1))
    assert json.loads((run_dir / "summary.json").read_text())["step"] == steps
    ckpt = run_dir / "checkpoints" / f"step_{steps:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert sorted(p.name for p in ckpt.glob("rank*.pt")) == [f"rank{r:05d}.pt" for r in range(ranks)]


# ---- deepspeed ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["parallel.ep=2", "parallel.tp=2"])
def test_deepspeed_launcher(demo_dir, tmp_path, layout):
    _require("deepspeed")
    run = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "modalmoe.launch.train",
           *_train_args(demo_dir, run, layout)]
    log = _run(cmd, tmp_path, _clean_env())
    _assert_trained(run, log, "deepspeed")
    assert ("tp 2 × dp 1" if "tp" in layout else "dp = ep 2") in log


def test_deepspeed_script_and_a_signal_to_one_rank_stops_every_rank_at_the_same_step(demo_dir, tmp_path):
    """SIGUSR1 to rank 1 alone: the all-reduced flag stops both ranks after one step, with one checkpoint."""
    _require("deepspeed")
    run, out = tmp_path / "run", tmp_path / "launcher.log"
    env = _clean_env(NUM_GPUS="2", MASTER_PORT=str(_free_port()))
    cmd = ["bash", str(REPO / "launch" / "deepspeed.sh"), *_train_args(demo_dir, run, "parallel.ep=2", "train.steps=400")]
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0, proc, out)
        rank1 = re.search(r"process (\d+) spawned with command: \[.*'--local_rank=1'", out.read_text())
        assert rank1, out.read_text()[-4000:]
        os.kill(int(rank1.group(1)), signal.SIGUSR1)
        rc = proc.wait(timeout=JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = out.read_text()
    assert rc == PREEMPTED_EXIT_CODE, log[-4000:]
    stops = re.findall(r"stopped by SIGUSR1 after step (\d+)", log)
    assert len(stops) == 2 and stops[0] == stops[1], log[-4000:]
    ckpt = run / "checkpoints" / f"step_{int(stops[0]):08d}"
    assert sorted(p.name for p in ckpt.glob("rank*.pt")) == ["rank00000.pt", "rank00001.pt"]


# ---- Open MPI ----------------------------------------------------------------------------------------


def test_mpirun(demo_dir, tmp_path):
    _require("mpirun")
    _require_mpi4py()
    run = tmp_path / "run"
    cmd = ["mpirun", "--allow-run-as-root", "-np", "2", sys.executable, "-m", "modalmoe.launch.train",
           *_train_args(demo_dir, run, "parallel.ep=2")]
    log = _run(cmd, tmp_path, _clean_env())
    _assert_trained(run, log, "mpirun")
    assert "rendezvous from mpi4py" in log


def test_mpirun_script(demo_dir, tmp_path):
    _require("mpirun")
    _require_mpi4py()
    run = tmp_path / "run"
    cmd = ["bash", str(REPO / "launch" / "mpirun.sh"), *_train_args(demo_dir, run, "parallel.ep=2")]
    log = _run(cmd, tmp_path, _clean_env(NP="2", PYTHON=sys.executable))
    _assert_trained(run, log, "mpirun")


# ---- SLURM -------------------------------------------------------------------------------------------


class SlurmCluster:
    """munged + slurmctld + slurmd for one node named localhost, all state under ``root``."""

    def __init__(self, root: Path, programs: dict[str, str]):
        self.root, self.programs = root, programs
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = root / "slurm.conf"
        self.cpus = len(os.sched_getaffinity(0))
        self.env = _clean_env(SLURM_CONF=str(self.conf))

    def start(self) -> None:
        r = self.root
        (r / "state").mkdir()
        (r / "spool").mkdir()
        self._write_conf(self._start_munged(), "modalmoe-test", "localhost", "", "localhost",
                         "NodeName=localhost NodeHostname=localhost", ctld_port=_free_port(), d_port=_free_port())
        self._spawn("slurmctld", [self.programs["slurmctld"], "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [self.programs["slurmd"], "-D", "-f", str(self.conf), "-N", "localhost"])
        self._until(lambda: self.scontrol_ok() and self.node_state() == "idle",
                    "the node never became idle", r / "slurmd.log", r / "slurmctld.log")

    def _start_munged(self) -> Path:
        r = self.root
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = r / "munge.sock"
        self._spawn("munged", [self.programs["munged"], "--foreground", "--force", f"--socket={sock}",
                               f"--key-file={key}", f"--pid-file={r / 'munged.pid'}", f"--log-file={r / 'munged.log'}",
                               f"--seed-file={r / 'munged.seed'}"])
        self._until(lambda: sock.exists(), "munged made no socket", r / "munged.log")
        return sock

    def _write_conf(self, sock: Path, cluster: str, ctld_host: str, per_node: str, partition: str, node_line: str,
                    ctld_port: int, d_port: int) -> None:
        """``per_node`` ("" or "-%n") keeps each slurmd's spool, pid and log apart when several share ``root``.
        A requeued job may start cred_expire s after its preemption, but only at the next scheduling pass:
        sched_interval is 60 s by default (bf_interval 30), 2 s here."""
        r = self.root
        self.conf.write_text(f"""\
ClusterName={cluster}
SlurmctldHost={ctld_host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / f'spool{per_node}'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / f'slurmd{per_node}.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / f'slurmd{per_node}.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=600
SchedulerParameters=sched_interval=2,bf_interval=2
{node_line} CPUs={self.cpus} State=UNKNOWN
PartitionName=ci Nodes={partition} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.root / f"{name}.out", "w") as out:
            self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def _until(self, ok, what: str, *logs: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                break
            time.sleep(0.5)
        tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in [*logs, *self.root.glob("*.out")] if p.is_file())
        raise AssertionError(f"local SLURM cluster: {what} (exited: {[n for n, p in self.procs.items() if p.poll() is not None]})\n{tails}")

    def cmd(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60, check=False)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr}")
        return out.stdout

    def scontrol_ok(self) -> bool:
        return subprocess.run(["scontrol", "ping"], env=self.env, capture_output=True, timeout=30, check=False).returncode == 0

    def node_state(self) -> str:
        return self.cmd("sinfo", "-h", "-N", "-o", "%T", check=False).strip().rstrip("*")

    def job(self, job_id: str) -> dict[str, str]:
        line = self.cmd("scontrol", "show", "job", "-o", job_id)
        return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)

    def wait(self, job_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
                return info
            time.sleep(1)
        self.cmd("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} did not finish in {timeout:.0f}s: {self.job(job_id)}")

    def logs(self, lines: int = 30) -> str:
        """The daemons' log tails, for a failure message."""
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.is_file():
                out.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.cmd("scancel", "--user", str(os.getuid()), check=False)
        for p in reversed(list(self.procs.values())):  # the slurmds, slurmctld, then munged
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    programs = _require("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "srun", path=SBIN)
    if os.geteuid() != 0:
        msg = "the local SLURM cluster runs its daemons as root (SlurmUser=root); run the tests as root"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), programs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _sbatch(slurm: SlurmCluster, demo_dir: Path, work: Path, run: Path, *train_args: str) -> str:
    """Submit launch/slurm/train.sbatch as a GPU user would, with only the site-specific lines
    (partition, GPUs, CPUs, time) overridden on the sbatch command line for this CPU node."""
    env = {**slurm.env, "PYTHON": sys.executable, "PRESET": "smoke", "DEMO_DIR": str(demo_dir), "RUN_DIR": str(run)}
    extra = ["--overcommit"] if slurm.cpus < 2 else []
    cmd = ["sbatch", "--parsable", "--partition=ci", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
           "--time=10", f"--chdir={work}", f"--output={work}/slurm-%j.out", *extra,
           str(REPO / "launch" / "slurm" / "train.sbatch"), "--set", *TINY, *train_args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    return out.stdout.strip().split(";")[0]


def _usr1_once_training(slurm: SlurmCluster, job: str, metrics: Path) -> None:
    """Waits for the job's first logged step, then sends SIGUSR1 to every task (what --signal=USR1@N sends)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (metrics.is_file() and metrics.stat().st_size > 0):
        assert time.monotonic() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), \
            f"job {job} never trained: {slurm.job(job)}\n{slurm.logs()}"
        time.sleep(0.3)
    slurm.cmd("scancel", "--signal=USR1", job)


def test_slurm_sbatch_two_tasks(slurm, demo_dir, tmp_path):
    run = tmp_path / "run"
    job = _sbatch(slurm, demo_dir, tmp_path, run, "parallel.ep=2")
    info = slurm.wait(job)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", f"job {job}: {info['JobState']} {info.get('ExitCode')}\n{log[-6000:]}\n{slurm.logs()}"
    assert f"launched by slurm: job {job}, 2 tasks on 1 node(s)" in log
    _assert_trained(run, log, "slurm")


def test_slurm_preemption_requeues_and_resumes(slurm, demo_dir, tmp_path):
    """SIGUSR1 to the job's tasks (what --signal=USR1@180 sends before the time limit): every task
    checkpoints and exits 75, the script requeues the job, and the job's second run resumes there."""
    run = tmp_path / "run"
    job = _sbatch(slurm, demo_dir, tmp_path, run, "parallel.ep=2", "train.steps=300")
    metrics = run / "metrics.jsonl"
    _usr1_once_training(slurm, job, metrics)
    info = slurm.wait(job)  # a requeued job waits out its credential's lifetime: cred_expire=10 here, 120 s by default
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log[-6000:]}\n{slurm.logs()}"
    stops = re.findall(r"stopped by SIGUSR1 after step (\d+)", log)
    assert len(stops) == 2 and stops[0] == stops[1], log[-6000:]
    assert "requeueing it" in log
    assert re.search(rf"resumed from \S+step_{int(stops[0]):08d} at step {stops[0]}", log), log[-6000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 301))


# ---- one process: the smoke script and preemption ------------------------------------------------------


def test_smoke_script(demo_dir, tmp_path):
    """The first line the job logs says how it was started."""
    run = tmp_path / "run"
    out = subprocess.run(["bash", str(REPO / "launch" / "smoke.sh"), *_train_args(demo_dir, run)], cwd=tmp_path,
                         env=_clean_env(PYTHON=sys.executable), capture_output=True, text=True,
                         timeout=JOB_TIMEOUT, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "modalmoe.launch INFO] launched as a single process" in out.stderr.splitlines()[0]
    assert json.loads((run / "summary.json").read_text())["step"] == 2


def _wait_for(ok, proc: subprocess.Popen, log: Path, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the run ended (rc {proc.poll()}) or stalled before training:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def test_sigterm_mid_training_checkpoints_exits_75_and_the_rerun_resumes(demo_dir, tmp_path):
    run, out = tmp_path / "run", tmp_path / "train.log"
    cmd = [sys.executable, "-m", "modalmoe.launch.train", *_train_args(demo_dir, run, "train.steps=5000")]
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_clean_env(), stdout=f, stderr=subprocess.STDOUT)
    try:
        metrics = run / "metrics.jsonl"
        _wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, proc, out)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = out.read_text()
    assert rc == PREEMPTED_EXIT_CODE, log[-4000:]
    step = int(re.search(r"stopped by SIGTERM after step (\d+)", log).group(1))
    assert 1 <= step < 5000
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert not (run / "summary.json").exists()

    rerun = _run(cmd[:-1] + [f"train.steps={step + 2}"], tmp_path, _clean_env())
    assert f"resumed from {run / 'checkpoints' / f'step_{step:08d}'} at step {step}" in rerun
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, step + 3))
    assert json.loads((run / "summary.json").read_text())["step"] == step + 2

def test_cli_reports_a_bad_launch_environment(monkeypatch, capsys, demo_dir, tmp_path):
    for k in [k for k in os.environ if LAUNCHER_VARS.match(k)]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert main(["train", *_train_args(demo_dir, tmp_path / "r")]) == 2
    assert "SLURM_JOB_NODELIST" in capsys.readouterr().err
