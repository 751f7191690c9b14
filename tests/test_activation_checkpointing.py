"""Activation checkpointing (models/activation_checkpoint.py): every mode computes what ``none`` does.

The model here carries every side effect the recompute could get wrong: dropout and the noisy
router (random numbers), the router bias update (layer state), the aux losses and routing stats,
and two passes through each MoE layer per step (captioning and the contrastive text-only pass).

Tolerance: none. A recompute runs the same ops on the same inputs with the same random numbers, so
losses, gradients, grad norms and biases are expected bit-equal, and on CPU they are (single process
and EP=2, whose recompute repeats the all-gather and the all-to-alls). The EP runs are also held to
the parity bar against the single-process run (relative 1e-5, tests/test_parity.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from dist_utils import run_distributed
from modalmoe.models.activation_checkpoint import apply_activation_checkpointing, is_checkpointed
from modalmoe.models.transformer import build_model
from modalmoe.runtime.moe.layer import CheckpointCall, MoELayer, moe_layers
from modalmoe.train.job_config import load_job_config
from parity_utils import MODEL, data_overrides, global_batches, train_run

MODES = ["moe", "attention", "full", ("moe", "mlp", "attention")]
SIDE_EFFECTS = ["model.dropout=0.1", "model.moe.router=noisy", "model.moe.bias_update_rate=0.01",
                "model.contrastive_coef=0.1"]
STEPS = ["train.steps=6"]


def _model(mode, overrides=SIDE_EFFECTS):
    cfg = load_job_config(None, MODEL + overrides).model
    model = build_model(cfg, seed=0)
    for layer in moe_layers(model):  # the noise weights start at 0: make the router's noise real
        with torch.no_grad():
            layer.router.noise_EH.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    apply_activation_checkpointing(model, mode)
    return model.train()


def _fwd_bwd(model, seed=5):
    torch.manual_seed(seed)
    out = model(global_batches()[0])
    bias_fwd = [m.router.expert_bias_E.clone() for m in moe_layers(model)]
    out.loss.backward()
    return {
        "loss": out.loss.detach(), "aux": out.aux_loss.detach(),
        "stats": [t for s in out.moe_stats for t in s.tensors()],
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "bias_fwd": bias_fwd, "bias_bwd": [m.router.expert_bias_E.clone() for m in moe_layers(model)],
        "rng_after": torch.rand(3),
    }


def _same(a, b) -> bool:
    return (torch.equal(a["loss"], b["loss"]) and torch.equal(a["aux"], b["aux"])
            and a["grads"].keys() == b["grads"].keys()
            and all(torch.equal(a["grads"][k], b["grads"][k]) for k in a["grads"])
            and all(torch.equal(x, y) for x, y in zip(a["stats"], b["stats"], strict=True))
            and all(torch.equal(x, y) for x, y in zip(a["bias_bwd"], b["bias_bwd"], strict=True)))


@pytest.fixture(scope="module")
def reference():
    return _fwd_bwd(_model("none"))


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_grads_bit_equal_and_side_effects_once(mode, reference, monkeypatch):
    calls = {"forward": 0, "update_bias": 0}
    router_cls = type(moe_layers(_model("none"))[0].router)
    forward, update = MoELayer._forward, router_cls.update_bias

    def count_forward(self, *a, **k):
        calls["forward"] += 1
        return forward(self, *a, **k)

    def count_update(self, *a, **k):
        calls["update_bias"] += 1
        return update(self, *a, **k)

    monkeypatch.setattr(MoELayer, "_forward", count_forward)
    monkeypatch.setattr(router_cls, "update_bias", count_update)
    got = _fwd_bwd(_model(mode))
    assert _same(got, reference), f"{mode}: loss, grads, stats or bias differ from activation_checkpointing=none"
    assert all(torch.equal(a, b) for a, b in zip(got["bias_fwd"], got["bias_bwd"])), "the recompute moved the bias"
    assert any(not torch.equal(b, torch.zeros_like(b)) for b in got["bias_bwd"]), "the bias update never ran"
    assert torch.equal(got["rng_after"], reference["rng_after"]), "the recompute advanced the global RNG"
    passes = 2 * 1  # one MoE layer, captioning + text-only pass
    recomputed = "moe" in mode or mode == "full"
    assert calls["update_bias"] == passes
    assert calls["forward"] == passes * (2 if recomputed else 1), calls


def test_recompute_without_the_bias_protocol_diverges(reference, monkeypatch):
    """The protocol is what makes the MoE modes exact: with it switched off the recompute routes
    with the already-updated bias and updates it again, and the gradients come out different."""
    monkeypatch.setattr(CheckpointCall, "current", staticmethod(lambda: None))
    assert not _same(_fwd_bwd(_model("moe")), reference)


def test_randomness_is_live(reference):
    """Dropout and the noisy router really draw numbers: another seed gives another loss, so the
    bit-equality above means the recompute replayed the forward's draws."""
    assert not torch.equal(_fwd_bwd(_model("full"), seed=6)["loss"], reference["loss"])


