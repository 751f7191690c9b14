"""Expert parallelism on gloo against the single-process layer on the whole batch.

Worlds: 2 ranks (dp 2 = ep 2, edp 1) and 4 ranks (dp 4 = ep 2 × edp 2). A fixed global batch is
split over the DP ranks; each rank runs an EP layer holding its slice of the experts of a seeded
single-process layer. The task loss of a rank is the mean over its own tokens (so the global loss
is the mean of the ranks' losses) plus the aux loss, which every rank computes on the global sums.
Grads are then reduced as DeepSpeed does (dense: SUM over DP ÷ dp; expert: SUM over EDP ÷ dp).

Tolerance, float32: every compared tensor must agree elementwise within rtol 1e-5 and
atol 1e-5 × max|reference| (relative to the tensor's scale; summation orders differ).

Capacity: with a capacity factor each rank caps each expert at ceil(cf · its own routed slots / E)
and drops its own overflow (per-rank capacity, as in every EP system), which a single process on
the global batch cannot reproduce. Those cases are compared with the single-process layer run on
each shard separately (the aux loss, which never sees drops, still on the global batch); the
dropless cases are compared with the single-process layer on the global batch.

One spawn per world size runs every case and returns numpy arrays; the reference and the
assertions run here in the test process.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from modalmoe.runtime.distributed import all_reduce_sum, reduce_gradients
from modalmoe.runtime.config import ConfigError
from modalmoe.runtime.deepspeed_groups import DeepSpeedMPU, deepspeed_group_name, mark_expert_params
from modalmoe.runtime.moe import MoEConfig, MoELayer
from modalmoe.runtime.moe.dispatch import LocalDispatcher, TokenDispatcher
from modalmoe.runtime.moe.ep_dispatch import AllToAllDispatcher
from modalmoe.runtime.parallel_state import Layout, ParallelState

H, F, E, K = 16, 32, 4, 2
B_GLOBAL, S = 4, 8
RTOL = 1e-5

CASES: dict[str, dict] = {
    "topk": dict(lb_coef=0.01, z_loss_coef=1e-3, num_shared_experts=1),
    "modality": dict(
        router="modality", modality_top_k=[1, 2], lb_coef=0.01, lb_modality_coef=0.02, limoe_local_coef=0.01,
        limoe_global_coef=0.01, entropy_floor_coef=0.05, entropy_floor=1.5, min_util_coef=0.1, min_util=0.3,
    ),
    "modality_gate": dict(router="modality_gate", modality_partition=[2, 2], lb_modality_coef=0.02, z_loss_coef=1e-3),
    "sigmoid_bias": dict(router="sigmoid", bias_update_rate=0.01, lb_coef=0.01, activation="swiglu"),
    # per-rank capacity: compared with the single-process layer run on each rank's shard
    "capacity": dict(capacity_factor=1.0, lb_coef=0.01, z_loss_coef=1e-3),
    "capacity_modality": dict(router="modality", modality_capacity_factor=[0.75, 1.5], drop_policy="probability", lb_coef=0.01),
    # all tokens are modality 0, whose experts live on EP rank 0, and the second half of the batch
    # is padding: the last DP rank(s) send nothing, EP rank 1 receives nothing
    "empty_rank": dict(router="modality_gate", modality_partition=[2, 2], lb_coef=0.01, z_loss_coef=1e-3),
}
PER_SHARD = {"capacity", "capacity_modality"}
WORLDS = {2: dict(ep=2), 4: dict(ep=2)}
STEPS = 3
LR = dict(sgd=0.1, adam=1e-2)
# Adam normalises each element's step, so an element whose grad is ~0 in both runs (here ~1e-9)
# may take a step of a different size: parameters after Adam steps are compared to 1e-3 of the
# total step length instead (the per-step losses still to 1e-5).
ADAM_PARAM_ATOL = 1e-3 * LR["adam"] * STEPS
TRAIN_CASE = dict(router="modality", lb_coef=0.01, z_loss_coef=1e-3, bias_update_rate=0.01, num_shared_experts=1)


def _cfg(kw: dict) -> MoEConfig:
    return MoEConfig(hidden_size=H, ffn_hidden_size=F, num_experts=E, top_k=K, **kw)


def _full_layer(kw: dict) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(_cfg(kw))


def _batch(seed: int, case: str = ""):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B_GLOBAL, S, H, generator=g)
    modality = torch.randint(0, 2, (B_GLOBAL, S), generator=g)
    mask = torch.rand(B_GLOBAL, S, generator=g) > 0.2
    target = torch.randn(B_GLOBAL, S, H, generator=g)
    if case == "empty_rank":
        modality.zero_()
        mask[B_GLOBAL // 2 :] = False
    return x, modality, mask, target


def _task(y, target):
    """Mean over this batch's positions: the global task loss is the mean of the ranks' ones."""
    return (y * target).sum() / (y.shape[0] * y.shape[1])


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().copy()


# ------------------------------------------------------------------------------------------------
# The distributed side: runs in each spawned rank.
# ------------------------------------------------------------------------------------------------


def _ep_layer(kw: dict, state: ParallelState) -> MoELayer:
    """The seeded single-process layer made expert-parallel, as ``parallelize`` makes it."""
    layer = _full_layer(kw)
    layer.apply_ep(state.ep_group)
    layer.stats_group = state.dp_group
    mark_expert_params(layer.experts, deepspeed_group_name(state.size("ep")))
    return layer


def _ep_setup(world: int, ep: int, kw: dict):
    state = ParallelState.build(Layout(world, ep=ep))
    layer = _ep_layer(kw, state)
    assert all(p.allreduce is False and p.group_name == f"ep_size_{ep}" for p in layer.experts.parameters())
    return state, layer


def _shard(t: torch.Tensor, state: ParallelState) -> torch.Tensor:
    b = B_GLOBAL // state.layout.dp
    return t[state.coords.dp * b : (state.coords.dp + 1) * b]


def _step(layer: MoELayer, state: ParallelState, case: str) -> dict:
    """One forward/backward of ``layer`` on this rank's shard, grads reduced as DeepSpeed does."""
    x, modality, mask, target = (_shard(t, state) for t in _batch(seed=1, case=case))
    x.requires_grad_(True)
    y, aux = layer(x, modality, mask)
    (_task(y, target) + aux.loss).backward()
    reduce_gradients(layer.parameters(), state.dp_group, state.edp_group)
    return dict(
        y=_np(y), aux=float(aux.loss.detach()), x_grad=_np(x.grad), bias=_np(layer.router.expert_bias_E),
        grads={n: _np(p.grad) for n, p in layer.named_parameters() if p.grad is not None},
        bytes=dict(layer.dispatcher.bytes_sent), tokens_M=_np(aux.stats.tokens_M),
        dp_idx=state.coords.dp, ep_idx=state.rank_in("ep"), ep_ranks=state.ranks["ep"],
    )


