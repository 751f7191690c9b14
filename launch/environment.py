"""Which launcher started this process, turned into the one set of variables the trainer reads.

Every launcher describes a job differently: the deepspeed launcher and torchrun export ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``; ``srun`` exports ``SLURM_PROCID``
/ ``SLURM_NTASKS`` / ``SLURM_LOCALID`` and a compressed node list; ``mpirun`` (Open MPI) exports
``OMPI_COMM_WORLD_*`` and no rendezvous address at all. :func:`setup_environment` detects which one
it is, fills in the torch.distributed variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and returns a :class:`LaunchInfo` whose
``describe()`` is the first line ``modalmoe train`` logs, so a job's log says how it was started.
The CLI passes that :class:`LaunchInfo` (defined in ``runtime.launch_info``) on to the trainer.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping, MutableMapping

from ..runtime.config import ConfigError
from ..runtime.launch_info import LaunchInfo

__all__ = ["LaunchError", "LaunchInfo", "detect", "free_port", "setup_environment", "slurm_first_host", "slurm_port"]

_TORCH_VARS = ("RANK", "WORLD_SIZE")


class LaunchError(ConfigError):
    """The launcher's environment is incomplete or contradictory; the message says how to fix it."""


def _int(env: Mapping[str, str], name: str, launcher: str) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{launcher} job: environment variable {name}={value!r} is not an integer") from None


def _from_torch_vars(env: Mapping[str, str], local_rank_arg: int | None) -> LaunchInfo:
    """deepspeed's launcher exports CROSS_RANK/CROSS_SIZE; torchrun exports TORCHELASTIC_*."""
    if "CROSS_RANK" in env or "CROSS_SIZE" in env:
        launcher = "deepspeed"
    elif "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env:
        launcher = "torchrun"
    else:
        launcher = "deepspeed" if local_rank_arg is not None else "torchrun"
    rank, world = _int(env, "RANK", launcher), _int(env, "WORLD_SIZE", launcher)
    if "LOCAL_RANK" in env:
        local = _int(env, "LOCAL_RANK", launcher)
    elif local_rank_arg is not None:
        local = local_rank_arg
    else:
        local = 0
    local_world = int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or world)
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not env.get(n)]
    if missing and world > 1:
        raise LaunchError(
            f"{launcher} job: RANK and WORLD_SIZE are set but {' and '.join(missing)} are not; "
            "export MASTER_ADDR (rank 0's host) and MASTER_PORT, or start the job with deepspeed or torchrun"
        )
    nodes = env.get("CROSS_SIZE") or env.get("GROUP_WORLD_SIZE") or "?"
    return LaunchInfo(
        launcher, rank, world, local, local_world, env.get("MASTER_ADDR") or None,
        int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None, f"{world} processes on {nodes} node(s)",
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
    )


def slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``gpu[03-05,09],cpu1`` → ``gpu03``): ``scontrol show
    hostnames`` when it is installed, else the first entry of the list expanded by hand."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60, check=False)
        hosts = out.stdout.split()
        if out.returncode == 0 and hosts:
            return hosts[0]
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise LaunchError(f"slurm job: cannot read the node list {nodelist!r}; set MASTER_ADDR to the first node's hostname")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def slurm_port(job_id: str) -> int:
    """A port every task of one job derives alike without talking: 20000 + job id mod 12000, below
    Linux's default ephemeral range (32768+), where the kernel never hands ports to other sockets.
    Two jobs sharing a node collide only when their ids are 12000 apart; the sbatch scripts pass a
    port they checked is free (:func:`free_port`) as MASTER_PORT, which wins over this."""
    return 20000 + (int(job_id) % 12000 if job_id.isdigit() else 0)


