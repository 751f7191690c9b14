"""Model FLOPs per token against a hand count, the peak-TFLOP/s lookup, and tflops/mfu in metrics.jsonl."""

from __future__ import annotations

import json

import pytest
import torch
from modalmoe.models import IMAGE, TEXT, ModelConfig, build_model, count_parameters
from modalmoe.models.masks import prefix_lm_mask
from modalmoe.runtime.config import ConfigError
from modalmoe.runtime.moe import MoEConfig
from modalmoe.train.flops import TrainFlops, lookup_peak_tflops, peak_tflops, throughput_metrics
from modalmoe.train.job_config import TrainConfig, load_job_config
from test_train_job import _train, demo_dir  # noqa: F401  (demo_dir is a fixture)

# V=32, D=16, 2 dense layers, FFN 24, 8x8 images in 4x4 patches (P=4, patch_dim=48), L=8, tied head
DENSE = dict(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, ffn_hidden_size=24, moe_every=0,
             image_size=8, patch_size=4, max_text_len=8)


def _flops(**overrides) -> TrainFlops:
    cfg = ModelConfig(**{**DENSE, **overrides}).validate()
    torch.manual_seed(0)
    _, active = count_parameters(build_model(cfg))
    return TrainFlops.of(cfg, active)


def test_dense_model_against_a_hand_count():
    # per layer: q,k,v,o 4·16² + FFN 2·16·24 + two norms 2·16 = 1824; trunk = 2·1824 + final norm 16
    f = _flops()
    assert (f.trunk, f.patch, f.head, f.proj) == (3664, 48 * 16, 32 * 16, 0)
    pairs = 4 * 4 + 4 * 8 + 8 * 9 // 2  # image↔image, text→image, causal text
    forward = 2 * 3664 * 12 + 2 * 768 * 4 + 2 * 512 * 8 + 4 * 16 * 2 * pairs
    assert f.attention_pairs(8) == pairs
    assert f.per_sample(8) == 3 * forward
    assert f.per_token(8) == 3 * forward / 12
    assert f.for_window(tokens=5 * 12, samples=5, max_text_len=8) == pytest.approx(5 * 3 * forward)


def test_attention_pairs_are_the_mask_allowed_pairs():
    P, L = 4, 8
    modality = torch.cat([torch.full((1, P), IMAGE), torch.full((1, L), TEXT)], 1)
    assert int(prefix_lm_mask(modality).sum()) == _flops().attention_pairs(L)


def test_contrastive_pass_untied_head_and_learned_positions():
    base, f = _flops(), _flops(contrastive_coef=0.5, tie_embeddings=False, pos="learned")
    assert f.trunk == base.trunk and f.proj == 2 * 16 * 16
    # the text-only pass: the trunk again over L tokens, its causal attention, two projections
    extra = 3 * (2 * base.trunk * 8 + 4 * 16 * 2 * 36 + 2 * f.proj)
    assert f.per_sample(8) == pytest.approx(base.per_sample(8) + extra)


def test_moe_counts_only_the_active_experts():
    moe = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=1)
    dense_trunk = _flops(moe_every=2).trunk
    cfg = ModelConfig(**{**DENSE, "moe_every": 2, "moe": moe}).validate()
    total, active = count_parameters(build_model(cfg))
    f = TrainFlops.of(cfg, active)
    assert active < total and f.trunk == active - 768 - 512 - 32
    assert f.trunk < dense_trunk + 4 * 2 * 16 * 8  # fewer than all four experts


@pytest.mark.parametrize("name, dtype, tf32, peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, True, 989.0),
    ("NVIDIA H100 PCIe", torch.bfloat16, True, 756.0),
    ("NVIDIA H200", torch.bfloat16, True, 989.0),
    ("NVIDIA GH200 480GB", torch.bfloat16, True, 989.0),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, True, 312.0),
    ("NVIDIA A100 80GB PCIe", torch.float32, True, 156.0),
    ("NVIDIA A100-SXM4-40GB", torch.float32, False, 19.5),
    ("NVIDIA L4", torch.bfloat16, True, 121.0),
    ("NVIDIA L40S", torch.bfloat16, True, 362.0),
    ("Tesla V100-SXM2-16GB", torch.float32, True, 15.7),
    ("Tesla V100-SXM2-16GB", torch.bfloat16, True, None),
    ("Some Future GPU", torch.bfloat16, True, None),
])
def test_peak_lookup(name, dtype, tf32, peak):
    assert lookup_peak_tflops(name, dtype, tf32) == peak


def test_configured_peak_wins_and_cpu_has_none():
    cpu = torch.device("cpu")
    assert peak_tflops(cpu, torch.float32, True, None) is None
    assert peak_tflops(cpu, torch.float32, True, 0.0) is None
    assert peak_tflops(cpu, torch.float32, True, 50.0) == 50.0
    assert throughput_metrics(2e12, 1.0, 2, None) == {"tflops": 1.0}
    assert throughput_metrics(2e12, 1.0, 2, 4.0) == {"tflops": 1.0, "mfu": 0.25}


def test_peak_tflops_config_is_validated():
    TrainConfig(peak_tflops=989.0).validate()
    with pytest.raises(ConfigError, match="train.peak_tflops"):
        TrainConfig(peak_tflops=-1.0).validate()


def _train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def test_training_writes_tflops_and_mfu_when_the_peak_is_known(demo_dir, tmp_path):  # noqa: F811
    common = ("train.steps=5", "train.eval_batches=1", "train.report=false", "train.tensorboard=false")
    assert _train(demo_dir, tmp_path / "plain", *common) == 0
    rows = _train_rows(tmp_path / "plain")
    assert rows and all(r["tflops"] > 0 and "mfu" not in r for r in rows)  # CPU: no known peak
    assert _train(demo_dir, tmp_path / "peak", *common, "train.peak_tflops=0.5") == 0
    model_cfg = load_job_config(tmp_path / "peak" / "config.yaml").model.validate()
    f = TrainFlops.of(model_cfg, count_parameters(build_model(model_cfg))[1])
    for r in _train_rows(tmp_path / "peak"):
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5)
        # one process: FLOPs per token at the window's mean caption length, between 1 and max_text_len
        per_token = r["tflops"] * 1e12 / r["tokens_per_s"]
        ends = sorted([f.per_token(1), f.per_token(model_cfg.max_text_len)])
        assert ends[0] <= per_token <= ends[1]
