"""The backward of the weighted unpermute: ``modalmoe::combine_rows_backward`` (both gradients in one
pass on CPU) against the two ops it replaces (gather_rows with weights, slot_dot) and the reference.

Legend: T tokens, k slots per token, S = T*k, E experts, H hidden, R permuted rows.
Tolerances: grad_y is w[s] * grad[t] rounded once, as gather_rows rounds it, so it must match
bitwise; grad_w is a dot over H summed in float32 (float64 for float64 rows) in another order than
slot_dot's and the reference's, so it gets rtol 1e-5 / atol 1e-4 (float64: 1e-12).
"""

from __future__ import annotations

import pytest
import torch
from modalmoe import ops
from modalmoe.ops.reference import combine_rows_backward_reference
from ops_utils import DEVICES, REQUIRE_EXTENSION, random_topk
from torch.utils._python_dispatch import TorchDispatchMode

HAS_FUSED = ops.HAS_EXTENSION and hasattr(torch.ops.modalmoe, "combine_rows_backward")
needs_fused = pytest.mark.skipif(
    not HAS_FUSED and not REQUIRE_EXTENSION, reason="modalmoe._C without combine_rows_backward, not required"
)
mm = torch.ops.modalmoe

# (T, k, E, H, pad_multiple, capacity, unrouted fraction): tails of the 16-lane loops, padding rows, drops
CASES = [
    (256, 2, 16, 256, 1, None, 0.0),
    (300, 2, 8, 40, 4, None, 0.1),
    (300, 2, 8, 37, 2, 60, 0.1),
    (97, 3, 5, 17, 3, 40, 0.2),
]


def _dot_tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}


