"""Tensor parallelism on 2 gloo ranks against the same computation in one process.

Legend: B batch, S sequence, H hidden, P patches, L text length. Every rank builds the reference
(full) model and the TP model from the same seed and feeds both the same batch, so each rank can
compare its TP result with the full one directly. Comparisons are norm-relative (1e-5, float32).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from modalmoe.models import ModelConfig, MultimodalTransformer, build_model
from modalmoe.models.parallelize import check_tp_divisibility, parallelize_model
from modalmoe.runtime.config import ConfigError
from modalmoe.runtime.moe import MoEConfig
from modalmoe.runtime.moe.experts import MLP
from modalmoe.runtime.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardSpec,
    TensorParallelGroupedExperts,
    copy_to_tp_region,
    gather_from_tp_region,
    gather_full_grads,
    gather_full_state_dict,
    load_full_state_dict,
    reduce_from_tp_region,
    tp_shard_specs,
)
from model_utils import make_batch

torch.set_num_threads(2)

TP = 2
RTOL = 1e-5


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = RTOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    assert err <= tol * max(scale, 1e-30), f"{what}: |diff| {err:.3e} > {tol} x |ref| {scale:.3e}"


def tiny_config(activation: str = "gelu", num_shared_experts: int = 0, contrastive_coef: float = 0.0,
                **overrides) -> ModelConfig:
    moe = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=4, top_k=2, activation=activation,
                    num_shared_experts=num_shared_experts)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48,
                      moe_every=2, image_size=8, patch_size=4, max_text_len=8, activation=activation,
                      contrastive_coef=contrastive_coef, moe=moe)
    return dataclasses.replace(cfg, **overrides).validate()


def build_pair(cfg: ModelConfig, group, expert_tp: bool) -> tuple[MultimodalTransformer, MultimodalTransformer]:
    torch.manual_seed(0)
    full = MultimodalTransformer(cfg).train()
    return full, parallelize_model(copy.deepcopy(full), group, expert_tp=expert_tp)


# ---- sharding specs (no processes) ------------------------------------------------------------


@pytest.mark.parametrize("dim,chunks", [(0, 1), (1, 1), (0, 2), (2, 2)])
def test_shard_spec_round_trip(dim, chunks):
    full = torch.randn(8, 12, 4)
    spec = ShardSpec(dim, chunks)
    shards = [spec.shard(full, r, TP) for r in range(TP)]
    assert shards[0].shape[dim] == full.shape[dim] // TP
    assert torch.equal(spec.unshard(shards), full)
    if chunks == 2:  # each rank holds [gate shard; up shard]
        gate, up = full.chunk(2, dim)
        assert torch.equal(shards[1].chunk(2, dim)[0], gate.chunk(TP, dim)[1])
        assert torch.equal(shards[1].chunk(2, dim)[1], up.chunk(TP, dim)[1])


# ---- divisibility (no processes) --------------------------------------------------------------


def _moe(**kw) -> MoEConfig:
    return MoEConfig(**{"hidden_size": 32, "ffn_hidden_size": 16, "num_experts": 4, "top_k": 2, **kw})


@pytest.mark.parametrize(
    "cfg_kwargs,tp,expert_tp,expected",
    [
        ({}, 3, False, r"tp=3 must divide model\.hidden_size=32"),
        ({"hidden_size": 36, "pos": "learned", "moe": _moe(hidden_size=36)}, 3, False,
         r"tp=3 must divide model\.num_heads=4 .*one of \[1, 2, 4\]"),
        ({"ffn_hidden_size": 30}, 4, False, r"tp=4 must divide model\.ffn_hidden_size=30"),
        ({"moe": _moe(ffn_hidden_size=18)}, 4, True, r"tp=4 must divide model\.moe\.ffn_hidden_size=18"),
        ({"moe": _moe(num_shared_experts=1, shared_ffn_hidden_size=10)}, 4, True,
         r"tp=4 must divide the shared-expert width \(model\.moe\.shared_ffn_hidden_size x num_shared_experts\)=10"),
    ],
)
def test_divisibility_names_parallel_tp_and_the_fix(cfg_kwargs, tp, expert_tp, expected):
    cfg = tiny_config(**cfg_kwargs)
    with pytest.raises(ConfigError, match=r"^config field `parallel\.tp`: " + expected) as e:
        check_tp_divisibility(cfg, tp, expert_tp)
    assert "set parallel.tp to one of" in str(e.value) and "or change" in str(e.value)


def test_divisibility_with_the_world_size_suggests_what_fits_it():
    """The trainer passes the launched world size: tp values must divide it too. The dense FFN width
    is checked even when every layer is MoE (a layout stays valid when layers turn dense)."""
    cfg = tiny_config(moe_every=1, ffn_hidden_size=30)
    with pytest.raises(ConfigError, match=r"tp=4 must divide model\.ffn_hidden_size=30") as e:
        check_tp_divisibility(cfg, 4, expert_tp=False, world_size=8)
    assert str(e.value).endswith("on 8 ranks: use a multiple of 4 for `model.ffn_hidden_size` or tp in [1, 2]")
    check_tp_divisibility(tiny_config(), 2, expert_tp=True, world_size=2)


def test_whole_experts_need_not_divide():
    cfg = tiny_config(moe=_moe(ffn_hidden_size=18, num_shared_experts=1, shared_ffn_hidden_size=10))
    check_tp_divisibility(cfg, 4, expert_tp=False)
    check_tp_divisibility(cfg, 2, expert_tp=True)


# ---- collectives on 2 ranks -------------------------------------------------------------------


def _collectives_worker(rank: int, world: int) -> None:
    group = dist.group.WORLD
    x = torch.arange(6.0).view(2, 3).requires_grad_()

    y = copy_to_tp_region(x, group)  # identity forward, all-reduce backward
    assert torch.equal(y, x)
    y.backward(torch.full_like(y, rank + 1.0))
    assert torch.equal(x.grad, torch.full_like(x, sum(r + 1.0 for r in range(world))))

    x.grad = None
    y = reduce_from_tp_region(x * (rank + 1), group)  # all-reduce forward, identity backward
    assert torch.equal(y, x.detach() * sum(r + 1 for r in range(world)))
    assert torch.equal(x, torch.arange(6.0).view(2, 3)), "the forward all-reduce must not write into its input"
    y.backward(torch.full_like(y, 10.0 * (rank + 1)))
    assert torch.equal(x.grad, torch.full_like(x, 10.0 * (rank + 1) ** 2))

    x_local = (torch.arange(4.0).view(2, 2) + 100 * rank).requires_grad_()  # all-gather on the last dim
    y = gather_from_tp_region(x_local, group)
    assert torch.equal(y, torch.cat([torch.arange(4.0).view(2, 2) + 100 * r for r in range(world)], dim=-1))
    g = torch.arange(2.0 * 2 * world).view(2, 2 * world)
    y.backward(g)
    assert torch.equal(x_local.grad, g[:, 2 * rank : 2 * rank + 2])

    singles = [dist.new_group([r]) for r in range(world)]  # every rank takes part in every new_group
    x1 = torch.randn(3, requires_grad=True)
    for fn in (copy_to_tp_region, reduce_from_tp_region, gather_from_tp_region):
        out = fn(x1, singles[rank])
        assert torch.equal(out, x1)
        out.backward(torch.ones(3))
    assert torch.equal(x1.grad, torch.full((3,), 3.0))


def test_collectives_forward_backward():
    run_distributed(_collectives_worker, TP)


# ---- column → row MLP on 2 ranks --------------------------------------------------------------


def _mlp_worker(rank: int, world: int) -> None:
    group = dist.group.WORLD
    for activation in ("gelu", "swiglu"):
        torch.manual_seed(0)
        full = MLP(16, 24, activation, init_std=0.2)
        tp = copy.deepcopy(full)
        tp.up = ColumnParallelLinear.from_full(full.up, group, chunks=2 if activation == "swiglu" else 1)
        tp.down = RowParallelLinear.from_full(full.down, group)
        assert tp.up.weight.shape[0] == full.up.weight.shape[0] // world
        assert tp.down.weight.shape[1] == full.down.weight.shape[1] // world
        g = torch.Generator().manual_seed(1)
        x_BSH = torch.randn(2, 5, 16, generator=g)
        dy_BSH = torch.randn(2, 5, 16, generator=g)
        x_ref, x_tp = x_BSH.clone().requires_grad_(), x_BSH.clone().requires_grad_()
        y_ref, y_tp = full(x_ref), tp(x_tp)
        assert_rel(y_tp, y_ref, f"{activation} output")
        y_ref.backward(dy_BSH)
        y_tp.backward(dy_BSH)
        assert_rel(x_tp.grad, x_ref.grad, f"{activation} input grad")
        grads = gather_full_grads(tp, group)
        assert set(grads) == {"up.weight", "down.weight"}
        for name, p in full.named_parameters():
            assert_rel(grads[name], p.grad, f"{activation} {name} grad")
        state = gather_full_state_dict(tp, group)
        for name, t in full.state_dict().items():
            assert torch.equal(state[name], t), name

    torch.manual_seed(2)  # a column layer on its own, its output gathered whole; with a bias
    lin = torch.nn.Linear(6, 8)
    col = ColumnParallelLinear.from_full(lin, group, gather_output=True)
    row = RowParallelLinear.from_full(torch.nn.Linear(8, 6), group)
    assert set(tp_shard_specs(col)) == {"weight", "bias"} and set(tp_shard_specs(row)) == {"weight"}
    x = torch.randn(3, 6)
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    (lin(xr) ** 2).sum().backward()
    (col(xt) ** 2).sum().backward()
    assert_rel(xt.grad, xr.grad, "gathered column input grad")
    grads = gather_full_grads(col, group)
    assert_rel(grads["weight"], lin.weight.grad, "gathered column weight grad")
    assert_rel(grads["bias"], lin.bias.grad, "gathered column bias grad")


def test_column_row_mlp_matches_full():
    run_distributed(_mlp_worker, TP)


# ---- the whole model on 2 ranks ---------------------------------------------------------------

CASES = {
    # expert_tp: config kwargs. The expert-TP case also covers SwiGLU halves, shared experts and
    # the text-only contrastive pass.
    False: dict(activation="gelu"),
    True: dict(activation="swiglu", num_shared_experts=1, contrastive_coef=0.5),
}


def _model_worker(rank: int, world: int, expert_tp: bool) -> None:
    group = dist.group.WORLD
    cfg = tiny_config(**CASES[expert_tp])
    full, tp = build_pair(cfg, group, expert_tp)
    attn = tp.layers[0].attn
    assert isinstance(attn.wq, ColumnParallelLinear) and isinstance(attn.wo, RowParallelLinear)
    assert attn.num_heads == cfg.num_heads // world
    assert isinstance(tp.layers[0].ffn.up, ColumnParallelLinear)
    moe = tp.layers[1].ffn
    assert isinstance(moe.experts, TensorParallelGroupedExperts) == expert_tp
    assert type(tp.embed.tokens) is torch.nn.Embedding and type(tp.lm_head) is torch.nn.Linear
    assert tp.lm_head.weight is tp.embed.tokens.weight  # still tied

    batch = make_batch(cfg, seed=1)
    out_ref, out_tp = full(batch), tp(batch)
    assert_rel(out_tp.loss, out_ref.loss, "loss")
    assert_rel(out_tp.aux_loss, out_ref.aux_loss, "aux loss")
    if expert_tp:
        assert_rel(out_tp.contrastive_loss, out_ref.contrastive_loss, "contrastive loss")
    out_ref.loss.backward()
    out_tp.loss.backward()
    grads = gather_full_grads(tp, group)
    ref = dict(full.named_parameters())
    assert set(grads) == set(ref), set(grads) ^ set(ref)
    for name, p in ref.items():
        assert_rel(grads[name], p.grad, f"grad of {name}")

    # full state out of the sharded model, and back into a fresh sharded one
    state = gather_full_state_dict(tp, group)
    assert state.keys() == full.state_dict().keys()
    for name, t in full.state_dict().items():
        assert torch.equal(state[name], t), name
    torch.manual_seed(123)  # different weights, overwritten by the load
    fresh = parallelize_model(MultimodalTransformer(cfg).train(), group, expert_tp=expert_tp)
    load_full_state_dict(fresh, state, group)
    for name, t in tp.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name


@pytest.mark.parametrize("expert_tp", [False, True], ids=["experts_whole", "expert_tp"])
def test_model_loss_and_grads_match_single_process(expert_tp):
    run_distributed(_model_worker, TP, expert_tp)


def _adam_worker(rank: int, world: int) -> list[list[float]]:
    group = dist.group.WORLD
    losses = []
    for expert_tp in (False, True):
        cfg = tiny_config(**CASES[expert_tp])
        full, tp = build_pair(cfg, group, expert_tp)
        opt_ref = torch.optim.Adam(full.parameters(), lr=1e-3)
        opt_tp = torch.optim.Adam(tp.parameters(), lr=1e-3)
        run = []
        for step in range(3):
            batch = make_batch(cfg, seed=10 + step)
            for model, opt in ((full, opt_ref), (tp, opt_tp)):
                opt.zero_grad(set_to_none=True)
                model(batch).loss.backward()
                opt.step()
            with torch.no_grad():  # the loss after this step, on a fixed held-out batch
                held = make_batch(cfg, seed=99)
                l_ref, l_tp = full(held).loss, tp(held).loss
            assert_rel(l_tp, l_ref, f"expert_tp={expert_tp} loss after step {step + 1}")
            run.append(l_tp.item())
        assert run[-1] < run[0], f"expert_tp={expert_tp}: training does not lower the loss {run}"
        losses.append(run)
    return losses


def test_adam_steps_keep_loss_parity():
    per_rank = run_distributed(_adam_worker, TP)
    assert per_rank[0] == per_rank[1], "TP ranks must see bit-identical losses"


def _refuse_worker(rank: int, world: int) -> None:
    group = dist.group.WORLD
    cfg = tiny_config(num_heads=3, hidden_size=24, moe=_moe(hidden_size=24))
    model = MultimodalTransformer(cfg)
    with pytest.raises(ConfigError, match=r"`parallel\.tp`: tp=2 must divide model\.num_heads=3.*one of \[1, 3\]"):
        parallelize_model(model, group)
    assert not tp_shard_specs(model), "a refused model is left untouched"
    with pytest.raises(ConfigError, match=r"`parallel\.tp`: tp=2 must divide model\.moe\.ffn_hidden_size=15"):
        parallelize_model(build_model(tiny_config(moe=_moe(ffn_hidden_size=15))), group, expert_tp=True)
    ok = parallelize_model(build_model(tiny_config(moe=_moe(ffn_hidden_size=15))), group, expert_tp=False)
    with pytest.raises(ValueError, match="already tensor-parallel"):
        parallelize_model(ok, group)


def test_parallelize_refuses_indivisible_sizes():
    run_distributed(_refuse_worker, TP)
