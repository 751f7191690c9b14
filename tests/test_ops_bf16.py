"""The bf16 CPU fast paths: the fused SwiGLU op, the router's top-k op, and the AVX-512 row loops of
gather_rows / combine_rows, each against its pure-PyTorch reference.

Legend: T tokens, k slots, E experts, H hidden, R rows, F width of each SwiGLU half.
bfloat16 results must equal torch's own bfloat16 ops bit for bit (they round at the same places);
exp may differ from torch's in the last float bit, which the tests' data never exposes.
"""

from __future__ import annotations

import pytest
import torch
from modalmoe import ops
from modalmoe.runtime.moe.experts import MLP, GroupedExperts, activate
from modalmoe.runtime.moe.router import top_k

needs_extension = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="modalmoe._C not built")
SPECIALS = [float("inf"), float("-inf"), float("nan"), -200.0, -90.0, 95.0, 0.0, -0.0]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values, NaN == NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _swiglu_input(shape, dtype, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(*shape, generator=gen) * 4).to(dtype)
    n = min(len(SPECIALS), h.numel())
    h.view(-1)[:n] = torch.tensor(SPECIALS[:n], dtype=dtype)
    return h


@needs_extension
@pytest.mark.parametrize("shape", [(300, 2 * 512), (7, 2 * 37), (3, 5, 2 * 20), (0, 8), (4, 2)])
def test_swiglu_bf16_equals_torch_bitwise(shape) -> None:
    h = _swiglu_input(shape, torch.bfloat16)
    a, b = h.clone().requires_grad_(), h.clone().requires_grad_()
    y, y_ref = ops.swiglu(a), ops.swiglu_reference(b)
    assert _same(y, y_ref)
    g = torch.randn(y.shape).bfloat16()
    y.backward(g)
    y_ref.backward(g)
    assert _same(a.grad, b.grad)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_swiglu_op_other_dtypes_and_gradcheck(dtype) -> None:
    h = _swiglu_input((9, 2 * 19), dtype)[1:]  # the finite rows; non-zero storage offset
    h_ref = h.clone().requires_grad_()
    h = h.clone().requires_grad_()
    y = torch.ops.modalmoe.swiglu(h)
    torch.testing.assert_close(y, ops.swiglu_reference(h_ref))
    g = torch.randn(y.shape, dtype=dtype)
    (gh,) = torch.autograd.grad(y, h, g)
    (gh_ref,) = torch.autograd.grad(ops.swiglu_reference(h_ref), h_ref, g)
    torch.testing.assert_close(gh, gh_ref)
    x = torch.randn(5, 2 * 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.modalmoe.swiglu, (x,))


@needs_extension
def test_swiglu_non_contiguous_and_errors() -> None:
    h = _swiglu_input((64, 2 * 40), torch.bfloat16).t().contiguous().t()  # column-major
    assert not h.is_contiguous()
    assert _same(ops.swiglu(h), ops.swiglu_reference(h))
    with pytest.raises(ValueError, match="even last dim"):
        ops.swiglu(torch.zeros(3, 5))
    with pytest.raises(RuntimeError, match="even last dim"):
        torch.ops.modalmoe.swiglu(torch.zeros(3, 5))
    with pytest.raises(RuntimeError, match="halved"):
        torch.ops.modalmoe.swiglu_backward(torch.zeros(3, 3), torch.zeros(3, 8))


@needs_extension
def test_opcheck_new_ops() -> None:
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.randn(6, 2 * 20, generator=gen).to(dtype)
        torch.library.opcheck(torch.ops.modalmoe.swiglu.default, (h.requires_grad_(),))
        grad = torch.randn(6, 20).to(dtype)
        torch.library.opcheck(torch.ops.modalmoe.swiglu_backward.default, (grad, h.detach()))
    torch.library.opcheck(torch.ops.modalmoe.top_k_rows.default, (torch.rand(10, 7, generator=gen), 3))


