// modalmoe token permutation and grouped matmul: C++ entry points.
//
// Shape legend: T tokens, k = top_k slots per token, S = T*k slots, E experts,
// H hidden size, R rows of the permuted buffer (real rows + padding rows),
// K / N grouped-matmul input / output features.
//
// The ops are registered with the dispatcher as modalmoe::<name> (registration.cpp);
// these declarations let C++ callers and tests reach the CPU kernels directly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

namespace modalmoe {

// (counts [E], padded_counts [E], offsets [E+1], row_of [T, k], src_slot [R], dropped [T, k])
using Plan = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Stable counting sort of slots by expert; capacity < 0 means unlimited.
Plan build_plan_cpu(const at::Tensor& topk_idx_Tk, int64_t num_experts, int64_t pad_multiple,
                    int64_t capacity);

// (x_perm [R, H] with zero padding rows, then the Plan's six tensors)
using Permuted = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// build_plan and the row copy in one pass over the slots.
Permuted permute_rows_cpu(const at::Tensor& x_TH, const at::Tensor& topk_idx_Tk, int64_t num_experts,
                          int64_t pad_multiple, int64_t capacity);

// out[r] = w[s] * x[s / k] for s = src_slot[r] >= 0, zero rows where s == -1.
at::Tensor gather_rows_cpu(const at::Tensor& x_TH, const at::Tensor& src_slot_R,
                           const at::Tensor& row_of_Tk, const std::optional<at::Tensor>& weights_Tk);

// out[t] = sum_j w[t, j] * y[row_of[t, j]] over row_of >= 0.
at::Tensor combine_rows_cpu(const at::Tensor& y_RH, const at::Tensor& row_of_Tk,
                            const at::Tensor& src_slot_R, const std::optional<at::Tensor>& weights_Tk);

// out[t, j] = <tokens[t], rows[row_of[t, j]]>, 0 where row_of == -1.
at::Tensor slot_dot_cpu(const at::Tensor& tokens_TH, const at::Tensor& rows_RH,
                        const at::Tensor& row_of_Tk, c10::ScalarType dtype);

// combine_rows' two gradients in one pass: (grad_y [R, H] = gather_rows(grad, src_slot, row_of, weights),
// grad_weights [T, k] = slot_dot(grad, y_perm, row_of) in the weights' dtype).
std::tuple<at::Tensor, at::Tensor> combine_rows_backward_cpu(const at::Tensor& grad_TH, const at::Tensor& y_RH,
                                                             const at::Tensor& row_of_Tk,
                                                             const at::Tensor& src_slot_R,
                                                             const at::Tensor& weights_Tk);

// CPU ops that read + write at least this many bytes store their output non-temporally; < 0
// restores the default (the last-level cache size). Returns the previous setting. For tests and tuning.
int64_t set_streaming_min_bytes(int64_t bytes);

// out[offsets[e]:offsets[e+1]] = x[offsets[e]:offsets[e+1]] @ w[e]; any device.
at::Tensor grouped_mm(const at::Tensor& x_RK, const at::Tensor& w_EKN, c10::IntArrayRef offsets);

// dw[e] = x[rows of e]^T @ grad[rows of e]; zero for empty groups.
at::Tensor grouped_mm_weight_grad(const at::Tensor& x_RK, const at::Tensor& grad_RN,
                                  c10::IntArrayRef offsets);
// The same written into a given out [E, K, N] (a gradient buffer kept between steps).
void grouped_mm_weight_grad_out(const at::Tensor& x_RK, const at::Tensor& grad_RN, c10::IntArrayRef offsets,
                                const at::Tensor& out_EKN);

// out = silu(h[..., :F]) * h[..., F:] for h [..., 2F] (SwiGLU), and its gradient dh [..., 2F].
at::Tensor swiglu_cpu(const at::Tensor& h_R2F);
at::Tensor swiglu_backward_cpu(const at::Tensor& grad_RF, const at::Tensor& h_R2F);

// Indices [T, k] of each row's k largest scores, largest first, as k argmax passes give them.
at::Tensor top_k_rows_cpu(const at::Tensor& scores_TE, int64_t k);

}  // namespace modalmoe
