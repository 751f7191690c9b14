// AVX-512 helpers for bfloat16 rows, shared by the CPU kernels: 16 lanes of float math per step,
// bfloat16 loads and stores rounded as c10::BFloat16 rounds. Callers check cpu_has_avx512() first;
// MODALMOE_HAS_AVX512 is 0 where the compiler cannot target it.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MODALMOE_HAS_AVX512 1

namespace modalmoe {

#define MODALMOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

inline bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}

// exp(x) to ~1 ulp: x = n·ln2 + r, Cephes' expf polynomial on r, scaled by 2^n. Clamped so that
// scalef gives inf above ~88.72 and 0 below ~-103.3 (as expf does); NaN passes through.
MODALMOE_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.8f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));  // NaN stays
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

MODALMOE_AVX512 inline __m512 load_bf16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// Round to nearest even, NaN to 0x7fc0: c10::BFloat16's conversion, 16 lanes at a time.
MODALMOE_AVX512 inline __m512i bf16_bits(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i bits = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  return _mm512_mask_mov_epi32(bits, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
}

MODALMOE_AVX512 inline __m512 round_bf16(__m512 f) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(f), 16));
}

MODALMOE_AVX512 inline void store_bf16(c10::BFloat16* p, __m512 f, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(bf16_bits(f)));
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
}

// dst[h] = bf16(w * src[h])
MODALMOE_AVX512 inline void scale_row_bf16(c10::BFloat16* dst, const c10::BFloat16* src, float w, int64_t H) {
  const __m512 wv = _mm512_set1_ps(w);
  for (int64_t h = 0; h < H; h += 16) {
    const __mmask16 m = tail_mask(H - h);
    store_bf16(dst + h, _mm512_mul_ps(wv, load_bf16(src + h, m)), m);
  }
}

// dst[h] = bf16(acc[h])
MODALMOE_AVX512 inline void store_row_bf16(c10::BFloat16* dst, const float* acc, int64_t H) {
  for (int64_t h = 0; h < H; h += 16) {
    const __mmask16 m = tail_mask(H - h);
    store_bf16(dst + h, _mm512_maskz_loadu_ps(m, acc + h), m);
  }
}

}  // namespace modalmoe

#else
#define MODALMOE_HAS_AVX512 0
namespace modalmoe {
inline bool cpu_has_avx512() { return false; }
}  // namespace modalmoe
#endif
