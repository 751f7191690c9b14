"""How a parameter is initialised, and the seed of each one: the parts every module may name.

A parameter's values come from its own generator, seeded from (job seed, full parameter name[,
global expert index]), never from a shared stream: so they do not depend on build order or on
what else this rank built, and a rank that holds a shard can make exactly that shard
(``runtime/materialize.py`` does the filling). No imports from the rest of the package, so every
module, the MoE runtime included, can name its rules here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

__all__ = ["Init", "normal", "constant", "param_seed", "draw_seed"]


@dataclass(frozen=True)
class Init:
    """Normal(0, ``std``) when ``std`` is set, else the constant ``value``."""

    std: float | None = None
    value: float = 0.0


def normal(std: float) -> Init:
    return Init(std=float(std))


def constant(value: float) -> Init:
    return Init(value=float(value))


def param_seed(seed: int, name: str, index: int | None = None) -> int:
    """A 63-bit seed for one parameter (or one expert of it); stable across processes and runs."""
    key = f"{seed}/{name}" if index is None else f"{seed}/{name}/{index}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def draw_seed() -> int:
    """A job seed drawn from torch's global CPU generator, so ``torch.manual_seed(s)`` before a build
    still fixes the weights (explicit device: a ``torch.device("meta")`` context must not catch it)."""
    return int(torch.randint(0, 2**62, (1,), device="cpu").item())
