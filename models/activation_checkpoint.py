"""Activation checkpointing: chosen sublayers keep only their inputs and recompute the rest in backward.

``train.activation_checkpointing`` picks them: ``moe`` (the MoE FFNs), ``attention`` (the attention
sublayers), ``full`` (whole transformer blocks), or ``none``; :func:`apply_activation_checkpointing`
also takes a list of kinds (``moe``, ``attention``, ``mlp`` for the dense FFNs, or ``full`` alone).

Applied in place after ``parallelize`` (TP rewrite, EP), on whatever those left: the module's class
is swapped for a subclass whose forward runs the original under ``torch.utils.checkpoint``
(non-reentrant), so parameter names, ``state_dict`` keys, ``isinstance`` checks and forward hooks
(the TP pre-hook of attention) are unchanged, and a deep copy stays checkpointed.

What the recompute must repeat and what it must not:
- collectives (the TP all-reduces, the MoE all-gather of routing sums and the EP all-to-alls) run
  again: every rank recomputes the same layers in the same backward order, so they pair up;
- random numbers (dropout, the noisy router) are the forward's: torch's checkpoint stashes the RNG
  state of the inputs' devices and replays it (``preserve_rng_state``, on by default);
- the recompute's outputs are discarded, so routing stats and aux losses count once; the MoE
  layer's one state change, the router bias update, is applied by the forward only, and the
  recompute routes with the bias the forward saw (:class:`~..runtime.moe.layer.CheckpointCall`);
- host syncs: a recomputed MoE layer syncs again (its rows per expert or EP split sizes), one more
  per MoE forward (tests/test_host_syncs.py counts it).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..runtime.moe.layer import CheckpointCall
from .block import TransformerBlock

__all__ = ["apply_activation_checkpointing", "is_checkpointed", "KINDS", "MODES"]

MODES = ("none", "moe", "attention", "full")
KINDS = ("moe", "attention", "mlp", "full")
_CLASSES: dict[type, type] = {}


def _parse(mode: str | Iterable[str]) -> frozenset[str]:
    kinds = frozenset([mode] if isinstance(mode, str) else mode) - {"none"}
    unknown = sorted(kinds - set(KINDS))
    if unknown:
        raise ValueError(f"train.activation_checkpointing: unknown {unknown}; choose one of {list(MODES)} "
                         f"or a list of {list(KINDS)}")
    if "full" in kinds and len(kinds) > 1:
        raise ValueError("train.activation_checkpointing: `full` already recomputes whole blocks; "
                         f"do not combine it with {sorted(kinds - {'full'})}")
    return kinds


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    inner = partial(self._checkpoint_base.forward, self)
    if not torch.is_grad_enabled():  # nothing is kept for backward anyway (eval, no_grad)
        return inner(*args, **kwargs)
    return checkpoint(inner, *args, use_reentrant=False, context_fn=CheckpointCall().contexts, **kwargs)


def _checkpointed_class(cls: type) -> type:
    if cls not in _CLASSES:
        name = f"Checkpointed{cls.__name__}"
        new = type(name, (cls,), {"forward": _checkpointed_forward, "_checkpoint_base": cls,
                                  "__module__": __name__, "__qualname__": name})
        globals()[name] = new  # picklable by name, like the class it stands for
        _CLASSES[cls] = new
    return _CLASSES[cls]


def _targets(model: nn.Module, kinds: frozenset[str]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for block in (m for m in model.modules() if isinstance(m, TransformerBlock)):
        if "full" in kinds:
            out.append(block)
            continue
        if "attention" in kinds:
            out.append(block.attn)
        if ("moe" if block.is_moe else "mlp") in kinds:
            out.append(block.ffn)
    return out


def is_checkpointed(module: nn.Module) -> bool:
    """Whether ``module`` itself runs under activation checkpointing."""
    return "_checkpoint_base" in vars(type(module))


def apply_activation_checkpointing(model: nn.Module, mode: str | Iterable[str]) -> list[nn.Module]:
    """Checkpoint the sublayers ``mode`` names, in place; returns them. Run once, after parallelize."""
    kinds = _parse(mode)
    targets = _targets(model, kinds)
    if kinds and not targets:
        raise ValueError(f"train.activation_checkpointing={sorted(kinds)}: the model has no such sublayer "
                         "(no MoE FFN for `moe`, no dense FFN for `mlp`?)")
    for module in targets:
        if is_checkpointed(module) or any(is_checkpointed(m) for m in module.modules()):
            raise ValueError(f"{type(module).__name__} is already checkpointed: apply_activation_checkpointing runs once")
    for module in targets:
        module.__class__ = _checkpointed_class(type(module))
    return targets
