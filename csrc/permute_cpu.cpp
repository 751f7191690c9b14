// CPU kernels for token permutation (OpenMP). Legend in permute.h: T tokens, k slots per token,
// S = T*k, E experts, H hidden, R permuted rows. A slot s = t*k + j; row_of/src_slot are inverse maps.
#include "permute.h"

#include "bf16_avx512.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <omp.h>
#include <unistd.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <type_traits>
#include <vector>

namespace modalmoe {
namespace {

// Enough work per thread that fork/join (~µs) stays negligible.
constexpr int64_t kSlotsPerThread = 16384;
constexpr int64_t kElemsPerThread = 65536;
constexpr int64_t kCacheLine = 64;

// When the bytes an op reads and writes together reach the last-level cache size, its output will not
// stay cached for the consumer: store it non-temporally, which also saves the read-for-ownership of
// every destination line. Below that, plain stores (streaming is slower there: docs/benchmarks.md).
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    // sysfs gives the cache this CPU shares; sysconf can report the whole package's L3.
    int64_t best_level = 0, best = 0;
    for (int i = 0; i < 8; ++i) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
      std::ifstream level_file(dir + "level"), size_file(dir + "size");
      int64_t level = 0, size = 0;
      char unit = 0;
      if (!(level_file >> level) || !(size_file >> size)) continue;
      if (size_file >> unit) size <<= unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0;
      if (level > best_level) best_level = level, best = size;
    }
    if (best <= 0) best = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return best > 0 ? best : int64_t{32} << 20;
  }();
  return bytes;
}

int threads_for(int64_t work, int64_t per_thread) {
  if (omp_in_parallel()) return 1;
  const int64_t wanted = std::max<int64_t>(1, work / per_thread);
  return static_cast<int>(std::min<int64_t>(at::get_num_threads(), wanted));
}

std::atomic<int64_t> streaming_min_bytes{-1};  // bytes read + written; < 0: the last-level cache size

bool can_stream(const void* base, int64_t row_bytes, int64_t read_bytes, int64_t write_bytes) {
#if defined(__SSE2__)
  const int64_t set = streaming_min_bytes.load(std::memory_order_relaxed);
  return read_bytes + write_bytes >= (set < 0 ? last_level_cache_bytes() : set) && row_bytes % 16 == 0 &&
         reinterpret_cast<uintptr_t>(base) % 16 == 0;
#else
  return false;
#endif
}

// dst must be 16-byte aligned and bytes a multiple of 16 (see can_stream).
inline void stream_copy(void* dst, const void* src, int64_t bytes) {
#if defined(__SSE2__)
  auto* d = static_cast<__m128i*>(dst);
  const auto* s = static_cast<const __m128i*>(src);
  for (int64_t i = 0; i < bytes / 16; ++i) _mm_stream_si128(d + i, _mm_loadu_si128(s + i));
#else
  std::memcpy(dst, src, bytes);
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += kCacheLine) __builtin_prefetch(p + off);
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "modalmoe: ", name, " must be a CPU tensor, got ", t.device());
}

void check_plan_maps(const at::Tensor& row_of_Tk, const at::Tensor& src_slot_R) {
  TORCH_CHECK(row_of_Tk.dim() == 2 && row_of_Tk.scalar_type() == at::kLong,
              "modalmoe: row_of must be int64 [T, k], got ", row_of_Tk.scalar_type(), " ",
              row_of_Tk.sizes());
  TORCH_CHECK(src_slot_R.dim() == 1 && src_slot_R.scalar_type() == at::kLong,
              "modalmoe: src_slot must be int64 [R], got ", src_slot_R.scalar_type(), " ",
              src_slot_R.sizes());
}

// Weights are read in the accumulation type so kernels need one weight pointer type per dtype.
at::Tensor weights_as(const std::optional<at::Tensor>& weights_Tk, const at::Tensor& row_of_Tk,
                      at::ScalarType acc_dtype) {
  if (!weights_Tk.has_value()) return at::Tensor();
  const auto& w = *weights_Tk;
  TORCH_CHECK(w.sizes() == row_of_Tk.sizes(), "modalmoe: weights must be [T, k] = ",
              row_of_Tk.sizes(), ", got ", w.sizes());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), "modalmoe: weights must be floating point");
  check_cpu(w, "weights");
  return w.to(acc_dtype).contiguous();
}

