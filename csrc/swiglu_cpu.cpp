// SwiGLU in one pass: out = silu(gate) * up for h = [gate | up] along the last dim, and its
// backward, so neither the silu output, the two products of the backward nor the cat of the two
// halves' gradients make a pass over memory of their own. Legend: R rows, F width of each half.
//
// Results equal torch's `F.silu(gate) * up` and its autograd in the same dtype: bfloat16 rounds
// where torch's bfloat16 ops round (the silu output, each product), and the silu formulas are
// torch's (x / (1 + exp(-x)); dy * sig * (1 + x * (1 - sig))). exp differs from torch's only in
// the last float bit, which bfloat16 rounding almost always hides.
#include "bf16_avx512.h"
#include "permute.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace modalmoe {
namespace {

constexpr int64_t kElemsPerTask = 32768;

// Scalar rows [r0, r1): any floating dtype, math in opmath (float for bfloat16).
template <typename scalar_t>
void swiglu_rows(const scalar_t* h, scalar_t* out, int64_t F, int64_t r0, int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* gate = h + r * 2 * F;
    const scalar_t* up = gate + F;
    for (int64_t c = 0; c < F; ++c) {
      const acc_t x = static_cast<acc_t>(gate[c]);
      const acc_t s = static_cast<acc_t>(static_cast<scalar_t>(x / (acc_t(1) + std::exp(-x))));
      out[r * F + c] = static_cast<scalar_t>(s * static_cast<acc_t>(up[c]));
    }
  }
}

template <typename scalar_t>
void swiglu_backward_rows(const scalar_t* dy, const scalar_t* h, scalar_t* dh, int64_t F, int64_t r0,
                          int64_t r1) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* gate = h + r * 2 * F;
    const scalar_t* up = gate + F;
    scalar_t* dgate = dh + r * 2 * F;
    scalar_t* dup = dgate + F;
    for (int64_t c = 0; c < F; ++c) {
      const acc_t x = static_cast<acc_t>(gate[c]), g = static_cast<acc_t>(dy[r * F + c]);
      const acc_t e = std::exp(-x);
      const acc_t s = static_cast<acc_t>(static_cast<scalar_t>(x / (acc_t(1) + e)));
      const acc_t sig = acc_t(1) / (acc_t(1) + e);
      const acc_t ds = static_cast<acc_t>(static_cast<scalar_t>(g * static_cast<acc_t>(up[c])));
      dup[c] = static_cast<scalar_t>(g * s);
      dgate[c] = static_cast<scalar_t>(ds * sig * (acc_t(1) + x * (acc_t(1) - sig)));
    }
  }
}

#if MODALMOE_HAS_AVX512
MODALMOE_AVX512 void swiglu_rows_avx512(const c10::BFloat16* h, c10::BFloat16* out, int64_t F, int64_t r0,
                                        int64_t r1) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t r = r0; r < r1; ++r) {
    const c10::BFloat16* gate = h + r * 2 * F;
    const c10::BFloat16* up = gate + F;
    for (int64_t c = 0; c < F; c += 16) {
      const __mmask16 m = tail_mask(F - c);
      const __m512 x = load_bf16(gate + c, m);
      const __m512 d = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)));
      const __m512 s = round_bf16(_mm512_div_ps(x, d));
      store_bf16(out + r * F + c, _mm512_mul_ps(s, load_bf16(up + c, m)), m);
    }
  }
}

MODALMOE_AVX512 void swiglu_backward_rows_avx512(const c10::BFloat16* dy, const c10::BFloat16* h,
                                                 c10::BFloat16* dh, int64_t F, int64_t r0, int64_t r1) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t r = r0; r < r1; ++r) {
    const c10::BFloat16* gate = h + r * 2 * F;
    const c10::BFloat16* up = gate + F;
    c10::BFloat16* dgate = dh + r * 2 * F;
    c10::BFloat16* dup = dgate + F;
    for (int64_t c = 0; c < F; c += 16) {
      const __mmask16 m = tail_mask(F - c);
      const __m512 x = load_bf16(gate + c, m), g = load_bf16(dy + r * F + c, m);
      const __m512 d = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)));
      const __m512 s = round_bf16(_mm512_div_ps(x, d));
      const __m512 sig = _mm512_div_ps(one, d);
      const __m512 ds = round_bf16(_mm512_mul_ps(g, load_bf16(up + c, m)));
      store_bf16(dup + c, _mm512_mul_ps(g, s), m);
      const __m512 slope = _mm512_add_ps(one, _mm512_mul_ps(x, _mm512_sub_ps(one, sig)));
      store_bf16(dgate + c, _mm512_mul_ps(_mm512_mul_ps(ds, sig), slope), m);
    }
  }
}
#endif