def test_activate_and_experts_match_the_plain_swiglu() -> None:
    """activate / MLP / GroupedExperts under bf16 autocast give what silu(gate) * up gives."""
    torch.manual_seed(0)
    h = torch.randn(33, 2 * 24).bfloat16()
    gate, up = h.chunk(2, dim=-1)
    assert _same(activate(h, "swiglu"), torch.nn.functional.silu(gate) * up)
    mlp = MLP(16, 24, "swiglu", 0.5)
    x = torch.randn(40, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
        xb = x.bfloat16()
        hb = torch.nn.functional.linear(xb, mlp.up.weight.bfloat16())
        g_, u_ = hb.chunk(2, dim=-1)
        y_ref = torch.nn.functional.linear(torch.nn.functional.silu(g_) * u_, mlp.down.weight.bfloat16())
    assert _same(y, y_ref)
    experts = GroupedExperts(3, 16, 24, "swiglu", 0.5)
    counts = [10, 0, 30]
    xr = torch.randn(40, 16).bfloat16().requires_grad_()
    yr = experts(xr, counts)
    w1, w2 = experts.w1_EHF.bfloat16(), experts.w2_EFH.bfloat16()
    xs = xr.detach().clone().requires_grad_()
    blocks = [(0, 10), (10, 10), (10, 40)]
    want = torch.cat([ops.swiglu_reference(xs[a:b] @ w1[e]) @ w2[e] for e, (a, b) in enumerate(blocks)])
    torch.testing.assert_close(yr, want, rtol=1.6e-2, atol=1e-2)
    g = torch.randn(40, 16).bfloat16()
    yr.backward(g)
    want.backward(g)
    torch.testing.assert_close(xr.grad, xs.grad, rtol=1.6e-2, atol=1e-2)
    assert experts.w1_EHF.grad.dtype == torch.float32 and experts.w2_EFH.grad.dtype == torch.float32


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_top_k_rows_equals_argmax_passes(dtype) -> None:
    """Ties (lower index first), NaN (ranks first, as argmax), all -inf rows (argmax's index)."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(40):
        T, E = int(torch.randint(1, 40, (), generator=gen)), int(torch.randint(1, 12, (), generator=gen))
        s = torch.randint(0, 4, (T, E), generator=gen).float()
        s[torch.rand(T, E, generator=gen) < 0.2] = float("-inf")
        s[torch.rand(T, E, generator=gen) < 0.05] = float("nan")
        s[0] = float("-inf")
        s = s.to(dtype)
        for k in range(1, min(E, 4) + 1):
            got = ops.top_k_rows(s, k)
            assert got.dtype == torch.int64 and torch.equal(got, ops.top_k_rows_reference(s, k))
            assert torch.equal(top_k(s, k), got)
    s = torch.rand(50, 6, generator=gen)
    assert torch.equal(ops.top_k_rows(s, 6), s.topk(6, dim=-1).indices)  # distinct scores: torch.topk's order
    assert torch.equal(ops.top_k_rows(s[:, :2], 3), ops.top_k_rows_reference(s[:, :2], 3))  # k > E: reference


@needs_extension
@pytest.mark.parametrize("H", [24, 256, 7])
def test_bf16_gather_and_combine_round_like_scalar_bf16(H) -> None:
    """The AVX-512 row loops round exactly as the scalar c10::BFloat16 ones: bf16(w * x), bf16(Σ)."""
    gen = torch.Generator().manual_seed(5)
    T, k, E = 70, 2, 5
    x = torch.randn(T, H, generator=gen).bfloat16()
    idx = torch.rand(T, E, generator=gen).topk(k, dim=1).indices
    idx[3, 1] = -1
    w = torch.rand(T, k, generator=gen)
    rows, plan = ops.permute(x, idx, E, pad_multiple=4)
    got = torch.ops.modalmoe.gather_rows(x, plan.src_slot, plan.row_of, w)
    src = plan.src_slot
    real = src >= 0
    want = torch.zeros_like(got)
    want[real] = (x[src[real] // k].float() * w.reshape(-1)[src[real]].unsqueeze(1)).bfloat16()
    assert _same(got, want)
    y = torch.ops.modalmoe.combine_rows(rows, plan.row_of, plan.src_slot, w)
    acc = torch.zeros(T, H)
    for j in range(k):  # slot order, float32 accumulation, one rounding at the end
        r = plan.row_of[:, j]
        acc += torch.where((r >= 0)[:, None], rows[r.clamp_min(0)].float() * w[:, j : j + 1], 0.0)
    assert _same(y, acc.bfloat16())
