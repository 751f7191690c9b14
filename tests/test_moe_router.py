"""Routers: each one's selection rule, per-modality top-k, partitions, padding."""

import pytest
import torch
from modalmoe.runtime.config import ConfigError
from modalmoe.runtime.moe import ROUTERS, MoEConfig, build_router

H, E = 16, 8


def _cfg(**kw):
    base = dict(hidden_size=H, ffn_hidden_size=32, num_experts=E, top_k=2)
    base.update(kw)
    return MoEConfig(**base).validate()


def _inputs(T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    modality = torch.randint(0, 2, (T,), generator=g)
    valid = torch.rand(T, generator=g) > 0.2
    return x, modality, valid


@pytest.mark.parametrize("name", ROUTERS)
def test_every_router_routes_real_tokens_only(name):
    torch.manual_seed(0)
    router = build_router(_cfg(router=name, top_k=1 if name == "switch" else 2))
    x, modality, valid = _inputs()
    r = router(x, modality, valid)
    assert r.probs_TE.dtype == torch.float32
    assert torch.allclose(r.probs_TE.sum(-1), torch.ones(len(x)), atol=1e-5)
    assert (r.idx_Tk[~valid] == -1).all() and (r.weights_Tk[~valid] == 0).all()
    routed = r.idx_Tk >= 0
    assert (r.idx_Tk[routed] < E).all()
    assert (r.weights_Tk[~routed] == 0).all()
    if name != "expert_choice":
        assert routed[valid].all()
        # no expert twice for one token
        srt = r.idx_Tk[valid].sort(1).values
        assert (srt[:, 1:] != srt[:, :-1]).all() if srt.shape[1] > 1 else True


def test_softmax_topk_picks_the_largest_probabilities_and_renormalises():
    router = build_router(_cfg())
    x, modality, valid = _inputs()
    valid[:] = True
    r = router(x, modality, valid)
    top = torch.topk(r.probs_TE, 2, dim=-1)
    assert torch.equal(r.idx_Tk, top.indices)
    assert torch.allclose(r.weights_Tk, top.values / top.values.sum(-1, keepdim=True))


def test_switch_weight_is_the_raw_probability():
    router = build_router(_cfg(router="switch", top_k=1))
    x, modality, valid = _inputs()
    r = router(x, modality, valid)
    assert torch.allclose(r.weights_Tk[valid, 0], r.probs_TE[valid].max(-1).values)


def test_sigmoid_router_normalises_chosen_scores():
    router = build_router(_cfg(router="sigmoid"))
    x, modality, valid = _inputs()
    r = router(x, modality, valid)
    assert torch.allclose(r.weights_Tk[valid].sum(-1), torch.ones(int(valid.sum())), atol=1e-6)
    scores = torch.sigmoid(r.logits_TE)
    assert torch.equal(r.idx_Tk[valid], torch.topk(scores, 2, -1).indices[valid])


def test_noisy_router_is_noisy_in_training_only():
    torch.manual_seed(0)
    router = build_router(_cfg(router="noisy"))
    with torch.no_grad():
        router.noise_EH.normal_(std=1.0)
    x, modality, valid = _inputs()
    a, b = router(x, modality, valid), router(x, modality, valid)
    assert not torch.equal(a.logits_TE, b.logits_TE)
    router.eval()
    a, b = router(x, modality, valid), router(x, modality, valid)
    assert torch.equal(a.logits_TE, b.logits_TE)


def test_random_router_is_frozen():
    router = build_router(_cfg(router="random"))
    assert not any(p.requires_grad for p in router.parameters())


def test_expert_choice_gives_each_expert_its_budget():
    router = build_router(_cfg(router="expert_choice", expert_choice_capacity_factor=1.0))
    x, modality, valid = _inputs(T=64)
    r = router(x, modality, valid)
    n_real = int(valid.sum())
    budget = -(-n_real * 2 // E)
    counts = torch.bincount(r.idx_Tk[r.idx_Tk >= 0], minlength=E)
    assert (counts == budget).all()
    # each expert's picks are its highest-scoring real tokens
    for e in range(E):
        picked = (r.idx_Tk == e).any(1)
        worst_picked = r.probs_TE[picked, e].min()
        best_unpicked = r.probs_TE[valid & ~picked, e].max()
        assert worst_picked >= best_unpicked


def test_per_modality_top_k():
    router = build_router(_cfg(modality_top_k=[1, 3]))
    x, modality, valid = _inputs()
    r = router(x, modality, valid)
    n_routed = (r.idx_Tk >= 0).sum(1)
    assert (n_routed[valid & (modality == 0)] == 1).all()
    assert (n_routed[valid & (modality == 1)] == 3).all()


@pytest.mark.parametrize("name", ["topk", "sigmoid", "switch", "modality"])
def test_modality_partition_keeps_each_modality_in_its_group(name):
    router = build_router(_cfg(router=name, top_k=1 if name == "switch" else 2, modality_partition=[3, 5]))
    x, modality, valid = _inputs()
    r = router(x, modality, valid)
    routed = r.idx_Tk >= 0
    img = routed & (modality == 0)[:, None]
    txt = routed & (modality == 1)[:, None]
    assert (r.idx_Tk[img] < 3).all() and (r.idx_Tk[txt] >= 3).all()
    assert (r.probs_TE[modality == 0][:, 3:] == 0).all()


def test_modality_aware_routers_condition_on_modality():
    torch.manual_seed(0)
    x, modality, valid = _inputs()
    for name in ["modality", "modality_gate"]:
        router = build_router(_cfg(router=name))
        a = router(x, torch.zeros_like(modality), valid).logits_TE
        b = router(x, torch.ones_like(modality), valid).logits_TE
        assert not torch.allclose(a, b)
    plain = build_router(_cfg())
    assert torch.equal(plain(x, torch.zeros_like(modality), valid).logits_TE, plain(x, torch.ones_like(modality), valid).logits_TE)


def test_router_math_is_float32_for_bf16_inputs():
    router = build_router(_cfg())
    x, modality, valid = _inputs()
    r = router(x.bfloat16(), modality, valid)
    assert r.logits_TE.dtype == r.probs_TE.dtype == r.weights_Tk.dtype == torch.float32


def test_bias_update_moves_towards_balance():
    router = build_router(_cfg(bias_update_rate=0.1))
    router.update_bias(torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 6]))
    b = router.expert_bias_E
    assert b[0] < 0 and b[7] < 0 and (b[1:7] > 0).all()


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(router="nope"), "moe.router"),
        (dict(top_k=9), "moe.top_k"),
        (dict(router="switch", top_k=2), "moe.top_k"),
        (dict(modality_top_k=[1]), "moe.modality_top_k"),
        (dict(modality_partition=[4, 3]), "moe.modality_partition"),
        (dict(modality_partition=[1, 7]), "moe.modality_partition[0]"),
        (dict(lb_coef=-1.0), "moe.lb_coef"),
        (dict(capacity_factor=0.0), "moe.capacity_factor"),
        (dict(block_diag_coef=1.0, block_diag_groups=3), "moe.block_diag_groups"),
    ],
)
def test_bad_moe_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        _cfg(**kw)


def test_one_router_registry_serves_validation_and_build():
    from modalmoe.runtime.moe import router as router_module
    from modalmoe.runtime.moe.config import ROUTER_CLASSES

    assert ROUTERS == tuple(ROUTER_CLASSES)
    classes = {c for c in vars(router_module).values()
               if isinstance(c, type) and issubclass(c, router_module.Router)}
    assert {getattr(router_module, n) for n in ROUTER_CLASSES.values()} == classes  # none left out
    for name, cls in ROUTER_CLASSES.items():
        assert type(build_router(_cfg(router=name, top_k=1 if name == "switch" else 2))).__name__ == cls
    with pytest.raises(ConfigError) as err:
        _cfg(router="nope")
    assert str(list(ROUTERS)) in str(err.value)