// Plan only: nothing to move.
struct NoRows {
  int threads(int64_t /*S*/) const { return 1; }
  void prepare(int64_t /*R*/, const int64_t* /*counts_E*/, const int64_t* /*offsets_E1*/, int64_t /*E*/) {}
  void move(int64_t /*s*/, int64_t /*row*/) const {}
  void finish() const {}
};

// When the output is streamed (see can_stream), the counting sort's scatter pass copies each kept
// slot's token row to its row of the output: x is read once in token order and the plan is never
// re-read. Smaller outputs are gathered after the plan instead: in cache, scattered plain stores are
// slower than a sequential gather (docs/benchmarks.md).
template <typename scalar_t>
struct CopyRows {
  const scalar_t* x_TH;
  int64_t T, H, k;
  at::Tensor* out;  // allocated in prepare, once the row count is known
  scalar_t* out_RH = nullptr;
  bool streaming = false;

  int threads(int64_t S) const { return threads_for(S * H, kElemsPerThread); }
  void prepare(int64_t R, const int64_t* counts_E, const int64_t* offsets_E1, int64_t E) {
    *out = at::empty({R, H}, out->options());
    out_RH = out->data_ptr<scalar_t>();
    const int64_t row_bytes = H * static_cast<int64_t>(sizeof(scalar_t));
    streaming = R > 0 && can_stream(out_RH, row_bytes, T * row_bytes, R * row_bytes);
    if (!streaming) return;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t pad_lo = offsets_E1[e] + counts_E[e];
      std::memset(static_cast<void*>(out_RH + pad_lo * H), 0, (offsets_E1[e + 1] - pad_lo) * row_bytes);
    }
  }
  void move(int64_t s, int64_t row) const {
    if (streaming) stream_copy(out_RH + row * H, x_TH + (s / k) * H, H * int64_t{sizeof(scalar_t)});
  }
  void finish() const {
    if (streaming) stream_fence();
  }
};

template <typename idx_t, typename Rows>
void plan_kernel(const idx_t* idx_S, int64_t T, int64_t k, int64_t E, int64_t pad, int64_t cap,
                 int64_t* counts_E, int64_t* padded_E, int64_t* offsets_E1, int64_t* row_of_S,
                 bool* dropped_S, at::Tensor& src_slot_R, Rows& rows) {
  const int64_t S = T * k;
  const int P = std::max(threads_for(S, kSlotsPerThread), rows.threads(S));
  auto chunk_lo = [&](int p) { return (T * p / P) * k; };

  // cursor[p*E + e]: histogram of chunk p, then the rank of its first expert-e slot.
  std::vector<int64_t> cursor(static_cast<size_t>(P) * E, 0);
  int bad = 0;
#pragma omp parallel for num_threads(P) schedule(static, 1) reduction(| : bad)
  for (int p = 0; p < P; ++p) {
    int64_t* hist = cursor.data() + static_cast<int64_t>(p) * E;
    const int64_t hi = chunk_lo(p + 1);
    for (int64_t s = chunk_lo(p); s < hi; ++s) {
      const int64_t e = idx_S[s];
      if (e >= 0 && e < E) {
        ++hist[e];
      } else if (e != -1) {
        bad = 1;
      }
    }
  }
  TORCH_CHECK(!bad, "modalmoe.permute: topk_idx entries must be -1 or in [0, ", E, ")");

  offsets_E1[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t seen = 0;
    for (int p = 0; p < P; ++p) {
      int64_t& c = cursor[static_cast<int64_t>(p) * E + e];
      const int64_t n = c;
      c = seen;
      seen += n;
    }
    const int64_t kept = cap < 0 ? seen : std::min(seen, cap);
    counts_E[e] = kept;
    padded_E[e] = (kept + pad - 1) / pad * pad;
    offsets_E1[e + 1] = offsets_E1[e] + padded_E[e];
  }

  src_slot_R = at::empty({offsets_E1[E]}, src_slot_R.options());
  int64_t* src_slot = src_slot_R.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    std::fill(src_slot + offsets_E1[e] + counts_E[e], src_slot + offsets_E1[e + 1], int64_t{-1});
  }
  rows.prepare(offsets_E1[E], counts_E, offsets_E1, E);

  const int64_t limit = cap < 0 ? INT64_MAX : cap;