def _problem(T, k, E, H, pad, cap, unrouted, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx_Tk = random_topk(T, k, E, gen=gen, unrouted=unrouted).to(device)
    x_TH = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
    _, plan = ops.permute(x_TH, idx_Tk, E, pad_multiple=pad, capacity=cap)
    y_RH = torch.randn(plan.num_rows, H, generator=gen).to(device=device, dtype=dtype)
    g_TH = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w_Tk = torch.rand(T, k, generator=gen).to(device=device, dtype=w_dtype)
    return plan, y_RH, g_TH, w_Tk


class _OpLog(TorchDispatchMode):
    """Names of the modalmoe ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "modalmoe":
            self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.fixture
def streaming_min_bytes():
    from modalmoe import _C

    yield _C.set_streaming_min_bytes
    _C.set_streaming_min_bytes(-1)


@needs_fused
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_fused_matches_two_ops_and_reference(case, dtype, stream, streaming_min_bytes) -> None:
    streaming_min_bytes(0 if stream else 1 << 62)
    plan, y_RH, g_TH, w_Tk = _problem(*case, dtype)
    grad_y, grad_w = mm.combine_rows_backward(g_TH, y_RH, plan.row_of, plan.src_slot, w_Tk)
    assert grad_y.dtype == dtype and grad_w.dtype == w_Tk.dtype
    assert grad_y.shape == y_RH.shape and grad_w.shape == w_Tk.shape
    two_y = mm.gather_rows(g_TH, plan.src_slot, plan.row_of, w_Tk)
    two_w = mm.slot_dot(g_TH, y_RH, plan.row_of, w_Tk.dtype)
    ref_y, ref_w = combine_rows_backward_reference(g_TH, y_RH, plan.row_of, plan.src_slot, w_Tk)
    assert torch.equal(grad_y, two_y) and torch.equal(grad_y, ref_y)
    torch.testing.assert_close(grad_w, two_w, **_dot_tol(dtype))
    torch.testing.assert_close(grad_w, ref_w, **_dot_tol(dtype))
    padding_R, unkept_Tk = plan.src_slot < 0, plan.row_of < 0
    assert bool((grad_y[padding_R] == 0).all()) and bool((grad_w[unkept_Tk] == 0).all())
    _, _, pad, cap, unrouted = case[2:]
    assert (pad == 1) or bool(padding_R.any())
    assert (cap is None) or bool(plan.dropped.any())


@needs_fused
def test_noncontiguous_inputs_and_maps_that_are_not_inverse() -> None:
    """Strided grad / y / weights, and a src_slot row whose slot's row_of points elsewhere: the op still
    computes gather_rows' and slot_dot's definitions."""
    plan, y_RH, g_TH, w_Tk = _problem(200, 2, 8, 48, 2, None, 0.1, torch.float32, seed=3)
    g_wide = g_TH.repeat_interleave(2, dim=1)[:, ::2]
    y_wide = y_RH.repeat_interleave(2, dim=1)[:, ::2]
    assert torch.equal(g_wide, g_TH) and torch.equal(y_wide, y_RH)
    w_t = w_Tk.t().contiguous().t()
    assert not g_wide.is_contiguous() and not y_wide.is_contiguous() and not w_t.is_contiguous()
    src_slot = plan.src_slot.clone()
    pad_rows = (src_slot < 0).nonzero().squeeze(1)
    kept = (plan.row_of.reshape(-1) >= 0).nonzero().squeeze(1)
    src_slot[pad_rows[0]] = kept[0]  # a padding row that also reads slot kept[0]
    got = mm.combine_rows_backward(g_wide, y_wide, plan.row_of, src_slot, w_t)
    ref = combine_rows_backward_reference(g_TH, y_RH, plan.row_of, src_slot, w_Tk)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[0], mm.gather_rows(g_TH, src_slot, plan.row_of, w_Tk))
    torch.testing.assert_close(got[1], ref[1], **_dot_tol(torch.float32))


@needs_fused
@pytest.mark.parametrize("bad, message", [
    ("row_of", r"combine_rows_backward: row_of entries must be -1 or in \[0, R\)"),
    ("row_of_negative", r"combine_rows_backward: row_of entries must be -1 or in \[0, R\)"),
    ("src_slot", r"combine_rows_backward: src_slot entries must be -1 or in \[0, T\*k\)"),
])
def test_bad_index_error(bad, message) -> None:
    plan, y_RH, g_TH, w_Tk = _problem(64, 2, 4, 16, 1, None, 0.0, torch.float32)
    row_of, src_slot = plan.row_of.clone(), plan.src_slot.clone()
    if bad == "row_of":
        row_of[5, 1] = plan.num_rows
    elif bad == "row_of_negative":
        row_of[5, 1] = -2
    else:
        src_slot[3] = row_of.numel()
    with pytest.raises(RuntimeError, match=message):
        mm.combine_rows_backward(g_TH, y_RH, row_of, src_slot, w_Tk)


@needs_fused
def test_opcheck() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        plan, y_RH, g_TH, w_Tk = _problem(30, 2, 4, 20, 2, 9, 0.2, dtype, seed=5)
        torch.library.opcheck(mm.combine_rows_backward.default, (g_TH, y_RH, plan.row_of, plan.src_slot, w_Tk))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[1:3])
def test_unpermute_grads_match_reference(case, dtype, device) -> None:
    """ops.unpermute's values and both gradients against unpermute_reference's autograd; on CPU the
    backward is the fused op alone, and with one input requiring grad the single op that computes it."""
    plan, y_RH, g_TH, w_Tk = _problem(*case, dtype, device=device, seed=1)
    y, w = y_RH.clone().requires_grad_(), w_Tk.clone().requires_grad_()
    out = ops.unpermute(y, plan, w)
    ref = ops.unpermute_reference(y, plan, w)
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, ref, **tol)
    with _OpLog() as log:
        gy, gw = torch.autograd.grad(out, (y, w), g_TH)
    ref_gy, ref_gw = torch.autograd.grad(ref, (y, w), g_TH)
    assert gy.dtype == dtype and gw.dtype == torch.float32
    assert torch.equal(gy, ref_gy)  # the reference rounds w * grad once, as the kernels do
    torch.testing.assert_close(gw, ref_gw, **_dot_tol(dtype))
    fused = HAS_FUSED and device == "cpu"
    if ops.kernels_for(device, "combine_rows"):
        assert log.names == (["combine_rows_backward"] if fused else ["gather_rows", "slot_dot"])

    for only_y, op in ((True, "gather_rows"), (False, "slot_dot")):
        y, w = y_RH.clone().requires_grad_(only_y), w_Tk.clone().requires_grad_(not only_y)
        out = ops.unpermute(y, plan, w)
        with _OpLog() as log:
            (got,) = torch.autograd.grad(out, (y if only_y else w,), g_TH)
        if only_y:
            assert torch.equal(got, ref_gy)
        else:
            torch.testing.assert_close(got, ref_gw, **_dot_tol(dtype))
        if ops.kernels_for(device, "combine_rows"):
            assert log.names == [op]


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_takes_the_differentiable_ops(device) -> None:
    """create_graph keeps grad mode on in the backward: the fused op (no formula of its own) must not
    serve it, so the second derivative in y comes out right with w requiring grad too. (slot_dot has
    no formula either: a second derivative in w was not supported before the fused op and is not now.)"""
    plan, y_RH, g_TH, w_Tk = _problem(12, 2, 4, 5, 2, 4, 0.2, torch.float64, device=device, seed=2)
    y, w = y_RH.clone().requires_grad_(), w_Tk.clone().requires_grad_()
    out = ops.unpermute(y, plan, w)
    with _OpLog() as log:
        torch.autograd.grad(out, (y, w), g_TH, create_graph=True)
    if ops.kernels_for(device, "combine_rows"):
        assert log.names == ["gather_rows", "slot_dot"]
    assert torch.autograd.gradgradcheck(lambda y: ops.unpermute(y, plan, w), (y,))