def _parity_worker(rank: int, world: int, ep: int) -> dict:
    out = {}
    for name, kw in CASES.items():
        state, layer = _ep_setup(world, ep, kw)
        out[name] = _step(layer, state, name)
    out["train"] = {opt: _train_worker(world, ep, opt) for opt in ("sgd", "adam")}
    return out


def _optimizer(opt: str, params):
    return torch.optim.SGD(params, lr=LR["sgd"]) if opt == "sgd" else torch.optim.Adam(params, lr=LR["adam"])


def _train_worker(world: int, ep: int, opt_name: str) -> dict:
    state, layer = _ep_setup(world, ep, TRAIN_CASE)
    opt = _optimizer(opt_name, layer.parameters())
    losses = []
    for step in range(STEPS):
        x, modality, mask, target = (_shard(t, state) for t in _batch(seed=10 + step))
        y, aux = layer(x, modality, mask)
        loss = _task(y, target) + aux.loss
        opt.zero_grad()
        loss.backward()
        reduce_gradients(layer.parameters(), state.dp_group, state.edp_group)
        opt.step()
        losses.append(float(all_reduce_sum(loss.detach(), state.dp_group)) / state.layout.dp)
    return dict(losses=losses, params={n: _np(p) for n, p in layer.named_parameters()},
                bias=_np(layer.router.expert_bias_E), ep_idx=state.rank_in("ep"))


@functools.cache
def _run(world: int) -> list[dict]:
    return run_distributed(_parity_worker, world, WORLDS[world]["ep"], timeout=120)


# ------------------------------------------------------------------------------------------------
# The single-process reference and the comparisons.
# ------------------------------------------------------------------------------------------------


def _close(actual, expected, what: str, atol: float | None = None) -> None:
    actual, expected = torch.as_tensor(np.asarray(actual)), torch.as_tensor(np.asarray(expected))
    if atol is None:
        atol = RTOL * max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-12)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


