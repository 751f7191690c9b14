"""What a process knows about the job it belongs to: its rank, the world, the rendezvous address.

``launch.environment`` builds a :class:`LaunchInfo` from whichever launcher started the process
(deepspeed, torchrun, srun, mpirun) and the CLI hands it to the trainer, which passes it down to
process-group init, core binding, the watchdog and the checkpoint metadata. A trainer created
in-process (tests, the study runner) reads the torch.distributed variables once, with
:meth:`LaunchInfo.from_env`: the only place under ``runtime`` and ``train`` that reads them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from .config import ConfigError

__all__ = ["LaunchInfo"]


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; unset it or let the launcher set it") from None


@dataclass
class LaunchInfo:
    launcher: str  # deepspeed | torchrun | slurm | mpirun | environment | single
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None
    detail: str = ""  # launcher-specific: job id, node count
    agent_store: bool = False  # the rendezvous store is torchrun's agent's, not rank 0's

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LaunchInfo:
        """The torch.distributed variables as a launcher (or ``setup_environment``) exported them;
        none set: a single process. Without ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` every rank is
        taken to run on this host (local rank = rank), as torch's own defaults assume."""
        env = os.environ if env is None else env
        world = _int(env, "WORLD_SIZE", 1)
        rank = _int(env, "RANK", 0)
        single = world == 1 and not env.get("RANK")
        return cls(
            launcher="single" if single else "environment",
            rank=rank,
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK", rank),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", world),
            master_addr=env.get("MASTER_ADDR") or None,
            master_port=_int(env, "MASTER_PORT", 0) or None,
            detail=f"{world} processes, from RANK/WORLD_SIZE in the environment",
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if self.launcher == "single":
            return "launched as a single process (no launcher variables found)"
        where = f"rank {self.rank} of {self.world_size}, local rank {self.local_rank}"
        return f"launched by {self.launcher}: {self.detail}; {where}, rendezvous {self.master_addr}:{self.master_port}"

    def export(self, env: MutableMapping[str, str]) -> None:
        """Write the torch.distributed variables (nothing for a single process: its defaults hold,
        and a later detection in the same process must not mistake them for a launcher's)."""
        if self.launcher == "single":
            return
        env["RANK"] = str(self.rank)
        env["WORLD_SIZE"] = str(self.world_size)
        env["LOCAL_RANK"] = str(self.local_rank)
        env["LOCAL_WORLD_SIZE"] = str(self.local_world_size)
        if self.master_addr is not None:
            env["MASTER_ADDR"] = self.master_addr
        if self.master_port is not None:
            env["MASTER_PORT"] = str(self.master_port)
