// CUDA implementations of the modalmoe permutation ops: checks, allocation and dtype mapping around
// the raw kernels in permute_kernels.cu. Built only when torch has CUDA (setup.py). Legend in
// permute_kernels.h.
#include "../permute.h"
#include "permute_kernels.h"

// c10/cuda only: ATen/cuda/CUDAContext.h would pull in the cuBLAS / cuSPARSE / cuSOLVER headers.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

namespace modalmoe {
namespace {

#define MODALMOE_CUDA_CHECK(expr)                                                        \
  do {                                                                                   \
    const cudaError_t modalmoe_err = (expr);                                             \
    TORCH_CHECK(modalmoe_err == cudaSuccess, "modalmoe CUDA kernel failed: ",            \
                cudaGetErrorString(modalmoe_err));                                       \
  } while (0)

cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "modalmoe: expected float32, float64 or bfloat16, got ", t);
  }
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "modalmoe: ", name, " must be on ",
              like.device(), ", got ", t.device());
}

void check_values(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "modalmoe: ", name, " must be 2-D, got ", t.sizes());
  kernel_dtype(t.scalar_type());
}

void check_plan_maps(const at::Tensor& row_of_Tk, const at::Tensor& src_slot_R, const at::Tensor& like) {
  TORCH_CHECK(row_of_Tk.dim() == 2 && row_of_Tk.scalar_type() == at::kLong,
              "modalmoe: row_of must be int64 [T, k]");
  TORCH_CHECK(src_slot_R.dim() == 1 && src_slot_R.scalar_type() == at::kLong,
              "modalmoe: src_slot must be int64 [R]");
  check_cuda(row_of_Tk, like, "row_of");
  check_cuda(src_slot_R, like, "src_slot");
}

at::Tensor weights_as(const std::optional<at::Tensor>& weights_Tk, const at::Tensor& row_of_Tk,
                      const at::Tensor& like) {
  if (!weights_Tk.has_value()) return at::Tensor();
  const auto& w = *weights_Tk;
  TORCH_CHECK(w.sizes() == row_of_Tk.sizes(), "modalmoe: weights must be [T, k] = ", row_of_Tk.sizes(),
              ", got ", w.sizes());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "modalmoe: weights must be floating point");
  check_cuda(w, like, "weights");
  return w.to(acc_dtype(like.scalar_type())).contiguous();
}

Plan build_plan_cuda(const at::Tensor& topk_idx_Tk, int64_t num_experts, int64_t pad_multiple,
                     int64_t capacity) {
  TORCH_CHECK(topk_idx_Tk.dim() == 2, "modalmoe.permute: topk_idx must be [T, k]");
  TORCH_CHECK(topk_idx_Tk.scalar_type() == at::kInt || topk_idx_Tk.scalar_type() == at::kLong,
              "modalmoe.permute: topk_idx must be int32 or int64");
  TORCH_CHECK(num_experts > 0 && pad_multiple >= 1, "modalmoe.permute: need num_experts > 0 and pad_multiple >= 1");
  const c10::cuda::CUDAGuard guard(topk_idx_Tk.device());
  const at::Tensor idx = topk_idx_Tk.contiguous();
  const int64_t T = idx.size(0), k = idx.size(1), S = T * k, E = num_experts;
  const bool is64 = idx.scalar_type() == at::kLong;
  const auto i64 = idx.options().dtype(at::kLong);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor base_CE = at::empty({cuda::plan_num_chunks(S) * E}, i64);
  at::Tensor counts = at::empty({E}, i64), padded = at::empty({E}, i64), offsets = at::empty({E + 1}, i64);
  at::Tensor row_of = at::empty({T, k}, i64), dropped = at::empty({T, k}, i64.dtype(at::kBool));
  at::Tensor meta = at::empty({2}, i64);
  MODALMOE_CUDA_CHECK(cuda::plan_count(idx.const_data_ptr(), is64, S, E, pad_multiple, capacity,
                                       base_CE.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                                       padded.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                                       meta.data_ptr<int64_t>(), stream));
  const at::Tensor meta_host = meta.cpu();  // the one host sync: R sizes src_slot
  const int64_t* m = meta_host.const_data_ptr<int64_t>();
  TORCH_CHECK(m[1] == 0, "modalmoe.permute: topk_idx entries must be -1 or in [0, ", E, ")");
  at::Tensor src_slot = at::empty({m[0]}, i64);
  MODALMOE_CUDA_CHECK(cuda::plan_scatter(idx.const_data_ptr(), is64, S, E, capacity, base_CE.data_ptr<int64_t>(),
                                         offsets.const_data_ptr<int64_t>(), m[0], row_of.data_ptr<int64_t>(),
                                         dropped.data_ptr<bool>(), src_slot.data_ptr<int64_t>(), stream));
  return {counts, padded, offsets, row_of, src_slot, dropped};
}