def _from_slurm(env: Mapping[str, str]) -> LaunchInfo:
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
    if not ntasks:
        raise LaunchError("slurm job: SLURM_PROCID is set but SLURM_NTASKS is not; start the training with srun inside the job")
    world = int(ntasks)
    if not in_step and world > 1:
        raise LaunchError(
            f"slurm job: this allocation has {world} tasks but the program was not started by srun (only the batch "
            "script's one process is running); launch it with `srun python -m modalmoe.launch.train ...` "
            "as launch/slurm/train.sbatch does"
        )
    if not in_step:
        world = 1
    rank = _int(env, "SLURM_PROCID", "slurm")
    local = int(env.get("SLURM_LOCALID", "0"))
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    local_world = int(m.group(1)) if (m := re.match(r"(\d+)", per_node)) else 1
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "?"
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or "?"
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise LaunchError(
                "slurm job: SLURM_JOB_NODELIST is not set, so rank 0's host is unknown; run inside a SLURM job "
                "(sbatch/salloc + srun) or export MASTER_ADDR to the first node's hostname"
            )
        addr = slurm_first_host(nodelist)
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else slurm_port(job)
    if not in_step:
        detail = f"job {job}, the batch script's own process (no srun step)"
    else:
        detail = f"job {job}, {world} tasks on {nodes} node(s)"
    return LaunchInfo("slurm", rank, world, local, local_world, addr, port, detail)


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(start: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """A TCP port free on this host now, taken from below the kernel's ephemeral range.

    A port the kernel handed out by ``bind(0)`` is an ephemeral one: between the moment it is read
    and the moment rank 0 listens on it, srun, slurmstepd or any outgoing connection may be given the
    same port by the kernel (a CI job failed so, EADDRINUSE). Ports below the ephemeral range are
    never handed out that way. The probe starts at ``start`` (default: :func:`slurm_port` of the SLURM
    job, so jobs sharing a node start apart) and walks up, wrapping, until one binds."""
    env = os.environ if env is None else env
    low, high = 20000, _ephemeral_range()[0] - 1
    if high - low < 1000:  # the ephemeral range starts too low to leave room: fall back to the kernel's pick
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return s.getsockname()[1]
    if start is None:
        start = slurm_port(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "")
    span = high - low + 1
    first = low + (start - low) % span
    for i in range(span):
        port = low + (first - low + i) % span
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise LaunchError(f"no free TCP port in {low}-{high} on {socket.gethostname()}; export MASTER_PORT to a free port")


def _from_openmpi(env: Mapping[str, str]) -> LaunchInfo:
    """Open MPI gives no rendezvous address: rank 0 picks its hostname and a free port and sends
    them to every rank over MPI (mpi4py), which also confirms the rank and size."""
    rank, world = _int(env, "OMPI_COMM_WORLD_RANK", "mpirun"), _int(env, "OMPI_COMM_WORLD_SIZE", "mpirun")
    local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
    local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", str(world)))
    addr, port = env.get("MASTER_ADDR") or None, int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None
    try:
        from mpi4py import MPI
    except ImportError:
        if world > 1 and (addr is None or port is None):
            raise LaunchError(
                "mpirun job: mpi4py is not installed, so rank 0 cannot tell the other ranks its address; "
                "`pip install mpi4py` (needs an MPI: apt-get install libopenmpi-dev), or pass "
                "`-x MASTER_ADDR=<rank 0 host> -x MASTER_PORT=<free port>` to mpirun"
            ) from None
        via = "environment (mpi4py not installed)"
    else:
        comm = MPI.COMM_WORLD
        if (comm.Get_rank(), comm.Get_size()) != (rank, world):
            raise LaunchError(
                f"mpirun job: OMPI_COMM_WORLD says rank {rank} of {world} but MPI.COMM_WORLD says rank "
                f"{comm.Get_rank()} of {comm.Get_size()}; mpi4py is built against another MPI than the mpirun "
                "that started the job: reinstall it with `pip install --no-binary mpi4py --force-reinstall mpi4py`"
            )
        if addr is None or port is None:
            mine = (addr or socket.gethostname(), port or free_port()) if rank == 0 else None
            addr, port = comm.bcast(mine, root=0)
        via = "mpi4py"
    return LaunchInfo("mpirun", rank, world, local, local_world, addr, port,
                      f"Open MPI, {world} processes, {local_world} on this node, rendezvous from {via}")


def detect(env: Mapping[str, str] | None = None, local_rank_arg: int | None = None) -> LaunchInfo:
    """Read the launcher from ``env`` (default ``os.environ``). ``local_rank_arg`` is the
    ``--local_rank`` the deepspeed launcher appends to the command line.

    Order matters: the torch variables win (a deepspeed or torchrun started inside a SLURM job),
    then Open MPI (an mpirun inside a SLURM allocation still carries SLURM_PROCID), then SLURM.
    """
    env = os.environ if env is None else env
    if all(env.get(n) for n in _TORCH_VARS):
        return _from_torch_vars(env, local_rank_arg)
    if env.get("OMPI_COMM_WORLD_RANK") and env.get("OMPI_COMM_WORLD_SIZE"):
        return _from_openmpi(env)
    if env.get("SLURM_PROCID"):
        return _from_slurm(env)
    return LaunchInfo("single", 0, 1, local_rank_arg or 0, 1, None, None)


def setup_environment(local_rank_arg: int | None = None, env: MutableMapping[str, str] | None = None) -> LaunchInfo:
    """Detect the launcher and export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for
    ``runtime.distributed.init_from_env``; call before the Trainer is built."""
    env = os.environ if env is None else env
    info = detect(env, local_rank_arg)
    info.export(env)
    return info
