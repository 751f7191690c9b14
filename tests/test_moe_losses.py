"""Aux losses and stats on hand-made routing tables whose answers are known."""

import math

import torch
from modalmoe.runtime.moe import MoEConfig
from modalmoe.runtime.moe.losses import block_diagonal_mask, router_losses
from modalmoe.runtime.moe.router import Routing
from modalmoe.runtime.moe.stats import RoutingStats, RoutingSums

E = 4


def _routing(probs, idx, logits=None):
    probs = torch.tensor(probs, dtype=torch.float32)
    idx = torch.tensor(idx)
    logits = probs.log() if logits is None else torch.tensor(logits)
    return Routing(logits, probs, idx, probs.gather(1, idx.clamp_min(0)) * (idx >= 0))


def _losses(cfg, r, modality, valid):
    modality, valid = torch.tensor(modality), torch.tensor(valid)
    sums = RoutingSums.compute(r, modality, valid, cfg.num_modalities)
    allowed = torch.ones(cfg.num_modalities, E, dtype=torch.bool)
    return router_losses(cfg, r, sums, valid, allowed, torch.ones(E, 8)), sums


def _cfg(**kw):
    return MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=E, top_k=1, **kw).validate()


def test_switch_balance_loss_is_one_when_uniform_and_E_when_collapsed():
    uniform = _routing([[0.25] * 4] * 4, [[0], [1], [2], [3]])
    (_, terms), _ = _losses(_cfg(lb_coef=1.0), uniform, [0, 0, 1, 1], [True] * 4)
    assert math.isclose(float(terms["load_balance"]), 1.0, rel_tol=1e-6)
    collapsed = _routing([[1.0, 0, 0, 0]] * 4, [[0]] * 4)
    (_, terms), _ = _losses(_cfg(lb_coef=1.0), collapsed, [0, 0, 1, 1], [True] * 4)
    assert math.isclose(float(terms["load_balance"]), 4.0, rel_tol=1e-6)


def test_padding_is_not_counted():
    # the padded token (last) is confidently on expert 3: counted, it would raise the loss above 1
    r = _routing([[0.25] * 4] * 4 + [[0.0, 0.0, 0.0, 1.0]], [[0], [1], [2], [3], [3]])
    (_, terms), sums = _losses(_cfg(lb_coef=1.0), r, [0, 0, 1, 1, 1], [True] * 4 + [False])
    assert math.isclose(float(terms["load_balance"]), 1.0, rel_tol=1e-6)
    assert sums.load_ME.sum() == 4 and sums.tokens_M.tolist() == [2.0, 2.0]


def test_per_modality_balance_sees_what_global_balance_misses():
    # images all to expert 0/1, text all to 2/3: globally balanced, per modality collapsed onto half
    probs = [[0.5, 0.5, 0, 0]] * 2 + [[0, 0, 0.5, 0.5]] * 2
    r = _routing(probs, [[0], [1], [2], [3]])
    (total, terms), _ = _losses(_cfg(lb_coef=1.0, lb_modality_coef=1.0), r, [0, 0, 1, 1], [True] * 4)
    assert math.isclose(float(terms["load_balance"]), 1.0, rel_tol=1e-6)
    # per modality: f = (.5,.5,0,0), P = (.5,.5,0,0) → 4·Σ f·P = 2
    assert math.isclose(float(terms["load_balance_modality"]), 2.0, rel_tol=1e-6)
    assert math.isclose(float(total), 3.0, rel_tol=1e-6)


def test_per_modality_balance_with_a_target_is_one_at_the_target():
    # with P = f (consistent routing) the loss is Σ f²/q, minimal (= 1) exactly at f = q
    target = [[0.5, 0.5, 1e-3, 1e-3], [1e-3, 1e-3, 0.5, 0.5]]
    cfg = _cfg(lb_modality_coef=1.0, lb_modality_target=target, lb_coef=0.0)
    on = _routing([[0.5, 0.5, 0, 0]] * 2 + [[0, 0, 0.5, 0.5]] * 2, [[0], [1], [2], [3]])
    (_, terms), _ = _losses(cfg, on, [0, 0, 1, 1], [True] * 4)
    q = torch.tensor(target) / torch.tensor(target).sum(1, keepdim=True)
    expected = float((torch.tensor([0.25, 0.25, 0, 0]) / q[0]).sum() + (torch.tensor([0, 0, 0.25, 0.25]) / q[1]).sum()) / 2
    assert math.isclose(float(terms["load_balance_modality"]), expected, rel_tol=1e-5)
    assert abs(expected - 1.0) < 0.01
    off = _routing([[0.25] * 4] * 8, [[0], [1], [2], [3]] * 2)
    (_, terms), _ = _losses(cfg, off, [0, 0, 0, 0, 1, 1, 1, 1], [True] * 8)
    assert float(terms["load_balance_modality"]) > 10 * expected


