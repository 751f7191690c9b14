"""The MoE layer end to end: against a per-token loop reference, capacity, padding, training."""

import pytest
import torch
from modalmoe.runtime.moe import MoEConfig, MoELayer
from modalmoe.runtime.moe.experts import activate

H, F, E = 16, 24, 6


def _layer(**kw):
    torch.manual_seed(0)
    base = dict(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=2)
    base.update(kw)
    return MoELayer(MoEConfig(**base))


def _reference(layer, x_TH, idx_Tk, w_Tk):
    """y[t] = Σ_j w[t, j] · expert_{idx[t, j]}(x[t]), one token at a time."""
    ex = layer.experts
    y = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for j in range(idx_Tk.shape[1]):
            e = int(idx_Tk[t, j])
            if e < 0:
                continue
            h = activate(x_TH[t] @ ex.w1_EHF[e], ex.activation)
            y[t] += w_Tk[t, j] * (h @ ex.w2_EFH[e])
    return y


def _inputs(B=3, S=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, H, generator=g, dtype=torch.float64)
    modality = torch.randint(0, 2, (B, S), generator=g)
    mask = torch.rand(B, S, generator=g) > 0.25
    return x, modality, mask


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(router="sigmoid"),
        dict(router="switch", top_k=1),
        dict(router="expert_choice"),
        dict(router="modality", modality_top_k=[1, 2]),
        dict(router="modality_gate", modality_partition=[2, 4]),
        dict(activation="swiglu"),
    ],
)
def test_layer_matches_per_token_reference(kw):
    layer = _layer(**kw).double()
    x, modality, mask = _inputs()
    y, aux = layer(x, modality, mask)
    r = layer.router(x.reshape(-1, H), modality.reshape(-1), mask.reshape(-1))
    ref = _reference(layer, x.reshape(-1, H), r.idx_Tk, r.weights_Tk.double()).view_as(x)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    assert (y[~mask] == 0).all()
    assert aux.stats.tokens_M.sum() == mask.sum()


