"""Fake (meta) kernels for torch.compile / opcheck and the autograd formulas of the compiled ops,
defined in terms of the ops themselves (``TORCH_LIBRARY`` in csrc/registration.cpp holds the schemas)."""

from __future__ import annotations

import torch

__all__ = ["register_python_kernels"]


def _register_python_kernels() -> None:
    """Fake kernels for torch.compile / opcheck and autograd formulas, defined in terms of the ops."""
    ops = torch.ops.modalmoe

    @torch.library.register_fake("modalmoe::build_plan")
    def _(topk_idx_Tk, num_experts, pad_multiple, capacity):
        num_rows = torch.library.get_ctx().new_dynamic_size()
        i64 = {"dtype": torch.int64}
        return (
            topk_idx_Tk.new_empty(num_experts, **i64),
            topk_idx_Tk.new_empty(num_experts, **i64),
            topk_idx_Tk.new_empty(num_experts + 1, **i64),
            topk_idx_Tk.new_empty(topk_idx_Tk.shape, **i64),
            topk_idx_Tk.new_empty(num_rows, **i64),
            topk_idx_Tk.new_empty(topk_idx_Tk.shape, dtype=torch.bool),
        )

    @torch.library.register_fake("modalmoe::permute_rows")
    def _(x_TH, topk_idx_Tk, num_experts, pad_multiple, capacity):
        torch._check(x_TH.shape[0] == topk_idx_Tk.shape[0])
        plan = torch.ops.modalmoe.build_plan.default(topk_idx_Tk, num_experts, pad_multiple, capacity)
        return (x_TH.new_empty(plan[4].shape[0], x_TH.shape[1]), *plan)

    @torch.library.register_fake("modalmoe::gather_rows")
    def _(x_TH, src_slot_R, row_of_Tk, weights_Tk):
        torch._check(x_TH.shape[0] == row_of_Tk.shape[0])
        return x_TH.new_empty(src_slot_R.shape[0], x_TH.shape[1])

    @torch.library.register_fake("modalmoe::combine_rows")
    def _(y_RH, row_of_Tk, src_slot_R, weights_Tk):
        torch._check(y_RH.shape[0] == src_slot_R.shape[0])
        return y_RH.new_empty(row_of_Tk.shape[0], y_RH.shape[1])

    @torch.library.register_fake("modalmoe::slot_dot")
    def _(tokens_TH, rows_RH, row_of_Tk, dtype):
        return tokens_TH.new_empty(row_of_Tk.shape, dtype=dtype)

    @torch.library.register_fake("modalmoe::grouped_mm")
    def _(x_RK, w_EKN, offsets):
        return x_RK.new_empty(x_RK.shape[0], w_EKN.shape[2])

    @torch.library.register_fake("modalmoe::grouped_mm_weight_grad")
    def _(x_RK, grad_RN, offsets):
        return x_RK.new_empty(len(offsets) - 1, x_RK.shape[1], grad_RN.shape[1])

    if hasattr(ops, "grouped_mm_weight_grad_out"):  # absent from an extension built before it

        @torch.library.register_fake("modalmoe::grouped_mm_weight_grad_out")
        def _(x_RK, grad_RN, offsets, out):
            return None

    fused_combine_backward = hasattr(ops, "combine_rows_backward")  # CPU only; absent from older builds
    if fused_combine_backward:

        @torch.library.register_fake("modalmoe::combine_rows_backward")
        def _(grad_TH, y_RH, row_of_Tk, src_slot_R, weights_Tk):
            torch._check(grad_TH.shape[0] == row_of_Tk.shape[0])
            torch._check(y_RH.shape[0] == src_slot_R.shape[0])
            return y_RH.new_empty(y_RH.shape), weights_Tk.new_empty(weights_Tk.shape)

    # gather_rows and combine_rows are adjoint: each one's input gradient is the other op.
    def save_rows_plan_weights(ctx, inputs, output):
        values, first_map, second_map, weights = inputs
        ctx.save_for_backward(values, first_map, second_map, weights)

    def gather_rows_backward(ctx, grad_RH):
        x_TH, src_slot_R, row_of_Tk, weights_Tk = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.combine_rows(grad_RH, row_of_Tk, src_slot_R, weights_Tk)
        if weights_Tk is not None and ctx.needs_input_grad[3]:
            grad_w = ops.slot_dot(x_TH, grad_RH, row_of_Tk, weights_Tk.dtype)
        return grad_x, None, None, grad_w

    def combine_rows_backward(ctx, grad_TH):
        """Both gradients from one pass over grad on CPU; the fused op has no autograd formula of its
        own, so a double backward (create_graph) and other devices take the two differentiable ops."""
        y_RH, row_of_Tk, src_slot_R, weights_Tk = ctx.saved_tensors
        both = ctx.needs_input_grad[0] and weights_Tk is not None and ctx.needs_input_grad[3]
        if (both and fused_combine_backward and grad_TH.device.type == "cpu"
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in (grad_TH, y_RH, weights_Tk)))):
            grad_y, grad_w = ops.combine_rows_backward(grad_TH, y_RH, row_of_Tk, src_slot_R, weights_Tk)
            return grad_y, None, None, grad_w
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = ops.gather_rows(grad_TH, src_slot_R, row_of_Tk, weights_Tk)
        if weights_Tk is not None and ctx.needs_input_grad[3]:
            grad_w = ops.slot_dot(grad_TH, y_RH, row_of_Tk, weights_Tk.dtype)
        return grad_y, None, None, grad_w

    def permute_rows_setup(ctx, inputs, output):
        ctx.save_for_backward(output[4], output[5])  # row_of, src_slot

    def permute_rows_backward(ctx, grad_RH, *_plan_grads):
        row_of_Tk, src_slot_R = ctx.saved_tensors
        grad_x = ops.combine_rows(grad_RH, row_of_Tk, src_slot_R, None) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None

    torch.library.register_autograd("modalmoe::permute_rows", permute_rows_backward, setup_context=permute_rows_setup)
    torch.library.register_autograd(
        "modalmoe::gather_rows", gather_rows_backward, setup_context=save_rows_plan_weights
    )
    torch.library.register_autograd(
        "modalmoe::combine_rows", combine_rows_backward, setup_context=save_rows_plan_weights
    )

    def grouped_mm_setup(ctx, inputs, output):
        x_RK, w_EKN, offsets = inputs
        ctx.save_for_backward(x_RK, w_EKN)
        ctx.offsets = offsets

    def grouped_mm_backward(ctx, grad_RN):
        x_RK, w_EKN = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.grouped_mm(grad_RN, w_EKN.transpose(1, 2), ctx.offsets)
        if ctx.needs_input_grad[1]:
            grad_w = ops.grouped_mm_weight_grad(x_RK, grad_RN, ctx.offsets)
        return grad_x, grad_w, None

    torch.library.register_autograd("modalmoe::grouped_mm", grouped_mm_backward, setup_context=grouped_mm_setup)



def _register_swiglu_and_top_k_kernels() -> None:
    @torch.library.register_fake("modalmoe::top_k_rows")
    def _(scores, k):
        return scores.new_empty(scores.shape[0], k, dtype=torch.int64)

    @torch.library.register_fake("modalmoe::swiglu")
    def _(h):
        return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)

    @torch.library.register_fake("modalmoe::swiglu_backward")
    def _(grad, h):
        return h.new_empty(h.shape)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return torch.ops.modalmoe.swiglu_backward(grad.contiguous(), h)

    torch.library.register_autograd("modalmoe::swiglu", backward, setup_context=setup)



def register_python_kernels() -> None:
    _register_python_kernels()
    _register_swiglu_and_top_k_kernels()
