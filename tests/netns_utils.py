"""Two "nodes" on one machine for the multi-node launcher tests: network namespaces joined by a veth pair.

Each node is one long-lived holder process (``sleep``) started in a named network namespace
(``ip netns add``) inside its own UTS namespace (hostname ``node1`` / ``node2``) and mount namespace,
where a test-owned hosts file is bind-mounted over /etc/hosts so the nodes resolve each other (and
their own names, which gloo and srun look up) to their veth addresses. Every command "on a node"
enters the holder's namespaces with ``nsenter``. The nodes share the filesystem, so the same
Python, venv and paths. Nothing outside the pair is contacted: the only addresses are the veth's.

sshd runs in each node from a test-owned config and key; the client side is an ``ssh`` wrapper put
first on PATH (``-F`` a test-owned ssh_config), which is what pdsh, the deepspeed launcher's checks
and Open MPI's rsh agent run, so ~/.ssh is never read or written. :class:`TwoNodeSlurm` runs
slurmctld on node1 and a slurmd on each node. ``stop`` kills everything in both namespaces and
deletes them, whatever state a test left them in.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from test_launchers import SBIN, SlurmCluster, _clean_env

__all__ = ["NamespaceUnavailable", "Sshd", "TwoNodeSlurm", "TwoNodes"]

NODES = ("node1", "node2")
SUBNET = "10.231.0"
_count = 0


class NamespaceUnavailable(RuntimeError):
    """This machine (or container) does not let the test make namespaces or a veth pair."""


def _sh(*cmd: str) -> str:
    out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


class TwoNodes:
    """node1 (10.231.0.1) and node2 (10.231.0.2); ``start`` raises NamespaceUnavailable with the
    reason when the kernel or container refuses a namespace or the veth pair."""

    def __init__(self, root: Path):
        global _count
        _count += 1
        self.root = root
        self.tag = f"mm{os.getpid() % 100000}x{_count}"
        self.netns = {n: f"{self.tag}-{n}" for n in NODES}
        self.addr = {n: f"{SUBNET}.{i + 1}" for i, n in enumerate(NODES)}
        self.holder: dict[str, subprocess.Popen] = {}
        self.hosts = root / "hosts"
        self.veth = {n: f"{self.tag}{i}" for i, n in enumerate(NODES)}

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in self.addr.items()))
        veth = self.veth
        try:
            for ns in self.netns.values():
                _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", veth["node1"], "type", "veth", "peer", "name", veth["node2"])
            for n in NODES:
                _sh("ip", "link", "set", veth[n], "netns", self.netns[n])
                _sh("ip", "-n", self.netns[n], "addr", "add", f"{self.addr[n]}/24", "dev", veth[n])
                _sh("ip", "-n", self.netns[n], "link", "set", "lo", "up")
                _sh("ip", "-n", self.netns[n], "link", "set", veth[n], "up")
        except RuntimeError as e:
            raise NamespaceUnavailable(f"cannot make two network namespaces joined by a veth pair: {e}") from e
        for n in NODES:
            ready = self.root / f"{n}.ready"
            script = f"hostname {n} && mount --bind {self.hosts} /etc/hosts && touch {ready} && exec sleep infinity"
            with open(self.root / f"{n}.holder.err", "w") as err:
                self.holder[n] = subprocess.Popen(
                    # nsenter, not `ip netns exec`: that remounts /sys without /sys/fs/cgroup, which slurmd needs
                    ["nsenter", f"--net=/run/netns/{self.netns[n]}", "unshare", "--uts", "--mount", "sh", "-c", script],
                    stdout=subprocess.DEVNULL, stderr=err,
                )
            deadline = time.monotonic() + 20
            while not ready.exists():
                if self.holder[n].poll() is not None or time.monotonic() > deadline:
                    why = (self.root / f"{n}.holder.err").read_text().strip()
                    raise NamespaceUnavailable(f"cannot make a UTS and mount namespace for {n} (unshare --uts --mount): {why}")
                time.sleep(0.05)
        for n in NODES:
            got = self.run(n, ["sh", "-c", "hostname; getent hosts node1 node2"], capture_output=True, text=True, timeout=30)
            lines = got.stdout.split()
            assert got.returncode == 0 and lines[0] == n and self.addr["node2"] in lines, f"{n}: {got.stdout}{got.stderr}"

    def prefix(self, node: str, cwd: Path | str | None = None) -> list[str]:
        """Run what follows on ``node``: its network, hostname and hosts file, working dir kept."""
        return ["nsenter", "-t", str(self.holder[node].pid), "-n", "-u", "-m", f"--wd={cwd or os.getcwd()}", "--"]

    def run(self, node: str, cmd: list[str], cwd: Path | str | None = None, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.prefix(node, cwd) + cmd, cwd=cwd, check=False, **kw)

    def popen(self, node: str, cmd: list[str], cwd: Path | str | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.prefix(node, cwd) + cmd, cwd=cwd, **kw)

    def pids(self, node: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns[node]], capture_output=True, text=True, timeout=30, check=False)
        return [int(p) for p in out.stdout.split()]

    def kill(self, node: str) -> list[int]:
        """SIGKILL every process in ``node``'s network namespace (a node lost), until none is left."""
        killed: list[int] = []
        for _ in range(50):
            pids = [p for p in self.pids(node) if p != os.getpid()]
            if not pids:
                break
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                    killed.append(p)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        h = self.holder.get(node)
        if h is not None:
            h.wait(timeout=10)
        return killed

    def stop(self) -> None:
        for n in NODES:
            if n in self.holder or self.netns[n] in _sh("ip", "netns", "list"):
                self.kill(n)
        for ns in self.netns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
        # gone with its namespace, unless start() failed before moving it there
        subprocess.run(["ip", "link", "del", self.veth["node1"]], capture_output=True, timeout=30, check=False)


