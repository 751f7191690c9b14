"""The parallel layout: rank lists by hand and at 512 ranks (no process group), refusals naming the
field and the fix, and the real groups on 4 gloo ranks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from dist_utils import free_port, run_distributed
from modalmoe.models import ModelConfig
from modalmoe.models.parallelize import check_tp_divisibility
from modalmoe.runtime.config import ConfigError
from modalmoe.runtime.deepspeed_groups import DeepSpeedMPU, register_with_deepspeed
from modalmoe.runtime.parallel_state import GROUP_KINDS, Layout, ParallelState, check_experts_divide
from modalmoe.train.job_config import ParallelConfig


def test_hand_derived_rank_lists():
    g = Layout(8, tp=2, ep=2).groups()
    assert g == {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "dp": [[0, 2, 4, 6], [1, 3, 5, 7]],
        "ep": [[0, 2], [4, 6], [1, 3], [5, 7]],
        "edp": [[0, 4], [2, 6], [1, 5], [3, 7]],
    }
    g = Layout(4, ep=2).groups()
    assert g == {"tp": [[0], [1], [2], [3]], "dp": [[0, 1, 2, 3]], "ep": [[0, 1], [2, 3]], "edp": [[0, 2], [1, 3]]}
    g = Layout(4, ep=4).groups()
    assert g["ep"] == [[0, 1, 2, 3]] and g["edp"] == [[0], [1], [2], [3]]
    g = Layout(4, tp=4).groups()
    assert g["tp"] == [[0, 1, 2, 3]] and g["dp"] == [[0], [1], [2], [3]] and g["ep"] == g["edp"] == g["dp"]


def test_deepspeed_docstring_example():
    """world 16, tp 2, ep 4: the layout in deepspeed.utils.groups' E + M + D example."""
    layout = Layout(16, tp=2, ep=4)
    g = layout.groups()
    assert g["dp"] == [list(range(0, 16, 2)), list(range(1, 16, 2))]
    assert g["ep"] == [[0, 2, 4, 6], [8, 10, 12, 14], [1, 3, 5, 7], [9, 11, 13, 15]]
    assert g["edp"] == [[0, 8], [2, 10], [4, 12], [6, 14], [1, 9], [3, 11], [5, 13], [7, 15]]
    c = layout.coords(11)
    assert (c.tp, c.dp, c.ep, c.edp) == (1, 5, 1, 1) and layout.rank_of(tp=1, ep=1, edp=1) == 11


@pytest.mark.parametrize(
    "world, tp, ep", [(8, 1, 2), (8, 2, 2), (16, 2, 4), (32, 4, 2), (64, 2, 8), (512, 8, 8), (512, 1, 64), (512, 4, 16)]
)
def test_matches_deepspeeds_own_expert_layout(world, tp, ep):
    groups = pytest.importorskip("deepspeed.utils.groups")
    ds_ep, ds_edp = groups._get_expert_parallel_ranks(world, tp, ep)
    g = Layout(world, tp=tp, ep=ep).groups()
    assert g["ep"] == [list(r) for r in ds_ep]
    assert g["edp"] == [list(r) for r in ds_edp]