@functools.cache
def _reference(name: str, dp: int) -> dict:
    kw = CASES[name]
    layer = _full_layer(kw)
    x, modality, mask, target = _batch(seed=1, case=name)
    x.requires_grad_(True)
    if name in PER_SHARD:
        b = B_GLOBAL // dp
        ys = [layer(x[i * b : (i + 1) * b], modality[i * b : (i + 1) * b], mask[i * b : (i + 1) * b])[0] for i in range(dp)]
        y = torch.cat(ys)
        aux = layer(x, modality, mask)[1]  # the routing losses never see capacity drops
        loss = sum(_task(ys[i], target[i * b : (i + 1) * b]) for i in range(dp)) / dp + aux.loss
    else:
        y, aux = layer(x, modality, mask)
        loss = _task(y, target) + aux.loss
    loss.backward()
    idx_Tk = layer.router(x.detach().reshape(-1, H), modality.reshape(-1), mask.reshape(-1)).idx_Tk
    return dict(
        y=y.detach(), aux=float(aux.loss.detach()), x_grad=x.grad, bias=layer.router.expert_bias_E.clone(),
        grads={n: p.grad for n, p in layer.named_parameters() if p.grad is not None},
        idx_Tk=idx_Tk.view(B_GLOBAL, S, -1), tokens_M=aux.stats.tokens_M,
    )


def _expert_slice(name: str, t: torch.Tensor, ep_idx: int, ep: int) -> torch.Tensor:
    if name.startswith("experts."):
        n = t.shape[0] // ep
        return t[ep_idx * n : (ep_idx + 1) * n]
    return t


def _assert_matches_reference(case: str, world: int, ep: int, per_rank: list[dict]) -> None:
    dp = world  # tp = 1
    ref = _reference(case, dp)
    b = B_GLOBAL // dp
    for rank, r in enumerate(per_rank):
        shard = slice(r["dp_idx"] * b, (r["dp_idx"] + 1) * b)
        where = f"{case}, world {world}, rank {rank}"
        _close(r["y"], ref["y"][shard], f"output ({where})")
        _close(r["aux"], ref["aux"], f"aux loss ({where})")
        # every rank's loss reaches its tokens through the all-reduced sums: Σ_r L_r = dp · L
        _close(r["x_grad"] / dp, ref["x_grad"][shard], f"input grad ({where})")
        _close(r["bias"], ref["bias"], f"expert bias ({where})")
        assert set(r["grads"]) == set(ref["grads"]), where
        for n, g in r["grads"].items():
            _close(g, _expert_slice(n, ref["grads"][n], r["ep_idx"], ep), f"grad of {n} ({where})")


