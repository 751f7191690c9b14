// CUDA kernels for token permutation; interface and legend in permute_kernels.h.
//
// Plan: one warp per contiguous chunk of slots. __match_any_sync groups the lanes of a 32-slot round
// by expert, so each slot's rank is (chunk's running count) + (earlier peers in the round): a stable
// counting sort without atomics or a sort.
#include "permute_kernels.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace modalmoe::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int64_t kMaxChunks = 256;
constexpr int64_t kMinChunk = 128;
constexpr int kScanThreads = 1024;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccOf<T>::type v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// N consecutive elements moved as one 16-byte access when rows are aligned (N = 1 otherwise).
template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

int64_t chunk_size(int64_t num_slots) {
  const int64_t per = (num_slots + kMaxChunks - 1) / kMaxChunks;
  return std::max(kMinChunk, (per + kWarp - 1) / kWarp * kWarp);
}

int grid_for(int64_t warps_needed) {
  const int64_t blocks = (warps_needed + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535)));
}

template <typename idx_t>
__global__ void chunk_hist_kernel(const idx_t* __restrict__ idx_S, int64_t S, int64_t E, int64_t chunk,
                                  int64_t C, int64_t* __restrict__ hist_CE, int64_t* __restrict__ meta_2) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (c >= C) return;
  int64_t* hist = hist_CE + c * E;
  const int64_t hi = min(S, (c + 1) * chunk);
  for (int64_t s0 = c * chunk; s0 < hi; s0 += kWarp) {
    const int64_t s = s0 + lane;
    long long e = s < hi ? static_cast<long long>(idx_S[s]) : -1;
    if (e < -1 || e >= E) {
      meta_2[1] = 1;
      e = -1;
    }
    const unsigned peers = __match_any_sync(kFullMask, e);
    if (e >= 0 && lane == __ffs(peers) - 1) hist[e] += __popc(peers);
    __syncwarp();
  }
}

// One block: column prefix over chunks per expert, capacity, padding, then a block scan for offsets.
__global__ void expert_scan_kernel(int64_t E, int64_t C, int64_t pad, int64_t cap,
                                   int64_t* __restrict__ base_CE, int64_t* __restrict__ counts_E,
                                   int64_t* __restrict__ padded_E, int64_t* __restrict__ offsets_E1,
                                   int64_t* __restrict__ meta_2) {
  __shared__ int64_t sums[kScanThreads];
  const int tid = threadIdx.x;
  for (int64_t e = tid; e < E; e += blockDim.x) {
    int64_t seen = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t n = base_CE[c * E + e];
      base_CE[c * E + e] = seen;
      seen += n;
    }
    const int64_t kept = cap < 0 ? seen : min(seen, cap);
    counts_E[e] = kept;
    padded_E[e] = (kept + pad - 1) / pad * pad;
  }
  __syncthreads();

  const int64_t per = (E + blockDim.x - 1) / blockDim.x;
  const int64_t lo = min(E, tid * per), hi = min(E, lo + per);
  int64_t local = 0;
  for (int64_t e = lo; e < hi; ++e) local += padded_E[e];
  sums[tid] = local;
  __syncthreads();
  for (int off = 1; off < blockDim.x; off <<= 1) {
    const int64_t add = tid >= off ? sums[tid - off] : 0;
    __syncthreads();
    sums[tid] += add;
    __syncthreads();
  }
  int64_t running = sums[tid] - local;
  for (int64_t e = lo; e < hi; ++e) {
    offsets_E1[e] = running;
    running += padded_E[e];
  }
  if (tid == blockDim.x - 1) {
    offsets_E1[E] = sums[tid];
    meta_2[0] = sums[tid];
  }
}