@pytest.mark.parametrize("world, tp, ep", [(512, 8, 8), (512, 2, 32), (512, 1, 512), (512, 512, 1), (24, 2, 3)])
def test_dry_run_properties(world, tp, ep):
    """No process group: every kind partitions the world, and the groups intersect as they must."""
    layout = Layout(world, tp=tp, ep=ep)
    dp, edp = world // tp, world // tp // ep
    g = layout.groups()
    sizes = dict(tp=tp, dp=dp, ep=ep, edp=edp)
    for kind in GROUP_KINDS:
        assert sorted(r for grp in g[kind] for r in grp) == list(range(world)), kind
        assert all(len(grp) == sizes[kind] for grp in g[kind]), kind
    for rank in range(0, world, max(1, world // 37)):
        mine = layout.group_ranks(rank)
        for kind in GROUP_KINDS:
            assert mine[kind] in g[kind] and rank in mine[kind]
        c = layout.coords(rank)
        assert layout.rank_of(c.tp, c.ep, c.edp) == rank and c.dp == c.edp * ep + c.ep
        assert set(mine["tp"]) & set(mine["dp"]) == {rank}
        assert set(mine["ep"]) & set(mine["edp"]) == {rank}
        assert set(mine["ep"]) | set(mine["edp"]) <= set(mine["dp"])
        assert all(layout.coords(r).tp == c.tp for r in mine["dp"])
    assert "tp 8" in Layout(512, tp=8, ep=8).describe(rank=9)


def test_dp_is_derived_or_checked():
    assert Layout(12, tp=2).dp == 6
    assert Layout(12, tp=2, dp=6, ep=3).edp == 2
    assert Layout.from_config(ParallelConfig(tp=2, ep=2), world_size=8).groups() == Layout(8, tp=2, ep=2).groups()


@pytest.mark.parametrize(
    "kwargs, field, fix",
    [
        (dict(world_size=8, tp=3), "parallel.tp", "use one of [1, 2, 4, 8]"),
        (dict(world_size=8, tp=0), "parallel.tp", "must be >= 1"),
        (dict(world_size=8, tp=16), "parallel.tp", "use one of [1, 2, 4, 8]"),
        (dict(world_size=8, tp=2, dp=3), "parallel.dp", "set dp=4 or dp=-1"),
        (dict(world_size=8, dp=0), "parallel.dp", "must be >= 1 or -1"),
        (dict(world_size=8, tp=2, ep=3), "parallel.ep", "dp=4 (EP groups are carved out of DP); use one of [1, 2, 4]"),
        (dict(world_size=8, ep=16), "parallel.ep", "use one of [1, 2, 4, 8]"),
        (dict(world_size=8, ep=0), "parallel.ep", "must be >= 1"),
    ],
)
def test_invalid_layouts_are_refused_before_any_collective(kwargs, field, fix):
    assert not dist.is_initialized()
    with pytest.raises(ConfigError) as e:
        Layout(**kwargs)
    assert f"`{field}`" in str(e.value) and fix in str(e.value), str(e.value)


def _validate_model(layout: Layout, num_heads: int, hidden_size: int, ffn_hidden_size: int, num_experts: int) -> None:
    """What the trainer checks before any process group: TP splits (model side), then EP splits."""
    cfg = ModelConfig(num_heads=num_heads, hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size)
    check_tp_divisibility(cfg, layout.tp, expert_tp=False, world_size=layout.world_size)
    layout.validate_num_experts(num_experts)


def test_model_shapes_are_checked_against_the_layout():
    layout = Layout(16, tp=4, ep=4)
    _validate_model(layout, num_heads=8, hidden_size=256, ffn_hidden_size=1024, num_experts=8)
    cases = [
        (dict(num_heads=6, hidden_size=256, ffn_hidden_size=1024, num_experts=8), "model.num_heads", "multiple of 4"),
        (dict(num_heads=8, hidden_size=250, ffn_hidden_size=1024, num_experts=8), "model.hidden_size", "tp in [1, 2]"),
        (dict(num_heads=8, hidden_size=256, ffn_hidden_size=1022, num_experts=8), "model.ffn_hidden_size", "multiple of 4"),
        (dict(num_heads=8, hidden_size=256, ffn_hidden_size=1024, num_experts=6), "model.moe.num_experts", "ep in [1, 2]"),
    ]
    for kw, field, fix in cases:
        with pytest.raises(ConfigError) as e:
            _validate_model(layout, **kw)
        assert f"`{field}`" in str(e.value) and fix in str(e.value), str(e.value)


def test_expert_divisibility_is_one_check():
    """The layout's check and the EP dispatcher's (which knows only its group size) say the same."""
    with pytest.raises(ConfigError) as by_layout:
        Layout(8, ep=4).validate_num_experts(6)
    with pytest.raises(ConfigError) as by_group:
        check_experts_divide(6, 4)
    for e in (by_layout, by_group):
        assert str(e.value).startswith("config field `model.moe.num_experts`: num_experts=6 is not divisible by parallel.ep=4")
    assert str(by_layout.value).endswith("ep in [1, 2]") and str(by_group.value).endswith("ep in [1, 2, 3, 6]")
    check_experts_divide(8, 4)
    assert not hasattr(Layout, "validate_model") and not hasattr(ParallelState, "mpu")


def _groups_worker(rank: int, world: int) -> dict:
    out = {}
    for tp, ep in ((1, 2), (2, 2), (1, 4)):
        layout = Layout(world, tp=tp, ep=ep)
        state = ParallelState.build(layout)
        got = {}
        for kind in GROUP_KINDS:
            t = torch.tensor([float(rank), 1.0])
            dist.all_reduce(t, group=state.group(kind))
            got[kind] = (t.tolist(), state.ranks[kind], state.rank_in(kind), dist.get_rank(state.group(kind)))
        mpu = DeepSpeedMPU(state)
        got["mpu"] = (
            mpu.get_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank(),
            mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank(), mpu.get_data_parallel_group_ranks(),
            mpu.get_tensor_model_parallel_src_rank(), mpu.get_pipeline_model_parallel_world_size(),
            hasattr(mpu, "initialize_sequence_parallel"),
        )
        out[(tp, ep)] = got
    # a world-size mismatch is refused before any new_group
    try:
        ParallelState.build(Layout(8, ep=2))
    except ConfigError as e:
        out["mismatch"] = str(e)
    # DeepSpeed's group registry now answers with our groups
    from deepspeed.utils import groups

    state = ParallelState.build(Layout(world, ep=2))
    name = register_with_deepspeed(state)
    out["deepspeed"] = (
        name,
        groups._get_expert_parallel_group(name) is state.ep_group,
        groups._get_expert_data_parallel_group(name) is state.edp_group,
        groups._get_data_parallel_group() is state.dp_group,
        groups._get_expert_parallel_world_size(name), groups._get_expert_data_parallel_world_size(name),
        groups._get_expert_parallel_rank(name), list(groups._get_expert_data_parallel_group_ranks(name)),
        groups._get_max_expert_size_name(),
    )
    return out


def test_real_groups_on_four_gloo_ranks():
    results = run_distributed(_groups_worker, 4, timeout=90)
    for rank, res in enumerate(results):
        for (tp, ep), got in ((k, v) for k, v in res.items() if isinstance(k, tuple)):
            expected = Layout(4, tp=tp, ep=ep).group_ranks(rank)
            for kind in GROUP_KINDS:
                (total, count), ranks, idx, dist_idx = got[kind]
                assert ranks == expected[kind] and total == sum(ranks) and count == len(ranks), (tp, ep, kind, rank)
                assert idx == dist_idx == ranks.index(rank)
            c = Layout(4, tp=tp, ep=ep).coords(rank)
            assert got["mpu"] == (tp, c.tp, 4 // tp, c.dp, expected["dp"], expected["tp"][0], 1, False)
        assert "`parallel`" in res["mismatch"] and "4 were launched" in res["mismatch"]
        ep_ranks = Layout(4, ep=2).group_ranks(rank)
        assert res["deepspeed"] == ("ep_size_2", True, True, True, 2, 2, ep_ranks["ep"].index(rank), ep_ranks["edp"], "ep_size_2")


_INIT_FROM_ENV = """
import torch, torch.distributed as dist
from modalmoe.runtime.distributed import init_from_env
rank, world = init_from_env()
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
print(rank, world, dist.get_backend(), int(t))
dist.destroy_process_group()
"""


def test_init_from_env_in_launched_processes():
    """Two processes started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_* in the env)."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _INIT_FROM_ENV],
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert [o[0].split() for o in outs] == [["0", "2", "gloo", "3"], ["1", "2", "gloo", "3"]]


def _polled_worker(rank: int, world: int) -> dict:
    from modalmoe.runtime.distributed import polled, set_busy_wait

    out = {}
    for busy in (True, False):
        set_busy_wait(busy)
        x = torch.full((3,), float(rank + 1))
        polled(dist.all_reduce, x, group=None)
        rows = torch.arange(4, dtype=torch.float32) + 10 * rank
        got = torch.empty(4)
        polled(dist.all_to_all_single, got, rows, group=None)
        out[busy] = (x.tolist(), got.tolist())
    set_busy_wait(True)
    return out


def test_polled_collectives_match_blocking_ones():
    """Polling for a gloo collective (parallel.busy_wait) returns what the blocking call returns."""
    results = run_distributed(_polled_worker, 2, timeout=60)
    for rank, r in enumerate(results):
        assert r[True] == r[False]
        assert r[True][0] == [3.0, 3.0, 3.0]
        assert r[True][1] == [2.0 * rank, 2.0 * rank + 1, 10.0 + 2 * rank, 11.0 + 2 * rank]
