"""FlexAttention path against the SDPA explicit-mask path: same mask, same outputs, same gradients.

torch has no FlexAttention backward on CPU, only a device guard in front of an eager reference that
is device agnostic; the gradient tests lift that guard (``cpu_flex_backward``) to check our mask_mod
and block mask, not torch's kernel, which the CUDA test covers where a GPU exists.
Legend: B batch, P patches, L text length, S sequence.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from modalmoe.models import IMAGE, TEXT, ModelConfig, build_model, masks
from modalmoe.models.masks import attention_mask, prefix_lm_mask, prefix_lm_mask_mod
from modalmoe.runtime.config import ConfigError
from modalmoe.runtime.moe import MoEConfig
from model_utils import make_batch
from torch.nn.attention import flex_attention as fa

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# fp32 on CPU: both paths do the same math in a different order
ATOL = 2e-5


def tiny_config(**overrides) -> ModelConfig:
    # head_dim 16: the smallest the fused flex kernel takes
    cfg = ModelConfig(
        vocab_size=32, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=24, moe_every=2,
        image_size=8, patch_size=4, max_text_len=8, contrastive_coef=0.5,
        moe=MoEConfig(hidden_size=32, ffn_hidden_size=8, num_experts=4, top_k=2),
    )
    return dataclasses.replace(cfg, **overrides).validate()


def pair(**overrides):
    """The same weights under both attention paths."""
    torch.manual_seed(0)
    sdpa = build_model(tiny_config(attention="sdpa", **overrides))
    flex = build_model(tiny_config(attention="flex", **overrides))
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)


def _layouts():
    B, P, L = 3, 4, 8
    img, txt = torch.full((B, P), IMAGE), torch.full((B, L), TEXT)
    text_mask = torch.arange(L)[None] < torch.tensor([L, 5, 1])[:, None]
    image_mask = torch.ones(B, P, dtype=torch.bool)
    image_mask[2, 3:] = False
    return {
        "joint": (torch.cat([img, txt], 1), torch.cat([image_mask, text_mask], 1)),
        "image": (img, image_mask),
        "text": (txt, text_mask),
    }


@pytest.mark.parametrize("layout", ["joint", "image", "text"])
def test_mask_mod_states_the_dense_rule(layout):
    modality_BS, mask_BS = _layouts()[layout]
    B, S = modality_BS.shape
    dense = fa.create_mask(prefix_lm_mask_mod(modality_BS, mask_BS), B, 1, S, S, device="cpu")
    assert torch.equal(dense, prefix_lm_mask(modality_BS, mask_BS))


def test_auto_is_sdpa_on_cpu_and_flex_builds_a_block_mask(monkeypatch):
    modality_BS, mask_BS = _layouts()["joint"]
    assert isinstance(attention_mask("auto", modality_BS, mask_BS), torch.Tensor)
    monkeypatch.setattr(masks, "flex_available", lambda device: True)  # as on a GPU
    assert isinstance(attention_mask("auto", modality_BS, mask_BS), fa.BlockMask)
    assert isinstance(attention_mask("auto", modality_BS, mask_BS, dropout=0.1), torch.Tensor)
    assert isinstance(attention_mask("auto", modality_BS, mask_BS, head_dim=8), torch.Tensor)
    monkeypatch.undo()
    assert isinstance(attention_mask("sdpa", modality_BS, mask_BS), torch.Tensor)
    assert isinstance(attention_mask("flex", modality_BS, mask_BS), fa.BlockMask)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_grads(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=1e-4, msg=name)


def test_joint_and_text_only_passes_match_sdpa(cpu_flex_backward):
    """forward() runs the captioning (joint) pass and, with contrastive_coef > 0, the text-only pass."""
    sdpa, flex = pair()
    batch = make_batch(sdpa.cfg, B=3, lengths=[8, 5, 2])
    outs = []
    for model in (sdpa, flex):
        out = model(batch, return_logits=True)
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].logits, outs[1].logits, atol=ATOL, rtol=1e-4)
    for key in ("loss", "caption_loss", "contrastive_loss", "aux_loss"):
        torch.testing.assert_close(getattr(outs[0], key), getattr(outs[1], key), atol=ATOL, rtol=1e-4)
    _assert_close_grads(_grads(sdpa), _grads(flex))


@pytest.mark.parametrize("which", ["embed_image", "embed_text"])
def test_image_only_and_text_only_embeddings_match_sdpa(cpu_flex_backward, which):
    sdpa, flex = pair()
    batch = make_batch(sdpa.cfg, B=3, lengths=[8, 3, 1])
    batch["mask"][1, 2:4] = False  # padded image patches in the image-only pass
    embs = []
    for model in (sdpa, flex):
        emb = getattr(model, which)(batch)
        (emb * torch.linspace(-1, 1, emb.shape[1])).sum().backward()
        embs.append(emb)
    torch.testing.assert_close(embs[0], embs[1], atol=ATOL, rtol=1e-4)
    _assert_close_grads(_grads(sdpa), _grads(flex))


def test_block_mask_built_once_per_pass(monkeypatch):
    """Every layer shares one BlockMask: one construction per pass (joint + text-only here)."""
    calls = []
    real = masks.prefix_lm_block_mask
    monkeypatch.setattr(masks, "prefix_lm_block_mask", lambda *a: calls.append(1) or real(*a))
    _, flex = pair(num_layers=4)
    with torch.no_grad():
        flex(make_batch(flex.cfg))
    assert len(calls) == 2


def test_cpu_flex_training_says_what_to_do():
    _, flex = pair()
    with pytest.raises(NotImplementedError, match="model.attention=auto or sdpa"):
        flex(make_batch(flex.cfg))


def test_config_rejects_unknown_attention_and_flex_with_dropout():
    with pytest.raises(ConfigError, match="model.attention"):
        tiny_config(attention="fused")
    with pytest.raises(ConfigError, match="dropout"):
        tiny_config(attention="flex", dropout=0.1)
    with pytest.raises(ConfigError, match="head_dim >= 16"):
        tiny_config(attention="flex", num_heads=4)
    assert tiny_config(attention="auto", dropout=0.1).attention == "auto"  # auto falls back to sdpa


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled FlexAttention)")
def test_compiled_flex_matches_sdpa_on_cuda():
    sdpa, flex = (m.cuda() for m in pair())
    batch = {k: v.cuda() for k, v in make_batch(sdpa.cfg, B=3, lengths=[8, 5, 2]).items()}
    assert isinstance(attention_mask("auto", batch["modality"], batch["mask"]), fa.BlockMask)
    outs = []
    for model in (sdpa, flex):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch, return_logits=True)
        out.loss.backward()
        outs.append(out)
    # bf16: the fused kernel and SDPA round differently
    torch.testing.assert_close(outs[0].logits.float(), outs[1].logits.float(), atol=3e-2, rtol=3e-2)
    for name, g in _grads(sdpa).items():
        torch.testing.assert_close(g, dict(flex.named_parameters())[name].grad, atol=3e-2, rtol=5e-2, msg=name)
