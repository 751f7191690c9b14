"""bf16 mixed precision: bf16 where the FLOPs are, float32 where the decisions and sums are.

Under ``train.dtype=bfloat16`` (autocast over float32 weights) the rows reaching the permute, the
expert GEMMs and the combine are bf16; the router's logits, the routing sums and the losses are
float32 with autocast off. A bf16 run tracks the float32 run; EP=2 and DP=2×EP=2 in bf16 track the
bf16 single-process run.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed
from modalmoe import ops
from modalmoe.runtime.engine import deepspeed_config
from modalmoe.runtime.moe import MoEConfig, MoELayer
from modalmoe.runtime.moe import router as router_mod
from modalmoe.train.job_config import TrainConfig
from parity_utils import STEPS, data_overrides, train_run


def _spy(monkeypatch, module, name, seen: list):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        seen.append((args, torch.is_autocast_enabled("cpu")))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def test_expert_gemms_run_in_bf16_and_the_router_in_fp32(monkeypatch):
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=64, num_experts=4, top_k=2, lb_coef=0.01, z_loss_coef=1e-3,
                    num_shared_experts=1)
    layer = MoELayer(cfg)
    gemms, permutes, logits = [], [], []
    _spy(monkeypatch, ops, "grouped_mm", gemms)
    _spy(monkeypatch, ops, "permute", permutes)
    real_logits = router_mod.Router.logits

    def logits_spy(self, x_TH, modality_T):
        out = real_logits(self, x_TH, modality_T)
        logits.append((x_TH.dtype, out.dtype, torch.is_autocast_enabled("cpu")))
        return out

    monkeypatch.setattr(router_mod.Router, "logits", logits_spy)
    x = torch.randn(2, 16, 32, requires_grad=True)
    modality = torch.randint(0, 2, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x, modality)
    assert [a[0].dtype for a, _ in gemms] == [torch.bfloat16] * 2, "expert GEMM inputs"
    assert [a[1].dtype for a, _ in gemms] == [torch.bfloat16] * 2, "expert GEMM weights"
    assert permutes[0][0][0].dtype == torch.bfloat16, "permute payload"
    assert logits == [(torch.float32, torch.float32, False)], "router: float32 in and out, autocast off"
    assert aux.loss.dtype == torch.float32 and aux.stats.load_ME.dtype == torch.float32
    assert y.dtype == torch.bfloat16
    (y.float().sum() + aux.loss).backward()
    # float32 master weights get float32 grads
    assert layer.experts.w1_EHF.grad.dtype == torch.float32 and layer.router.weight_EH.grad.dtype == torch.float32


def test_without_autocast_everything_stays_float32(monkeypatch):
    layer = MoELayer(MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2))
    gemms = []
    _spy(monkeypatch, ops, "grouped_mm", gemms)
    y, _ = layer(torch.randn(8, 16), torch.randint(0, 2, (8,)))
    assert y.dtype == torch.float32 and all(a[0].dtype == torch.float32 for a, _ in gemms)


def test_dtype_auto_means_bf16_on_cuda_fp32_on_cpu():
    t = TrainConfig()
    assert t.dtype == "auto"
    assert t.resolved_dtype("cuda") == "bfloat16" and t.resolved_dtype("cpu") == "float32"
    assert TrainConfig(dtype="float32").resolved_dtype("cuda") == "float32"


def test_deepspeed_bf16_is_autocast_over_fp32_weights():
    """DeepSpeed's own bf16 mode would cast the router and its bias buffer to bf16."""
    from modalmoe.runtime.data.config import DataConfig
    from modalmoe.train.job_config import ParallelConfig

    ds = deepspeed_config(TrainConfig(), DataConfig(), ParallelConfig(), 2, "bfloat16")
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert not ds.get("bf16", {}).get("enabled", False)
    assert not deepspeed_config(TrainConfig(), DataConfig(), ParallelConfig(), 2, "float32")["torch_autocast"]["enabled"]


# bf16 keeps 8 mantissa bits: one rounding is up to 2^-9 ≈ 2e-3 relative. The loss is a mean over
# many tokens, so the roundings mostly cancel: this tiny model's bf16 curve stayed within 4e-4 of
# float32 over 20 steps here. The bound is one bf16 rounding, 2e-3.
BF16_VS_FP32_RTOL = 2e-3


@pytest.fixture(scope="module")
def bf16_reference(demo, tmp_path_factory):
    curve = train_run(0, 1, data_overrides(demo) + ["train.dtype=bfloat16"], str(tmp_path_factory.mktemp("bf16")))
    assert len(curve) == STEPS and curve[-1][1] < curve[0][1]
    return curve


def test_bf16_run_tracks_the_fp32_run(demo, bf16_reference, tmp_path):
    fp32 = train_run(0, 1, data_overrides(demo) + ["train.dtype=float32"], str(tmp_path))
    diffs = [abs(a[1] - b[1]) / abs(a[1]) for a, b in zip(fp32, bf16_reference)]
    assert max(diffs) <= BF16_VS_FP32_RTOL, f"bf16 vs fp32 relative loss gaps {diffs}"
    assert max(diffs) > 0, "the bf16 run gave the float32 curve bit for bit: bf16 never ran"


# The distributed bf16 runs do the same bf16 roundings on other row blocks (each rank's GEMMs see
# half the batch; the experts see rows from two ranks), so they differ from the single-process
# bf16 run by about what bf16 differs from float32 (here at most 3.3e-4 for EP=2, 3.5e-4 for
# DP=2×EP=2 over the 20 steps): the same bound of one bf16 rounding.
BF16_PARITY_RTOL = 2e-3
BF16_LAYOUTS = {
    "ep2": (2, ["parallel.ep=2"]),
    "dp2xep2-zero1": (4, ["parallel.ep=2", "parallel.zero_stage=1"]),
}


@pytest.mark.parametrize("name", list(BF16_LAYOUTS))
def test_bf16_layout_matches_bf16_single_process(name, demo, bf16_reference, tmp_path):
    world, overrides = BF16_LAYOUTS[name]
    curve = run_distributed(train_run, world, data_overrides(demo) + overrides + ["train.dtype=bfloat16"],
                            str(tmp_path / "run"), timeout=300)[0]
    assert len(curve) == STEPS
    for (step, loss, _), (_, ref, _) in zip(curve, bf16_reference):
        assert abs(loss - ref) <= BF16_PARITY_RTOL * abs(ref), f"{name}: step {step} loss {loss!r} vs bf16 single-process {ref!r}"