@pytest.mark.parametrize("world", sorted(WORLDS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_backward_parity(world, case):
    _assert_matches_reference(case, world, WORLDS[world]["ep"], [res[case] for res in _run(world)])
    tokens = sum(res[case]["tokens_M"] for res in _run(world))
    _close(tokens, _reference(case, world)["tokens_M"], f"stats stay per-rank and sum to the global counts ({case})")


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_all_to_all_sends_only_real_rows(world):
    """Dropless: a rank sends exactly its routed real slots, never capacity padding."""
    dp, ep = world, WORLDS[world]["ep"]
    b, L = B_GLOBAL // dp, E // ep
    results = _run(world)
    for case in ("topk", "modality", "modality_gate", "empty_rank"):
        idx = _reference(case, dp)["idx_Tk"]  # [B, S, k], -1 = not routed (incl. padding tokens)
        for rank, res in enumerate(results):
            r = res[case]
            sent = int((idx[r["dp_idx"] * b : (r["dp_idx"] + 1) * b] >= 0).sum())
            # rows routed to my experts by the ranks of my EP group (their dp_idx = their rank here)
            lo = r["ep_idx"] * L
            recv = sum(
                int(((idx[p * b : (p + 1) * b] >= lo) & (idx[p * b : (p + 1) * b] < lo + L)).sum()) for p in r["ep_ranks"]
            )
            row = H * 4
            assert r["bytes"] == dict(
                dispatch_fwd=sent * row, combine_fwd=recv * row, dispatch_bwd=recv * row, combine_bwd=sent * row
            ), (case, world, rank)
            assert sent < b * S * K  # padding tokens and modality_top_k=1 slots are not sent
    empty = [res["empty_rank"]["bytes"] for res in results]
    assert min(e["dispatch_fwd"] for e in empty) == 0 == min(e["combine_fwd"] for e in empty)


@pytest.mark.parametrize("world", sorted(WORLDS))
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_training_steps_parity(world, opt_name):
    ep = WORLDS[world]["ep"]
    layer = _full_layer(TRAIN_CASE)
    opt = _optimizer(opt_name, layer.parameters())
    ref_losses = []
    for step in range(STEPS):
        x, modality, mask, target = _batch(seed=10 + step)
        y, aux = layer(x, modality, mask)
        loss = _task(y, target) + aux.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(float(loss.detach()))
    for rank, res in enumerate(_run(world)):
        r = res["train"][opt_name]
        where = f"{opt_name}, world {world}, rank {rank}"
        _close(r["losses"], ref_losses, f"loss per step ({where})")
        _close(r["bias"], layer.router.expert_bias_E, f"expert bias ({where})")
        for n, p in layer.named_parameters():
            _close(r["params"][n], _expert_slice(n, p.detach(), r["ep_idx"], ep), f"{n} after {STEPS} steps ({where})",
                   atol=ADAM_PARAM_ATOL if opt_name == "adam" else None)


def test_losses_match_between_worlds():
    """The same global batch gives the same aux loss whatever the split (2 or 4 ranks)."""
    for case in CASES:
        auxes = [res[case]["aux"] for w in WORLDS for res in _run(w)]
        assert max(auxes) - min(auxes) <= RTOL * max(1.0, abs(auxes[0])) * 2, (case, auxes)
        assert math.isfinite(auxes[0])


def _count_paths_worker(rank: int, world: int, ep: int) -> dict:
    """The EP dispatcher fed counts gathered over the DP group (the layer's path, riding the routing
    sums) and the same dispatcher exchanging them by its own all-to-all must move the same rows."""
    from modalmoe.runtime.moe.stats import RoutingSums

    state = ParallelState.build(Layout(world, ep=ep))
    gen = torch.Generator().manual_seed(100 + rank)
    E, T, H = 8, 40, 6
    idx_Tk = torch.randint(-1, E, (T, 2), generator=gen)
    x_TH = torch.randn(T, H, generator=gen, requires_grad=True)
    disp = AllToAllDispatcher(E, state.ep_group)
    x_own, plan_own, counts_own = disp.send(*disp.permute(x_TH, idx_Tk, None))
    zeros = torch.zeros(1)
    sums = RoutingSums(zeros, zeros, zeros, zeros, zeros, zeros[0])
    x_RH, plan = disp.permute(x_TH, idx_Tk, None)
    _, counts_rows = sums.across(state.dp_group, disp.shared_counts(plan))
    x_shared, plan_shared, counts_shared = disp.send(x_RH, plan, counts_rows, state.dp_group)
    return dict(same_rows=torch.equal(x_own, x_shared), same_counts=list(counts_own) == list(counts_shared),
                same_splits=(plan_own.send_splits, plan_own.recv_splits) == (plan_shared.send_splits, plan_shared.recv_splits),
                rows=int(x_own.shape[0]))


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_counts_ride_the_routing_sums(world):
    results = run_distributed(_count_paths_worker, world, WORLDS[world]["ep"], timeout=60)
    for rank, r in enumerate(results):
        assert r["same_rows"] and r["same_counts"] and r["same_splits"], (rank, r)
    assert sum(r["rows"] for r in results) > 0


def test_partitioned_router_entropy_grad_is_finite():
    """Zero probabilities (experts outside a modality's partition) must give finite router grads:
    EP all-reduces the entropy sums with the others, so their backward always runs."""
    layer = _full_layer(dict(router="modality_gate", modality_partition=[2, 2], limoe_local_coef=0.1, limoe_global_coef=0.1))
    x, modality, mask, target = _batch(seed=3)
    y, aux = layer(x, modality, mask)
    (_task(y, target) + aux.loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def _apply_ep_worker(rank: int, world: int, ep: int) -> dict:
    """apply_ep on tensor-parallel experts (TP groups of one rank, so they compute what the plain
    ones do), and its refusals."""
    from modalmoe.runtime.tensor_parallel import TensorParallelGroupedExperts

    state = ParallelState.build(Layout(world, ep=ep))
    tp_group = [dist.new_group([r]) for r in range(world)][rank]
    layer = _full_layer(CASES["topk"])
    layer.experts = TensorParallelGroupedExperts.from_full(layer.experts, tp_group)
    for p in layer.experts.parameters():
        p.tensor_model_parallel = True
    before = {n: p for n, p in layer.experts.named_parameters()}
    layer.apply_ep(state.ep_group)
    mark_expert_params(layer.experts, deepspeed_group_name(ep))
    layer.stats_group = state.dp_group
    ex = layer.experts
    out = dict(
        step=_step(layer, state, "topk"),
        kind=type(ex).__name__, tp_group_kept=ex.tp_group is tp_group, specs=sorted(ex.tp_shard_specs()),
        shapes={n: tuple(p.shape) for n, p in ex.named_parameters()},
        tp_marks=[getattr(p, "tensor_model_parallel", False) for p in ex.parameters()],
        new_params=all(p is not before[n] for n, p in ex.named_parameters()),
        dispatchers=(isinstance(layer.dispatcher, AllToAllDispatcher), isinstance(layer.dispatcher, TokenDispatcher)),
    )
    try:
        layer.apply_ep(state.ep_group)
    except ValueError as e:
        out["twice"] = str(e)
    odd = MoELayer(MoEConfig(hidden_size=H, ffn_hidden_size=F, num_experts=3, top_k=2))
    try:
        odd.apply_ep(state.ep_group)
    except ConfigError as e:
        out["indivisible"] = str(e)
    out["indivisible_untouched"] = (isinstance(odd.dispatcher, LocalDispatcher), odd.experts.num_experts, odd.ep_group)
    return out


def test_apply_ep_on_tensor_parallel_experts_and_its_refusals():
    ep = world = 2
    results = run_distributed(_apply_ep_worker, world, ep, timeout=60)
    _assert_matches_reference("topk", world, ep, [r["step"] for r in results])
    for r in results:
        assert r["kind"] == "TensorParallelGroupedExperts" and r["tp_group_kept"] and r["specs"] == ["w1_EHF", "w2_EFH"]
        assert r["shapes"] == {"w1_EHF": (E // ep, H, F), "w2_EFH": (E // ep, F, H)}
        assert r["tp_marks"] == [True, True] and r["new_params"]
        assert r["dispatchers"] == (True, True)
        assert "already expert-parallel" in r["twice"]
        assert "`model.moe.num_experts`" in r["indivisible"] and "multiple of 2" in r["indivisible"], r["indivisible"]
        assert r["indivisible_untouched"] == (True, 3, None)


def _deepspeed_worker(rank: int, world: int, ep: int) -> dict:
    """deepspeed.initialize on our groups: its grad reduction must equal ``reduce_gradients``."""
    import deepspeed
    from modalmoe.runtime.deepspeed_groups import deepspeed_moe_marker, register_with_deepspeed

    state = ParallelState.build(Layout(world, ep=ep))
    name = register_with_deepspeed(state)
    kw = CASES["topk"]
    x, modality, mask, target = (_shard(t, state) for t in _batch(seed=1))

    class Net(torch.nn.Module):
        def __init__(self, marker: bool):
            super().__init__()
            self.moe = _ep_layer(kw, state)
            assert self.moe.experts.w1_EHF.group_name == name
            if marker:
                self.ds_moe_marker = deepspeed_moe_marker(E, ep, name)

        def forward(self):
            y, aux = self.moe(x, modality, mask)
            return _task(y, target) + aux.loss

    ours = Net(marker=False)
    ours().backward()
    reduce_gradients(ours.parameters(), state.dp_group, state.edp_group)
    out = {}
    for stage in (0, 2):
        net = Net(marker=True)
        engine, *_ = deepspeed.initialize(
            model=net, model_parameters=list(net.parameters()), mpu=DeepSpeedMPU(state),
            config={"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": DS_LR}},
                    "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True},
        )
        engine.backward(engine())
        engine.step()
        out[stage] = dict(has_moe_layers=engine.has_moe_layers, params={n: _np(p) for n, p in net.named_parameters()})
    out["expected"] = {n: _np(p.detach() - DS_LR * p.grad) for n, p in ours.named_parameters()}
    return out


DS_LR = 10.0  # large, so the update dominates the parameters and is what gets compared


def test_deepspeed_engine_uses_our_groups():
    """4 ranks (dp 4 = ep 2 × edp 2), ZeRO 0 and 2: one SGD step through DeepSpeed equals our
    reduction (dense: DP sum ÷ dp, expert: EDP sum ÷ dp) followed by the same step."""
    pytest.importorskip("deepspeed")
    for rank, res in enumerate(run_distributed(_deepspeed_worker, 4, 2, timeout=150)):
        for stage in (0, 2):
            assert res[stage]["has_moe_layers"], stage
            for n, expected in res["expected"].items():
                _close(res[stage]["params"][n], expected, f"{n} after a DeepSpeed step (ZeRO {stage}, rank {rank})")
