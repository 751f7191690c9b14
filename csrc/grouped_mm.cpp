// Grouped matmul for expert MLPs: one mm per expert written straight into a preallocated output,
// so neither per-expert weight slices nor cat/split copies show up (in forward or backward).
// Legend: R rows grouped by expert, K in-features, N out-features, E experts.
#include "permute.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <exception>
#include <vector>

namespace modalmoe {
namespace {

void check_offsets(c10::IntArrayRef offsets, int64_t E, int64_t R) {
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == E + 1, "modalmoe.grouped_mm: expected ", E + 1,
              " offsets, got ", offsets.size());
  TORCH_CHECK(offsets[0] == 0 && offsets[E] == R, "modalmoe.grouped_mm: offsets must run from 0 to ",
              R, ", got ", offsets[0], "..", offsets[E]);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(offsets[e] <= offsets[e + 1], "modalmoe.grouped_mm: offsets must be non-decreasing");
  }
}

// Runs fn(e) for every non-empty group. On CPU, groups holding at least 1/threads of the rows run
// one after another with a multithreaded mm; the smaller ones run concurrently, one thread each,
// largest first: many small GEMMs keep the cores busier that way than one threaded GEMM at a time.
// Worker threads adopt the caller's thread-local state (dispatch keys below autograd, grad mode).
template <typename Fn>
void for_each_group(c10::IntArrayRef offsets, bool on_cpu, const Fn& fn) {
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1, R = offsets[E];
  const int threads = on_cpu && !omp_in_parallel() ? at::get_num_threads() : 1;
  std::vector<int64_t> small;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    if (n == 0) continue;
    if (threads == 1 || n * threads >= R) {
      fn(e);
    } else {
      small.push_back(e);
    }
  }
  if (small.empty()) return;
  std::stable_sort(small.begin(), small.end(), [&](int64_t a, int64_t b) {
    return offsets[a + 1] - offsets[a] > offsets[b + 1] - offsets[b];
  });
  const at::ThreadLocalState caller_state;
  std::exception_ptr error;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (size_t i = 0; i < small.size(); ++i) {
    try {
      const at::ThreadLocalStateGuard state_guard(caller_state);
      fn(small[i]);
    } catch (...) {
#pragma omp critical(modalmoe_grouped_mm_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

at::Tensor grouped_mm(const at::Tensor& x_RK, const at::Tensor& w_EKN, c10::IntArrayRef offsets) {
  TORCH_CHECK(x_RK.dim() == 2 && w_EKN.dim() == 3 && x_RK.size(1) == w_EKN.size(1),
              "modalmoe.grouped_mm: expected x [R, K] and w [E, K, N], got ", x_RK.sizes(), " and ",
              w_EKN.sizes());
  TORCH_CHECK(x_RK.scalar_type() == w_EKN.scalar_type() && x_RK.device() == w_EKN.device(),
              "modalmoe.grouped_mm: x and w must share dtype and device");
  const int64_t E = w_EKN.size(0), R = x_RK.size(0);
  check_offsets(offsets, E, R);
  at::Tensor out_RN = at::empty({R, w_EKN.size(2)}, x_RK.options());
  for_each_group(offsets, x_RK.is_cpu(), [&](int64_t e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    at::Tensor out_e = out_RN.narrow(0, offsets[e], n);
    at::mm_out(out_e, x_RK.narrow(0, offsets[e], n), w_EKN.select(0, e));
  });
  return out_RN;
}

// Callers that keep the gradient buffer between steps (ops/grad_buffers.py) avoid a fresh one.
void grouped_mm_weight_grad_out(const at::Tensor& x_RK, const at::Tensor& grad_RN, c10::IntArrayRef offsets,
                                const at::Tensor& out_EKN) {
  TORCH_CHECK(x_RK.dim() == 2 && grad_RN.dim() == 2 && x_RK.size(0) == grad_RN.size(0),
              "modalmoe.grouped_mm_weight_grad: expected x [R, K] and grad [R, N], got ",
              x_RK.sizes(), " and ", grad_RN.sizes());
  TORCH_CHECK(x_RK.scalar_type() == grad_RN.scalar_type() && x_RK.device() == grad_RN.device(),
              "modalmoe.grouped_mm_weight_grad: x and grad must share dtype and device");
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1, R = x_RK.size(0);
  TORCH_CHECK(E >= 1, "modalmoe.grouped_mm_weight_grad: need at least one group");
  check_offsets(offsets, E, R);
  TORCH_CHECK(out_EKN.dim() == 3 && out_EKN.size(0) == E && out_EKN.size(1) == x_RK.size(1) &&
                  out_EKN.size(2) == grad_RN.size(1),
              "modalmoe.grouped_mm_weight_grad_out: expected out [", E, ", ", x_RK.size(1), ", ",
              grad_RN.size(1), "], got ", out_EKN.sizes());
  TORCH_CHECK(out_EKN.scalar_type() == x_RK.scalar_type() && out_EKN.device() == x_RK.device(),
              "modalmoe.grouped_mm_weight_grad_out: out must share x's dtype and device");
  for (int64_t e = 0; e < E; ++e) {
    if (offsets[e + 1] == offsets[e]) out_EKN.select(0, e).zero_();
  }
  for_each_group(offsets, x_RK.is_cpu(), [&](int64_t e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    at::Tensor dw_e = out_EKN.select(0, e);
    at::mm_out(dw_e, x_RK.narrow(0, offsets[e], n).t(), grad_RN.narrow(0, offsets[e], n));
  });
}

at::Tensor grouped_mm_weight_grad(const at::Tensor& x_RK, const at::Tensor& grad_RN,
                                  c10::IntArrayRef offsets) {
  TORCH_CHECK(x_RK.dim() == 2 && grad_RN.dim() == 2,
              "modalmoe.grouped_mm_weight_grad: expected x [R, K] and grad [R, N], got ",
              x_RK.sizes(), " and ", grad_RN.sizes());
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1;
  TORCH_CHECK(E >= 1, "modalmoe.grouped_mm_weight_grad: need at least one group");
  at::Tensor dw_EKN = at::empty({E, x_RK.size(1), grad_RN.size(1)}, x_RK.options());
  grouped_mm_weight_grad_out(x_RK, grad_RN, offsets, dw_EKN);
  return dw_EKN;
}

// Composite over at::mm, so the same kernel serves CPU and CUDA tensors.
TORCH_LIBRARY_IMPL(modalmoe, CompositeExplicitAutograd, m) {
  m.impl("grouped_mm", &grouped_mm);
  m.impl("grouped_mm_weight_grad", &grouped_mm_weight_grad);
  m.impl("grouped_mm_weight_grad_out", &grouped_mm_weight_grad_out);
}

}  // namespace modalmoe
