"""Parity: every parallel layout trains the same loss curve as the single-process run.

20 steps of a tiny smoke-shaped model (one dense and one MoE block, 4 experts top-2, load-balance
and z losses on) on fixed synthetic global batches of 8 samples; each data-parallel replica takes
its slice of every global batch, tensor-parallel ranks of one replica take the same slice. The
multi-process runs step through DeepSpeed (gloo on CPU) on our process groups; the reference
steps with plain PyTorch in one process.

Tolerance: relative 1e-5 per step in float32, the issue's bar. The distributed runs add the same
numbers in another order (all-reduce, all-to-all regrouping, TP partial sums), which moves a loss
by a few ulps; over these 20 Adam steps that stayed inside 1e-5 in every layout.
"""

from __future__ import annotations

import pytest
from dist_utils import run_distributed
from parity_utils import STEPS, data_overrides, train_run

RTOL = 1e-5
NORM_RTOL = 1e-4  # a norm of float32 grads summed in another order: a few ulps of each term

@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory) -> list[tuple[float, float]]:
    curve = train_run(0, 1, data_overrides(demo), str(tmp_path_factory.mktemp("single")))
    assert len(curve) == STEPS and curve[-1][1] < curve[0][1]
    return curve


LAYOUTS = {
    "dp2": (2, []),
    "ep2": (2, ["parallel.ep=2"]),
    "tp2": (2, ["parallel.tp=2"]),
    "dp2xep2-zero0": (4, ["parallel.ep=2", "parallel.zero_stage=0"]),
    "dp2xep2-zero1": (4, ["parallel.ep=2", "parallel.zero_stage=1"]),
    "dp2xep2-zero2": (4, ["parallel.ep=2", "parallel.zero_stage=2"]),
    "tp2xep2": (4, ["parallel.tp=2", "parallel.ep=2"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, demo, reference, tmp_path):
    world, overrides = LAYOUTS[name]
    results = run_distributed(train_run, world, data_overrides(demo) + overrides, str(tmp_path / "run"), timeout=300)
    curve = results[0]
    assert len(curve) == STEPS
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(curve, reference):
        assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), f"{name}: step {step} loss {loss!r} vs single-process {ref_loss!r}"
        # the clipped-by norm: each expert counted once, TP shards summed, replicas not double-counted
        assert abs(norm - ref_norm) <= NORM_RTOL * ref_norm, f"{name}: step {step} grad norm {norm!r} vs {ref_norm!r}"
