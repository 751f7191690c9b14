"""Checkpoints that survive a crash or power cut mid-write and never unpickle arbitrary objects.

Each checkpoint is a folder ``step_NNNNNNNN`` written under a temporary name, every file fsynced,
and renamed into place (a re-save of a step swaps the folders in one step); ``latest`` (a one-line
text file replaced atomically and durably) names the newest complete one and never a missing folder;
a manifest of file sizes and SHA-256 sums is verified before loading; tensors load with
``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .durable import disk_full, exchange, fsync_dir, replace_file, write_synced
from .metrics import get_logger

__all__ = ["CheckpointManager", "CheckpointError", "rng_state", "set_rng_state"]

log = get_logger("modalmoe.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message says which and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as e:
        log.warning("cannot hard-link %s (%s): copying it, which takes its size again on disk", src, e)
        write_synced(dst, lambda f: f.write(src.read_bytes()))


def rng_state() -> dict[str, Any]:
    """Every RNG a step consumes, in types that ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`. A checkpoint loaded with ``map_location="cuda"`` hands back the
    generator states as CUDA tensors, which torch's setters reject: they go back to the CPU first."""
    torch.set_rng_state(state["torch"].to("cpu"))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].to("cpu").numpy().astype(np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to("cpu") for s in state["cuda"]])


class CheckpointManager:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.dir = Path(directory)
        self.keep = keep

    def _name(self, step: int) -> str:
        return f"step_{step:08d}"

    def save(
        self,
        step: int,
        files: dict[str, Any],
        meta: dict[str, Any] | None = None,
        *,
        rank: int = 0,
        barrier: Callable[[], None] | None = None,
    ) -> Path:
        """Write ``{file stem: state}`` as ``<stem>.pt`` files plus a manifest; publish atomically.

        In a multi-process job every rank calls this with its own stems (e.g. ``rank00003``) and a
        ``barrier`` over all ranks; rank 0 prepares the temporary folder, merges the per-rank
        manifests and renames the folder into place once every rank has written. A failed save
        removes what it wrote; a full disk raises a :class:`CheckpointError` saying what to do.
        """
        sync = barrier or (lambda: None)
        final = self.dir / self._name(step)
        tmp = self.dir / f".{self._name(step)}.tmp"
        written: list[Path] = []
        size = 0
        try:
            if rank == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            sync()
            part: dict[str, Any] = {}
            for stem, state in files.items():
                path = tmp / f"{stem}.pt"
                written.append(path)
                write_synced(path, lambda f, state=state: torch.save(state, f))
                part[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
            written.append(tmp / f"manifest.part{rank:05d}.json")
            write_synced(written[-1], lambda f: f.write(json.dumps(part).encode()))
            size, written = sum(info["bytes"] for info in part.values()), []  # complete: rank 0 publishes them
            sync()
            if rank == 0:
                self._finish(step, tmp, final, meta)
        except Exception as e:
            partial = size + sum(p.stat().st_size for p in written if p.is_file())
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            for path in written:
                path.unlink(missing_ok=True)
            if disk_full(e):
                raise self._no_space(step, tmp, partial) from e
            raise
        if rank == 0:
            self._prune()
        sync()
        return final

    def _finish(self, step: int, tmp: Path, final: Path, meta: dict[str, Any] | None) -> None:
        manifest: dict[str, Any] = {"step": step, "files": {}, "meta": meta or {}}
        pieces = sorted(tmp.glob("manifest.part*.json"))
        for piece in pieces:
            manifest["files"].update(json.loads(piece.read_text()))
        write_synced(tmp / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        for piece in pieces:
            piece.unlink()
        fsync_dir(tmp)
        if not final.exists():
            os.rename(tmp, final)
        elif not exchange(tmp, final):  # a re-save: swapped in one step, `latest` keeps naming a whole folder
            self._replace_through_twin(tmp, final)
            return
        fsync_dir(final)
        fsync_dir(self.dir)
        self._write_latest(final.name)
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the checkpoint this one replaced

    def _replace_through_twin(self, tmp: Path, final: Path) -> None:
        """A re-save where folders cannot be swapped atomically: ``latest`` names a hard-linked twin
        of the new checkpoint (no second copy of the data) while the old folder is replaced."""
        twin = self.dir / f".{final.name}.twin-{time.time_ns()}"
        twin.mkdir()
        for f in tmp.iterdir():
            _link_or_copy(f, twin / f.name)
        fsync_dir(twin)
        fsync_dir(self.dir)
        self._write_latest(twin.name)
        shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(final)
        fsync_dir(self.dir)
        self._write_latest(final.name)
        shutil.rmtree(twin, ignore_errors=True)

    def _write_latest(self, name: str) -> None:
        replace_file(self.dir / "latest", (name + "\n").encode())

    def _pointed(self) -> str | None:
        pointer = self.dir / "latest"
        return pointer.read_text().strip() if pointer.exists() else None

    def _prune(self) -> None:
        """Drop the oldest folders beyond ``keep`` and leftovers of interrupted saves, never the one
        ``latest`` names (a re-saved early step can be the oldest)."""
        pointed = self._pointed()
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        stale = done[: max(0, len(done) - self.keep)] + list(self.dir.glob(".step_*.twin-*"))
        for old in stale:
            if old.name != pointed:
                shutil.rmtree(old, ignore_errors=True)
        for left in self.dir.glob(".latest.tmp-*"):
            left.unlink(missing_ok=True)

    def _no_space(self, step: int, tmp: Path, partial: int) -> CheckpointError:
        mount = self.dir.resolve()
        while not os.path.ismount(mount) and mount != mount.parent:
            mount = mount.parent
        usage = shutil.disk_usage(mount)
        pointed = self._pointed()
        prev = self.dir / pointed if pointed else None
        if prev is not None and (prev / "manifest.json").exists():
            size = sum(f["bytes"] for f in json.loads((prev / "manifest.json").read_text())["files"].values())
            need, kept = f"one checkpoint here takes about {_size(size)}", f"latest still names {prev}, which is untouched"
        else:
            need, kept = f"this process had written {_size(partial)} of it", "there is no earlier checkpoint"
        return CheckpointError(
            f"no space left on the disk holding {self.dir} while writing checkpoint step {step} (file system "
            f"{mount}: {_size(usage.free)} free of {_size(usage.total)} now; {need}); the partial {tmp.name} was removed "
            f"and {kept}. Free space on that disk, keep fewer checkpoints (train.keep_checkpoints, now "
            f"{self.keep}) or point train.run_dir at another disk, then rerun to resume"
        )

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if not pointer.exists():
            return None
        path = self.dir / pointer.read_text().strip()
        if not path.is_dir():
            raise CheckpointError(
                f"{pointer} names {path.name}, which does not exist; delete {pointer} to start fresh "
                f"or point it at one of {sorted(p.name for p in self.dir.glob('step_*'))}"
            )
        return path

    @staticmethod
    def verify(path: Path) -> dict[str, Any]:
        mf = path / "manifest.json"
        if not mf.exists():
            raise CheckpointError(f"checkpoint {path} has no manifest.json: it is incomplete; use an earlier one")
        manifest = json.loads(mf.read_text())
        for name, info in manifest["files"].items():
            f = path / name
            if not f.exists() or f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
                raise CheckpointError(
                    f"checkpoint file {f} is missing or does not match its manifest (size/SHA-256): the "
                    f"checkpoint is corrupt; resume from an earlier step_* folder in {path.parent}"
                )
        return manifest

    @classmethod
    def load(
        cls, path: str | Path, map_location: str | torch.device = "cpu", stems: list[str] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Returns ({stem: state} for ``stems`` (default: all), manifest) after verifying every file."""
        path = Path(path)
        manifest = cls.verify(path)
        names = [n for n in manifest["files"] if stems is None or Path(n).stem in stems]
        if stems is not None and len(names) != len(stems):
            missing = sorted(set(stems) - {Path(n).stem for n in names})
            raise CheckpointError(f"checkpoint {path} has no file for {missing}: it was written by a different layout")
        states = {}
        for n in names:
            try:
                states[Path(n).stem] = torch.load(path / n, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                raise CheckpointError(
                    f"checkpoint file {path / n} holds objects other than tensors and plain containers, which are "
                    f"never unpickled ({str(e).splitlines()[0][:200]}); load only checkpoints this trainer wrote, "
                    "or resume from another step_* folder"
                ) from e
        return states, manifest