def test_z_loss_is_mean_squared_logsumexp():
    logits = [[0.0, 0.0, 0.0, 0.0], [math.log(2.0), -100.0, -100.0, -100.0]]
    r = _routing([[0.25] * 4, [1.0, 0, 0, 0]], [[0], [0]], logits)
    (_, terms), _ = _losses(_cfg(lb_coef=0.0, z_loss_coef=1.0), r, [0, 1], [True, True])
    expected = (math.log(4.0) ** 2 + math.log(2.0) ** 2) / 2
    assert math.isclose(float(terms["z_loss"]), expected, rel_tol=1e-5)


def test_limoe_entropies():
    probs = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.25] * 4, [0.25] * 4]
    r = _routing(probs, [[0], [1], [2], [3]])
    cfg = _cfg(lb_coef=0.0, limoe_local_coef=1.0, limoe_global_coef=1.0)
    (_, terms), _ = _losses(cfg, r, [0, 0, 1, 1], [True] * 4)
    # local: image tokens 0 entropy, text tokens log 4 → mean over modalities log(4)/2
    assert math.isclose(float(terms["limoe_local"]), math.log(4) / 2, rel_tol=1e-6)
    # global: image p̄ = (.5,.5,0,0) → H = log 2; text p̄ uniform → log 4; loss = -mean
    assert math.isclose(float(terms["limoe_global"]), -(math.log(2) + math.log(4)) / 2, rel_tol=1e-6)
    cfg = _cfg(lb_coef=0.0, limoe_global_coef=1.0, limoe_global_threshold=math.log(4))
    (_, terms), _ = _losses(cfg, r, [0, 0, 1, 1], [True] * 4)
    assert math.isclose(float(terms["limoe_global"]), (math.log(4) - math.log(2)) / 2, rel_tol=1e-6)


def test_modality_agnostic_regularisers():
    probs = [[1.0, 0, 0, 0]] * 4
    r = _routing(probs, [[0]] * 4)
    cfg = _cfg(lb_coef=0.0, entropy_floor_coef=1.0, entropy_floor=1.0, min_util_coef=1.0, min_util=0.1)
    (_, terms), _ = _losses(cfg, r, [0, 0, 1, 1], [True] * 4)
    assert math.isclose(float(terms["entropy_floor"]), 1.0, rel_tol=1e-6)
    assert math.isclose(float(terms["min_util"]), 0.3, rel_tol=1e-6)


def test_block_diagonal_penalty():
    mask = block_diagonal_mask(4, 8, 2)
    assert mask.sum() == 16 and not mask[0, 0] and mask[0, 7] and not mask[3, 7]
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=1, lb_coef=0.0, block_diag_coef=1.0).validate()
    r = _routing([[0.25] * 4], [[0]])
    sums = RoutingSums.compute(r, torch.tensor([0]), torch.tensor([True]), 2)
    allowed = torch.ones(2, 4, dtype=torch.bool)
    w_block = (~mask).float()
    _, terms = router_losses(cfg, r, sums, torch.tensor([True]), allowed, w_block)
    assert float(terms["block_diag"]) == 0.0
    _, terms = router_losses(cfg, r, sums, torch.tensor([True]), allowed, torch.ones(4, 8))
    assert math.isclose(float(terms["block_diag"]), 0.5, rel_tol=1e-6)


def test_stats_summarise_and_add():
    r = _routing([[0.25] * 4] * 4, [[0], [0], [2], [3]])
    modality, valid = torch.tensor([0, 0, 1, 1]), torch.tensor([True] * 4)
    sums = RoutingSums.compute(r, modality, valid, 2)
    kept = sums.load_ME.clone()
    kept[0, 0] = 1  # one image slot dropped
    s = RoutingStats.from_sums(sums, kept, {})
    assert s.dropped_fraction_M().tolist() == [0.5, 0.0]
    assert s.load_share_ME()[0].tolist() == [1.0, 0, 0, 0]
    assert math.isclose(s.entropy_M()[1].item(), math.log(4), rel_tol=1e-6)
    both = s + s
    assert both.tokens_M.tolist() == [4.0, 4.0] and both.calls == 2
    assert both.balance() == s.balance() == 2.0
