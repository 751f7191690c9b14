"""Expert weight gradients written into buffers kept between steps (ops/grad_buffers.py): the same
values as the plain op, correct accumulation, no buffer written while anything else holds it, and
no fresh weight-gradient allocation per step in either ``zero_grad`` mode."""

from __future__ import annotations

import pytest
import torch
from modalmoe import ops
from modalmoe.runtime.moe import MoEConfig, MoELayer
from modalmoe.runtime.moe.experts import GroupedExperts
from ops_utils import needs_extension
from torch.profiler import ProfilerActivity, profile

COUNTS = [5, 0, 7, 8]  # one empty expert: its gradient must be zeros, not a stale buffer's values
E, H, F = 4, 8, 24  # dw bytes (E*H*F*4 = 3072) differ from every activation's here


def _experts(seed: int = 0) -> GroupedExperts:
    torch.manual_seed(seed)
    return GroupedExperts(E, H, F, "gelu", 0.5)


def _reference_grads(m: GroupedExperts, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w1 = m.w1_EHF.detach().clone().requires_grad_()
    w2 = m.w2_EFH.detach().clone().requires_grad_()
    offsets = [0, 5, 5, 12, 20]
    h = torch.nn.functional.gelu(ops.grouped_mm_reference(x, w1, offsets), approximate="tanh")
    ops.grouped_mm_reference(h, w2, offsets).square().sum().backward()
    return w1.grad, w2.grad


def _step(m: GroupedExperts, x: torch.Tensor) -> None:
    m(x, COUNTS).square().sum().backward()


def _weight_grad_allocations(fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.name for e in prof.events() if e.self_cpu_memory_usage == E * H * F * 4]


def test_take_reuses_only_unreferenced_buffers() -> None:
    bufs = ops.GradBuffers(per_shape=2)
    like = torch.empty(0)
    a = bufs.take((3, 4), like)
    a_ptr = a.data_ptr()
    b = bufs.take((3, 4), like)
    assert b.data_ptr() != a_ptr, "a buffer still referenced must not be handed out again"
    c = bufs.take((3, 4), like)  # both kept ones busy and at the cap: a plain tensor
    assert bufs.num_buffers() == 2 and c.data_ptr() not in (a_ptr, b.data_ptr())
    view_of_a = a[1]
    del a
    assert bufs.take((3, 4), like).data_ptr() not in (a_ptr,), "a view still holds a's storage"
    del view_of_a
    assert bufs.take((3, 4), like).data_ptr() == a_ptr
    assert bufs.take((2, 6), like).data_ptr() != a_ptr  # another shape, another buffer
    bufs.clear()
    assert bufs.num_buffers() == 0


@needs_extension
def test_grads_match_the_reference_and_accumulate() -> None:
    m = _experts()
    x = torch.randn(20, H)
    want1, want2 = _reference_grads(m, x)
    for _ in range(3):  # zero_grad(set_to_none=True): the buffers come back each step
        _step(m, x)
        torch.testing.assert_close(m.w1_EHF.grad, want1)
        torch.testing.assert_close(m.w2_EFH.grad, want2)
        assert bool((m.w1_EHF.grad[1] == 0).all()), "the empty expert's gradient is zero"
        m.zero_grad(set_to_none=True)
    for _ in range(3):  # no zeroing: .grad += each step's gradient, carried by the second buffer
        _step(m, x)
    torch.testing.assert_close(m.w1_EHF.grad, 3 * want1)
    torch.testing.assert_close(m.w2_EFH.grad, 3 * want2)
    assert m.grad_buffers.num_buffers() <= 4


@needs_extension
def test_a_gradient_someone_holds_is_never_overwritten() -> None:
    m = _experts()
    x = torch.randn(20, H)
    want1, _ = _reference_grads(m, x)
    _step(m, x)
    held = m.w1_EHF.grad
    m.zero_grad(set_to_none=True)
    _step(m, 2 * x)
    assert held.data_ptr() != m.w1_EHF.grad.data_ptr()
    torch.testing.assert_close(held, want1)


@needs_extension
@pytest.mark.parametrize("set_to_none", [True, False])
def test_no_fresh_weight_gradient_buffer_per_step(set_to_none) -> None:
    m = _experts()
    x = torch.randn(20, H)

    def step() -> None:
        _step(m, x)
        m.zero_grad(set_to_none=set_to_none)

    step()
    step()
    assert _weight_grad_allocations(step) == []
    m.grad_buffers = None  # the plain op: the check above does see each fresh dw
    assert len(_weight_grad_allocations(step)) == 2


@needs_extension
def test_moe_layer_grad_storage_is_stable_across_steps() -> None:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2, activation="gelu"))
    x, modality = torch.randn(64, 16), torch.randint(0, 2, (64,))
    ptrs = []
    for _ in range(3):
        y, aux = layer(x, modality)
        (y.square().sum() + aux.loss).backward()
        ptrs.append(layer.experts.w1_EHF.grad.data_ptr())
        layer.zero_grad(set_to_none=True)
        blocker = torch.empty_like(layer.experts.w1_EHF)  # would take a freed grad's place
    assert ptrs[0] == ptrs[1] == ptrs[2] and blocker.data_ptr() != ptrs[0]


@needs_extension
def test_opcheck_grouped_mm_weight_grad_out() -> None:
    gen = torch.Generator().manual_seed(3)
    x_RK, g_RN = torch.randn(20, 8, generator=gen), torch.randn(20, 6, generator=gen)
    out = torch.full((4, 8, 6), float("nan"))
    torch.library.opcheck(torch.ops.modalmoe.grouped_mm_weight_grad_out.default, (x_RK, g_RN, [0, 5, 5, 12, 20], out))
    torch.ops.modalmoe.grouped_mm_weight_grad_out(x_RK, g_RN, [0, 5, 5, 12, 20], out)
    torch.testing.assert_close(out, torch.ops.modalmoe.grouped_mm_weight_grad(x_RK, g_RN, [0, 5, 5, 12, 20]))


def test_gradcheck_through_kept_buffers() -> None:
    x_RK = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    w_EKN = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    bufs = ops.GradBuffers()
    assert torch.autograd.gradcheck(lambda x, w: ops.grouped_mm(x, w, [0, 3, 3, 7], grad_buffers=bufs), (x_RK, w_EKN))


@needs_extension
def test_a_copied_module_keeps_no_buffers_of_the_original() -> None:
    import copy
    import pickle

    m = _experts()
    x = torch.randn(20, H)
    _step(m, x)
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert twin.grad_buffers.num_buffers() == 0
        _step(twin, x)
        assert twin.w1_EHF.grad.data_ptr() != m.w1_EHF.grad.data_ptr()
        torch.testing.assert_close(twin.w1_EHF.grad, m.w1_EHF.grad)
