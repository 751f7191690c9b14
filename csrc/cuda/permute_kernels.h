// Raw CUDA kernels for token permutation: plain pointers + a stream, no torch headers, so the .cu
// compiles with bare nvcc. The ATen binding (permute_binding.cpp) allocates and dispatches.
//
// Legend: T tokens, k slots per token, S = T*k slots (slot s = t*k + j), E experts, H hidden,
// R permuted rows, C plan chunks. "acc" pointers hold float for float32/bfloat16 data and double
// for float64 data.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace modalmoe::cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2 };

// Number of chunks C the plan kernels split S slots into; chunk_base must hold C*E int64.
int64_t plan_num_chunks(int64_t num_slots);

// Histogram -> counts_E (after capacity), padded_E, offsets_E1 and each chunk's first rank per
// expert in chunk_base_CE. meta_2[0] = R (rows incl. padding), meta_2[1] = 1 if an index was not
// in [-1, E). capacity < 0 means unlimited.
cudaError_t plan_count(const void* topk_idx_S, bool idx_is_int64, int64_t num_slots, int64_t E,
                       int64_t pad_multiple, int64_t capacity, int64_t* chunk_base_CE,
                       int64_t* counts_E, int64_t* padded_E, int64_t* offsets_E1, int64_t* meta_2,
                       cudaStream_t stream);

// Stable scatter after plan_count (same chunk_base_CE, consumed): row_of_S, dropped_S, and
// src_slot_R (R from meta_2[0]; padding rows set to -1 here).
cudaError_t plan_scatter(const void* topk_idx_S, bool idx_is_int64, int64_t num_slots, int64_t E,
                         int64_t capacity, int64_t* chunk_base_CE, const int64_t* offsets_E1,
                         int64_t R, int64_t* row_of_S, bool* dropped_S, int64_t* src_slot_R,
                         cudaStream_t stream);

// out[r] = w[s] * x[s / k] for s = src_slot[r] in [0, S), else a zero row. w_S (acc) may be null.
cudaError_t gather_rows(DType dtype, const void* x_TH, const int64_t* src_slot_R, const void* w_S,
                        void* out_RH, int64_t R, int64_t H, int64_t S, int64_t k, cudaStream_t stream);

// out[t] = sum_j w[t, j] * y[row_of[t, j]] over row_of in [0, R), in slot order (deterministic).
cudaError_t combine_rows(DType dtype, const void* y_RH, const int64_t* row_of_S, const void* w_S,
                         void* out_TH, int64_t T, int64_t k, int64_t H, int64_t R, cudaStream_t stream);

// out_S (acc) [t, j] = <a[t], b[row_of[t, j]]>, 0 where row_of is not in [0, R).
cudaError_t slot_dot(DType dtype, const void* a_TH, const void* b_RH, const int64_t* row_of_S,
                     void* out_S, int64_t T, int64_t k, int64_t H, int64_t R, cudaStream_t stream);

}  // namespace modalmoe::cuda
