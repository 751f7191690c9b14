"""Tests for grouped_mm against its per-expert loop, and for the device dispatch around the ops:
which device gets compiled kernels (kernels_for), the reference fallback with one warning, and
torch's grouped matmul path (group_offsets' row ends, its constraints)."""

from __future__ import annotations

import pytest
import torch
from modalmoe import ops
from modalmoe.ops import PermutePlan
from ops_utils import DEVICES, needs_extension, random_topk


# ----------------------------------------------------------------------------------------------
# grouped_mm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("form", ["counts_list", "offsets_tensor", "counts_tensor", "plan"])
def test_grouped_mm_matches_loop(form, dtype, device) -> None:
    gen = torch.Generator().manual_seed(2)
    E, K, N = 6, 16, 12
    counts = [5, 0, 9, 0, 1, 17]
    R = sum(counts)
    x_RK = torch.randn(R, K, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    w_EKN = torch.randn(E, K, N, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    arg = {
        "counts_list": counts,
        "offsets_tensor": torch.tensor(offsets),
        "counts_tensor": torch.tensor(counts, device=device),
        "plan": PermutePlan(*(torch.empty(0),) * 2, torch.tensor(offsets), *(torch.empty(0),) * 3, 0, 1),
    }[form]
    out = ops.grouped_mm(x_RK, w_EKN, arg)
    ref = ops.grouped_mm_reference(x_RK, w_EKN, offsets)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, ref, **tol)
    g_RN = torch.randn(R, N, generator=gen).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, (x_RK, w_EKN), g_RN)
    ref_grads = torch.autograd.grad(ref, (x_RK, w_EKN), g_RN)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **tol)
    assert bool((grads[1][1] == 0).all()) and bool((grads[1][3] == 0).all()), "empty groups get zero dw"


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_mm_gradcheck_and_edges(device) -> None:
    gen = torch.Generator().manual_seed(4)
    x_RK = torch.randn(7, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w_EKN = torch.randn(3, 3, 2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: ops.grouped_mm(x, w, [0, 3, 3, 7]), (x_RK, w_EKN))
    out = ops.grouped_mm(x_RK[:0], w_EKN, [0, 0, 0])
    assert out.shape == (0, 2)
    (gw,) = torch.autograd.grad(out.sum(), w_EKN)
    assert torch.equal(gw, torch.zeros_like(w_EKN))
    with pytest.raises((RuntimeError, ValueError)):
        ops.grouped_mm(x_RK, w_EKN, [2, 2, 2])


# ----------------------------------------------------------------------------------------------
# Device checks: kernels_for / the reference fallback, group_offsets and torch's grouped matmul.
# ----------------------------------------------------------------------------------------------


def _cpu_has_torch_grouped_mm() -> bool:
    try:
        torch._grouped_mm(torch.zeros(8, 8, dtype=torch.bfloat16), torch.zeros(1, 8, 8, dtype=torch.bfloat16),
                          offs=torch.tensor([8], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


TORCH_GROUPED_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _cpu_has_torch_grouped_mm(), reason="no torch._grouped_mm on CPU")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0), reason="needs a sm80+ GPU")),
]


def _serve_torch_grouped_mm_on(monkeypatch, device: str) -> list[int]:
    """Route grouped_mm's int32 row ends on ``device`` to torch._grouped_mm; returns a call counter."""
    monkeypatch.setattr(ops.grouped_gemm, "_TORCH_GROUPED_MM_DEVICES", ops.grouped_gemm._TORCH_GROUPED_MM_DEVICES | {device})
    calls, real = [], torch._grouped_mm

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    return calls


def test_kernels_for_matches_the_dispatcher() -> None:
    assert ops.kernels_for("cpu") == ops.HAS_EXTENSION
    assert ops.kernels_for("cuda", "grouped_mm") == ops.HAS_EXTENSION  # composite over at::mm
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("modalmoe::permute_rows", "CUDA")
    assert ops.kernels_for("cuda") == (ops.HAS_EXTENSION and has_cuda)


@needs_extension
def test_missing_device_kernels_fall_back_with_one_warning(monkeypatch, caplog) -> None:
    """'CUDA available, no CUDA kernels', simulated on CPU: the references run and one warning comes."""
    monkeypatch.setattr(ops.extension, "kernels_for", lambda device_type, op="permute_rows": False)
    monkeypatch.setattr(ops.extension, "_FALLBACK_WARNED", set())
    ran = []
    for name in ("permute_reference", "unpermute_reference", "grouped_mm_reference"):
        real = getattr(ops.reference, name)
        monkeypatch.setattr(ops.reference, name, lambda *a, _real=real, _name=name, **k: ran.append(_name) or _real(*a, **k))
    gen = torch.Generator().manual_seed(11)
    x_TH, idx_Tk = torch.randn(12, 8, generator=gen), random_topk(12, 2, 4, gen=gen)
    w_Tk = torch.rand(12, 2, generator=gen)
    with pytest.warns(RuntimeWarning, match="no cpu kernels") as caught:
        for _ in range(2):
            x_perm, plan = ops.permute(x_TH, idx_Tk, 4)
            y_TH = ops.unpermute(x_perm, plan, w_Tk)
            ops.grouped_mm(x_perm, torch.randn(4, 8, 3, generator=gen), plan)
    assert len([w for w in caught if "no cpu kernels" in str(w.message)]) == 1
    assert [r.getMessage() for r in caplog.records].count(str(caught[0].message)) == 1
    assert ran == ["permute_reference", "unpermute_reference", "grouped_mm_reference"] * 2
    want_perm, want_plan = ops.permute_reference(x_TH, idx_Tk, 4)
    torch.testing.assert_close(y_TH, ops.unpermute_reference(want_perm, want_plan, w_Tk))