#pragma omp parallel for num_threads(P) schedule(static, 1)
  for (int p = 0; p < P; ++p) {
    int64_t* rank = cursor.data() + static_cast<int64_t>(p) * E;
    const int64_t hi = chunk_lo(p + 1);
    for (int64_t s = chunk_lo(p); s < hi; ++s) {
      const int64_t e = idx_S[s];
      if (e < 0) {
        row_of_S[s] = -1;
        dropped_S[s] = false;
        continue;
      }
      const int64_t r = rank[e]++;
      const bool keep = r < limit;
      const int64_t row = offsets_E1[e] + r;
      row_of_S[s] = keep ? row : -1;
      dropped_S[s] = !keep;
      if (keep) {
        src_slot[row] = s;
        rows.move(s, row);
      }
    }
    rows.finish();
  }
}

template <typename scalar_t, typename acc_t>
void gather_kernel(const scalar_t* x_TH, const int64_t* src_slot_R, const acc_t* w_S, scalar_t* out_RH,
                   int64_t R, int64_t H, int64_t S, int64_t k) {
  constexpr int64_t kAhead = 4;
  const int64_t row_bytes = sizeof(scalar_t) * H;
  const int64_t T = S / std::max<int64_t>(k, 1);
  const bool streaming = w_S == nullptr && can_stream(out_RH, row_bytes, T * row_bytes, R * row_bytes);
  const bool avx512 = cpu_has_avx512();
  int bad = 0;
#pragma omp parallel num_threads(threads_for(R * H, kElemsPerThread)) reduction(| : bad)
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      if (r + kAhead < R && src_slot_R[r + kAhead] >= 0 && src_slot_R[r + kAhead] < S) {
        prefetch_row(x_TH + (src_slot_R[r + kAhead] / k) * H, row_bytes);
      }
      const int64_t s = src_slot_R[r];
      scalar_t* __restrict dst = out_RH + r * H;
      if (s < 0 || s >= S) {
        bad |= s < -1 || s >= S;
        std::memset(static_cast<void*>(dst), 0, row_bytes);
        continue;
      }
      const scalar_t* __restrict src = x_TH + (s / k) * H;
      if (streaming) {
        stream_copy(dst, src, row_bytes);
      } else if (w_S == nullptr) {
        std::memcpy(static_cast<void*>(dst), src, row_bytes);
      } else {
        const acc_t ws = w_S[s];
#if MODALMOE_HAS_AVX512
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          if (avx512) {
            scale_row_bf16(dst, src, ws, H);  // the scalar bf16 rounding below does not vectorize
            continue;
          }
        }
#endif
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<scalar_t>(ws * static_cast<acc_t>(src[h]));
      }
    }
    if (streaming) stream_fence();
  }
  TORCH_CHECK(!bad, "modalmoe.gather_rows: src_slot entries must be -1 or in [0, T*k)");
}

