"""Probe a trained run: its routing and its experts' functions on fixed probe tokens.

The probe tokens are the first batches of a data set's eval split, read in a fixed order, so every
run of a study (and every checkpoint of a run) is probed on the very same tokens. For each MoE layer
we record the input hidden states through a forward hook, re-run the layer's router on them to get
every token's chosen experts, and, for CKA, pass a fixed subset of the tokens through *every* expert
of the layer (not only the ones the router picked), so expert functions are compared on equal inputs.

Legend: N probe tokens (real tokens only), L MoE layers, M modalities, E experts, H hidden, n CKA tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.transformer import build_model
from ..runtime.checkpoint import CheckpointManager
from ..runtime.data import DataConfig, build_loader
from ..runtime.modality import MODALITY_NAMES
from ..train.job_config import JobConfig, load_job_config
from . import metrics as sm

__all__ = ["ProbeBatches", "LayerProbe", "load_probe_batches", "list_checkpoints", "load_model", "probe_model", "summarise_layer"]


@dataclass
class ProbeBatches:
    batches: list  # runtime.data.Batch, on the CPU
    modality_N: np.ndarray  # uint8 modality of each real token, in probe order


@dataclass
class LayerProbe:
    layer: int  # index in the model's layer stack
    load_ME: np.ndarray  # routed slots per (modality, expert), all top-k slots
    top1_N: np.ndarray  # int16 top-1 expert of each real probe token
    cka: dict[str, np.ndarray] | None  # "all" / modality name → [E, E] pairwise linear CKA
    routed_NE: np.ndarray | None = None  # bool: token routed to the expert in any of its top-k slots


def load_probe_batches(data: DataConfig, eval_shards: list[str], tokenizer: str, batches: int, batch_size: int) -> ProbeBatches:
    """The first ``batches`` eval batches of ``eval_shards``: unshuffled, one process, same every call."""
    cfg = DataConfig(**{**data.__dict__, "eval_shards": list(eval_shards), "tokenizer": tokenizer,
                        "batch_size": batch_size, "num_workers": 0})
    loader = build_loader(cfg, split="eval", dp_rank=0, dp_size=1, tokenizer=tokenizer)
    out = []
    for b in loader:
        out.append(b)
        if len(out) >= batches:
            break
    modality = torch.cat([b.modality[b.mask] for b in out]).numpy().astype(np.uint8)
    return ProbeBatches(out, modality)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a run, oldest first."""
    ckpts = []
    for p in sorted((Path(run_dir) / "checkpoints").glob("step_*")):
        if p.is_dir() and (p / "manifest.json").is_file():
            ckpts.append((int(p.name.removeprefix("step_")), p))
    return ckpts


def load_model(run_dir: Path, checkpoint: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, JobConfig]:
    """The run's model (from its saved ``config.yaml``) with a checkpoint's weights, in eval mode."""
    cfg = load_job_config(Path(run_dir) / "config.yaml")
    model = build_model(cfg.model)
    states, _ = CheckpointManager.load(checkpoint, map_location="cpu", stems=["rank00000"])
    model.load_state_dict(states["rank00000"]["model"])
    return model.to(device).eval(), cfg


def _moe_layers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    return [(i, block.ffn) for i, block in enumerate(model.layers) if getattr(block, "is_moe", False)]


@torch.no_grad()
def probe_model(model: torch.nn.Module, probe: ProbeBatches, *, cka_tokens: int = 0,
                modality_names: list[str] | None = None, device: str | torch.device = "cpu") -> list[LayerProbe]:
    """Routing of every MoE layer on the probe tokens; with ``cka_tokens`` also expert-output CKA."""
    layers = _moe_layers(model)
    inputs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i, _ in layers}
    hooks = []
    for i, moe in layers:
        def hook(module, args, _out, i=i):
            x, modality, mask = args[0], args[1], args[2]
            keep = mask.reshape(-1).bool()
            inputs[i].append((x.reshape(-1, x.shape[-1])[keep].float().cpu(), modality.reshape(-1)[keep].cpu()))
        hooks.append(moe.register_forward_hook(hook))
    try:
        for b in probe.batches:
            model(b.to(device))
    finally:
        for h in hooks:
            h.remove()
    names = modality_names or list(MODALITY_NAMES)
    out = []
    for i, moe in layers:
        x_NH = torch.cat([x for x, _ in inputs[i]])
        mod_N = torch.cat([m for _, m in inputs[i]]).long()
        valid_N = torch.ones_like(mod_N, dtype=torch.bool)
        routing = moe.router(x_NH.to(device), mod_N.to(device), valid_N.to(device))
        idx_Nk = routing.idx_Tk.cpu()
        M, E = moe.cfg.num_modalities, moe.cfg.num_experts
        routed = idx_Nk >= 0
        flat = (mod_N[:, None] * E + idx_Nk.clamp_min(0))[routed]
        load_ME = torch.bincount(flat, minlength=M * E).view(M, E).numpy().astype(np.float64)
        top1_N = torch.where(idx_Nk[:, 0] >= 0, idx_Nk[:, 0], routing.probs_TE.argmax(-1).cpu()).numpy().astype(np.int16)
        cka = None
        if cka_tokens:
            cka = _expert_cka(moe, x_NH, mod_N, cka_tokens, names, device)
        routed_NE = np.zeros((len(mod_N), E), dtype=bool)
        rows, slots = routed.nonzero(as_tuple=True)
        routed_NE[rows.numpy(), idx_Nk[rows, slots].numpy()] = True
        out.append(LayerProbe(i, load_ME, top1_N, cka, routed_NE))
    return out


def _expert_cka(moe, x_NH: torch.Tensor, mod_N: torch.Tensor, n: int, names: list[str], device) -> dict[str, np.ndarray]:
    """[E, E] CKA of expert outputs on n evenly spaced probe tokens, over all of them and per modality."""
    E = moe.cfg.num_experts
    pick = torch.linspace(0, x_NH.shape[0] - 1, min(n, x_NH.shape[0])).round().long().unique()
    x_nH = x_NH[pick].to(device)
    y_EnH = moe.experts(x_nH.repeat(E, 1), [x_nH.shape[0]] * E).view(E, x_nH.shape[0], -1).float().cpu().numpy()
    mod_n = mod_N[pick].numpy()
    cka = {"all": sm.pairwise_cka(y_EnH)}
    for m, name in enumerate(names):
        sel = mod_n == m
        if sel.sum() >= 2:
            cka[name] = sm.pairwise_cka(y_EnH[:, sel])
    return cka


def summarise_layer(p: LayerProbe, names: list[str]) -> dict:
    """JSON-ready numbers of one layer's probe."""
    d = {
        "layer": p.layer,
        "load_ME": p.load_ME.tolist(),
        "specialisation": sm.specialisation_index(p.load_ME),
        "cv": dict(zip(names, sm.load_cv(p.load_ME).tolist())),
        "max_mean": dict(zip(names, sm.max_mean_ratio(p.load_ME).tolist())),
        "effective_experts": dict(zip(names, sm.effective_experts(p.load_ME).tolist())),
    }
    if p.cka is not None:
        d["cka"] = {k: v.tolist() for k, v in p.cka.items()}
        d["cka_mean_offdiag"] = {k: sm.mean_off_diagonal(v) for k, v in p.cka.items()}
    return d
