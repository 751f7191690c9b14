"""Tests of the multimodal transformer: shapes, attention-mask semantics, losses, configs, counts.

Legend: B batch, P patches, C patch_dim, L text length, V vocab.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from modalmoe.launch.presets import list_presets, load_model_config, preset_path
from modalmoe.models import (
    IMAGE,
    TEXT,
    ModelConfig,
    MultimodalTransformer,
    build_model,
    count_parameters,
    normalize_over_images,
    recall_at_k,
)
from modalmoe.models.masks import prefix_lm_mask
from modalmoe.models.norm import RMSNorm, apex_rms_norm
from modalmoe.runtime.config import ConfigError, load_yaml
from modalmoe.runtime.data import SIZE_FIELDS
from modalmoe.runtime.moe import MoEConfig
from modalmoe.train.job_config import load_job_config
from model_utils import make_batch

torch.set_num_threads(2)

V, D, L = 32, 16, 8


def tiny_config(**overrides) -> ModelConfig:
    moe = dict(hidden_size=D, ffn_hidden_size=8, num_experts=4, top_k=2)
    moe.update(overrides.pop("moe", {}))
    cfg = ModelConfig(
        vocab_size=V, hidden_size=D, num_layers=2, num_heads=2, ffn_hidden_size=24, moe_every=1,
        image_size=8, patch_size=4, max_text_len=L, moe=MoEConfig(**moe),
    )
    return dataclasses.replace(cfg, **overrides).validate()


def build(seed: int = 0, **overrides) -> MultimodalTransformer:
    torch.manual_seed(seed)
    return build_model(tiny_config(**overrides)).eval()


def logits_of(model: MultimodalTransformer, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(batch, return_logits=True).logits


# ---- shapes and outputs -----------------------------------------------------------------------


def test_forward_shapes_and_outputs():
    model = build()
    cfg = model.cfg
    batch = make_batch(cfg)
    out = model(batch, return_logits=True)
    assert out.logits.shape == (3, L, V)
    assert out.loss.ndim == 0 and out.loss.requires_grad
    assert out.contrastive_loss is None
    assert len(out.moe_stats) == 2
    assert int(out.num_text_tokens) == (L - 1) + (L - 3) + 3
    assert torch.allclose(out.loss, out.caption_loss + out.aux_loss)
    assert model(batch).logits is None
    assert model.embed_image(batch).shape == (3, D) and model.embed_text(batch).shape == (3, D)
    assert torch.allclose(model.embed_image(batch).norm(dim=-1), torch.ones(3))
    assert model.caption_scores(batch, batch, pairs_per_pass=4).shape == (3, 3)


def test_modality_and_mask_default_from_layout():
    model = build()
    batch = make_batch(model.cfg)
    short = {k: batch[k] for k in ("patches", "text", "text_mask")}
    assert torch.equal(logits_of(model, batch), logits_of(model, short))


def test_wrong_patch_shape_is_a_clear_error():
    model = build()
    batch = make_batch(model.cfg)
    batch["patches"] = batch["patches"][:, :, :-1]
    with pytest.raises(ValueError, match="patch_size"):
        model(batch)


def test_deterministic_given_seed():
    a, b = build(seed=3), build(seed=3)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    batch = make_batch(a.cfg)
    assert torch.equal(logits_of(a, batch), logits_of(b, batch))


# ---- attention mask semantics -----------------------------------------------------------------


def test_prefix_lm_mask_by_hand():
    modality_BS = torch.tensor([[IMAGE, IMAGE, TEXT, TEXT, TEXT]])
    mask_BS = torch.tensor([[True, True, True, True, False]])
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],  # a padding query keeps its diagonal so no row is empty
    ], dtype=torch.bool)
    assert torch.equal(prefix_lm_mask(modality_BS, mask_BS)[0, 0], expected)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_later_text_does_not_change_earlier_logits(pos):
    model = build(pos=pos)
    batch = make_batch(model.cfg, lengths=[L, L, L])
    before = logits_of(model, batch)
    t = 5
    batch["text"][:, t] = (batch["text"][:, t] + 1) % V
    after = logits_of(model, batch)
    assert torch.allclose(before[:, :t], after[:, :t], atol=1e-6)
    assert not torch.allclose(before[:, t:], after[:, t:])


@pytest.mark.parametrize("patch", [0, 3])
def test_any_image_patch_changes_text_logits(patch):
    model = build()
    batch = make_batch(model.cfg)
    before = logits_of(model, batch)
    batch["patches"][:, patch] += 1.0
    after = logits_of(model, batch)
    assert ((before - after).abs().amax(-1) > 1e-5).all()  # every text position sees every patch


def test_image_states_do_not_see_text():
    model = build()
    batch = make_batch(model.cfg)
    other = dict(batch, text=(batch["text"] + 1) % V)
    with torch.no_grad():
        a = model._encode_joint(batch["patches"], batch["text"], batch["text_mask"]).h_BSD
        b = model._encode_joint(other["patches"], other["text"], other["text_mask"]).h_BSD
    P = model.cfg.num_patches
    assert torch.allclose(a[:, :P], b[:, :P], atol=1e-6)


def test_padding_does_not_change_real_outputs():
    model = build()
    batch = make_batch(model.cfg, B=2, lengths=[4, 4])
    trimmed = {k: v for k, v in batch.items()}
    trimmed["text"], trimmed["text_mask"] = batch["text"][:, :4], batch["text_mask"][:, :4]
    P = model.cfg.num_patches
    trimmed["modality"], trimmed["mask"] = batch["modality"][:, : P + 4], batch["mask"][:, : P + 4]
    padded = dict(batch, text=batch["text"].masked_fill(~batch["text_mask"], 7))  # pad id is irrelevant
    a, b = logits_of(model, trimmed), logits_of(model, padded)[:, :4]
    assert torch.allclose(a, b, atol=1e-5)


def test_padded_image_patch_is_invisible():
    """Right-padded text is already hidden by causality; a padded patch is hidden only by the key mask."""
    model = build()
    batch = make_batch(model.cfg)
    batch["mask"][:, 3] = False
    before = logits_of(model, batch)
    batch["patches"][:, 3] += 1.0
    assert torch.allclose(before, logits_of(model, batch), atol=1e-6)


# ---- objectives -------------------------------------------------------------------------------


def test_caption_loss_ignores_pad_and_matches_hand_count():
    model = build()
    batch = make_batch(model.cfg)
    out = model(batch, return_logits=True)
    logits_BLV, text_BL, mask_BL = out.logits, batch["text"], batch["text_mask"]
    valid = mask_BL[:, 1:]
    hand = F.cross_entropy(logits_BLV[:, :-1][valid], text_BL[:, 1:][valid])
    assert torch.allclose(out.caption_loss, hand, atol=1e-5)
    assert int(out.num_text_tokens) == int(valid.sum())
    repadded = dict(batch, text=batch["text"].masked_fill(~mask_BL, 5))
    assert torch.allclose(model(repadded).caption_loss, out.caption_loss, atol=1e-6)


def test_caption_logprob_and_scores_agree_with_loss():
    model = build()
    batch = make_batch(model.cfg)
    with torch.no_grad():
        out = model(batch)
        logp_B = model.caption_logprob(batch)
        scores = model.caption_scores(batch, batch, pairs_per_pass=5)
    assert torch.allclose(-logp_B.sum() / out.num_text_tokens, out.caption_loss, atol=1e-5)
    assert torch.allclose(scores.diagonal(), logp_B, atol=1e-4)


def test_contrastive_objective():
    model = build(contrastive_coef=0.5)
    model.train()
    batch = make_batch(model.cfg)
    out = model(batch)
    assert out.contrastive_loss is not None and torch.isfinite(out.contrastive_loss)
    assert torch.allclose(out.loss, out.caption_loss + 0.5 * out.contrastive_loss + out.aux_loss)
    out.loss.backward()
    assert model.logit_scale.grad is not None and model.text_proj.weight.grad is not None
    # the text embedding comes from a text-only pass: the image cannot leak into it
    other = dict(batch, patches=torch.randn_like(batch["patches"]))
    assert torch.equal(model.embed_text(batch), model.embed_text(other))


def test_moe_aux_loss_reaches_total():
    model = build(moe={"lb_coef": 0.5, "z_loss_coef": 0.1})
    out = model(make_batch(model.cfg))
    assert out.aux_loss.item() > 0
    assert torch.allclose(out.loss, out.caption_loss + out.aux_loss)


def test_overfits_four_samples():
    torch.manual_seed(0)
    model = build_model(tiny_config(hidden_size=32, num_heads=4, moe={"hidden_size": 32})).train()
    batch = make_batch(model.cfg, B=4, lengths=[L, 6, 5, L], seed=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.caption_loss.item()
    assert out.caption_loss.item() < 0.2 * first, (first, out.caption_loss.item())


# ---- structure, counts, configs ---------------------------------------------------------------


@pytest.mark.parametrize("moe_every,expected", [(1, [0, 1, 2, 3]), (2, [1, 3]), (3, [2]), (0, [])])
def test_moe_every_places_moe_layers(moe_every, expected):
    model = build(num_layers=4, moe_every=moe_every)
    assert [i for i, b in enumerate(model.layers) if b.is_moe] == expected
    assert model.cfg.moe_layers == expected
    assert len(model(make_batch(model.cfg)).moe_stats) == len(expected)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_parameter_counts_by_hand(tie, pos):
    model = build(num_layers=2, moe_every=2, tie_embeddings=tie, pos=pos)  # layer 0 dense, 1 MoE
    cfg = model.cfg
    E, k, Fe, Fd, C = cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.ffn_hidden_size, cfg.ffn_hidden_size, cfg.patch_dim
    embed = C * D + V * D + 2 * D + (cfg.max_seq_len * D if pos == "learned" else 0)
    attn_and_norms = 4 * D * D + 2 * D
    dense_ffn = 2 * D * Fd
    router, experts = E * D, E * 2 * D * Fe
    head = 0 if tie else V * D
    total = embed + 2 * attn_and_norms + dense_ffn + router + experts + D + head
    assert count_parameters(model) == (total, total - experts + experts * k // E)
    assert count_parameters(model)[1] < count_parameters(model)[0]


def test_dense_model_has_equal_counts():
    total, active = count_parameters(build(moe_every=0))
    assert total == active


def test_tp_plan_names_existing_linears():
    model = build(num_layers=2, moe_every=2)
    modules = dict(model.named_modules())
    plan = model.tp_plan()
    assert plan["layers.0.ffn.up"] == "colwise" and "layers.1.ffn.up" not in plan
    assert all(name in modules for name in plan)


def test_heads_must_divide_hidden():
    with pytest.raises(ConfigError, match=r"model\.num_heads.*divide hidden_size=16"):
        tiny_config(num_heads=3)


def test_moe_hidden_must_match():
    with pytest.raises(ConfigError, match=r"model\.moe\.hidden_size.*set model\.moe\.hidden_size=16"):
        tiny_config(moe={"hidden_size": 32})


def test_other_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"model\.patch_size"):
        tiny_config(patch_size=3)
    with pytest.raises(ConfigError, match=r"model\.moe\.top_k"):
        tiny_config(moe={"top_k": 5})
    tiny_config(moe_every=0, moe={"hidden_size": 32})  # no MoE layer: the moe section is unused


@pytest.mark.parametrize("name", ["smoke", "small", "base"])
def test_presets_load_and_agree_with_data(name):
    assert name in list_presets()
    cfg = load_model_config(name).validate()
    assert not set(SIZE_FIELDS) & set(load_yaml(preset_path(name))["data"])  # the model owns the sizes
    data = load_job_config(preset_path(name)).validate(check_paths=False).data
    assert (data.image_size, data.patch_size, data.max_text_len) == (
        cfg.image_size, cfg.patch_size, cfg.max_text_len)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match="choose one of"):
        preset_path("nope")


def test_rms_norm_matches_formula():
    norm = RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, D)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), ref, atol=1e-5)


def test_unrelated_apex_package_is_not_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))  # the PyPI namesake
    apex_rms_norm.cache_clear()
    try:
        assert apex_rms_norm() is None
    finally:
        apex_rms_norm.cache_clear()


# ---- retrieval --------------------------------------------------------------------------------


def test_recall_at_k_by_hand():
    scores = torch.tensor([
        [0.9, 0.1, 0.0, 0.2],  # correct 0 ranks 1st
        [0.5, 0.4, 0.6, 0.7],  # correct 1 ranks 4th
        [0.3, 0.3, 0.3, 0.1],  # correct 2 ties with two others: counted as 3rd
        [0.0, 0.2, 0.1, 0.1],  # correct 3 trails text 1 and ties text 2: counted as 3rd
    ])
    r = recall_at_k(scores, torch.tensor([0, 1, 2, 3]), ks=(1, 2, 3, 5))
    assert r == {"recall@1": 0.25, "recall@2": 0.25, "recall@3": 0.75, "recall@5": 1.0}
    multi = torch.zeros(4, 4, dtype=torch.bool)
    multi[torch.arange(4), torch.tensor([0, 1, 2, 3])] = True
    multi[1, 3] = True  # a second correct caption for image 1, ranked 1st
    assert recall_at_k(scores, multi, ks=(1,))["recall@1"] == 0.5
    assert recall_at_k(torch.zeros(5, 5), torch.arange(5), ks=(1,))["recall@1"] == 0.0


def test_normalize_over_images_is_a_log_posterior():
    s = torch.randn(4, 6)
    p = normalize_over_images(s).exp()
    assert torch.allclose(p.sum(0), torch.ones(6), atol=1e-5)
    assert torch.equal(p.argmax(0), s.argmax(0))
