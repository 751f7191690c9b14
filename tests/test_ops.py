"""Tests for modalmoe.ops: the compiled permute / unpermute / grouped_mm against their references.

Legend: T tokens, k slots per token, S = T*k, E experts, H hidden, R permuted rows, K/N mm features.

Set MODALMOE_REQUIRE_EXTENSION=1 (CI does) to turn a missing modalmoe._C into a failure instead of
a run against the pure-PyTorch fallback.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from modalmoe import ops
from modalmoe.ops import PermutePlan
from ops_utils import DEVICES, REQUIRE_EXTENSION, needs_extension, random_topk

PLAN_FIELDS = ("counts", "padded_counts", "offsets", "row_of", "src_slot", "dropped")



def assert_plans_equal(got: PermutePlan, want: PermutePlan) -> None:
    for name in PLAN_FIELDS:
        g, w = getattr(got, name).cpu(), getattr(want, name).cpu()
        assert g.dtype == w.dtype and torch.equal(g, w), f"plan.{name} differs:\n{g}\nvs\n{w}"
    assert (got.num_tokens, got.top_k) == (want.num_tokens, want.top_k)


def check_plan_invariants(plan: PermutePlan, idx_Tk: torch.Tensor, capacity: int | None, pad: int) -> None:
    """Ascending experts, slot order within an expert, first-come capacity, padding at block ends."""
    idx_S, row_of_S = idx_Tk.reshape(-1).long().cpu(), plan.row_of.reshape(-1).cpu()
    src_R, offsets = plan.src_slot.cpu(), plan.offsets.cpu()
    counts, padded = plan.counts.cpu(), plan.padded_counts.cpu()
    assert offsets[0] == 0 and torch.equal(offsets[1:] - offsets[:-1], padded)
    assert torch.equal(padded % pad, torch.zeros_like(padded)) and bool((padded - counts < pad).all())
    for e in range(plan.num_experts):
        block = src_R[offsets[e] : offsets[e + 1]]
        real, pad_rows = block[: counts[e]], block[counts[e] :]
        assert bool((pad_rows == -1).all()) and bool((real >= 0).all())
        assert bool((real[1:] > real[:-1]).all()), "rows of an expert must follow slot order"
        assert bool((idx_S[real] == e).all())
        routed_e = (idx_S == e).nonzero().squeeze(1)
        n_keep = routed_e.numel() if capacity is None else min(capacity, routed_e.numel())
        assert torch.equal(real, routed_e[:n_keep]), "capacity must keep the first slots in token order"
    kept_S = row_of_S >= 0
    assert torch.equal(src_R[row_of_S[kept_S]], kept_S.nonzero().squeeze(1))
    assert torch.equal(plan.dropped.reshape(-1).cpu(), (idx_S >= 0) & ~kept_S)


def test_extension_is_built() -> None:
    if not REQUIRE_EXTENSION and not ops.HAS_EXTENSION:
        pytest.skip("modalmoe._C not built; MODALMOE_REQUIRE_EXTENSION is not set")
    assert ops.HAS_EXTENSION, "MODALMOE_REQUIRE_EXTENSION=1 but modalmoe._C failed to import"


# (T, k, E, pad_multiple, capacity, unrouted fraction, experts_used)
PLAN_CASES = [
    (0, 2, 4, 1, None, 0.0, None),
    (0, 1, 3, 4, 2, 0.0, None),
    (1, 1, 1, 1, None, 0.0, None),
    (7, 1, 5, 1, None, 0.0, None),
    (33, 2, 8, 1, None, 0.3, None),
    (40, 3, 16, 4, None, 0.0, 5),
    (64, 2, 4, 1, 10, 0.0, None),
    (64, 2, 4, 8, 0, 0.1, None),
    (100, 4, 6, 3, 25, 0.2, 3),
    (50, 2, 8, 1, None, 1.0, None),
    (300, 2, 1024, 2, 1, 0.05, None),
    (20000, 2, 64, 16, 500, 0.05, 48),
]


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: "T{}k{}E{}p{}c{}u{}".format(*c[:6]))
def test_plan_matches_argsort_reference(case, idx_dtype, device) -> None:
    T, k, E, pad, cap, unrouted, used = case
    gen = torch.Generator().manual_seed(T * 31 + E)
    idx_Tk = random_topk(T, k, E, gen=gen, unrouted=unrouted, experts_used=used, dtype=idx_dtype).to(device)
    x_TH = torch.randn(T, 8, generator=gen).to(device)
    x_perm, plan = ops.permute(x_TH, idx_Tk, E, pad_multiple=pad, capacity=cap)
    ref_perm, ref_plan = ops.permute_reference(x_TH, idx_Tk, E, pad_multiple=pad, capacity=cap)
    assert_plans_equal(plan, ref_plan)
    check_plan_invariants(plan, idx_Tk, cap, pad)
    assert torch.equal(x_perm, ref_perm)


@needs_extension
@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_plan_is_stable_across_thread_chunks(threads) -> None:
    """The CPU histogram is per thread chunk; the scatter must stay stable whatever the split."""
    gen = torch.Generator().manual_seed(threads)
    idx_Tk = random_topk(30011, 2, 24, gen=gen, unrouted=0.05, distinct=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plan = ops.permute(torch.zeros(30011, 1), idx_Tk, 24, capacity=2000, pad_multiple=8)[1]
    finally:
        torch.set_num_threads(previous)
    assert_plans_equal(plan, ops.plan_reference(idx_Tk, 24, capacity=2000, pad_multiple=8))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(12))
def test_random_properties(seed, device) -> None:
    """Random shapes and routings, duplicate experts per token included: plan, values and grads."""
    gen = torch.Generator().manual_seed(1000 + seed)
    T = int(torch.randint(0, 200, (1,), generator=gen))
    k = int(torch.randint(1, 5, (1,), generator=gen))
    E = int(torch.randint(1, 40, (1,), generator=gen))
    H = int(torch.randint(1, 40, (1,), generator=gen))
    pad = int(torch.randint(1, 5, (1,), generator=gen))
    cap = None if seed % 3 == 0 else int(torch.randint(0, max(1, 2 * T * k // E), (1,), generator=gen))
    idx_Tk = random_topk(T, k, E, gen=gen, unrouted=0.2 * (seed % 2), distinct=seed % 4 != 1,
                         experts_used=max(1, E - seed % 5)).to(device)
    x_TH = torch.randn(T, H, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w_Tk = torch.rand(T, k, generator=gen, dtype=torch.float64).to(device).requires_grad_()

    x_perm, plan = ops.permute(x_TH, idx_Tk, E, pad_multiple=pad, capacity=cap)
    ref_perm, ref_plan = ops.permute_reference(x_TH, idx_Tk, E, pad_multiple=pad, capacity=cap)
    assert_plans_equal(plan, ref_plan)
    check_plan_invariants(plan, idx_Tk, cap, pad)
    torch.testing.assert_close(x_perm, ref_perm, rtol=0, atol=0)

    y_perm = torch.randn(plan.num_rows, H, generator=gen, dtype=torch.float64).to(device)
    out = ops.unpermute(x_perm * y_perm, plan, w_Tk)
    ref = ops.unpermute_reference(ref_perm * y_perm, ref_plan, w_Tk)
    torch.testing.assert_close(out, ref)
    g_TH = torch.randn(T, H, generator=gen, dtype=torch.float64).to(device)
    grads = torch.autograd.grad(out, (x_TH, w_Tk), g_TH, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, (x_TH, w_Tk), g_TH, allow_unused=True)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_values_and_grads_match_reference(dtype, device) -> None:
    """Non-contiguous inputs, -1 slots, drops and padding; float32 router weights with bf16 rows."""
    gen = torch.Generator().manual_seed(7)
    T, k, E, H = 96, 2, 6, 24
    x_TH = torch.randn(H, T, generator=gen).to(device=device, dtype=dtype).t().requires_grad_()
    idx_Tk = random_topk(T, k, E, gen=gen, unrouted=0.1).t().contiguous().t().to(device)
    w_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    w_Tk = torch.rand(k, T, generator=gen).to(device=device, dtype=w_dtype).t().requires_grad_()
    assert not x_TH.is_contiguous() and not idx_Tk.is_contiguous() and not w_Tk.is_contiguous()

    def forward(fn_permute, fn_unpermute):
        x_perm, plan = fn_permute(x_TH, idx_Tk, E, pad_multiple=4, capacity=28)
        y_wide = (x_perm.float().tanh().to(dtype) * 2).repeat(1, 2)
        y_TH = fn_unpermute(y_wide[:, ::2], plan, w_Tk)  # non-contiguous y_perm
        return x_perm, y_TH

    x_perm, y_TH = forward(ops.permute, ops.unpermute)
    ref_perm, ref_y = forward(ops.permute_reference, ops.unpermute_reference)
    assert x_perm.dtype == dtype and y_TH.dtype == dtype
    torch.testing.assert_close(x_perm, ref_perm, rtol=0, atol=0)
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(y_TH, ref_y, **tol)
    g_TH = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
    gx, gw = torch.autograd.grad(y_TH, (x_TH, w_Tk), g_TH)
    rgx, rgw = torch.autograd.grad(ref_y, (x_TH, w_Tk), g_TH)
    assert gx.dtype == dtype and gw.dtype == w_dtype
    torch.testing.assert_close(gx, rgx, **tol)
    torch.testing.assert_close(gw, rgw, **({"rtol": 2e-2, "atol": 5e-2} if dtype == torch.bfloat16 else {}))


@pytest.fixture
def streaming_min_bytes():
    """Set the CPU kernels' non-temporal-store threshold for one test (default: the LLC size)."""
    from modalmoe import _C

    yield _C.set_streaming_min_bytes
    _C.set_streaming_min_bytes(-1)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
