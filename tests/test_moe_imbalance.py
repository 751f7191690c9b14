"""The dropless imbalance guard: the warning (train/monitors.py ImbalanceGuard) and the cap
(runtime/moe/capacity.py, ``moe.imbalance_cap_ratio``) on a router forced to send every token to
expert 0, the imbalance of a dropless run's first hundred steps taken to the limit."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from modalmoe.runtime.moe import MoEConfig, MoELayer
from modalmoe.train.monitors import ImbalanceGuard
from parity_utils import MODEL, FixedBatches, data_overrides, global_batches
from test_host_syncs import SyncCounter

E, H = 4, 8


def _layer(cap=None, top_k=1, policy="position", skew=True):
    cfg = MoEConfig(hidden_size=H, ffn_hidden_size=16, num_experts=E, top_k=top_k, imbalance_cap_ratio=cap,
                    drop_policy=policy).validate()
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    if skew:  # positive inputs: expert 0 scores highest for every token; ties below it go to expert 1
        with torch.no_grad():
            layer.router.weight_EH.fill_(-0.1)
            layer.router.weight_EH[0].fill_(0.1)
    return layer


def _inputs(centred=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 20, H, generator=g) if centred else torch.rand(2, 20, H, generator=g) + 0.1
    modality = torch.ones(2, 20, dtype=torch.long)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[:, -4:] = False  # 32 real tokens: the mean counts routed slots, never padding
    return x, modality, mask


def _run(layer, centred=False):
    x, modality, mask = _inputs(centred)
    seen = []
    handle = layer.experts.register_forward_hook(lambda m, args, out: seen.append(torch.as_tensor(args[1]).clone()))
    y, aux = layer(x, modality, mask)
    handle.remove()
    return y, aux.stats, seen[0]


@pytest.mark.parametrize("top_k", [1, 2])
def test_cap_drops_the_excess_and_counts_it(top_k):
    real, ratio = 32, 1.5
    slots = real * top_k
    cap = math.ceil(ratio * slots / E)
    y_free, free, rows_free = _run(_layer(top_k=top_k))
    y_cap, capped, rows_cap = _run(_layer(cap=ratio, top_k=top_k))
    crowded = list(range(top_k))  # expert 0 (and 1, every second choice) take every real token
    assert rows_free[crowded].tolist() == [real] * top_k and free.kept_ME.sum() == free.load_ME.sum() == slots
    assert rows_cap[crowded].tolist() == [cap] * top_k and int(rows_cap.sum()) == top_k * cap
    assert torch.equal(capped.load_ME, free.load_ME)  # routed counts are before the cap
    dropped = float(capped.load_ME.sum() - capped.kept_ME.sum())
    assert dropped == top_k * (real - cap)
    assert float(capped.dropped_fraction_M()[1]) == pytest.approx(dropped / slots)
    if top_k == 1:  # position policy: the first `cap` real tokens keep their output, the rest get none
        kept_tokens = y_cap.reshape(-1, H).abs().sum(-1) > 0
        assert kept_tokens.sum() == cap and kept_tokens[:cap].all()
        torch.testing.assert_close(y_cap.reshape(-1, H)[:cap], y_free.reshape(-1, H)[:cap], rtol=0, atol=0)


def test_cap_leaves_balanced_layers_and_prefers_confident_tokens():
    _, balanced, _ = _run(_layer(cap=2.0, skew=False), centred=True)
    assert balanced.load_ME.sum(0).max() <= 2.0 * 32 / E
    assert torch.equal(balanced.kept_ME, balanced.load_ME), "a cap above every expert's load dropped rows"
    layer = _layer(cap=1.5, policy="probability")
    y, stats, rows = _run(layer)
    x, modality, mask = _inputs()
    confidence = layer.router(x.reshape(-1, H), modality.reshape(-1), mask.reshape(-1)).weights_Tk[:, 0]
    kept = y.reshape(-1, H).abs().sum(-1) > 0
    assert kept.sum() == rows[0] == 12
    assert confidence[kept].min() >= confidence[~kept & mask.reshape(-1)].max()


def test_cap_adds_no_host_sync_and_keeps_gradients():
    counts = []
    for cap in (None, 1.5):
        layer = _layer(cap=cap)
        x, modality, mask = _inputs()
        x.requires_grad_(True)
        with SyncCounter() as c:
            y, aux = layer(x, modality, mask)
        counts.append(len(c.hits))
        (y.square().sum() + aux.loss).backward()
        assert torch.isfinite(x.grad).all() and layer.experts.w1_EHF.grad[0].abs().sum() > 0
    assert counts[0] == counts[1] == 1, counts  # the grouped GEMM's rows per expert, capped or not


def test_guard_warns_once_per_layer_and_expert(caplog):
    _, skewed, _ = _run(_layer())
    _, even, _ = _run(_layer(skew=False), centred=True)
    guard = ImbalanceGuard([3, 5], warn_ratio=2.0, cap_ratio=None, rank=0, world=1)
    with caplog.at_level(logging.WARNING, logger="modalmoe"):
        guard.record([even, skewed])
        metrics = guard.check(1, 10)
        guard.record([even, skewed])
        guard.check(11, 20)
    warnings = [r.getMessage() for r in caplog.records if "dropless imbalance" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "layer 5 (layers.5.ffn), expert 0" in warnings[0] and "4.00x" in warnings[0]
    assert "steps 1-10" in warnings[0] and "model.moe.imbalance_cap_ratio" in warnings[0]
    assert metrics["layer5/imbalance"] == pytest.approx(4.0) and metrics["layer3/imbalance"] < 2.0
    off = ImbalanceGuard([3], warn_ratio=0.0, cap_ratio=None, rank=0, world=1)
    off.record([skewed])
    assert off.check(1, 1) == {}


def test_trainer_warns_and_caps(demo, tmp_path, caplog):
    """The whole loop: a router bias steers every token of the MoE layer (layer 1) to expert 0; the
    trainer warns once, and with the cap the metrics show the drops."""
    from modalmoe.train.job_config import load_job_config
    from modalmoe.train.trainer import Trainer

    results = {}
    for cap in (None, 2.0):
        run_dir = tmp_path / f"cap{cap}"
        over = ["train.steps=4", "train.log_every=2", "model.moe.top_k=1", "model.moe.bias_update_rate=1e-6",
                "model.moe.imbalance_warn_ratio=1.5", f"train.run_dir={run_dir}"]
        if cap is not None:
            over.append(f"model.moe.imbalance_cap_ratio={cap}")
        cfg = load_job_config(None, MODEL + data_overrides(demo) + over).validate()
        trainer = Trainer(cfg, train_data=FixedBatches(global_batches(), 0, 1))
        with torch.no_grad():
            trainer.model.layers[1].ffn.router.expert_bias_E[0] = 10.0
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="modalmoe"):
            trainer.fit()
        warned = [r.getMessage() for r in caplog.records if "dropless imbalance" in r.getMessage()]
        rows = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
        results[cap] = (warned, [r for r in rows if r["split"] == "train"])
    for cap, (warned, rows) in results.items():
        assert len(warned) == 1 and "layer 1 (layers.1.ffn), expert 0" in warned[0], (cap, warned)
        assert len(rows) == 2 and all(r["layer1/imbalance"] == pytest.approx(E) for r in rows)
    assert all(r["routing/dropped/text"] == 0 for r in results[None][1])
    assert "are being dropped" in results[2.0][0][0]
    # cap 2 keeps ceil(2 · T / 4) = T/2 of the T slots, all on expert 0, first come first kept: about
    # half of each modality's slots are dropped (exactly half of all, split by where samples fall)
    for r in results[2.0][1]:
        assert 0.3 < r["routing/dropped/text"] < 0.7 and 0.3 < r["routing/dropped/image"] < 0.7, r