// Sums a token's slot rows in slot order (deterministic) into an L1-resident acc_t row, then writes
// it out once (non-temporally when the output is large).
template <typename scalar_t, typename acc_t>
void combine_kernel(const scalar_t* y_RH, const int64_t* row_of_S, const acc_t* w_S, scalar_t* out_TH,
                    int64_t T, int64_t k, int64_t H, int64_t R) {
  constexpr int64_t kAhead = 2;
  const int64_t row_bytes = sizeof(scalar_t) * H;
  const bool streaming =
      std::is_same_v<scalar_t, acc_t> && can_stream(out_TH, row_bytes, R * row_bytes, T * row_bytes);
  const bool avx512 = cpu_has_avx512();
  int bad = 0;
#pragma omp parallel num_threads(threads_for(T * k * H, kElemsPerThread)) reduction(| : bad)
  {
    std::vector<acc_t> buf(H);
    acc_t* __restrict acc = buf.data();
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      if (t + kAhead < T) {
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = row_of_S[(t + kAhead) * k + j];
          if (r >= 0 && r < R) prefetch_row(y_RH + r * H, row_bytes);
        }
      }
      int64_t used = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = row_of_S[t * k + j];
        if (r < 0 || r >= R) {
          bad |= r < -1 || r >= R;
          continue;
        }
        const scalar_t* __restrict y = y_RH + r * H;
        const acc_t wj = w_S == nullptr ? acc_t(1) : w_S[t * k + j];
        if (used++ == 0) {
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) acc[h] = wj * static_cast<acc_t>(y[h]);
        } else {
#pragma omp simd
          for (int64_t h = 0; h < H; ++h) acc[h] += wj * static_cast<acc_t>(y[h]);
        }
      }
      if (used == 0) std::fill(acc, acc + H, acc_t(0));
      scalar_t* __restrict o = out_TH + t * H;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (streaming) {
          stream_copy(o, acc, row_bytes);
        } else {
          std::memcpy(o, acc, row_bytes);
        }
      } else {
#if MODALMOE_HAS_AVX512
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          if (avx512) {
            store_row_bf16(o, acc, H);
            continue;
          }
        }
#endif
        for (int64_t h = 0; h < H; ++h) o[h] = static_cast<scalar_t>(acc[h]);
      }
    }
    if (streaming) stream_fence();
  }
  TORCH_CHECK(!bad, "modalmoe.combine_rows: row_of entries must be -1 or in [0, R)");
}

template <typename scalar_t, typename acc_t>
void slot_dot_kernel(const scalar_t* a_TH, const scalar_t* b_RH, const int64_t* row_of_S, acc_t* out_S,
                     int64_t T, int64_t k, int64_t H, int64_t R) {
  int bad = 0;
#pragma omp parallel for num_threads(threads_for(T * k * H, kElemsPerThread)) schedule(static) reduction(| : bad)
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* __restrict a = a_TH + t * H;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = row_of_S[t * k + j];
      acc_t dot = 0;
      if (r >= 0 && r < R) {
        const scalar_t* __restrict b = b_RH + r * H;
#pragma omp simd reduction(+ : dot)
        for (int64_t h = 0; h < H; ++h) dot += static_cast<acc_t>(a[h]) * static_cast<acc_t>(b[h]);
      } else {
        bad |= r < -1 || r >= R;
      }
      out_S[t * k + j] = dot;
    }
  }
  TORCH_CHECK(!bad, "modalmoe.slot_dot: row_of entries must be -1 or in [0, R)");
}

#if MODALMOE_HAS_AVX512
// GCC 12 takes the `__Y = __Y` placeholders inside its own intrinsic headers for uninitialized reads.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
MODALMOE_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
MODALMOE_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) { return load_bf16(p, m); }
MODALMOE_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
MODALMOE_AVX512 inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) { store_bf16(p, v, m); }