@pytest.mark.parametrize("pad, cap", [(1, None), (16, None), (4, 300)])
def test_store_paths(stream, pad, cap, dtype, device, streaming_min_bytes) -> None:
    """Both CPU store paths: non-temporal (the plan's scatter pass copies the rows) and plain (a
    gather after the plan), with padding rows and capacity drops."""
    streaming_min_bytes(0 if stream else 1 << 62)
    gen = torch.Generator().manual_seed(9)
    T, k, E, H = 2048, 2, 8, 64 if dtype == torch.bfloat16 else 32
    idx_Tk = random_topk(T, k, E, gen=gen, unrouted=0.01).to(device)
    x_TH = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
    w_Tk = torch.rand(T, k, generator=gen).to(device)
    x_perm, plan = ops.permute(x_TH, idx_Tk, E, pad_multiple=pad, capacity=cap)
    ref_perm, ref_plan = ops.permute_reference(x_TH, idx_Tk, E, pad_multiple=pad, capacity=cap)
    assert torch.equal(x_perm, ref_perm) and torch.equal(plan.src_slot, ref_plan.src_slot)
    assert torch.equal(plan.row_of, ref_plan.row_of) and torch.equal(plan.dropped, ref_plan.dropped)
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(ops.unpermute(x_perm, plan, w_Tk), ops.unpermute_reference(ref_perm, ref_plan, w_Tk), **tol)
    torch.testing.assert_close(ops.unpermute(x_perm, plan), ops.unpermute_reference(ref_perm, ref_plan), **tol)
    rows = torch.ops.modalmoe.gather_rows(x_TH, plan.src_slot, plan.row_of, None)
    assert torch.equal(rows, ref_perm)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pad, cap, unrouted", [(1, None, 0.0), (3, 4, 0.25), (2, None, 0.5)])