// The AVX-512 loops for bfloat16 where the CPU has them, the scalar ones otherwise.
template <typename scalar_t>
void swiglu_task(const scalar_t* h, scalar_t* out, int64_t F, int64_t r0, int64_t r1) {
  swiglu_rows<scalar_t>(h, out, F, r0, r1);
}
template <typename scalar_t>
void swiglu_backward_task(const scalar_t* dy, const scalar_t* h, scalar_t* dh, int64_t F, int64_t r0,
                          int64_t r1) {
  swiglu_backward_rows<scalar_t>(dy, h, dh, F, r0, r1);
}
#if MODALMOE_HAS_AVX512
template <>
void swiglu_task<c10::BFloat16>(const c10::BFloat16* h, c10::BFloat16* out, int64_t F, int64_t r0,
                                int64_t r1) {
  if (cpu_has_avx512()) return swiglu_rows_avx512(h, out, F, r0, r1);
  swiglu_rows<c10::BFloat16>(h, out, F, r0, r1);
}
template <>
void swiglu_backward_task<c10::BFloat16>(const c10::BFloat16* dy, const c10::BFloat16* h,
                                         c10::BFloat16* dh, int64_t F, int64_t r0, int64_t r1) {
  if (cpu_has_avx512()) return swiglu_backward_rows_avx512(dy, h, dh, F, r0, r1);
  swiglu_backward_rows<c10::BFloat16>(dy, h, dh, F, r0, r1);
}
#endif

void check_h(const at::Tensor& h, const char* op) {
  TORCH_CHECK(h.device().is_cpu(), "modalmoe.", op, ": expected a CPU tensor, got ", h.device());
  TORCH_CHECK(h.dim() >= 1 && h.size(-1) % 2 == 0, "modalmoe.", op,
              ": h must have an even last dim [..., 2F], got ", h.sizes());
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), "modalmoe.", op, ": h must be floating point, got ",
              h.scalar_type());
}

std::vector<int64_t> half_last(const at::Tensor& h) {
  std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
  shape.back() /= 2;
  return shape;
}

}  // namespace

at::Tensor swiglu_cpu(const at::Tensor& h_R2F) {
  check_h(h_R2F, "swiglu");
  const at::Tensor h = h_R2F.contiguous();
  const int64_t F = h.size(-1) / 2, R = F == 0 ? 0 : h.numel() / (2 * F);
  at::Tensor out = at::empty(half_last(h), h.options());
  if (R == 0 || F == 0) return out;
  const int64_t grain = std::max<int64_t>(1, kElemsPerTask / F);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "modalmoe_swiglu", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) { swiglu_task<scalar_t>(hp, op, F, r0, r1); });
  });
  return out;
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad_RF, const at::Tensor& h_R2F) {
  check_h(h_R2F, "swiglu_backward");
  TORCH_CHECK(grad_RF.sizes() == at::IntArrayRef(half_last(h_R2F)) &&
                  grad_RF.scalar_type() == h_R2F.scalar_type() && grad_RF.device() == h_R2F.device(),
              "modalmoe.swiglu_backward: grad must be h's shape with the last dim halved and share its "
              "dtype and device; got ", grad_RF.sizes(), " ", grad_RF.scalar_type(), " for h ",
              h_R2F.sizes(), " ", h_R2F.scalar_type());
  const at::Tensor h = h_R2F.contiguous(), dy = grad_RF.contiguous();
  const int64_t F = h.size(-1) / 2, R = F == 0 ? 0 : h.numel() / (2 * F);
  at::Tensor dh = at::empty(h.sizes(), h.options());
  if (R == 0 || F == 0) return dh;
  const int64_t grain = std::max<int64_t>(1, kElemsPerTask / F);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "modalmoe_swiglu_backward", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    scalar_t* dp = dh.data_ptr<scalar_t>();
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      swiglu_backward_task<scalar_t>(gp, hp, dp, F, r0, r1);
    });
  });
  return dh;
}

TORCH_LIBRARY_IMPL(modalmoe, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace modalmoe