def test_names_copies_and_mistakes():
    plain = _model("none")
    model = _model("full")
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert all(is_checkpointed(b) for b in model.layers) and not is_checkpointed(plain.layers[0])
    assert isinstance(model.layers[1].ffn, MoELayer) and not is_checkpointed(model.layers[1].ffn)
    clone = copy.deepcopy(model)
    assert all(is_checkpointed(b) for b in clone.layers)
    assert _same(_fwd_bwd(clone), _fwd_bwd(_model("none")))
    for bad, says in [("everything", "unknown"), (("full", "moe"), "do not combine"), ("full", "already")]:
        with pytest.raises(ValueError, match=says):
            apply_activation_checkpointing(model, bad)
    with torch.no_grad():  # eval / no_grad: runs plainly, nothing recomputed or stashed
        out = model.eval()(global_batches()[0])
    assert out.loss.grad_fn is None


@pytest.fixture(scope="module")
def curve_none(demo, tmp_path_factory):
    return train_run(0, 1, data_overrides(demo) + SIDE_EFFECTS + STEPS, str(tmp_path_factory.mktemp("none")))


@pytest.mark.parametrize("mode", ["moe", "attention", "full"])
def test_loss_curve_equals_none(mode, demo, curve_none, tmp_path):
    curve = train_run(0, 1, data_overrides(demo) + SIDE_EFFECTS + STEPS + [f"train.activation_checkpointing={mode}"],
                      str(tmp_path))
    assert len(curve) == 6
    assert curve == curve_none, f"{mode}: (step, loss, grad norm) {curve} vs none {curve_none}"


# no contrastive term here: its in-batch negatives make a DP shard's objective differ from the single process's
EP_RUN = ["model.moe.bias_update_rate=0.01", "model.moe_every=1"]


def test_expert_parallel_checkpointed_equals_none(demo, tmp_path):
    """EP=2 (2 gloo ranks, DeepSpeed): the recompute repeats the routing-sum all-gather and the
    dispatch all-to-all in backward on both ranks in the same order; the curves stay bit-equal."""
    over = data_overrides(demo) + EP_RUN + STEPS
    single = train_run(0, 1, over, str(tmp_path / "single"))
    ep_none = run_distributed(train_run, 2, over + ["parallel.ep=2"], str(tmp_path / "none"), timeout=300)[0]
    ep_full = run_distributed(train_run, 2, over + ["parallel.ep=2", "train.activation_checkpointing=full"],
                              str(tmp_path / "full"), timeout=300)[0]
    ep_moe = run_distributed(train_run, 2, over + ["parallel.ep=2", "train.activation_checkpointing=moe"],
                             str(tmp_path / "moe"), timeout=300)[0]
    assert len(ep_full) == 6 and ep_full == ep_none and ep_moe == ep_none, (ep_full, ep_moe, ep_none)
    for (step, loss, _), (_, ref, _) in zip(ep_full, single):
        assert abs(loss - ref) <= 1e-5 * abs(ref), f"step {step}: EP=2 full {loss!r} vs single process {ref!r}"
