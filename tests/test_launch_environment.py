"""How a process learns its place in the job from the launcher's environment alone: which launcher
started it, the torch.distributed variables it exports, the rendezvous port, and the errors that
name the fix. No launcher runs here (tests/test_launchers.py runs them for real)."""

from __future__ import annotations

import os
import shutil
import socket
import sys

import pytest
from modalmoe.launch.environment import (
    LaunchError,
    detect,
    free_port,
    setup_environment,
    slurm_first_host,
    slurm_port,
)

def test_detect_each_launcher_from_its_variables(monkeypatch):
    ds = detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500",
                 "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "2"})
    assert (ds.launcher, ds.rank, ds.world_size, ds.local_rank, ds.master_addr, ds.master_port) == ("deepspeed", 1, 2, 1, "h", 29500)
    tr = detect({"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "x"})
    assert tr.launcher == "torchrun"
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)  # no scontrol: the node list is read by hand
    sl = detect({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_ID": "0",
                 "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123", "SLURM_STEP_NUM_NODES": "4",
                 "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_STEP_TASKS_PER_NODE": "2(x4)"})
    assert (sl.launcher, sl.rank, sl.world_size, sl.local_rank, sl.local_world_size, sl.master_addr, sl.master_port) == \
        ("slurm", 3, 8, 1, 2, "gpu07", slurm_port("123"))
    assert sl.describe().startswith("launched by slurm: job 123, 8 tasks on 4 node(s)")
    assert detect({}).launcher == "single"


def test_launch_info_from_the_torch_variables():
    """What a trainer created in-process reads: the torch.distributed variables, once, into a LaunchInfo."""
    from modalmoe.runtime.config import ConfigError
    from modalmoe.runtime.launch_info import LaunchInfo

    single = LaunchInfo.from_env({})
    assert (single.launcher, single.rank, single.world_size, single.local_rank, single.local_world_size) == ("single", 0, 1, 0, 1)
    assert (single.master_addr, single.master_port, single.agent_store) == (None, None, False)
    two = LaunchInfo.from_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29400",
                               "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert (two.rank, two.world_size, two.local_rank, two.local_world_size) == (1, 2, 1, 2)  # no LOCAL_*: all on this host
    assert (two.master_addr, two.master_port, two.agent_store) == ("h", 29400, True)
    spread = LaunchInfo.from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (spread.local_rank, spread.local_world_size) == (1, 4)
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        LaunchInfo.from_env({"RANK": "0", "WORLD_SIZE": "two"})
    tr = detect({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "x",
                 "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert tr.agent_store and not detect({"RANK": "0", "WORLD_SIZE": "1"}).agent_store


def test_free_port_skips_ports_in_use_and_stays_below_the_ephemeral_range():
    from modalmoe.launch.environment import _ephemeral_range

    eph_low = _ephemeral_range()[0]
    start = 20000 + (os.getpid() % 5000)
    with socket.socket() as held:
        held.bind(("", free_port(start=start)))
        held.listen()
        taken = held.getsockname()[1]
        port = free_port(start=taken)
        assert port != taken and 20000 <= port < eph_low
        with socket.socket() as s:
            s.bind(("", port))  # really free
    job = free_port(env={"SLURM_JOB_ID": "4321"})
    assert job >= slurm_port("4321") and job < eph_low


def test_slurm_first_host_without_scontrol(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    assert slurm_first_host("node[003-005,9],login1") == "node003"
    assert slurm_first_host("a01,a02") == "a01"
    assert slurm_first_host("localhost") == "localhost"


def test_launch_errors_name_the_fix(monkeypatch):
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST is not set"):
        detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0"})
    with pytest.raises(LaunchError, match="not started by srun"):
        detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"})
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        detect({"RANK": "0", "WORLD_SIZE": "2"})
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if not installed
    with pytest.raises(LaunchError, match="mpi4py is not installed"):
        detect({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    ok = detect({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "5"})
    assert (ok.launcher, ok.rank, ok.master_addr) == ("mpirun", 1, "h")




def test_export_sets_the_torch_variables():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0",
           "SLURM_LOCALID": "1", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": "4242"}
    info = setup_environment(env=env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == \
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "4242"}
    assert info.launcher == "slurm"
    single = {}
    setup_environment(env=single)
    assert single == {}
