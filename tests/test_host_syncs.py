"""Host syncs per training step: at most one per MoE layer forward, one for the grad norm, and the
trainer's one host copy of the step's scalars (skip decision and logged losses).

On CPU nothing waits for a device, so the test counts the Python-level calls that would make a GPU
run wait: ``.item``, ``.tolist``, ``.cpu``, ``.numpy``, ``bool``/``float``/``int`` of a tensor,
``nonzero``, boolean indexing, ``masked_select``, ``unique``, ``bincount`` (CUDA sizes its output
on the host) and ``repeat_interleave`` without ``output_size``. They are seen through a
``TorchFunctionMode``, which sees the forward, the loss and the optimizer step; the backward
that autograd's engine runs is outside its reach (custom Functions' backward included), so a sync
there would go unseen. Calls from ``torch/optim`` are left out: the
CPU AdamW reads its step counters, CPU tensors, with ``.item()`` (on CUDA the fused AdamW keeps
them on the device); and so are the C++ ops' own syncs (the CUDA permute reads R once), which a
Python mode cannot see.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter

import pytest
import torch
from dist_utils import run_distributed
from parity_utils import MODEL, FixedBatches, data_overrides, global_batches
from torch.overrides import TorchFunctionMode

SYNCING = {"item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__",
           "masked_select", "unique", "unique_consecutive", "bincount"}


class SyncCounter(TorchFunctionMode):
    """Records (call, our innermost frame) for every call that would wait for the device."""

    def __init__(self):
        super().__init__()
        self.hits: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        hit = name in SYNCING
        if name == "__getitem__" and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            hit = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if name == "repeat_interleave":
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
            hit = isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
        if hit:
            stack = traceback.extract_stack()[:-1]
            if not any("torch/optim/" in f.filename for f in stack):
                ours = [f for f in stack if "modalmoe" in f.filename or "/runtime/" in f.filename or "/models/" in f.filename]
                where = f"{ours[-1].filename.rsplit('/', 2)[-2:]}:{ours[-1].lineno}" if ours else stack[-1].filename
                self.hits.append((name, where))
        return func(*args, **kwargs)


class _AlsoCounting:
    """A checkpoint recompute's context that also makes ``counter`` current inside the recompute."""

    def __init__(self, context, counter):
        self.context, self.counter = context, counter

    def __enter__(self):
        self.context.__enter__()
        self.counter.__enter__()

    def __exit__(self, *exc):
        self.counter.__exit__(*exc)
        return self.context.__exit__(*exc)


@contextlib.contextmanager
def _watching_recompute(counter, on: bool):
    """torch does not carry function modes into the autograd engine, so the counter sees nothing
    that backward runs; an activation-checkpointing recompute (run in backward) is watched by
    entering the counter inside it, through the recompute context the checkpoint wrapper installs."""
    if not on:
        yield
        return
    from modalmoe.runtime.moe.layer import CheckpointCall

    contexts = CheckpointCall.contexts

    def watched(call):
        forward, recompute = contexts(call)
        return forward, _AlsoCounting(recompute, counter)

    CheckpointCall.contexts = watched
    try:
        yield
    finally:
        CheckpointCall.contexts = contexts


def _count_one_step(rank, world, overrides, run_dir):
    from modalmoe.train.job_config import load_job_config
    from modalmoe.train.trainer import Trainer

    cfg = load_job_config(None, MODEL + overrides + [f"train.run_dir={run_dir}"]).validate()
    trainer = Trainer(cfg, train_data=FixedBatches(global_batches(), rank, world // cfg.parallel.tp))
    loader = FixedBatches(global_batches(), rank, world)
    batches = iter(loader)
    trainer.model.train()
    trainer.train_step(next(batches))  # warm-up: lazy initialisation is not a step's cost
    counter = SyncCounter()
    with _watching_recompute(counter, cfg.train.activation_checkpointing != "none"), counter:
        trainer.train_step(next(batches))
    moe_calls = len(cfg.model.moe_layers) * (2 if cfg.model.contrastive_coef > 0 else 1)
    return counter.hits, moe_calls


# two MoE layers, each run twice a step (captioning and text-only contrastive passes)
LAYOUT = ["model.moe_every=1", "model.contrastive_coef=0.1"]


def _check(hits, moe_calls, recomputed=0):
    # one per MoE layer forward, the grad norm, the trainer's scalars; under activation checkpointing
    # of the MoE layers (moe, full) each MoE forward is run again in backward and syncs again
    budget = moe_calls * (1 + recomputed) + 2
    where = Counter(hits).most_common()
    assert len(hits) <= budget, f"{len(hits)} host syncs in one step (budget {budget}): {where}"
    # the budget is met by the planned syncs, not by luck: each MoE forward syncs for its offsets
    assert moe_calls >= 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_single_process_step_sync_budget(demo, tmp_path, dtype):
    hits, moe_calls = _count_one_step(0, 1, data_overrides(demo) + LAYOUT + [f"train.dtype={dtype}"], str(tmp_path))
    _check(hits, moe_calls)


def test_expert_parallel_step_sync_budget(demo, tmp_path):
    """EP=2: the split sizes and the rows per local expert come back in the layer's one host copy."""
    results = run_distributed(_count_one_step, 2, data_overrides(demo) + LAYOUT + ["parallel.ep=2"],
                              str(tmp_path / "run"), timeout=240)
    for hits, moe_calls in results:
        _check(hits, moe_calls)


@pytest.mark.parametrize(("mode", "recomputed"), [("attention", 0), ("moe", 1), ("full", 1)])
def test_checkpointed_step_sync_budget(demo, tmp_path, mode, recomputed):
    """Activation checkpointing adds exactly what its recompute repeats: one sync (the rows per
    expert) per recomputed MoE forward, nothing for attention; counted against the plain step."""
    plain, moe_calls = _count_one_step(0, 1, data_overrides(demo) + LAYOUT, str(tmp_path / "none"))
    hits, _ = _count_one_step(0, 1, data_overrides(demo) + LAYOUT + [f"train.activation_checkpointing={mode}"],
                              str(tmp_path / mode))
    assert len(hits) - len(plain) == recomputed * moe_calls, Counter(hits) - Counter(plain)
    _check(hits, moe_calls, recomputed)


def test_expert_parallel_checkpointed_step_sync_budget(demo, tmp_path):
    """EP=2, ``full``: the recompute brings the split sizes to the host again, once per MoE forward."""
    results = run_distributed(_count_one_step, 2, data_overrides(demo) + LAYOUT + ["parallel.ep=2",
                              "train.activation_checkpointing=full"], str(tmp_path / "run"), timeout=240)
    for hits, moe_calls in results:
        _check(hits, moe_calls, recomputed=1)
        assert len(hits) > 2 * moe_calls  # the recompute's syncs are there, not skipped


def test_counter_sees_the_syncs_it_claims_to():
    """The counter is what the budget rests on: each kind of sync it lists must register."""
    x = torch.arange(6.0)
    with SyncCounter() as c:
        x.tolist()
        x[x > 2]
        bool(x.sum() > 0)
        torch.repeat_interleave(x, torch.ones(6, dtype=torch.long))
        torch.repeat_interleave(x, torch.ones(6, dtype=torch.long), output_size=6)
        x.nonzero()
    assert [name for name, _ in c.hits] == ["tolist", "__getitem__", "__bool__", "repeat_interleave", "nonzero"]
