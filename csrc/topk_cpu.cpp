// The router's top-k over experts for small k: one pass per row keeping the k best, instead of
// k argmax passes (and a scatter between them) over the [T, E] scores. Legend: T tokens, E experts.
//
// Equals k passes of argmax where each pick is then set to -inf: largest first, ties to the lower
// index, NaN above everything (argmax's rule); a pick that finds only -inf left takes, as argmax
// would, the first index holding -inf, picked ones included.
#include "permute.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace modalmoe {
namespace {

constexpr int64_t kMaxK = 8;
constexpr int64_t kElemsPerTask = 65536;

template <typename acc_t>
inline bool above(acc_t a, acc_t b) {  // a ranks strictly above b
  return std::isnan(a) ? !std::isnan(b) : a > b;
}

template <typename scalar_t>
void top_k_rows(const scalar_t* s_TE, int64_t* idx_Tk, int64_t E, int64_t k, int64_t t0, int64_t t1) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t t = t0; t < t1; ++t) {
    const scalar_t* s = s_TE + t * E;
    acc_t best_v[kMaxK];
    int64_t best_i[kMaxK];
    int64_t n = 0;
    for (int64_t e = 0; e < E; ++e) {
      const acc_t v = static_cast<acc_t>(s[e]);
      // the common case first: a full list and v no higher than its last entry (v is no NaN)
      if (n == k && !(v > best_v[k - 1]) && (v == v || std::isnan(best_v[k - 1]))) continue;
      int64_t pos = n < k ? n++ : k - 1;
      while (pos > 0 && above(v, best_v[pos - 1])) {
        best_v[pos] = best_v[pos - 1];
        best_i[pos] = best_i[pos - 1];
        --pos;
      }
      best_v[pos] = v;
      best_i[pos] = e;
    }
    int64_t* out = idx_Tk + t * k;
    for (int64_t j = 0; j < k; ++j) {
      out[j] = best_i[j];
      if (!(best_v[j] == neg_inf)) continue;
      // Only -inf left: argmax returns the first -inf, and every earlier pick is -inf by now.
      for (int64_t e = 0; e < E; ++e) {
        bool picked = false;
        for (int64_t i = 0; i < j; ++i) picked |= out[i] == e;
        if (picked || static_cast<acc_t>(s[e]) == neg_inf) {
          out[j] = e;
          break;
        }
      }
    }
  }
}

}  // namespace

at::Tensor top_k_rows_cpu(const at::Tensor& scores_TE, int64_t k) {
  TORCH_CHECK(scores_TE.device().is_cpu() && scores_TE.dim() == 2,
              "modalmoe.top_k_rows: expected CPU scores [T, E], got ", scores_TE.device(), " ",
              scores_TE.sizes());
  TORCH_CHECK(k >= 1 && k <= kMaxK && k <= scores_TE.size(1), "modalmoe.top_k_rows: need 1 <= k <= min(",
              kMaxK, ", E), got k = ", k, " for E = ", scores_TE.size(1));
  const at::Tensor s = scores_TE.contiguous();
  const int64_t T = s.size(0), E = s.size(1);
  at::Tensor idx = at::empty({T, k}, s.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, s.scalar_type(), "modalmoe_top_k_rows", [&] {
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    int64_t* ip = idx.data_ptr<int64_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, kElemsPerTask / E),
                     [&](int64_t t0, int64_t t1) { top_k_rows<scalar_t>(sp, ip, E, k, t0, t1); });
  });
  return idx;
}

TORCH_LIBRARY_IMPL(modalmoe, CPU, m) { m.impl("top_k_rows", &top_k_rows_cpu); }

}  // namespace modalmoe
