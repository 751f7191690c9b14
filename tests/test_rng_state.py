"""Resume on a GPU: a checkpoint loaded with ``map_location="cuda"`` hands the RNG states back as
CUDA tensors, and torch's setters take CPU ByteTensors only. ``set_rng_state`` moves them first."""

from __future__ import annotations

import random

import numpy as np
import torch
from modalmoe.runtime import checkpoint
from modalmoe.runtime.checkpoint import rng_state, set_rng_state


class OnDevice(torch.Tensor):
    """A CPU tensor that reports a CUDA device, standing in for what map_location="cuda" returns;
    only ``.to("cpu")``/``.cpu()`` give back a plain CPU tensor."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    def to(self, *args, **kwargs):
        return torch.Tensor.to(self.as_subclass(torch.Tensor), *args, **kwargs)

    def cpu(self):
        return self.as_subclass(torch.Tensor)


def _on_device(x):
    if isinstance(x, torch.Tensor):
        return x.as_subclass(OnDevice)
    if isinstance(x, dict):
        return {k: _on_device(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_on_device(v) for v in x]
    return x


def test_rng_states_go_back_to_the_cpu_before_the_setters(monkeypatch):
    saved = rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    received = []
    real = torch.set_rng_state

    def strict_set_rng_state(state):
        if type(state) is not torch.Tensor or state.device.type != "cpu":
            raise TypeError(f"RNG state must be a torch.ByteTensor, got {type(state).__name__} on {state.device}")
        received.append(state)
        real(state)

    monkeypatch.setattr(checkpoint.torch, "set_rng_state", strict_set_rng_state)
    set_rng_state(_on_device(saved))
    assert len(received) == 1
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], expected[0]) and again[1:] == expected[1:]
