"""Checkpoints that survive a crash mid-write and never unpickle arbitrary objects.

Each checkpoint is a folder ``step_NNNNNNNN`` written under a temporary name and renamed into place;
``latest`` (a one-line text file replaced atomically) names the newest complete one; a manifest of
file sizes and SHA-256 sums is verified before loading; tensors load with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointManager", "CheckpointError", "rng_state", "set_rng_state"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message says which and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        manifests and renames the folder into place once every rank has written.
        """
        sync = barrier or (lambda: None)
        final = self.dir / self._name(step)
        tmp = self.dir / f".{self._name(step)}.tmp"
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        sync()
        part: dict[str, Any] = {}
        for stem, state in files.items():
            path = tmp / f"{stem}.pt"
            torch.save(state, path)
            part[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        with open(tmp / f"manifest.part{rank:05d}.json", "w") as f:
            json.dump(part, f)
        sync()
        if rank == 0:
            manifest: dict[str, Any] = {"step": step, "files": {}, "meta": meta or {}}
            for piece in sorted(tmp.glob("manifest.part*.json")):
                manifest["files"].update(json.loads(piece.read_text()))
                piece.unlink()
            with open(tmp / "manifest.json", "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._write_latest(final.name)
            self._prune()
        sync()
        return final

    def _write_latest(self, name: str) -> None:
        tmp = self.dir / f".latest.tmp-{os.getpid()}"
        tmp.write_text(name + "\n")
        os.replace(tmp, self.dir / "latest")

    def _prune(self) -> None:
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        for old in done[: max(0, len(done) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

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