// dst[h] = w * g[h] (rounded as gather_kernel rounds) and returns <g, y> in float; two
// accumulators so the dot's add chain does not bound the row.
template <typename scalar_t>
MODALMOE_AVX512 float scale_and_dot16(scalar_t* dst, const scalar_t* g, const scalar_t* y, float w, int64_t H) {
  const __m512 wv = _mm512_set1_ps(w);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t h = 0;
  for (; h + 32 <= H; h += 32) {
    const __m512 g0 = load16(g + h, 0xffff), g1 = load16(g + h + 16, 0xffff);
    acc0 = _mm512_fmadd_ps(g0, load16(y + h, 0xffff), acc0);
    acc1 = _mm512_fmadd_ps(g1, load16(y + h + 16, 0xffff), acc1);
    store16(dst + h, _mm512_mul_ps(wv, g0), 0xffff);
    store16(dst + h + 16, _mm512_mul_ps(wv, g1), 0xffff);
  }
  for (; h < H; h += 16) {
    const __mmask16 m = tail_mask(H - h);
    const __m512 g0 = load16(g + h, m);
    acc0 = _mm512_fmadd_ps(g0, load16(y + h, m), acc0);
    store16(dst + h, _mm512_mul_ps(wv, g0), m);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#pragma GCC diagnostic pop
#endif

// dst[h] = w * g[h]; returns <g, y>, both in acc_t.
template <typename scalar_t, typename acc_t>
acc_t scale_and_dot(scalar_t* __restrict dst, const scalar_t* __restrict g, const scalar_t* __restrict y, acc_t w,
                    int64_t H, bool avx512) {
#if MODALMOE_HAS_AVX512
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx512) return scale_and_dot16(dst, g, y, w, H);
  }
#endif
  acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t h = 0; h < H; ++h) {
    const acc_t gh = static_cast<acc_t>(g[h]);
    dot += gh * static_cast<acc_t>(y[h]);
    dst[h] = static_cast<scalar_t>(w * gh);
  }
  return dot;
}

// combine_rows' gradient with weights in one pass: grad_y[r] = w[s] * grad[s / k] for s = src_slot[r]
// (zero where s == -1) and grad_w[s] = <grad[s / k], y[row_of[s]]> (zero where row_of[s] == -1).
// Tokens are walked in order, so each grad row is read once (sequentially) and serves its k slots;
// walking rows in the gather's order instead reads each grad row k times at random and measured
// 1.1-1.7x slower (T=16384, k=2, H=256, E=16 and 64, float32, one thread). A row whose slot maps elsewhere (maps that are not a plan's inverse
// pair) and the padding rows are written by the second loop: every output is written exactly once.
template <typename scalar_t, typename acc_t>
void combine_backward_kernel(const scalar_t* g_TH, const scalar_t* y_RH, const int64_t* row_of_S,
                             const int64_t* src_slot_R, const acc_t* w_S, scalar_t* gy_RH, acc_t* gw_S,
                             int64_t T, int64_t k, int64_t H, int64_t R) {
  constexpr int64_t kAhead = 2;
  const int64_t S = T * k, row_bytes = sizeof(scalar_t) * H;
  const bool streaming = can_stream(gy_RH, row_bytes, (T + R) * row_bytes, R * row_bytes);
  const bool avx512 = cpu_has_avx512();
  int bad_row = 0, bad_slot = 0;
#pragma omp parallel num_threads(threads_for(S * H, kElemsPerThread)) reduction(| : bad_row, bad_slot)
  {
    std::vector<scalar_t> buf(streaming ? H : 0);  // the row, in L1, then streamed out
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < T; ++t) {
      if (t + kAhead < T) {
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = row_of_S[(t + kAhead) * k + j];
          if (r >= 0 && r < R) prefetch_row(y_RH + r * H, row_bytes);
        }
      }
      const scalar_t* __restrict g = g_TH + t * H;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = t * k + j, r = row_of_S[s];
        acc_t dot = 0;
        if (r < 0 || r >= R) {
          bad_row |= r < -1 || r >= R;
        } else if (src_slot_R[r] == s) {
          scalar_t* dst = streaming ? buf.data() : gy_RH + r * H;
          dot = scale_and_dot<scalar_t, acc_t>(dst, g, y_RH + r * H, w_S[s], H, avx512);
          if (streaming) stream_copy(gy_RH + r * H, dst, row_bytes);
        } else {
          const scalar_t* __restrict y = y_RH + r * H;
#pragma omp simd reduction(+ : dot)
          for (int64_t h = 0; h < H; ++h) dot += static_cast<acc_t>(g[h]) * static_cast<acc_t>(y[h]);
        }
        gw_S[s] = dot;
      }
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t s = src_slot_R[r];
      if (s >= 0 && s < S && row_of_S[s] == r) continue;  // written by the token loop
      scalar_t* __restrict dst = gy_RH + r * H;
      if (s < 0 || s >= S) {
        bad_slot |= s < -1 || s >= S;
        std::memset(static_cast<void*>(dst), 0, row_bytes);
        continue;
      }
      const scalar_t* __restrict g = g_TH + (s / k) * H;
      const acc_t ws = w_S[s];
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) dst[h] = static_cast<scalar_t>(ws * static_cast<acc_t>(g[h]));
    }
    if (streaming) stream_fence();
  }
  TORCH_CHECK(!bad_row, "modalmoe.combine_rows_backward: row_of entries must be -1 or in [0, R)");
  TORCH_CHECK(!bad_slot, "modalmoe.combine_rows_backward: src_slot entries must be -1 or in [0, T*k)");
}