at::Tensor gather_rows_cuda(const at::Tensor& x_TH, const at::Tensor& src_slot_R, const at::Tensor& row_of_Tk,
                            const std::optional<at::Tensor>& weights_Tk) {
  check_values(x_TH, "x");
  check_plan_maps(row_of_Tk, src_slot_R, x_TH);
  TORCH_CHECK(x_TH.size(0) == row_of_Tk.size(0), "modalmoe.gather_rows: x has ", x_TH.size(0),
              " tokens but row_of has ", row_of_Tk.size(0));
  const c10::cuda::CUDAGuard guard(x_TH.device());
  const at::Tensor x = x_TH.contiguous(), src_slot = src_slot_R.contiguous();
  const at::Tensor w = weights_as(weights_Tk, row_of_Tk, x);
  const int64_t R = src_slot.size(0), H = x.size(1);
  at::Tensor out = at::empty({R, H}, x.options());
  MODALMOE_CUDA_CHECK(cuda::gather_rows(kernel_dtype(x.scalar_type()), x.const_data_ptr(),
                                        src_slot.const_data_ptr<int64_t>(), w.defined() ? w.const_data_ptr() : nullptr,
                                        out.data_ptr(), R, H, row_of_Tk.numel(), row_of_Tk.size(1),
                                        c10::cuda::getCurrentCUDAStream()));
  return out;
}

// On the GPU the plan and the row copy stay two kernels behind the one op.
Permuted permute_rows_cuda(const at::Tensor& x_TH, const at::Tensor& topk_idx_Tk, int64_t num_experts,
                           int64_t pad_multiple, int64_t capacity) {
  check_values(x_TH, "x");
  check_cuda(topk_idx_Tk, x_TH, "topk_idx");
  TORCH_CHECK(x_TH.size(0) == topk_idx_Tk.size(0), "modalmoe.permute: x has ", x_TH.size(0),
              " tokens but topk_idx has ", topk_idx_Tk.size(0));
  auto [counts, padded, offsets, row_of, src_slot, dropped] =
      build_plan_cuda(topk_idx_Tk, num_experts, pad_multiple, capacity);
  at::Tensor x_perm = gather_rows_cuda(x_TH, src_slot, row_of, std::nullopt);
  return {x_perm, counts, padded, offsets, row_of, src_slot, dropped};
}

at::Tensor combine_rows_cuda(const at::Tensor& y_RH, const at::Tensor& row_of_Tk, const at::Tensor& src_slot_R,
                             const std::optional<at::Tensor>& weights_Tk) {
  check_values(y_RH, "y_perm");
  check_plan_maps(row_of_Tk, src_slot_R, y_RH);
  TORCH_CHECK(y_RH.size(0) == src_slot_R.size(0), "modalmoe.combine_rows: y_perm has ", y_RH.size(0),
              " rows but the plan has ", src_slot_R.size(0));
  const c10::cuda::CUDAGuard guard(y_RH.device());
  const at::Tensor y = y_RH.contiguous(), row_of = row_of_Tk.contiguous();
  const at::Tensor w = weights_as(weights_Tk, row_of, y);
  const int64_t T = row_of.size(0), k = row_of.size(1), H = y.size(1);
  at::Tensor out = at::empty({T, H}, y.options());
  MODALMOE_CUDA_CHECK(cuda::combine_rows(kernel_dtype(y.scalar_type()), y.const_data_ptr(),
                                         row_of.const_data_ptr<int64_t>(), w.defined() ? w.const_data_ptr() : nullptr,
                                         out.data_ptr(), T, k, H, y.size(0), c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor slot_dot_cuda(const at::Tensor& tokens_TH, const at::Tensor& rows_RH, const at::Tensor& row_of_Tk,
                         c10::ScalarType dtype) {
  check_values(tokens_TH, "tokens");
  check_values(rows_RH, "rows");
  check_cuda(rows_RH, tokens_TH, "rows");
  check_cuda(row_of_Tk, tokens_TH, "row_of");
  TORCH_CHECK(row_of_Tk.dim() == 2 && row_of_Tk.scalar_type() == at::kLong,
              "modalmoe.slot_dot: row_of must be int64 [T, k]");
  TORCH_CHECK(tokens_TH.scalar_type() == rows_RH.scalar_type(), "modalmoe.slot_dot: tokens and rows must share a dtype");
  TORCH_CHECK(tokens_TH.size(0) == row_of_Tk.size(0) && tokens_TH.size(1) == rows_RH.size(1),
              "modalmoe.slot_dot: shape mismatch");
  TORCH_CHECK(at::isFloatingType(dtype), "modalmoe.slot_dot: dtype must be floating point");
  const c10::cuda::CUDAGuard guard(tokens_TH.device());
  const at::Tensor a = tokens_TH.contiguous(), b = rows_RH.contiguous(), row_of = row_of_Tk.contiguous();
  const int64_t T = row_of.size(0), k = row_of.size(1);
  at::Tensor out = at::empty({T, k}, a.options().dtype(acc_dtype(a.scalar_type())));
  MODALMOE_CUDA_CHECK(cuda::slot_dot(kernel_dtype(a.scalar_type()), a.const_data_ptr(), b.const_data_ptr(),
                                     row_of.const_data_ptr<int64_t>(), out.data_ptr(), T, k, a.size(1), b.size(0),
                                     c10::cuda::getCurrentCUDAStream()));
  return out.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(modalmoe, CUDA, m) {
  m.impl("build_plan", &build_plan_cuda);
  m.impl("permute_rows", &permute_rows_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("combine_rows", &combine_rows_cuda);
  m.impl("slot_dot", &slot_dot_cuda);
}

}  // namespace modalmoe