template <typename idx_t>
__global__ void chunk_scatter_kernel(const idx_t* __restrict__ idx_S, int64_t S, int64_t E, int64_t chunk,
                                     int64_t C, int64_t cap, int64_t* __restrict__ base_CE,
                                     const int64_t* __restrict__ offsets_E1, int64_t* __restrict__ row_of_S,
                                     bool* __restrict__ dropped_S, int64_t* __restrict__ src_slot_R) {
  const int lane = threadIdx.x % kWarp;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (c >= C) return;
  int64_t* cursor = base_CE + c * E;
  const int64_t hi = min(S, (c + 1) * chunk);
  for (int64_t s0 = c * chunk; s0 < hi; s0 += kWarp) {
    const int64_t s = s0 + lane;
    long long e = s < hi ? static_cast<long long>(idx_S[s]) : -1;
    if (e >= E) e = -1;
    const unsigned peers = __match_any_sync(kFullMask, e);
    int64_t first = 0;
    if (e >= 0) first = cursor[e];
    __syncwarp();
    if (e >= 0) {
      const int64_t r = first + __popc(peers & lanes_below);
      const bool keep = cap < 0 || r < cap;
      const int64_t row = offsets_E1[e] + r;
      row_of_S[s] = keep ? row : -1;
      dropped_S[s] = !keep;
      if (keep) src_slot_R[row] = s;
      if (lane == __ffs(peers) - 1) cursor[e] = first + __popc(peers);
    } else if (s < hi) {
      row_of_S[s] = -1;
      dropped_S[s] = false;
    }
    __syncwarp();
  }
}

template <typename T, int N>
__global__ void gather_rows_kernel(const T* __restrict__ x_TH, const int64_t* __restrict__ src_slot_R,
                                   const typename AccOf<T>::type* __restrict__ w_S, T* __restrict__ out_RH,
                                   int64_t R, int64_t H, int64_t S, int64_t k) {
  using P = Pack<T, N>;
  const int lane = threadIdx.x % kWarp;
  const int64_t packs = H / N;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; r < R; r += warps) {
    const int64_t s = src_slot_R[r];
    P* dst = reinterpret_cast<P*>(out_RH + r * H);
    if (s < 0 || s >= S) {
      P zero;
#pragma unroll
      for (int i = 0; i < N; ++i) zero.v[i] = from_acc<T>(0);
      for (int64_t p = lane; p < packs; p += kWarp) dst[p] = zero;
      continue;
    }
    const P* src = reinterpret_cast<const P*>(x_TH + (s / k) * H);
    if (w_S == nullptr) {
      for (int64_t p = lane; p < packs; p += kWarp) dst[p] = src[p];
    } else {
      const auto ws = w_S[s];
      for (int64_t p = lane; p < packs; p += kWarp) {
        P v = src[p];
#pragma unroll
        for (int i = 0; i < N; ++i) v.v[i] = from_acc<T>(ws * to_acc(v.v[i]));
        dst[p] = v;
      }
    }
  }
}

template <typename T, int N>
__global__ void combine_rows_kernel(const T* __restrict__ y_RH, const int64_t* __restrict__ row_of_S,
                                    const typename AccOf<T>::type* __restrict__ w_S, T* __restrict__ out_TH,
                                    int64_t T_, int64_t k, int64_t H, int64_t R) {
  using acc_t = typename AccOf<T>::type;
  using P = Pack<T, N>;
  const int lane = threadIdx.x % kWarp;
  const int64_t packs = H / N;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; t < T_; t += warps) {
    P* dst = reinterpret_cast<P*>(out_TH + t * H);
    for (int64_t p = lane; p < packs; p += kWarp) {
      acc_t acc[N];
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = row_of_S[t * k + j];
        if (r < 0 || r >= R) continue;
        const acc_t wj = w_S == nullptr ? acc_t(1) : w_S[t * k + j];
        const P v = reinterpret_cast<const P*>(y_RH + r * H)[p];
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] += wj * to_acc(v.v[i]);
      }
      P o;
#pragma unroll
      for (int i = 0; i < N; ++i) o.v[i] = from_acc<T>(acc[i]);
      dst[p] = o;
    }
  }
}

