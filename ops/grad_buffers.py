"""Weight-gradient buffers kept between steps, so that a backward does not allocate them afresh.

On CPU, glibc hands out every block of 32 MiB or more as a fresh ``mmap`` and gives it back on
free, so a stacked expert weight's gradient ([E, K, N], 32 MiB at E=64, K=256, N=512 in fp32)
costs a page fault per 4 KiB on every step: the trainer raises glibc's thresholds
(``runtime/cpu_memory.py``), a user's own training loop does not. A :class:`GradBuffers` owned by
the module whose weights they serve plays the caching allocator for those few tensors: the
backward writes into a buffer that nothing else references any more (the previous step's
``.grad`` after ``zero_grad(set_to_none=True)``, or the one ``.grad += new`` consumed) and hands
autograd a fresh view of it, which ``AccumulateGrad`` adopts as ``.grad`` without a copy.
A buffer still referenced anywhere (a ``.grad``, a user's variable, an optimizer's bucket) is
never written.
"""

from __future__ import annotations

import torch

__all__ = ["GradBuffers"]


class GradBuffers:
    """At most ``per_shape`` buffers per (shape, dtype, device); beyond that, plain allocations.

    Two per weight cover both ``zero_grad`` modes: with ``set_to_none=True`` the old ``.grad``
    is free again by the next backward; with ``set_to_none=False`` one buffer stays ``.grad``
    and the other carries each step's gradient into it.
    """

    def __init__(self, per_shape: int = 2):
        self.per_shape = per_shape
        # key -> [(buffer, its StorageImpl, that storage's use count while only the buffer holds it)]
        self._buffers: dict[tuple, list[tuple[torch.Tensor, int, int]]] = {}

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of ``shape`` with ``like``'s dtype and device (uninitialised),
        aliasing a kept buffer that nothing else references, or newly allocated."""
        key = (tuple(shape), like.dtype, like.device)
        kept = self._buffers.setdefault(key, [])
        for buf, storage, alone in kept:
            if torch._C._storage_Use_Count(storage) <= alone:  # nothing but `buf` holds it
                return buf.view(buf.shape)  # a new tensor: AccumulateGrad may adopt it
        buf = like.new_empty(shape)
        if len(kept) < self.per_shape:
            storage = buf.untyped_storage()._cdata  # (the storage's Python object stays with it)
            kept.append((buf, storage, torch._C._storage_Use_Count(storage)))
            return buf.view(buf.shape)
        return buf

    def __deepcopy__(self, memo: dict) -> GradBuffers:
        return GradBuffers(self.per_shape)  # a copied module starts with none (the storage ptrs are this one's)

    def __getstate__(self) -> dict:
        return {"per_shape": self.per_shape}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["per_shape"])

    def num_buffers(self) -> int:
        """How many buffers are kept (for tests and memory accounting)."""
        return sum(len(v) for v in self._buffers.values())

    def clear(self) -> None:
        """Drop the kept buffers (their memory goes once nothing else references it)."""
        self._buffers.clear()
