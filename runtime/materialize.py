"""Sharded materialisation: a model built on the meta device (and already sharded there) gets
storage for this rank's shards only, filled so that every shard equals the slice of the
single-process value, either from the deterministic init or from a full safetensors file read by
slices.

Legend: E experts, W TP world size. Where a local tensor sits in its full one (:class:`Placement`):
a TP shard by its module's spec (dim, chunks) and TP rank; routed-expert weights [E, ...] by the
first global expert their module holds (``first_expert``, set by ``keep_experts``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .param_init import Init, param_seed
from .tensor_parallel.sharding import ShardSpec, TPSharded

__all__ = ["Placement", "placements", "materialize", "init_parameters", "read_local"]


@dataclass(frozen=True)
class Placement:
    tp: ShardSpec | None = None  # None: not split over TP
    tp_rank: int = 0
    tp_size: int = 1
    first_expert: int | None = None  # routed-expert weights: local dim 0 = global experts [first, first + n)

    @property
    def tp_split(self) -> bool:
        return self.tp is not None and self.tp_size > 1

    def whole_shape(self, local_shape: tuple[int, ...], per_expert: bool) -> list[int]:
        """The unsharded shape of the tensor this shard comes from; with ``per_expert`` the shard is
        one expert of a routed-expert weight (its dims one left of the spec's)."""
        shape = list(local_shape)
        if self.tp_split:
            shape[self.tp.dim - (1 if per_expert else 0)] *= self.tp_size
        return shape

    def cut(self, whole: Tensor, per_expert: bool) -> Tensor:
        if not self.tp_split:
            return whole
        spec = ShardSpec(self.tp.dim - 1, self.tp.chunks) if per_expert else self.tp
        return spec.shard(whole, self.tp_rank, self.tp_size)

    def index(self, full_shape: Iterable[int], local_rows: int) -> list[tuple[slice, ...]]:
        """The blocks of the full tensor that make this shard, in order (one per TP chunk), to be
        concatenated along the TP dim."""
        full_shape = list(full_shape)
        idx = [slice(None)] * len(full_shape)
        if self.first_expert is not None:
            idx[0] = slice(self.first_expert, self.first_expert + local_rows)
        if not self.tp_split:
            return [tuple(idx)]
        dim, chunks = self.tp.dim, self.tp.chunks
        block = full_shape[dim] // chunks
        piece = block // self.tp_size
        out = []
        for c in range(chunks):
            start = c * block + self.tp_rank * piece
            idx[dim] = slice(start, start + piece)
            out.append(tuple(idx))
        return out


def placements(model: nn.Module) -> dict[str, Placement]:
    """Full name → placement for every parameter (tied ones under their first name) and buffer."""
    out: dict[str, Placement] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        specs = module.tp_shard_specs() if isinstance(module, TPSharded) else {}
        rank, size = getattr(module, "tp_rank", 0), getattr(module, "tp_size", 1)
        first = getattr(module, "first_expert", None)
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            full = f"{prefix}.{name}" if prefix else name
            is_param = name in module._parameters
            out[full] = Placement(specs.get(name), rank, size, first if is_param else None)
    return out


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Give every meta parameter and buffer uninitialised storage on ``device`` (each local shard
    once: tied parameters stay tied, parameter attributes such as ``allreduce`` carry over), then
    recompute the buffers (every module's ``reset_buffers``). Returns ``model``."""
    new: dict[int, tuple[Tensor, Tensor]] = {}  # id(old) → (old, new): old kept alive so ids stay unique
    for module in model.modules():
        for table, make in ((module._parameters, _new_param), (module._buffers, _new_buffer)):
            for key, t in table.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in new:
                    new[id(t)] = (t, make(t, device))
                table[key] = new[id(t)][1]
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()
    return model


def _new_param(p: Tensor, device) -> nn.Parameter:
    q = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
    vars(q).update(vars(p))
    return q


def _new_buffer(b: Tensor, device) -> Tensor:
    return torch.empty_like(b, device=device)


def _normal(shape: list[int], std: float, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=g)


def _fill_normal(dst: Tensor, std: float, seed: int, place: Placement, per_expert: bool) -> None:
    if not place.tp_split and dst.device.type == "cpu" and dst.dtype == torch.float32 and dst.is_contiguous():
        dst.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))  # straight into place: no transient
        return
    dst.copy_(place.cut(_normal(place.whole_shape(dst.shape, per_expert), std, seed), per_expert))


@torch.no_grad()
def init_parameters(model: nn.Module, plan: Mapping[str, Init], seed: int) -> None:
    """Fill every parameter of ``model`` from ``plan`` (full name → rule) and ``seed``: the same
    values in every layout, each shard the slice of the single-process tensor. A TP-sharded tensor
    is drawn whole (one at a time, transient) and cut; routed experts draw one generator per global
    expert, so an EP rank draws only its own."""
    places = placements(model)
    for name, p in model.named_parameters():
        if p.is_meta:
            raise ValueError(f"{name} is still on the meta device; materialize() the model first")
        rule = plan.get(name)
        if rule is None:
            raise KeyError(f"no init rule for parameter {name!r}; add it to the model's init plan")
        if rule.std is None:
            p.fill_(rule.value)
            continue
        place = places[name]
        if place.first_expert is None:
            _fill_normal(p, rule.std, param_seed(seed, name), place, per_expert=False)
        else:
            for e in range(p.shape[0]):
                _fill_normal(p[e], rule.std, param_seed(seed, name, place.first_expert + e), place, per_expert=True)


def read_local(f, key: str, place: Placement, local: Tensor) -> Tensor:
    """This shard of tensor ``key`` from an open ``safetensors.safe_open`` file, read by slices
    (only its own bytes); raises ValueError when the shapes do not fit."""
    sl = f.get_slice(key)
    blocks = [sl[i] for i in place.index(sl.get_shape(), local.shape[0] if local.dim() else 0)]
    t = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=place.tp.dim)
    if tuple(t.shape) != tuple(local.shape):
        raise ValueError(f"{key}: the file's slice has shape {tuple(t.shape)}, this rank holds {tuple(local.shape)} "
                         f"(full {sl.get_shape()}): a checkpoint of another model")
    return t
