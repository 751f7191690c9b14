// C++ test of the modalmoe CPU ops against naive loops, run by ctest (see CMakeLists.txt).
// Legend: T tokens, k slots per token, S = T*k, E experts, H hidden, R permuted rows.
#include "permute.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                                    \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s | ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                     \
      std::fprintf(stderr, "\n");                                            \
      ++failures;                                                            \
    }                                                                        \
  } while (0)

struct NaivePlan {
  std::vector<int64_t> counts, padded, offsets, row_of, src_slot;
  std::vector<bool> dropped;
};

// One pass per expert over all slots: obviously stable and first-come for the capacity.
NaivePlan naive_plan(const std::vector<int64_t>& idx_S, int64_t E, int64_t pad, int64_t cap) {
  const int64_t S = static_cast<int64_t>(idx_S.size());
  NaivePlan p;
  p.row_of.assign(S, -1);
  p.dropped.assign(S, false);
  p.offsets.push_back(0);
  for (int64_t e = 0; e < E; ++e) {
    int64_t kept = 0;
    for (int64_t s = 0; s < S; ++s) {
      if (idx_S[s] != e) continue;
      if (cap >= 0 && kept >= cap) {
        p.dropped[s] = true;
        continue;
      }
      p.row_of[s] = p.offsets.back() + kept++;
      p.src_slot.push_back(s);
    }
    const int64_t padded = (kept + pad - 1) / pad * pad;
    p.src_slot.insert(p.src_slot.end(), padded - kept, -1);
    p.counts.push_back(kept);
    p.padded.push_back(padded);
    p.offsets.push_back(p.offsets.back() + padded);
  }
  return p;
}

std::vector<int64_t> to_vec(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()};
}

void check_case(int64_t T, int64_t k, int64_t E, int64_t H, int64_t pad, int64_t cap, double unrouted,
                at::ScalarType idx_dtype, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> pick(0, E - 1);
  std::bernoulli_distribution skip(unrouted);
  std::vector<int64_t> idx_S(T * k);
  for (auto& v : idx_S) v = skip(rng) ? -1 : pick(rng);
  const at::Tensor idx_Tk = at::tensor(idx_S, at::kLong).view({T, k}).to(idx_dtype);

  const NaivePlan want = naive_plan(idx_S, E, pad, cap);
  const auto [counts, padded, offsets, row_of, src_slot, dropped] = modalmoe::build_plan_cpu(idx_Tk, E, pad, cap);
  EXPECT(to_vec(counts) == want.counts, "counts T=%lld E=%lld", (long long)T, (long long)E);
  EXPECT(to_vec(padded) == want.padded, "padded_counts");
  EXPECT(to_vec(offsets) == want.offsets, "offsets");
  EXPECT(to_vec(row_of) == want.row_of, "row_of T=%lld E=%lld cap=%lld", (long long)T, (long long)E, (long long)cap);
  EXPECT(to_vec(src_slot) == want.src_slot, "src_slot");
  const std::vector<int64_t> dropped_v = to_vec(dropped);
  EXPECT(std::equal(dropped_v.begin(), dropped_v.end(), want.dropped.begin()), "dropped");

  // The registered op reaches the same kernel through the dispatcher.
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("modalmoe::build_plan", "")
                      .typed<modalmoe::Plan(const at::Tensor&, int64_t, int64_t, int64_t)>();
  EXPECT(at::equal(std::get<4>(op.call(idx_Tk, E, pad, cap)), src_slot), "dispatcher build_plan");

  const int64_t R = static_cast<int64_t>(want.src_slot.size());
  const at::Tensor x_TH = at::randn({T, H}, at::kDouble);
  const at::Tensor w_Tk = at::rand({T, k}, at::kDouble);
  const at::Tensor x_perm = modalmoe::gather_rows_cpu(x_TH, src_slot, row_of, std::nullopt);
  const auto x = x_TH.accessor<double, 2>();
  const auto xp = x_perm.accessor<double, 2>();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t s = want.src_slot[r];
    for (int64_t h = 0; h < H; ++h) {
      EXPECT(xp[r][h] == (s < 0 ? 0.0 : x[s / k][h]), "gather row %lld", (long long)r);
    }
  }

  // The fused op, on both store paths (streamed scatter pass; plain gather after the plan).
  for (const int64_t min_bytes : {int64_t{0}, int64_t{1} << 62}) {
    const int64_t before = modalmoe::set_streaming_min_bytes(min_bytes);
    const auto [xp2, counts2, padded2, offsets2, row_of2, src_slot2, dropped2] =
        modalmoe::permute_rows_cpu(x_TH, idx_Tk, E, pad, cap);
    modalmoe::set_streaming_min_bytes(before);
    EXPECT(at::equal(xp2, x_perm) && at::equal(row_of2, row_of) && at::equal(src_slot2, src_slot) &&
               at::equal(counts2, counts) && at::equal(padded2, padded) && at::equal(offsets2, offsets) &&
               at::equal(dropped2, dropped),
           "permute_rows (streaming from %lld bytes) T=%lld", (long long)min_bytes, (long long)T);
  }

  const at::Tensor y_RH = at::randn({R, H}, at::kDouble);
  const at::Tensor y_TH = modalmoe::combine_rows_cpu(y_RH, row_of, src_slot, w_Tk);
  const at::Tensor dots = modalmoe::slot_dot_cpu(x_TH, y_RH, row_of, at::kDouble);
  const auto y = y_RH.accessor<double, 2>();
  const auto w = w_Tk.accessor<double, 2>();
  const auto out = y_TH.accessor<double, 2>();
  const auto dot = dots.accessor<double, 2>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      double acc = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = want.row_of[t * k + j];
        if (r >= 0) acc += w[t][j] * y[r][h];
      }
      EXPECT(std::abs(out[t][h] - acc) < 1e-12, "combine t=%lld h=%lld", (long long)t, (long long)h);
    }
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = want.row_of[t * k + j];
      double acc = 0;
      for (int64_t h = 0; r >= 0 && h < H; ++h) acc += x[t][h] * y[r][h];
      EXPECT(std::abs(dot[t][j] - acc) < 1e-10, "slot_dot t=%lld j=%lld", (long long)t, (long long)j);
    }
  }

  const at::Tensor w_EHN = at::randn({E, H, 3}, at::kDouble);
  const at::Tensor mm = modalmoe::grouped_mm(x_perm, w_EHN, want.offsets);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t lo = want.offsets[e], n = want.offsets[e + 1] - lo;
    EXPECT(at::allclose(mm.narrow(0, lo, n), at::mm(x_perm.narrow(0, lo, n), w_EHN[e])), "grouped_mm e=%lld",
           (long long)e);
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (int threads : {1, 3}) {
    at::set_num_threads(threads);
    check_case(0, 2, 4, 5, 1, -1, 0.0, at::kLong, 1);
    check_case(1, 1, 1, 3, 1, -1, 0.0, at::kLong, 2);
    check_case(37, 2, 5, 7, 1, -1, 0.2, at::kInt, 3);
    check_case(200, 3, 9, 4, 4, 20, 0.1, at::kLong, 4);
    check_case(500, 2, 1024, 2, 2, 1, 0.0, at::kInt, 5);
    check_case(40000, 2, 16, 64, 8, 3000, 0.05, at::kLong, 6);  // chunked histogram
    check_case(300, 2, 6, 8, 4, 60, 0.1, at::kLong, 7);  // 64-byte rows: the streamed path can run
  }
  if (failures == 0) std::printf("test_permute: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
