#pragma once
/// @file merge_states.cuh
/// Merging partial attention states on the GPU: the CUDA twins of
/// kvkit::merge_states and kvkit::merge_states_varlen (ops/merge_states.hpp),
/// with the same rule (attention_state.hpp) and the same order of the
/// weights: two states use merge_weights; a variable number use the row's
/// largest lse, sum = Σ exp(lse_s − max), w_s = exp(lse_s − max) / sum.
/// One warp per row; lanes take consecutive dimensions (coalesced).

#include <cuda_runtime.h>

#include <cstdint>

#include "kvkit/core/error.hpp"
#include "kvkit/cuda/check.hpp"
#include "kvkit/cuda/vector_copy.cuh"
#include "kvkit/ops/attention_state.hpp"

namespace kvkit::cuda {

namespace detail {

inline constexpr int kMergeThreads = 128;  // four rows (warps) per block
inline constexpr int kMergeRowsPerBlock = kMergeThreads / 32;
/// Dimensions a lane accumulates per pass over the states (registers).
inline constexpr int kMergeDimsPerLane = 8;

__device__ KVKIT_FORCEINLINE float warp_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ KVKIT_FORCEINLINE float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

/// Merges `n` states of one row with the whole warp: state s has its output
/// at o + s * o_stride ([head_dim] floats) and its lse at lse[s * lse_stride].
/// Calls store(d, value) for every dimension d and returns the merged lse
/// (−inf and zeros when every state is empty). Every lane returns the same lse.
template <class Store>
__device__ float merge_row(const float* o, std::int64_t o_stride, const float* lse,
                           std::int64_t lse_stride, int n, int head_dim, Store&& store) {
  const int lane = threadIdx.x & 31;
  float m = -INFINITY;
  for (int s = lane; s < n; s += 32) m = fmaxf(m, lse[s * lse_stride]);
  m = warp_max(m);
  if (m == -INFINITY) {
    for (int d = lane; d < head_dim; d += 32) store(d, 0.0f);
    return -INFINITY;
  }
  float sum = 0.0f;
  for (int s = lane; s < n; s += 32) sum += expf(lse[s * lse_stride] - m);
  sum = warp_sum(sum);
  for (int d0 = 0; d0 < head_dim; d0 += 32 * kMergeDimsPerLane) {
    float acc[kMergeDimsPerLane];
#pragma unroll
    for (int k = 0; k < kMergeDimsPerLane; ++k) acc[k] = 0.0f;
    for (int s = 0; s < n; ++s) {
      const float w = expf(lse[s * lse_stride] - m) / sum;
      const float* src = o + s * o_stride;
#pragma unroll
      for (int k = 0; k < kMergeDimsPerLane; ++k) {
        const int d = d0 + lane + 32 * k;
        if (d < head_dim) acc[k] += w * src[d];
      }
    }
#pragma unroll
    for (int k = 0; k < kMergeDimsPerLane; ++k) {
      const int d = d0 + lane + 32 * k;
      if (d < head_dim) store(d, acc[k]);
    }
  }
  return m + logf(sum);
}

__global__ void __launch_bounds__(kMergeThreads)
    merge_states_kernel(const float* o_a, const float* lse_a, const float* o_b, const float* lse_b,
                        float* out_o, float* out_lse, std::int64_t num_rows, int head_dim) {
  const std::int64_t r = std::int64_t(blockIdx.x) * kMergeRowsPerBlock + threadIdx.x / 32;
  if (r >= num_rows) return;
  const int lane = threadIdx.x & 31;
  const MergeWeights w = merge_weights(lse_a[r], lse_b[r]);
  const float* a = o_a + r * head_dim;
  const float* b = o_b + r * head_dim;
  float* out = out_o + r * head_dim;
  // Each element is read and written by the same lane, so out_o may alias an input.
  for (int d = lane; d < head_dim; d += 32) out[d] = w.weight_a * a[d] + w.weight_b * b[d];
  __syncwarp();  // every lane has read lse_a[r], lse_b[r] before out_lse (maybe one of them) changes
  if (lane == 0) out_lse[r] = w.lse;
}

__global__ void __launch_bounds__(kMergeThreads)
    merge_states_varlen_kernel(const float* o, const float* lse, const std::int64_t* indptr,
                               std::int64_t num_rows, int head_dim, float* out_o, float* out_lse) {
  const std::int64_t r = std::int64_t(blockIdx.x) * kMergeRowsPerBlock + threadIdx.x / 32;
  if (r >= num_rows) return;
  const std::int64_t first = indptr[r];
  const std::int64_t n = indptr[r + 1] - first;
  float* out = out_o + r * head_dim;
  const float merged =
      merge_row(o + first * head_dim, head_dim, lse + first, 1, n > 0 ? int(n) : 0, head_dim,
                [&](int d, float v) { out[d] = v; });
  if ((threadIdx.x & 31) == 0) out_lse[r] = merged;
}

inline unsigned merge_blocks(std::int64_t rows) {
  return grid_for((rows + kMergeRowsPerBlock - 1) / kMergeRowsPerBlock);
}

}  // namespace detail

/// Merges two states elementwise on `stream` (see kvkit::merge_states): rows
/// of o_a, o_b, out_o are [num_rows, head_dim] float32, contiguous; lse
/// arrays are [num_rows]. out_o/out_lse may alias either input. All pointers
/// are device pointers. Throws kvkit::Error on bad sizes or null pointers
/// (nothing is launched); or a failed launch.
inline void merge_states(const float* o_a, const float* lse_a, const float* o_b,
                                const float* lse_b, float* out_o, float* out_lse,
                                std::int64_t num_rows, int head_dim, cudaStream_t stream = nullptr) {
  constexpr const char* kWhere = "kvkit::cuda::merge_states";
  check_argument(num_rows >= 0, kWhere, "num_rows", num_rows, ">= 0");
  check_argument(num_rows < (std::int64_t(1) << 32), kWhere, "num_rows", num_rows, "< 2^32 on the GPU");
  check_argument(head_dim > 0, kWhere, "head_dim", head_dim, "> 0");
  if (num_rows == 0) return;
  check(o_a && lse_a && o_b && lse_b && out_o && out_lse, kWhere,
        "a null pointer among o_a, lse_a, o_b, lse_b, out_o, out_lse; expected all non-null");
  detail::merge_states_kernel<<<detail::merge_blocks(num_rows), detail::kMergeThreads, 0, stream>>>(
      o_a, lse_a, o_b, lse_b, out_o, out_lse, num_rows, head_dim);
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

/// Merges a variable number of states per row on `stream` (see
/// kvkit::merge_states_varlen): row r's states are [indptr[r], indptr[r+1])
/// of `o` ([num_states, head_dim]) and `lse` ([num_states]); a row without
/// states gets o = 0, lse = −inf. `indptr` ([num_rows + 1], int64) is in
/// device memory and is not read by the launcher, so it is not validated:
/// it must start at 0 and not decrease. Outputs must not alias the inputs.
/// Throws kvkit::Error on bad sizes or null pointers; or a failed launch.
inline void merge_states_varlen(const float* o, const float* lse, const std::int64_t* indptr,
                                       std::int64_t num_rows, int head_dim, float* out_o,
                                       float* out_lse, cudaStream_t stream = nullptr) {
  constexpr const char* kWhere = "kvkit::cuda::merge_states_varlen";
  check_argument(num_rows >= 0, kWhere, "num_rows", num_rows, ">= 0");
  check_argument(num_rows < (std::int64_t(1) << 32), kWhere, "num_rows", num_rows, "< 2^32 on the GPU");
  check_argument(head_dim > 0, kWhere, "head_dim", head_dim, "> 0");
  if (num_rows == 0) return;
  check(o && lse && indptr && out_o && out_lse, kWhere,
        "a null pointer among o, lse, indptr, out_o, out_lse; expected all non-null");
  detail::merge_states_varlen_kernel<<<detail::merge_blocks(num_rows), detail::kMergeThreads, 0,
                                       stream>>>(o, lse, indptr, num_rows, head_dim, out_o, out_lse);
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvkit::cuda
