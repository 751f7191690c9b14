"""``train.optimizer=adafactor`` and ``parallel.reduce_bucket_size``, the two settings that let a
model whose AdamW state does not fit train anyway: the config refuses what they cannot do, a tiny job
learns with Adafactor and resumes from its checkpoint to the same losses (its factored state saved
and restored), the planner counts Adafactor's state as torch keeps it, and under EP=2 a small
all-reduce bucket leaves the loss curve exactly as the default one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from modalmoe.models.parallelize import build_local_model
from modalmoe.runtime.checkpoint import CheckpointManager
from modalmoe.runtime.config import ConfigError
from modalmoe.runtime.optim import build_optimizer
from modalmoe.runtime.parallel_state import Layout, ParallelState
from modalmoe.train.job_config import load_job_config
from modalmoe.train.memory_plan import plan_memory
from parity_utils import MODEL, STEPS, FixedBatches, data_overrides, global_batches

# Adafactor's lr is relative to each tensor's RMS: 0.1 moves these 0.02-std weights about as AdamW's 3e-3
ADAFACTOR = ["train.optimizer=adafactor", "train.lr=0.1"]


def train_run(rank: int, world: int, overrides: list[str], run_dir: str) -> list[tuple[int, float, float]] | None:
    """The parity tests' tiny job on one fixed global batch, every step (a curve that must fall)."""
    from modalmoe.train.trainer import Trainer

    cfg = load_job_config(None, MODEL + overrides + [f"train.run_dir={run_dir}"]).validate()
    trainer = Trainer(cfg, train_data=FixedBatches(global_batches()[:1] * STEPS, rank, world))
    trainer.fit()
    if rank != 0:
        return None
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("overrides, field", [
    (["train.optimizer=sgd"], "train.optimizer"),
    (["train.optimizer=adafactor", "parallel.zero_stage=1"], "train.optimizer"),
    (["train.optimizer=adafactor", "parallel.zero_stage=2"], "train.optimizer"),
    (["parallel.reduce_bucket_size=0"], "parallel.reduce_bucket_size"),
])
def test_config_refuses_what_adafactor_cannot_do(overrides, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        load_job_config(None, MODEL + overrides).validate(check_paths=False)


def test_adafactor_with_zero0_and_adamw_with_zero2_are_accepted():
    load_job_config(None, MODEL + ADAFACTOR + ["parallel.zero_stage=0"]).validate(check_paths=False)
    load_job_config(None, MODEL + ["parallel.zero_stage=2"]).validate(check_paths=False)


def test_adafactor_learns_and_resumes_to_the_same_losses(demo, tmp_path):
    common = data_overrides(demo) + ADAFACTOR + ["train.save_every=10", "train.keep_checkpoints=3"]
    full, part = tmp_path / "full", tmp_path / "part"
    curve = train_run(0, 1, common, str(full))
    assert len(curve) == STEPS
    first, last = sum(x[1] for x in curve[:3]) / 3, sum(x[1] for x in curve[-3:]) / 3
    assert last < 0.7 * first, curve

    ckpt = full / "checkpoints" / "step_00000010"
    states, _ = CheckpointManager.load(ckpt, stems=["rank00000"])
    saved = states["rank00000"]["engine"]["optimizer"]["state"]
    kinds = {k for s in saved.values() for k in s}
    assert {"row_var", "col_var", "variance", "step"} <= kinds and "exp_avg" not in kinds, kinds
    assert all(float(s["step"]) == 10 for s in saved.values())

    # a job stopped after step 10: it resumes there and trains the uninterrupted run's losses
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, part / "checkpoints" / ckpt.name)
    (part / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    resumed = train_run(0, 1, common, str(part))
    assert [r[0] for r in resumed] == list(range(11, STEPS + 1))
    assert resumed == curve[10:]


def _state_numel(rank: int, world: int, overrides: list[str]) -> tuple[int, str]:
    """Elements of Adafactor's state after one step of this rank's (sharded) model, step counters left out."""
    cfg = load_job_config(None, MODEL + ADAFACTOR + overrides).validate(check_paths=False)
    state = ParallelState.build(Layout.from_config(cfg.parallel, world)) if world > 1 else None
    model = build_local_model(cfg.model, state, device="cpu", seed=0)
    optimizer, _ = build_optimizer(model, cfg.train)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    numel = sum(t.numel() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    return numel, type(optimizer).__name__


@pytest.mark.parametrize("world, overrides", [(1, []), (2, ["parallel.ep=2"])])
def test_planner_counts_adafactor_state_as_torch_keeps_it(world, overrides):
    results = run_distributed(_state_numel, world, overrides) if world > 1 else [_state_numel(0, 1, overrides)]
    cfg = load_job_config(None, MODEL + ADAFACTOR + overrides).validate(check_paths=False)
    plan = plan_memory(cfg, world, "cpu").ranks[0]
    adamw = plan_memory(load_job_config(None, MODEL + overrides).validate(check_paths=False), world, "cpu").ranks[0]
    for numel, kind in results:
        assert kind == "Adafactor"
        assert plan.optimizer == numel * 4, (plan.optimizer, numel)
    assert plan.optimizer < adamw.optimizer / 4  # the reason to pick it
    assert plan.peak < adamw.peak


def test_small_reduce_bucket_keeps_the_ep2_adafactor_curve(demo, tmp_path):
    """ZeRO-0's all-reduce, now called by our engine: 64-element buckets (many per tensor group)
    sum the same numbers as DeepSpeed's default 5e8, so the losses and norms are identical."""
    common = data_overrides(demo) + ADAFACTOR + ["parallel.ep=2"]
    default = run_distributed(train_run, 2, common, str(tmp_path / "default"), timeout=300)[0]
    small = run_distributed(train_run, 2, common + ["parallel.reduce_bucket_size=64"], str(tmp_path / "small"), timeout=300)[0]
    assert len(default) == STEPS and default[-1][1] < default[0][1]
    assert small == default


# the MoE layers run twice a step (the contrastive text-only pass), and w1 / w2 differ in shape
TWICE = ["model.contrastive_coef=0.1", "model.hidden_size=64", "model.num_heads=4"]


def _kept_bytes(overrides: list[str], run_dir: str) -> tuple[int, int, list]:
    """(bytes of kept expert-gradient buffers that are not a .grad, how many buffers, losses) after 3 steps."""
    from modalmoe.ops import GradBuffers
    from modalmoe.train.trainer import Trainer

    cfg = load_job_config(None, MODEL + overrides + [f"train.run_dir={run_dir}"]).validate()
    trainer = Trainer(cfg, train_data=[])
    losses = [trainer.train_step(b)[0]["loss"] for b in global_batches()[:3]]
    grads = {p.grad.untyped_storage().data_ptr() for p in trainer.model.parameters() if p.grad is not None}
    kept = [buf for m in trainer.model.modules() if isinstance(getattr(m, "grad_buffers", None), GradBuffers)
            for bufs in m.grad_buffers._buffers.values() for buf, _, _ in bufs]
    apart = sum(b.nbytes for b in kept if b.untyped_storage().data_ptr() not in grads)
    return apart, len(kept), losses


def test_planner_counts_the_kept_expert_gradient_buffers(demo, tmp_path):
    overrides = data_overrides(demo) + TWICE
    apart, n, losses = _kept_bytes(overrides, str(tmp_path / "on"))
    plan = plan_memory(load_job_config(None, MODEL + overrides).validate(), 1, "cpu").ranks[0]
    assert n > 0 and apart == plan.kept_grad_buffers, (apart, plan.kept_grad_buffers)
    # train.cpu_grad_buffers=false: nothing kept, the same kernels, the same losses
    off = overrides + ["train.cpu_grad_buffers=false"]
    apart_off, n_off, losses_off = _kept_bytes(off, str(tmp_path / "off"))
    assert (apart_off, n_off) == (0, 0) and losses_off == losses
    assert plan_memory(load_job_config(None, MODEL + off).validate(), 1, "cpu").ranks[0].kept_grad_buffers == 0