def test_gradients_match_the_reference():
    layer = _layer().double()
    x, modality, mask = _inputs()
    x.requires_grad_(True)
    y, aux = layer(x, modality, mask)
    (y.square().sum() + aux.loss).backward()
    g_layer = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    x.grad = None
    r = layer.router(x.reshape(-1, H), modality.reshape(-1), mask.reshape(-1))
    ref = _reference(layer, x.reshape(-1, H), r.idx_Tk, r.weights_Tk.double())
    (ref.square().sum() + aux.loss.detach() * 0 + layer(x, modality, mask)[1].loss).backward()
    g_ref = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(g_layer, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_padding_tokens_change_nothing():
    layer = _layer(lb_coef=0.01, z_loss_coef=1e-3, capacity_factor=1.0)
    x, modality, mask = _inputs()
    x = x.float()
    y1, a1 = layer(x, modality, mask)
    x2 = x.clone()
    x2[~mask] = 100.0
    modality2 = modality.clone()
    modality2[~mask] = 1 - modality2[~mask]
    y2, a2 = layer(x2, modality2, mask)
    torch.testing.assert_close(y1[mask], y2[mask])
    torch.testing.assert_close(a1.loss, a2.loss)
    torch.testing.assert_close(a1.stats.load_ME, a2.stats.load_ME)


def test_shared_experts_are_added_for_every_token():
    layer = _layer(num_shared_experts=2, shared_ffn_hidden_size=8)
    x, modality, mask = _inputs()
    x = x.float()
    y, _ = layer(x, modality, mask)
    torch.testing.assert_close(y[~mask], layer.shared(x[~mask]))
    assert layer.shared.up.out_features == 16


def test_dropless_by_default():
    layer = _layer()
    x, modality, mask = _inputs(B=4, S=32)
    _, aux = layer(x.float(), modality, mask)
    assert (aux.stats.dropped_fraction_M() == 0).all()
    torch.testing.assert_close(aux.stats.kept_ME, aux.stats.load_ME)


def _skewed_router(layer):
    """Make every token prefer expert 0 first so that capacity must drop."""
    with torch.no_grad():
        layer.router.weight_EH.zero_()
        layer.router.weight_EH[0] = 1.0


def test_capacity_drops_by_position_and_reports_per_modality():
    layer = _layer(top_k=1, capacity_factor=1.0)
    _skewed_router(layer)
    T = 24
    x = torch.rand(1, T, H) + 0.1  # positive: expert 0 wins everywhere
    modality = torch.tensor([[0] * 12 + [1] * 12])
    y, aux = layer(x, modality)
    cap = T // E
    kept = aux.stats.kept_ME.sum(0)
    assert kept[0] == cap and aux.stats.load_ME.sum(0)[0] == T
    # by position: the first `cap` tokens (all images) are kept, later ones dropped
    assert (y[0, :cap].abs().sum(-1) > 0).all() and (y[0, cap:] == 0).all()
    torch.testing.assert_close(aux.stats.dropped_fraction_M(), torch.tensor([1 - cap / 12, 1.0]))
    layer.eval()
    _, aux = layer(x, modality)  # eval_capacity_factor=None → dropless in eval
    assert (aux.stats.dropped_fraction_M() == 0).all()


def test_capacity_by_probability_keeps_the_most_confident_tokens():
    layer = _layer(top_k=1, capacity_factor=1.0, drop_policy="probability")
    _skewed_router(layer)
    T = 24
    scale = torch.linspace(0.1, 2.0, T)
    x = torch.ones(1, T, H) * scale[None, :, None] / H  # logit of expert 0 = scale: later tokens surer
    y, aux = layer(x, torch.zeros(1, T, dtype=torch.long))
    cap = T // E
    kept_tokens = (y[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert kept_tokens == list(range(T - cap, T))


def test_per_modality_capacity():
    layer = _layer(top_k=1, capacity_factor=1.0, modality_capacity_factor=[0.5, 6.0])
    _skewed_router(layer)
    x = torch.rand(1, 24, H) + 0.1
    modality = torch.tensor([[0, 1] * 12])
    _, aux = layer(x, modality)
    kept = aux.stats.kept_ME[:, 0]
    assert kept.tolist() == [1.0, 12.0]  # images: ceil(0.5·12/6) = 1; text: room for all 12


def test_bf16_forward_backward():
    layer = _layer().bfloat16()
    x, modality, mask = _inputs()
    x = x.bfloat16().requires_grad_(True)
    y, aux = layer(x, modality, mask)
    assert y.dtype == torch.bfloat16
    (y.float().sum() + aux.loss).backward()
    assert torch.isfinite(x.grad.float()).all()


def test_both_dispatchers_are_token_dispatchers():
    """The layer talks to one interface; the local and the expert-parallel dispatcher implement it."""
    from modalmoe.runtime.moe.dispatch import LocalDispatcher, TokenDispatcher
    from modalmoe.runtime.moe.ep_dispatch import AllToAllDispatcher

    assert TokenDispatcher.__abstractmethods__ == {"permute", "shared_counts", "send", "combine"}
    for cls in (LocalDispatcher, AllToAllDispatcher):
        assert issubclass(cls, TokenDispatcher) and not cls.__abstractmethods__, cls
    assert isinstance(_layer().dispatcher, LocalDispatcher)

    class Incomplete(TokenDispatcher):
        def permute(self, x_TH, idx_Tk, capacity):
            return x_TH, None

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_empty_input():
    layer = _layer()
    y, aux = layer(torch.zeros(0, H), torch.zeros(0, dtype=torch.long))
    assert y.shape == (0, H) and aux.stats.tokens_M.sum() == 0 and torch.isfinite(aux.loss)


def _toy_task(router, steps=150, seed=0):
    """Two modalities whose targets need different functions of the same kind of input."""
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(hidden_size=H, ffn_hidden_size=16, num_experts=4, top_k=1, router=router, lb_coef=0.0))
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(2, H, H, generator=g) / H**0.5
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        x = torch.randn(256, H, generator=g)
        m = torch.randint(0, 2, (256,), generator=g)
        target = torch.tanh(torch.einsum("th,thd->td", x, A[m]))
        y, aux = layer(x, m)
        loss = (y - target).pow(2).mean() + aux.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, aux.stats


def test_toy_two_modality_task_trains_and_aware_router_specialises():
    losses, stats = _toy_task("modality")
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    share = stats.load_share_ME()
    # the modality-aware router sends the two modalities to different experts
    assert (share[0] - share[1]).abs().sum() > 0.5, share