void check_values(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "modalmoe: ", name, " must be 2-D, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                  t.scalar_type() == at::kBFloat16,
              "modalmoe: ", name, " must be float32, float64 or bfloat16, got ", t.scalar_type());
  check_cpu(t, name);
}

void check_plan_args(const at::Tensor& topk_idx_Tk, int64_t num_experts, int64_t pad_multiple) {
  TORCH_CHECK(topk_idx_Tk.dim() == 2, "modalmoe.permute: topk_idx must be [T, k], got ",
              topk_idx_Tk.sizes());
  TORCH_CHECK(topk_idx_Tk.scalar_type() == at::kInt || topk_idx_Tk.scalar_type() == at::kLong,
              "modalmoe.permute: topk_idx must be int32 or int64, got ", topk_idx_Tk.scalar_type());
  TORCH_CHECK(num_experts > 0, "modalmoe.permute: num_experts must be positive");
  TORCH_CHECK(pad_multiple >= 1, "modalmoe.permute: pad_multiple must be >= 1");
  check_cpu(topk_idx_Tk, "topk_idx");
}

}  // namespace

int64_t set_streaming_min_bytes(int64_t bytes) {
  return streaming_min_bytes.exchange(bytes < 0 ? -1 : bytes);
}

Plan build_plan_cpu(const at::Tensor& topk_idx_Tk, int64_t num_experts, int64_t pad_multiple,
                    int64_t capacity) {
  check_plan_args(topk_idx_Tk, num_experts, pad_multiple);
  const at::Tensor idx = topk_idx_Tk.contiguous();
  const int64_t T = idx.size(0), k = idx.size(1), E = num_experts;
  const auto i64 = idx.options().dtype(at::kLong);
  at::Tensor counts = at::empty({E}, i64), padded = at::empty({E}, i64);
  at::Tensor offsets = at::empty({E + 1}, i64), row_of = at::empty({T, k}, i64);
  at::Tensor dropped = at::empty({T, k}, i64.dtype(at::kBool));
  at::Tensor src_slot = at::empty({0}, i64);
  NoRows no_rows;
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "modalmoe_build_plan", [&] {
    plan_kernel<index_t>(idx.const_data_ptr<index_t>(), T, k, E, pad_multiple, capacity,
                         counts.data_ptr<int64_t>(), padded.data_ptr<int64_t>(),
                         offsets.data_ptr<int64_t>(), row_of.data_ptr<int64_t>(),
                         dropped.data_ptr<bool>(), src_slot, no_rows);
  });
  return {counts, padded, offsets, row_of, src_slot, dropped};
}