def test_group_offsets_host_list() -> None:
    counts = [5, 0, 9, 1]
    assert ops.group_offsets(torch.tensor(counts), "cpu") == [0, 5, 5, 14, 15]
    assert ops.group_offsets(counts, torch.device("cpu")) == [0, 5, 5, 14, 15]


@pytest.mark.parametrize("device", TORCH_GROUPED_DEVICES)
def test_group_offsets_device_ends(monkeypatch, device) -> None:
    if device == "cpu":
        _serve_torch_grouped_mm_on(monkeypatch, "cpu")
    for counts in (torch.tensor([5, 0, 9, 1], device=device), [5, 0, 9, 1]):
        ends = ops.group_offsets(counts, device)
        assert ends.dtype == torch.int32 and ends.shape == (4,) and ends.device.type == device
        assert ends.tolist() == [5, 5, 14, 15]


@pytest.mark.parametrize("device", TORCH_GROUPED_DEVICES)
def test_grouped_mm_torch_grouped_path(monkeypatch, device) -> None:
    """int32 row ends go to torch._grouped_mm (bf16, aligned); values and grads match the loop."""
    calls = _serve_torch_grouped_mm_on(monkeypatch, device)
    gen = torch.Generator().manual_seed(5)
    E, K, N = 5, 32, 24
    counts = [7, 0, 33, 1, 15]
    R = sum(counts)
    x_RK = torch.randn(R, K, generator=gen).to(device=device, dtype=torch.bfloat16).requires_grad_()
    w_EKN = torch.randn(E, K, N, generator=gen).to(device=device, dtype=torch.bfloat16).requires_grad_()
    ends = ops.group_offsets(torch.tensor(counts), device)
    assert isinstance(ends, torch.Tensor)
    out = ops.grouped_mm(x_RK, w_EKN, ends)
    assert calls == [1]
    offsets = [0, *ends.tolist()]
    ref = ops.grouped_mm_reference(x_RK, w_EKN, offsets)
    tol = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out, ref, **tol)
    g_RN = torch.randn(R, N, generator=gen).to(device=device, dtype=torch.bfloat16)
    grads = torch.autograd.grad(out, (x_RK, w_EKN), g_RN)
    for got, want in zip(grads, torch.autograd.grad(ref, (x_RK, w_EKN), g_RN)):
        torch.testing.assert_close(got, want, **tol)
    assert bool((grads[1][1] == 0).all()), "an empty group gets zero dw"
    # a weight stored [E, N, K] and used transposed (column-major per expert) is taken too
    w_ENK = w_EKN.detach().transpose(1, 2).contiguous()
    torch.testing.assert_close(ops.grouped_mm(x_RK.detach(), w_ENK.transpose(1, 2), ends), ref.detach(), **tol)
    assert calls == [1, 1]


@pytest.mark.parametrize("device", TORCH_GROUPED_DEVICES)
def test_grouped_mm_row_ends_fall_back_when_torch_grouped_mm_does_not_fit(monkeypatch, device) -> None:
    """fp32, K or N not on 16 bytes, no rows: the host-offsets path (one sync) with the same answer."""
    calls = _serve_torch_grouped_mm_on(monkeypatch, device)
    gen = torch.Generator().manual_seed(6)
    counts = [3, 0, 6]
    ends = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    for dtype, K, N in ((torch.float32, 16, 8), (torch.bfloat16, 12, 8), (torch.bfloat16, 16, 4)):
        x_RK = torch.randn(9, K, generator=gen).to(device=device, dtype=dtype)
        w_EKN = torch.randn(3, K, N, generator=gen).to(device=device, dtype=dtype)
        out = ops.grouped_mm(x_RK, w_EKN, ends)
        tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(out, ops.grouped_mm_reference(x_RK, w_EKN, [0, 3, 3, 9]), **tol)
    zero = torch.zeros(3, dtype=torch.int32, device=device)
    empty = torch.empty(0, 16, device=device, dtype=torch.bfloat16)
    assert ops.grouped_mm(empty, torch.randn(3, 16, 8, device=device, dtype=torch.bfloat16), zero).shape == (0, 8)
    assert calls == []


@pytest.mark.parametrize("device", TORCH_GROUPED_DEVICES)
@pytest.mark.parametrize("form", ["counts_tensor", "offsets_tensor", "plan"])
def test_grouped_mm_device_tensors_take_the_torch_grouped_path(monkeypatch, form, device) -> None:
    """Counts / offsets / a plan already on x's device reach torch._grouped_mm without a host sync."""
    calls = _serve_torch_grouped_mm_on(monkeypatch, device)
    gen = torch.Generator().manual_seed(7)
    counts = [4, 0, 11, 9]
    offsets = [0, 4, 4, 15, 24]
    x_RK = torch.randn(24, 16, generator=gen).to(device=device, dtype=torch.bfloat16)
    w_EKN = torch.randn(4, 16, 8, generator=gen).to(device=device, dtype=torch.bfloat16)
    arg = {
        "counts_tensor": torch.tensor(counts, device=device),
        "offsets_tensor": torch.tensor(offsets, device=device),
        "plan": PermutePlan(*(torch.empty(0),) * 2, torch.tensor(offsets, device=device), *(torch.empty(0),) * 3, 0, 1),
    }[form]
    out = ops.grouped_mm(x_RK, w_EKN, arg)
    assert calls == [1]
    torch.testing.assert_close(out, ops.grouped_mm_reference(x_RK, w_EKN, offsets), rtol=2e-2, atol=2e-2)