template <typename T, int N>
__global__ void slot_dot_kernel(const T* __restrict__ a_TH, const T* __restrict__ b_RH,
                                const int64_t* __restrict__ row_of_S, typename AccOf<T>::type* __restrict__ out_S,
                                int64_t S, int64_t k, int64_t H, int64_t R) {
  using acc_t = typename AccOf<T>::type;
  using P = Pack<T, N>;
  const int lane = threadIdx.x % kWarp;
  const int64_t packs = H / N;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; s < S; s += warps) {
    const int64_t r = row_of_S[s];
    acc_t dot = 0;
    if (r >= 0 && r < R) {
      const P* a = reinterpret_cast<const P*>(a_TH + (s / k) * H);
      const P* b = reinterpret_cast<const P*>(b_RH + r * H);
      for (int64_t p = lane; p < packs; p += kWarp) {
        const P va = a[p], vb = b[p];
#pragma unroll
        for (int i = 0; i < N; ++i) dot += to_acc(va.v[i]) * to_acc(vb.v[i]);
      }
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(kFullMask, dot, off);
    if (lane == 0) out_S[s] = dot;
  }
}

// Picks the 16-byte pack width when every row starts 16-byte aligned, else element-wise access.
template <typename T>
bool can_pack(int64_t H, std::initializer_list<const void*> ptrs) {
  constexpr int64_t n = 16 / sizeof(T);
  if (H % n != 0) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

template <typename T>
cudaError_t gather_typed(const void* x, const int64_t* src_slot, const void* w, void* out, int64_t R,
                         int64_t H, int64_t S, int64_t k, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  constexpr int N = 16 / sizeof(T);
  const auto* xp = static_cast<const T*>(x);
  const auto* wp = static_cast<const acc_t*>(w);
  auto* op = static_cast<T*>(out);
  if (can_pack<T>(H, {x, out})) {
    gather_rows_kernel<T, N><<<grid_for(R), kThreads, 0, stream>>>(xp, src_slot, wp, op, R, H, S, k);
  } else {
    gather_rows_kernel<T, 1><<<grid_for(R), kThreads, 0, stream>>>(xp, src_slot, wp, op, R, H, S, k);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t combine_typed(const void* y, const int64_t* row_of, const void* w, void* out, int64_t T_,
                          int64_t k, int64_t H, int64_t R, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  constexpr int N = 16 / sizeof(T);
  const auto* yp = static_cast<const T*>(y);
  const auto* wp = static_cast<const acc_t*>(w);
  auto* op = static_cast<T*>(out);
  if (can_pack<T>(H, {y, out})) {
    combine_rows_kernel<T, N><<<grid_for(T_), kThreads, 0, stream>>>(yp, row_of, wp, op, T_, k, H, R);
  } else {
    combine_rows_kernel<T, 1><<<grid_for(T_), kThreads, 0, stream>>>(yp, row_of, wp, op, T_, k, H, R);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t slot_dot_typed(const void* a, const void* b, const int64_t* row_of, void* out, int64_t T_,
                           int64_t k, int64_t H, int64_t R, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  constexpr int N = 16 / sizeof(T);
  const auto* ap = static_cast<const T*>(a);
  const auto* bp = static_cast<const T*>(b);
  auto* op = static_cast<acc_t*>(out);
  const int64_t S = T_ * k;
  if (can_pack<T>(H, {a, b})) {
    slot_dot_kernel<T, N><<<grid_for(S), kThreads, 0, stream>>>(ap, bp, row_of, op, S, k, H, R);
  } else {
    slot_dot_kernel<T, 1><<<grid_for(S), kThreads, 0, stream>>>(ap, bp, row_of, op, S, k, H, R);
  }
  return cudaGetLastError();
}

template <template <typename> class Fn, typename... Args>
cudaError_t dispatch(DType dtype, Args... args) {
  switch (dtype) {
    case DType::kFloat32: return Fn<float>::run(args...);
    case DType::kFloat64: return Fn<double>::run(args...);
    case DType::kBFloat16: return Fn<__nv_bfloat16>::run(args...);
  }
  return cudaErrorInvalidValue;
}

template <typename T> struct GatherFn {
  template <typename... A> static cudaError_t run(A... a) { return gather_typed<T>(a...); }
};
template <typename T> struct CombineFn {
  template <typename... A> static cudaError_t run(A... a) { return combine_typed<T>(a...); }
};
template <typename T> struct SlotDotFn {
  template <typename... A> static cudaError_t run(A... a) { return slot_dot_typed<T>(a...); }
};

}  // namespace

int64_t plan_num_chunks(int64_t num_slots) {
  return std::max<int64_t>(1, (num_slots + chunk_size(num_slots) - 1) / chunk_size(num_slots));
}

cudaError_t plan_count(const void* topk_idx_S, bool idx_is_int64, int64_t num_slots, int64_t E,
                       int64_t pad_multiple, int64_t capacity, int64_t* chunk_base_CE,
                       int64_t* counts_E, int64_t* padded_E, int64_t* offsets_E1, int64_t* meta_2,
                       cudaStream_t stream) {
  const int64_t chunk = chunk_size(num_slots), C = plan_num_chunks(num_slots);
  cudaError_t err = cudaMemsetAsync(chunk_base_CE, 0, sizeof(int64_t) * C * E, stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(meta_2, 0, sizeof(int64_t) * 2, stream);
  if (err != cudaSuccess) return err;
  if (num_slots > 0) {
    if (idx_is_int64) {
      chunk_hist_kernel<int64_t><<<grid_for(C), kThreads, 0, stream>>>(
          static_cast<const int64_t*>(topk_idx_S), num_slots, E, chunk, C, chunk_base_CE, meta_2);
    } else {
      chunk_hist_kernel<int32_t><<<grid_for(C), kThreads, 0, stream>>>(
          static_cast<const int32_t*>(topk_idx_S), num_slots, E, chunk, C, chunk_base_CE, meta_2);
    }
  }
  expert_scan_kernel<<<1, kScanThreads, 0, stream>>>(E, C, pad_multiple, capacity, chunk_base_CE, counts_E,
                                                      padded_E, offsets_E1, meta_2);
  return cudaGetLastError();
}

cudaError_t plan_scatter(const void* topk_idx_S, bool idx_is_int64, int64_t num_slots, int64_t E,
                         int64_t capacity, int64_t* chunk_base_CE, const int64_t* offsets_E1,
                         int64_t R, int64_t* row_of_S, bool* dropped_S, int64_t* src_slot_R,
                         cudaStream_t stream) {
  if (R > 0) {
    const cudaError_t err = cudaMemsetAsync(src_slot_R, 0xff, sizeof(int64_t) * R, stream);
    if (err != cudaSuccess) return err;
  }
  if (num_slots == 0) return cudaSuccess;
  const int64_t chunk = chunk_size(num_slots), C = plan_num_chunks(num_slots);
  if (idx_is_int64) {
    chunk_scatter_kernel<int64_t><<<grid_for(C), kThreads, 0, stream>>>(
        static_cast<const int64_t*>(topk_idx_S), num_slots, E, chunk, C, capacity, chunk_base_CE,
        offsets_E1, row_of_S, dropped_S, src_slot_R);
  } else {
    chunk_scatter_kernel<int32_t><<<grid_for(C), kThreads, 0, stream>>>(
        static_cast<const int32_t*>(topk_idx_S), num_slots, E, chunk, C, capacity, chunk_base_CE,
        offsets_E1, row_of_S, dropped_S, src_slot_R);
  }
  return cudaGetLastError();
}

cudaError_t gather_rows(DType dtype, const void* x_TH, const int64_t* src_slot_R, const void* w_S,
                        void* out_RH, int64_t R, int64_t H, int64_t S, int64_t k, cudaStream_t stream) {
  if (R == 0 || H == 0) return cudaSuccess;
  return dispatch<GatherFn>(dtype, x_TH, src_slot_R, w_S, out_RH, R, H, S, k, stream);
}

cudaError_t combine_rows(DType dtype, const void* y_RH, const int64_t* row_of_S, const void* w_S,
                         void* out_TH, int64_t T, int64_t k, int64_t H, int64_t R, cudaStream_t stream) {
  if (T == 0 || H == 0) return cudaSuccess;
  return dispatch<CombineFn>(dtype, y_RH, row_of_S, w_S, out_TH, T, k, H, R, stream);
}

cudaError_t slot_dot(DType dtype, const void* a_TH, const void* b_RH, const int64_t* row_of_S,
                     void* out_S, int64_t T, int64_t k, int64_t H, int64_t R, cudaStream_t stream) {
  if (T == 0 || k == 0) return cudaSuccess;
  return dispatch<SlotDotFn>(dtype, a_TH, b_RH, row_of_S, out_S, T, k, H, R, stream);
}

}  // namespace modalmoe::cuda
