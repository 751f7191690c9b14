"""One checkpoint for any layout: gather per-rank shards into full tensors, and shard them back.

A training checkpoint holds one file per rank (TP shards, this EP rank's experts) and, in its
manifest, the layout and how every parameter is split. ``consolidate`` writes the full model as
``model.safetensors`` (and, when the optimizer kept per-parameter state, its Adam moments as
``optimizer.safetensors``) plus ``config.yaml`` and ``trainer.json``; ``train.init_from`` starts a
run of any layout from that folder, reading it through :class:`Consolidated`: each rank reads only
its own slices of every tensor (safetensors slicing, by the placements of its already sharded
model), the Adam moments sharded exactly like the weights, so no rank ever holds the whole file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoint import CheckpointError, CheckpointManager
from .materialize import placements, read_local
from .parallel_state import Layout
from .tensor_parallel import ShardSpec

__all__ = ["consolidate", "shard_layout_meta", "named_optimizer_state", "Consolidated", "MOMENTS"]

MOMENTS = ("exp_avg", "exp_avg_sq")


def shard_layout_meta(model: nn.Module, tp_specs: dict[str, ShardSpec]) -> dict:
    """How each parameter of this rank's module is split: ``tp`` [dim, chunks] and ``ep`` (dim 0)."""
    out = {}
    for name, p in model.named_parameters():
        spec = tp_specs.get(name)
        out[name] = {"tp": [spec.dim, spec.chunks] if spec else None, "ep": getattr(p, "allreduce", True) is False}
    return out


def named_optimizer_state(model: nn.Module, optimizer) -> dict[str, dict[str, torch.Tensor]] | None:
    """Adam moments by parameter name, for optimizers that keep per-parameter state (not ZeRO 1/2)."""
    state = getattr(optimizer, "state", None)
    if not isinstance(state, dict) or not state:
        return None
    out = {}
    for name, p in model.named_parameters():
        s = state.get(p)
        if s and all(k in s for k in MOMENTS):
            out[name] = {k: s[k] for k in MOMENTS} | {"step": torch.as_tensor(s.get("step", 0))}
    return out or None


def _gather(pieces: dict[int, torch.Tensor], layout: Layout, info: dict) -> torch.Tensor:
    """Full tensor from {rank: local piece}: unshard over TP within each EP rank, then concatenate EP."""
    per_ep = []
    for ep in range(layout.ep if info["ep"] else 1):
        ranks = [layout.rank_of(tp, ep, 0) for tp in range(layout.tp)]
        if info["tp"]:
            dim, chunks = info["tp"]
            per_ep.append(ShardSpec(dim, chunks).unshard([pieces[r] for r in ranks]))
        else:
            per_ep.append(pieces[ranks[0]])
    return torch.cat(per_ep, 0) if info["ep"] else per_ep[0]


def consolidate(checkpoint: str | Path, out_dir: str | Path) -> Path:
    ckpt = Path(checkpoint)
    if (ckpt / "latest").is_file():
        ckpt = ckpt / (ckpt / "latest").read_text().strip()
    manifest = CheckpointManager.verify(ckpt)
    meta = manifest["meta"]
    if "shards" not in meta or "layout" not in meta:
        raise CheckpointError(f"{ckpt} has no shard layout in its manifest: it was not written by this version's trainer")
    lay = meta["layout"]
    layout = Layout(lay["world"], tp=lay["tp"], ep=lay["ep"])
    needed = sorted({layout.rank_of(tp, ep, 0) for tp in range(layout.tp) for ep in range(layout.ep)})
    states, _ = CheckpointManager.load(ckpt, stems=[f"rank{r:05d}" for r in needed])
    by_rank = {r: states[f"rank{r:05d}"] for r in needed}
    model_sd = by_rank[0]["model"]
    full = {}
    for name in model_sd:
        info = meta["shards"].get(name, {"tp": None, "ep": False})
        full[name] = _gather({r: st["model"][name] for r, st in by_rank.items()}, layout, info).contiguous().clone()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(full, str(out / "model.safetensors"))
    trainer = {"step": manifest["step"], "source": str(ckpt), "layout": lay, "optimizer": False}
    if all(st.get("named_optimizer") for st in by_rank.values()):
        opt = {}
        for name, info in meta["shards"].items():
            for k in MOMENTS:
                opt[f"{k}.{name}"] = _gather({r: st["named_optimizer"][name][k] for r, st in by_rank.items()}, layout, info).contiguous()
            opt[f"step.{name}"] = by_rank[0]["named_optimizer"][name]["step"].reshape(1).float()
        save_file(opt, str(out / "optimizer.safetensors"))
        trainer["optimizer"] = True
    (out / "config.yaml").write_text(meta["config"])
    (out / "trainer.json").write_text(json.dumps(trainer, indent=1))
    return out


def _check_folder(p: Path) -> None:
    if not (p / "model.safetensors").is_file():
        raise CheckpointError(
            f"config field `train.init_from`: {p} has no model.safetensors; point it at a folder written by "
            "`modalmoe checkpoint consolidate CHECKPOINT --out FOLDER`"
        )


class Consolidated:
    """A consolidated folder, read by slices: :meth:`load_into` fills a model of any layout (sharded
    or not, materialised) with its own slices of the weights, :meth:`moments` gives its slices of
    Adam's moments; nothing else of the files is read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_folder(self.path)
        self.info = json.loads((self.path / "trainer.json").read_text())
        self.has_moments = bool(self.info.get("optimizer")) and (self.path / "optimizer.safetensors").is_file()

    def _read(self, f, key: str, place, local: torch.Tensor) -> torch.Tensor:
        try:
            return read_local(f, key, place, local)
        except ValueError as e:
            raise CheckpointError(f"train.init_from {self.path}: {e}") from None

    @torch.no_grad()
    def load_into(self, model: nn.Module) -> None:
        """Copy this rank's slice of every entry of ``model.state_dict()`` from model.safetensors;
        strict: the file's names must be exactly the model's."""
        state = model.state_dict(keep_vars=True)
        places = placements(model)
        with safe_open(str(self.path / "model.safetensors"), "pt", device="cpu") as f:
            keys = set(f.keys())
            missing, unexpected = sorted(set(state) - keys), sorted(keys - set(state))
            if missing or unexpected:
                raise CheckpointError(f"train.init_from {self.path}: the checkpoint does not fit this model "
                                      f"(missing {missing[:5]}, unexpected {unexpected[:5]}); check model: in the config")
            for name, t in state.items():
                t.copy_(self._read(f, name, places[name], t))

    def moments(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """Parameter name → {exp_avg, exp_avg_sq: this rank's slice, step}, for ``model``'s layout."""
        places = placements(model)
        out = {}
        with safe_open(str(self.path / "optimizer.safetensors"), "pt", device="cpu") as f:
            for name, p in model.named_parameters():
                out[name] = {k: self._read(f, f"{k}.{name}", places[name], p) for k in MOMENTS}
                out[name]["step"] = f.get_tensor(f"step.{name}")
        return out