class Sshd:
    """sshd on port 22 of each node (each namespace has its own ports), root's login by a key made
    here; ``env(path)`` puts an ``ssh`` that uses only this test's config first on PATH."""

    def __init__(self, nodes: TwoNodes):
        self.nodes = nodes
        self.root = nodes.root / "ssh"
        self.procs: dict[str, subprocess.Popen] = {}
        self.bin = self.root / "bin"

    def start(self) -> None:
        r = self.root
        r.mkdir()
        self.bin.mkdir()
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(r / "id_ed25519"))
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(r / "host_key"))
        (r / "authorized_keys").write_text((r / "id_ed25519.pub").read_text())
        host_pub = (r / "host_key.pub").read_text().split()[:2]
        (r / "known_hosts").write_text(
            "".join(f"{n},{a} {' '.join(host_pub)}\n" for n, a in self.nodes.addr.items()))
        (r / "ssh_config").write_text(f"""\
Host *
  User root
  IdentityFile {r / 'id_ed25519'}
  IdentitiesOnly yes
  UserKnownHostsFile {r / 'known_hosts'}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  LogLevel ERROR
""")
        ssh = self.bin / "ssh"
        ssh.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {r / "ssh_config"} "$@"\n')
        ssh.chmod(0o755)
        sshd = shutil.which("sshd", path=SBIN)  # sshd re-executes itself: it needs its absolute path
        Path("/run/sshd").mkdir(exist_ok=True)  # Debian's sshd refuses to start without its privilege-separation dir
        for n in self.nodes.addr:
            conf = r / f"sshd_{n}.conf"
            conf.write_text(f"""\
Port 22
HostKey {r / 'host_key'}
AuthorizedKeysFile {r / 'authorized_keys'}
PidFile {r / f'sshd_{n}.pid'}
PermitRootLogin yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 100
MaxSessions 100
""")
            with open(r / f"sshd_{n}.log", "w") as log:
                self.procs[n] = self.nodes.popen(n, [sshd, "-D", "-e", "-f", str(conf)], cwd=r,
                                                 stdout=log, stderr=subprocess.STDOUT)
        env = self.env()
        for n in self.nodes.addr:
            deadline = time.monotonic() + 30
            while True:
                other = "node2" if n == "node1" else "node1"
                got = self.nodes.run(other, ["ssh", n, "hostname"], cwd=r, env=env, capture_output=True, text=True, timeout=30)
                if got.returncode == 0 and got.stdout.strip() == n:
                    break
                if self.procs[n].poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"ssh {other} -> {n} failed ({got.returncode}): {got.stderr}\n"
                                         f"{(r / f'sshd_{n}.log').read_text()[-2000:]}")
                time.sleep(0.2)

    def env(self, **extra: str) -> dict[str, str]:
        env = _clean_env(**extra)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env


class TwoNodeSlurm(SlurmCluster):
    """munged (this namespace; its socket is a file both nodes reach), slurmctld on node1 and a
    slurmd on each node, NodeName=node[1-2]; every client command runs on node1."""

    def __init__(self, root: Path, programs: dict[str, str], nodes: TwoNodes):
        super().__init__(root, programs)
        self.nodes = nodes

    def start(self) -> None:
        r = self.root
        (r / "state").mkdir()
        for n in self.nodes.addr:
            (r / f"spool-{n}").mkdir()
        self._write_conf(self._start_munged(), "modalmoe-2node", "node1", "-%n", "node[1-2]", "NodeName=node[1-2]",
                         ctld_port=6817, d_port=6818)
        self._spawn("slurmctld", [self.programs["slurmctld"], "-D", "-f", str(self.conf)], node="node1")
        for n in self.nodes.addr:
            self._spawn(f"slurmd-{n}", [self.programs["slurmd"], "-D", "-f", str(self.conf), "-N", n], node=n)
        self._until(lambda: self.scontrol_ok() and self.node_state() == "idle idle", "the nodes never became idle",
                    r / "slurmctld.log", *r.glob("slurmd-*.log"))

    def _spawn(self, name: str, cmd: list[str], node: str | None = None) -> None:
        with open(self.root / f"{name}.out", "w") as out:
            full = cmd if node is None else self.nodes.prefix(node, self.root) + cmd
            self.procs[name] = subprocess.Popen(full, cwd=self.root, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def cmd(self, *args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
        out = self.nodes.run("node1", list(args), cwd=self.root, env=env or self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr}")
        return out.stdout

    def scontrol_ok(self) -> bool:
        return self.nodes.run("node1", ["scontrol", "ping"], env=self.env, capture_output=True, timeout=30).returncode == 0

    def node_state(self) -> str:
        return " ".join(s.rstrip("*") for s in self.cmd("sinfo", "-h", "-N", "-o", "%T", check=False).split())

    def logs(self, lines: int = 30) -> str:
        out = []
        for path in [self.root / "slurmctld.log", *sorted(self.root.glob("slurmd-*.log"))]:
            if path.is_file():
                out.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-lines:]))
        return "\n".join(out)