def test_gradcheck_float64(pad, cap, unrouted, device) -> None:
    gen = torch.Generator().manual_seed(3)
    T, k, E, H = 12, 2, 4, 5
    idx_Tk = random_topk(T, k, E, gen=gen, unrouted=unrouted, distinct=False).to(device)
    x_TH = torch.randn(T, H, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w_Tk = torch.rand(T, k, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    _, plan = ops.permute(x_TH, idx_Tk, E, pad_multiple=pad, capacity=cap)
    y_perm = torch.randn(plan.num_rows, H, generator=gen, dtype=torch.float64).to(device).requires_grad_()

    def permute_x(x):
        return ops.permute(x, idx_Tk, E, pad_multiple=pad, capacity=cap)[0]

    assert torch.autograd.gradcheck(permute_x, (x_TH,))
    assert torch.autograd.gradcheck(lambda y, w: ops.unpermute(y, plan, w), (y_perm, w_Tk))
    assert torch.autograd.gradcheck(lambda y: ops.unpermute(y, plan), (y_perm,))
    assert torch.autograd.gradcheck(lambda x, w: ops.unpermute(permute_x(x) * 1.5, plan, w), (x_TH, w_Tk))
    assert torch.autograd.gradgradcheck(lambda y: ops.unpermute(y, plan, w_Tk.detach()), (y_perm,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pad, cap", [(1, None), (3, 2)])
def test_build_plan_and_gather_rows_are_permute_in_two_halves(pad, cap, device) -> None:
    gen = torch.Generator().manual_seed(11)
    T, k, E, H = 14, 2, 5, 6
    idx_Tk = random_topk(T, k, E, gen=gen, unrouted=0.2, distinct=False).to(device)
    x_TH = torch.randn(T, H, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w_Tk = torch.rand(T, k, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    x_perm, plan = ops.permute(x_TH, idx_Tk, E, pad_multiple=pad, capacity=cap)
    built = ops.build_plan(idx_Tk, E, pad_multiple=pad, capacity=cap)
    assert_plans_equal(built, plan)
    assert_plans_equal(built, ops.plan_reference(idx_Tk.cpu(), E, pad_multiple=pad, capacity=cap))
    args = (x_TH, built.src_slot, built.row_of)
    assert torch.equal(ops.gather_rows(*args), x_perm) and torch.equal(ops.gather_rows_reference(*args), x_perm)
    torch.testing.assert_close(ops.gather_rows(*args, w_Tk), ops.gather_rows_reference(*args, w_Tk))
    for fn in (ops.gather_rows, ops.gather_rows_reference):
        assert torch.autograd.gradcheck(lambda x, w, fn=fn: fn(x, built.src_slot, built.row_of, w), (x_TH, w_Tk))
    with pytest.raises(ValueError, match="gather_rows expects"):
        ops.gather_rows(x_TH[:-1], built.src_slot, built.row_of)


def test_gather_rows_reorders_a_permutation_with_a_gather_backward() -> None:
    """k = 1 and a permutation with its inverse (the EP dispatcher's regrouping of received rows)."""
    gen = torch.Generator().manual_seed(12)
    x_NH = torch.randn(7, 3, generator=gen, requires_grad=True)
    take_N = torch.randperm(7, generator=gen)
    put_N = torch.empty_like(take_N)
    put_N[take_N] = torch.arange(7)
    y = ops.gather_rows(x_NH, take_N, put_N.view(-1, 1))
    assert torch.equal(y, x_NH[take_N])
    g = torch.randn(7, 3, generator=gen)
    (grad,) = torch.autograd.grad(y, x_NH, g)
    assert torch.equal(grad, g[put_N])


@pytest.mark.parametrize("device", DEVICES)
def test_edge_cases(device) -> None:
    E = 5
    x_0H = torch.randn(0, 8, device=device, requires_grad=True)
    x_perm, plan = ops.permute(x_0H, torch.empty(0, 2, dtype=torch.int64, device=device), E)
    assert x_perm.shape == (0, 8) and plan.offsets.tolist() == [0] * (E + 1)
    y_0H = ops.unpermute(x_perm, plan, torch.empty(0, 2, device=device))
    assert y_0H.shape == (0, 8)
    y_0H.sum().backward()
    assert x_0H.grad.shape == (0, 8)

    x_TH = torch.randn(3, 4, device=device)
    x_perm, plan = ops.permute(x_TH, torch.full((3, 2), -1, device=device), E, pad_multiple=4)
    assert plan.num_rows == 0 and not plan.dropped.any()
    assert torch.equal(ops.unpermute(x_perm, plan), torch.zeros_like(x_TH))

    x_perm, plan = ops.permute(x_TH, torch.tensor([[0], [0], [0]], device=device), E, capacity=1, pad_multiple=2)
    assert plan.counts.tolist() == [1, 0, 0, 0, 0] and plan.padded_counts.tolist() == [2, 0, 0, 0, 0]
    assert plan.dropped.view(-1).tolist() == [False, True, True]
    assert torch.equal(x_perm, torch.stack([x_TH[0], torch.zeros_like(x_TH[0])]))
    y_TH = ops.unpermute(x_perm, plan)
    assert torch.equal(y_TH, torch.stack([x_TH[0], torch.zeros_like(x_TH[0]), torch.zeros_like(x_TH[0])]))

    for bad in (E, -2):
        with pytest.raises((RuntimeError, ValueError)):
            ops.permute(x_TH, torch.tensor([[0], [bad], [1]], device=device), E)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device) -> None:
    gen = torch.Generator().manual_seed(11)
    idx_Tk = random_topk(4096, 4, 32, gen=gen, distinct=False).to(device)
    x_TH = torch.randn(4096, 64, generator=gen).to(device).requires_grad_()
    w_Tk = torch.rand(4096, 4, generator=gen).to(device)

    def run():
        x_perm, plan = ops.permute(x_TH, idx_Tk, 32, capacity=400)
        y = ops.unpermute(x_perm * 0.5, plan, w_Tk)
        (gx,) = torch.autograd.grad(y, x_TH, torch.ones_like(y))
        return plan.src_slot, y, gx

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@needs_extension
def test_torch_compile_fullgraph() -> None:
    """The fake kernels (data-dependent R included) let torch.compile trace permute/unpermute whole."""

    def moe_mix(x_TH, idx_Tk, w_Tk):
        x_perm, plan = ops.permute(x_TH, idx_Tk, 8, pad_multiple=4, capacity=12)
        return ops.unpermute(x_perm.sin(), plan, w_Tk)

    gen = torch.Generator().manual_seed(8)
    x_TH = torch.randn(64, 16, generator=gen, requires_grad=True)
    idx_Tk = random_topk(64, 2, 8, gen=gen, unrouted=0.1)
    w_Tk = torch.rand(64, 2, generator=gen, requires_grad=True)
    out = torch.compile(moe_mix, fullgraph=True)(x_TH, idx_Tk, w_Tk)
    ref = moe_mix(x_TH, idx_Tk, w_Tk)
    torch.testing.assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out.sum(), (x_TH, w_Tk)), torch.autograd.grad(ref.sum(), (x_TH, w_Tk))):
        torch.testing.assert_close(got, want)


def _opcheck_samples(device: str) -> list[tuple[str, tuple]]:
    gen = torch.Generator().manual_seed(5)
    T, k, E, H = 10, 2, 4, 6
    idx_Tk = random_topk(T, k, E, gen=gen, unrouted=0.2, distinct=False).to(device)
    _, _, offsets, row_of, src_slot, _ = torch.ops.modalmoe.build_plan(idx_Tk, E, 2, 3)
    R = src_slot.shape[0]

    def leaf(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device).requires_grad_()

    offs = offsets.tolist()
    return [
        ("build_plan", (idx_Tk, E, 1, -1)),
        ("build_plan", (idx_Tk.int(), E, 4, 2)),
        ("permute_rows", (leaf(T, H), idx_Tk, E, 1, -1)),
        ("permute_rows", (leaf(T, H, dtype=torch.float64), idx_Tk.int(), E, 2, 3)),
        ("permute_rows", (leaf(T, H, dtype=torch.bfloat16), idx_Tk, E, 4, 2)),
        ("gather_rows", (leaf(T, H), src_slot, row_of, None)),
        ("gather_rows", (leaf(T, H), src_slot, row_of, leaf(T, k))),
        ("gather_rows", (leaf(T, H, dtype=torch.bfloat16), src_slot, row_of, leaf(T, k))),
        ("combine_rows", (leaf(R, H), row_of, src_slot, None)),
        ("combine_rows", (leaf(R, H, dtype=torch.float64), row_of, src_slot, leaf(T, k, dtype=torch.float64))),
        ("combine_rows", (leaf(R, H, dtype=torch.bfloat16), row_of, src_slot, leaf(T, k))),
        ("slot_dot", (leaf(T, H).detach(), leaf(R, H).detach(), row_of, torch.float64)),
        ("grouped_mm", (leaf(R, H), leaf(E, H, 3), offs)),
        ("grouped_mm_weight_grad", (leaf(R, H).detach(), leaf(R, 3).detach(), offs)),
    ]


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_registered_ops(device) -> None:
    for name, args in _opcheck_samples(device):
        torch.library.opcheck(getattr(torch.ops.modalmoe, name).default, args)


def test_fallback_warns_and_matches(tmp_path) -> None:
    """With the extension disabled, modalmoe.ops warns once and still computes the right answer."""
    script = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from modalmoe import ops\n"
        "assert not ops.HAS_EXTENSION\n"
        "assert any('falling back' in str(w.message) for w in caught), caught\n"
        "x = torch.randn(9, 4); idx = torch.tensor([[0, 2]] * 4 + [[1, -1]] * 5)\n"
        "x_perm, plan = ops.permute(x, idx, 3, pad_multiple=2)\n"
        "assert plan.counts.tolist() == [4, 5, 4] and plan.num_rows == 14\n"
        "y = ops.unpermute(x_perm, plan, torch.ones(9, 2))\n"
        "torch.testing.assert_close(y, x * torch.tensor([2.0] * 4 + [1.0] * 5)[:, None])\n"
        "assert ops.grouped_mm(x, torch.randn(2, 4, 3), [4, 5]).shape == (9, 3)\n"
    )
    env = {**os.environ, "MODALMOE_DISABLE_EXTENSION": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "falling back" in result.stderr  # the logger.warning reaches stderr via logging's last resort


def test_public_surface() -> None:
    assert set(ops.__all__) >= {"permute", "unpermute", "grouped_mm", "PermutePlan", "HAS_EXTENSION", "build_plan",
                                "gather_rows", "gather_rows_reference"}
    assert all(hasattr(ops, name) for name in ops.__all__)
    assert isinstance(ops.HAS_EXTENSION, bool)
