"""Numerical faults: a non-finite loss or gradient skips the step on every rank (nothing changes:
weights, Adam moments, LR schedule), is counted, and too many in a row stop the job after saving;
an expert a modality stops using raises a router-collapse warning naming layer, modality, expert."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from modalmoe.launch.cli import main
from modalmoe.models.transformer import MultimodalTransformer
from modalmoe.runtime.checkpoint import CheckpointManager
from modalmoe.runtime.data import make_demo
from modalmoe.runtime.faults import EXIT_NONFINITE, NonFiniteError
from modalmoe.runtime.moe.router import Router
from modalmoe.train.job_config import load_job_config
from modalmoe.train.trainer import Trainer
from parity_utils import MODEL, FixedBatches, data_overrides, global_batches

NAN = float("nan")


def _cfg(demo: Path, run_dir: Path, *extra: str):
    return load_job_config(None, MODEL + data_overrides(demo) + [f"train.run_dir={run_dir}", *extra]).validate()


def _rows(run_dir: Path | str) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


def _poison_forward(monkeypatch, bad_calls: set[int]) -> None:
    """The model sees NaN image patches on the given forward calls (1-based)."""
    orig = MultimodalTransformer.forward
    calls = [0]

    def forward(self, batch, *args, **kwargs):
        calls[0] += 1
        if calls[0] in bad_calls:
            batch = replace(batch, patches=batch.patches * NAN)
        return orig(self, batch, *args, **kwargs)

    monkeypatch.setattr(MultimodalTransformer, "forward", forward)


class _Snapshots:
    """Every parameter after each step, to check that a skipped step changed nothing."""

    def __init__(self, trainer: Trainer):
        self.after: dict[int, list[torch.Tensor]] = {}
        step = trainer.train_step

        def train_step(batch):
            out = step(batch)
            self.after[trainer.step + 1] = [p.detach().clone() for p in trainer.model.parameters()]
            return out

        trainer.train_step = train_step


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_nonfinite_loss_skips_the_step_and_training_goes_on(demo, tmp_path, monkeypatch):
    _poison_forward(monkeypatch, {3, 4})
    trainer = Trainer(_cfg(demo, tmp_path, "train.steps=8", "train.log_every=2", "train.max_nonfinite_steps=3"),
                      train_data=FixedBatches(global_batches(), 0, 1))
    snaps = _Snapshots(trainer)
    trainer.fit()
    assert _same(snaps.after[2], snaps.after[4]) and not _same(snaps.after[4], snaps.after[5])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    rows = {r["step"]: r for r in _rows(tmp_path)}
    assert rows[4]["nonfinite/skipped"] == 2 and "loss" not in rows[4]  # the whole window was skipped
    assert rows[8]["nonfinite/total"] == 2 and rows[8]["nonfinite/skipped"] == 0
    assert trainer.engine.scheduler.last_epoch == 6  # the LR schedule did not advance on skipped steps


def test_nonfinite_gradient_skips_the_step(demo, tmp_path):
    trainer = Trainer(_cfg(demo, tmp_path, "train.steps=5", "train.log_every=1"), train_data=FixedBatches(global_batches(), 0, 1))
    param = next(trainer.model.parameters())
    param.register_hook(lambda g: g * float("inf") if trainer.step == 2 else g)  # step 3's backward
    snaps = _Snapshots(trainer)
    trainer.fit()
    rows = {r["step"]: r for r in _rows(tmp_path)}
    assert rows[3]["nonfinite/skipped"] == 1 and rows[2]["nonfinite/skipped"] == 0
    assert _same(snaps.after[2], snaps.after[3])
    assert rows[5]["nonfinite/total"] == 1 and all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_too_many_nonfinite_steps_in_a_row_save_and_stop(demo, tmp_path, monkeypatch):
    _poison_forward(monkeypatch, set(range(3, 100)))
    trainer = Trainer(_cfg(demo, tmp_path, "train.steps=20", "train.max_nonfinite_steps=3"),
                      train_data=FixedBatches(global_batches(), 0, 1))
    snaps = _Snapshots(trainer)
    with pytest.raises(NonFiniteError) as e:
        trainer.fit()
    msg = str(e.value)
    assert "3 steps in a row" in msg and "train.max_nonfinite_steps" in msg and "step_00000005" in msg
    assert "lower train.lr" in msg.lower()
    latest = CheckpointManager(tmp_path / "checkpoints").latest()
    assert latest.name == "step_00000005"
    states, _ = CheckpointManager.load(latest)
    saved = states["rank00000"]["model"]
    last_finite = dict(zip([n for n, _ in trainer.model.named_parameters()], snaps.after[2]))
    assert all(torch.equal(saved[n], p) for n, p in last_finite.items())


def test_cli_exits_with_the_nonfinite_code(tmp_path, monkeypatch, capsys):
    demo = tmp_path / "demo"
    make_demo(demo, n_train=64, n_eval=16, samples_per_shard=32)
    _poison_forward(monkeypatch, set(range(2, 100)))
    rc = main(["train", "--demo-dir", str(demo), "--set", "model.hidden_size=32", "model.num_heads=2",
               "model.num_layers=2", "model.ffn_hidden_size=64", "model.moe.ffn_hidden_size=32", "model.moe.num_experts=4",
               "data.batch_size=8", "data.num_workers=0", "train.progress=false", "train.tensorboard=false",
               "train.max_nonfinite_steps=2", "train.steps=10", f"train.run_dir={tmp_path / 'run'}"])
    assert rc == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "error: 2 steps in a row (train.max_nonfinite_steps) had a non-finite loss" in err


# ---- two ranks ----------------------------------------------------------------------------------


class _NanOnRank1(FixedBatches):
    """Rank 1's slice of global batch 3 has NaN patches; rank 0's is clean."""

    def __init__(self, dp_rank: int, dp_size: int):
        super().__init__(global_batches(), dp_rank, dp_size)
        if dp_rank == 1:
            self.batches[2] = replace(self.batches[2], patches=self.batches[2].patches * NAN)


def _train_two(rank: int, world: int, overrides: list[str], run_dir: str, mode: str):
    cfg = load_job_config(None, MODEL + overrides + [f"train.run_dir={run_dir}"]).validate()
    if mode == "loss":
        data = _NanOnRank1(rank, world)
    else:
        data = FixedBatches(global_batches(), rank, world)
    trainer = Trainer(cfg, train_data=data)
    if mode == "grad" and rank == 1:
        param = next(trainer.model.parameters())
        param.register_hook(lambda g: g * float("inf") if trainer.step == 2 else g)
    trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    return _rows(run_dir) if rank == 0 else None


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_two_ranks_agree_to_skip_and_drop_the_gradients(demo, tmp_path, zero):
    """A NaN loss on one rank (skipped before backward) and an inf gradient on one rank (dropped
    after backward: by us under ZeRO 0, by DeepSpeed's overflow path under ZeRO 1/2, whose
    partitioned buffers already hold the reduced gradient) must leave identical states."""
    common = data_overrides(demo) + ["parallel.ep=2", f"parallel.zero_stage={zero}"]
    by_loss = run_distributed(_train_two, 2, common, str(tmp_path / "loss"), "loss", timeout=120)[0]
    by_grad = run_distributed(_train_two, 2, common, str(tmp_path / "grad"), "grad", timeout=120)[0]
    for rows in (by_loss, by_grad):
        assert [r["step"] for r in rows if r["nonfinite/skipped"]] == [3]
        assert rows[-1]["nonfinite/total"] == 1
    a = {r["step"]: r["loss"] for r in by_loss if "loss" in r}
    b = {r["step"]: r["loss"] for r in by_grad if "loss" in r}
    assert sorted(a) == [s for s in range(1, 21) if s != 3] == sorted(b)
    for step in range(4, 21):
        assert a[step] == b[step], f"ZeRO-{zero} step {step}: {a[step]!r} vs {b[step]!r}"


# ---- router collapse ----------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_router_collapse_warns_once_naming_layer_modality_and_expert(demo, tmp_path):
    cfg = _cfg(demo, tmp_path, "model.moe.router=modality", "model.moe.top_k=1", "model.moe.lb_coef=0",
               "model.moe.z_loss_coef=0", "train.lr=1e-9", "train.steps=10", "train.log_every=2",
               "train.collapse_share=0.1", "train.collapse_window=4")
    trainer = Trainer(cfg, train_data=FixedBatches(global_batches(), 0, 1))
    (router,) = [m for m in trainer.model.modules() if isinstance(m, Router)]
    with torch.no_grad():  # image tokens (modality 0) all go to expert 0; text routes as before
        router.modality_MH.zero_()
        router.modality_MH[0, 0] = 1e4
        router.weight_EH[:, 0] = 0.0
        router.weight_EH[0, 0] = 1.0
    records = _Records()
    logging.getLogger("modalmoe.health").addHandler(records)
    try:
        trainer.fit()
    finally:
        logging.getLogger("modalmoe.health").removeHandler(records)
    alarms = [m for m in records.messages if m.startswith("router collapse")]
    for e in (1, 2, 3):
        hits = [m for m in alarms if f"layer 1, modality image, expert {e} " in m]
        assert len(hits) == 1, alarms  # once, though it stays collapsed for 10 steps
        assert "for the last 4 steps" in hits[0] and "lb_coef" in hits[0]
    assert not any("modality image, expert 0 " in m for m in alarms)
    rows = {r["step"]: r for r in _rows(tmp_path)}
    assert rows[2]["routing/collapsed/image"] == 0  # starved, but not yet for a window
    assert rows[4]["routing/collapsed/image"] == 3 and rows[10]["layer1/collapsed/image"] == 3