Permuted permute_rows_cpu(const at::Tensor& x_TH, const at::Tensor& topk_idx_Tk, int64_t num_experts,
                          int64_t pad_multiple, int64_t capacity) {
  check_values(x_TH, "x");
  check_plan_args(topk_idx_Tk, num_experts, pad_multiple);
  TORCH_CHECK(x_TH.size(0) == topk_idx_Tk.size(0), "modalmoe.permute: x has ", x_TH.size(0),
              " tokens but topk_idx has ", topk_idx_Tk.size(0));
  const at::Tensor x = x_TH.contiguous(), idx = topk_idx_Tk.contiguous();
  const int64_t T = idx.size(0), k = idx.size(1), E = num_experts, H = x.size(1);
  const auto i64 = idx.options().dtype(at::kLong);
  at::Tensor counts = at::empty({E}, i64), padded = at::empty({E}, i64);
  at::Tensor offsets = at::empty({E + 1}, i64), row_of = at::empty({T, k}, i64);
  at::Tensor dropped = at::empty({T, k}, i64.dtype(at::kBool));
  at::Tensor src_slot = at::empty({0}, i64), out = at::empty({0, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "modalmoe_permute_rows", [&] {
    CopyRows<scalar_t> rows{x.const_data_ptr<scalar_t>(), T, H, k, &out};
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "modalmoe_permute_rows", [&] {
      plan_kernel<index_t, CopyRows<scalar_t>>(
          idx.const_data_ptr<index_t>(), T, k, E, pad_multiple, capacity, counts.data_ptr<int64_t>(),
          padded.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), row_of.data_ptr<int64_t>(),
          dropped.data_ptr<bool>(), src_slot, rows);
    });
    if (!rows.streaming) {
      gather_kernel<scalar_t, at::opmath_type<scalar_t>>(x.const_data_ptr<scalar_t>(),
                                                         src_slot.const_data_ptr<int64_t>(), nullptr,
                                                         out.data_ptr<scalar_t>(), out.size(0), H, T * k, k);
    }
  });
  return {out, counts, padded, offsets, row_of, src_slot, dropped};
}

at::Tensor gather_rows_cpu(const at::Tensor& x_TH, const at::Tensor& src_slot_R,
                           const at::Tensor& row_of_Tk, const std::optional<at::Tensor>& weights_Tk) {
  check_values(x_TH, "x");
  check_plan_maps(row_of_Tk, src_slot_R);
  TORCH_CHECK(x_TH.size(0) == row_of_Tk.size(0), "modalmoe.gather_rows: x has ", x_TH.size(0),
              " tokens but row_of has ", row_of_Tk.size(0));
  const at::Tensor x = x_TH.contiguous(), src_slot = src_slot_R.contiguous();
  const int64_t R = src_slot.size(0), H = x.size(1), k = row_of_Tk.size(1);
  at::Tensor out = at::empty({R, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "modalmoe_gather_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = weights_as(weights_Tk, row_of_Tk, c10::CppTypeToScalarType<acc_t>::value);
    gather_kernel<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), src_slot.const_data_ptr<int64_t>(),
                                   w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
                                   out.data_ptr<scalar_t>(), R, H, row_of_Tk.numel(), k);
  });
  return out;
}

at::Tensor combine_rows_cpu(const at::Tensor& y_RH, const at::Tensor& row_of_Tk,
                            const at::Tensor& src_slot_R, const std::optional<at::Tensor>& weights_Tk) {
  check_values(y_RH, "y_perm");
  check_plan_maps(row_of_Tk, src_slot_R);
  TORCH_CHECK(y_RH.size(0) == src_slot_R.size(0), "modalmoe.combine_rows: y_perm has ", y_RH.size(0),
              " rows but the plan has ", src_slot_R.size(0));
  const at::Tensor y = y_RH.contiguous(), row_of = row_of_Tk.contiguous();
  const int64_t T = row_of.size(0), k = row_of.size(1), H = y.size(1), R = y.size(0);
  at::Tensor out = at::empty({T, H}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "modalmoe_combine_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = weights_as(weights_Tk, row_of, c10::CppTypeToScalarType<acc_t>::value);
    combine_kernel<scalar_t, acc_t>(y.const_data_ptr<scalar_t>(), row_of.const_data_ptr<int64_t>(),
                                    w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
                                    out.data_ptr<scalar_t>(), T, k, H, R);
  });
  return out;
}

