"""benchmarks/bench_peers.py on a tiny layer: every contender that imports here runs fwd+bwd with
outputs of the layer's shape and finite grads, and an absent optional peer is skipped with its
reason printed (the benchmark goes on without it)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# registered in sys.modules before it runs: its dataclasses look their module up there
_spec = importlib.util.spec_from_file_location("bench_peers", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peers.py")
bp = sys.modules["bench_peers"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bp)
S = bp.Shape(T=64, H=32, F=64, E=4, k=2)


@pytest.fixture(autouse=True)
def _own_process_group():
    """DeepSpeed-MoE needs a default process group: the benchmark makes a one-rank one, which this
    test tears down again (with the launcher variables it set) so later tests start without one."""
    import os

    import torch.distributed as dist
    from dist_utils import LAUNCH_ENV, restore_launch_env

    env = {k: os.environ.get(k) for k in LAUNCH_ENV}
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    restore_launch_env(env)


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_every_contender_steps(bf16):
    logs: list[str] = []
    cs = bp.contenders(S, bf16, log=logs.append)
    names = [c.name for c in cs]
    assert names[0].startswith("dense") and names[1].startswith("modalmoe")
    assert sum(n.startswith("DeepSpeed-MoE") for n in names) == 6  # cf 1.0 / 1.25 / dropless × sampling off / on
    if _importable("transformers"):
        assert "HF Qwen3MoeSparseMoeBlock grouped_mm" in names and "HF Qwen3MoeSparseMoeBlock eager" in names
    if _importable("torchtitan.models.common.moe"):
        assert "torchtitan MoE as shipped" in names
        assert ("torchtitan MoE, fp32 experts" in names) != bf16  # at bf16 it is skipped with a reason
    for c in cs:
        y, gx = c.step()
        rows = S.T * S.k if c is cs[0] else S.T
        assert y.shape == (rows, S.H) and gx.shape == (rows, S.H), c.name
        assert torch.isfinite(y.float()).all() and torch.isfinite(gx.float()).all() and gx.abs().sum() > 0, c.name
        grads = [p.grad for p in c.module.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g.float()).all() for g in grads), c.name
    by_name = dict(zip(names, cs))
    assert by_name["modalmoe MoELayer (dropless)"].rows() == f"{S.T * S.k} routed"
    ds = by_name["DeepSpeed-MoE dropless, 2nd-expert sampling off"].rows()
    padded, routed = int(ds.split()[0]), int(ds.split(", ")[1].split()[0])
    assert routed == S.T * S.k and padded >= routed  # dropless: E × the fullest expert's rows
    times = bp.time_rounds(cs[:2], rounds=2, warmup=0)
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())


def test_absent_peer_is_skipped_with_its_reason(capsys):
    def importer(name: str):
        if name.split(".")[0] in ("transformers", "torchtitan"):
            raise ModuleNotFoundError(f"No module named '{name.split('.')[0]}'")
        return importlib.import_module(name)

    cs = bp.contenders(S, False, importer=importer)
    out = capsys.readouterr().out
    assert "skipped HF Qwen3-MoE: `import transformers` failed (ModuleNotFoundError: No module named 'transformers')" in out
    assert "skipped torchtitan MoE: `import torchtitan.models.common.moe` failed" in out
    assert not any(c.name.startswith(("HF", "torchtitan")) for c in cs)
    assert [c.name for c in cs][:2] == ["dense SwiGLU (reference)", "modalmoe MoELayer (dropless)"]
    y, gx = cs[1].step()  # the rest still runs
    assert y.shape == (S.T, S.H) and torch.isfinite(gx).all()