at::Tensor slot_dot_cpu(const at::Tensor& tokens_TH, const at::Tensor& rows_RH,
                        const at::Tensor& row_of_Tk, c10::ScalarType dtype) {
  check_values(tokens_TH, "tokens");
  check_values(rows_RH, "rows");
  TORCH_CHECK(row_of_Tk.dim() == 2 && row_of_Tk.scalar_type() == at::kLong,
              "modalmoe.slot_dot: row_of must be int64 [T, k]");
  TORCH_CHECK(tokens_TH.scalar_type() == rows_RH.scalar_type(),
              "modalmoe.slot_dot: tokens and rows must share a dtype");
  TORCH_CHECK(tokens_TH.size(0) == row_of_Tk.size(0) && tokens_TH.size(1) == rows_RH.size(1),
              "modalmoe.slot_dot: shape mismatch ", tokens_TH.sizes(), " ", rows_RH.sizes(), " ",
              row_of_Tk.sizes());
  TORCH_CHECK(at::isFloatingType(dtype), "modalmoe.slot_dot: dtype must be floating point");
  const at::Tensor a = tokens_TH.contiguous(), b = rows_RH.contiguous(), row_of = row_of_Tk.contiguous();
  const int64_t T = row_of.size(0), k = row_of.size(1), H = a.size(1), R = b.size(0);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "modalmoe_slot_dot", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    out = at::empty({T, k}, a.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    slot_dot_kernel<scalar_t, acc_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                     row_of.const_data_ptr<int64_t>(), out.data_ptr<acc_t>(), T, k, H, R);
  });
  return out.to(dtype);
}

std::tuple<at::Tensor, at::Tensor> combine_rows_backward_cpu(const at::Tensor& grad_TH, const at::Tensor& y_RH,
                                                             const at::Tensor& row_of_Tk,
                                                             const at::Tensor& src_slot_R,
                                                             const at::Tensor& weights_Tk) {
  check_values(grad_TH, "grad");
  check_values(y_RH, "y_perm");
  check_plan_maps(row_of_Tk, src_slot_R);
  TORCH_CHECK(grad_TH.scalar_type() == y_RH.scalar_type(),
              "modalmoe.combine_rows_backward: grad and y_perm must share a dtype, got ", grad_TH.scalar_type(),
              " and ", y_RH.scalar_type());
  TORCH_CHECK(grad_TH.size(0) == row_of_Tk.size(0) && grad_TH.size(1) == y_RH.size(1) &&
                  y_RH.size(0) == src_slot_R.size(0),
              "modalmoe.combine_rows_backward: shape mismatch: grad ", grad_TH.sizes(), ", y_perm ",
              y_RH.sizes(), ", row_of ", row_of_Tk.sizes(), ", src_slot ", src_slot_R.sizes());
  const at::Tensor g = grad_TH.contiguous(), y = y_RH.contiguous();
  const at::Tensor row_of = row_of_Tk.contiguous(), src_slot = src_slot_R.contiguous();
  const int64_t T = row_of.size(0), k = row_of.size(1), H = y.size(1), R = y.size(0);
  at::Tensor grad_y = at::empty({R, H}, y.options()), grad_w;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "modalmoe_combine_rows_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = weights_as(weights_Tk, row_of, c10::CppTypeToScalarType<acc_t>::value);
    grad_w = at::empty({T, k}, w.options());
    combine_backward_kernel<scalar_t, acc_t>(g.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                             row_of.const_data_ptr<int64_t>(), src_slot.const_data_ptr<int64_t>(),
                                             w.const_data_ptr<acc_t>(), grad_y.data_ptr<scalar_t>(),
                                             grad_w.data_ptr<acc_t>(), T, k, H, R);
  });
  return {grad_y, grad_w.to(weights_Tk.scalar_type())};
}

TORCH_LIBRARY_IMPL(modalmoe, CPU, m) {
  m.impl("build_plan", &build_plan_cpu);
  m.impl("permute_rows", &permute_rows_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("combine_rows", &combine_rows_cpu);
  m.impl("slot_dot", &slot_dot_cpu);
  m.impl("combine_rows_backward", &combine_rows_backward_cpu);
}

}  // namespace modalmoe
