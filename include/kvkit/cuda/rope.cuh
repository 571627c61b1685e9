#pragma once
/// @file rope.cuh
/// RoPE on the GPU: the CUDA twins of kvkit::apply_rope and
/// kvkit::rope_shift_keys (ops/rope.hpp), taking the same RopeParams with
/// device pointers. Results equal the CPU op's bit for bit when a cos/sin
/// table is used; with on-the-fly angles (float64 on both sides) they agree to
/// within an ulp of float.

#include <cuda_runtime.h>

#include <cstdint>

#include "kvkit/core/dispatch.hpp"
#include "kvkit/ops/rope.hpp"

namespace kvkit::cuda {

namespace detail {

constexpr int kRopeThreads = 256;
/// Largest rotary_dim the kernel stages cos/sin for in shared memory.
constexpr int kRopeMaxRotaryDim = 1024;

template <class T>
__device__ KVKIT_FORCEINLINE void rotate_token_heads(T* token_base, std::int64_t head_stride,
                                                     int num_heads, const RopeParams& p,
                                                     const float* cos_s, const float* sin_s,
                                                     bool valid) {
  const int half = p.rotary_dim / 2;
  const int work = num_heads * half;
  for (int w = threadIdx.x; w < work; w += blockDim.x) {
    const int h = w / half;
    const int i = w - h * half;
    T* x = token_base + h * head_stride;
    const RopePair pair = rope_pair(p.style, p.rotary_dim, i);
    float a = to_float(x[pair.first]);
    float b = to_float(x[pair.second]);
    if (valid) {
      rope_rotate(a, b, cos_s[i], sin_s[i]);
    } else {
      a = b = __int_as_float(0x7fc00000);  // position outside the table: make it loud
    }
    x[pair.first] = from_float<T>(a);
    x[pair.second] = from_float<T>(b);
  }
}

/// One block per token: stage the token's cos/sin in shared memory once, then
/// rotate all of its query and key heads. Consecutive threads take
/// consecutive pairs, so NeoX's two halves are each read coalesced.
template <class T>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(const RopeParams p) {
  __shared__ float cos_s[kRopeMaxRotaryDim / 2];
  __shared__ float sin_s[kRopeMaxRotaryDim / 2];
  const std::int64_t t = blockIdx.x;
  const std::int64_t position = p.positions[t];
  const std::int64_t magnitude = position < 0 ? -position : position;
  const bool valid = p.cos_sin_cache == nullptr || magnitude < p.cache_positions;
  for (int i = threadIdx.x; i < p.rotary_dim / 2 && valid; i += blockDim.x) {
    rope_cos_sin(p, position, i, cos_s[i], sin_s[i]);
  }
  __syncthreads();
  if (p.q != nullptr) {
    rotate_token_heads(static_cast<T*>(p.q) + t * p.q_token_stride, p.q_head_stride,
                       p.num_q_heads, p, cos_s, sin_s, valid);
  }
  if (p.k != nullptr) {
    rotate_token_heads(static_cast<T*>(p.k) + t * p.k_token_stride, p.k_head_stride,
                       p.num_k_heads, p, cos_s, sin_s, valid);
  }
}

inline cudaError_t launch_rope(const RopeParams& p, const char* where, cudaStream_t stream) {
  ::kvkit::detail::validate_rope_params(p, where);
  check_argument(p.rotary_dim <= kRopeMaxRotaryDim, where, "rotary_dim", p.rotary_dim, "<= ",
                 kRopeMaxRotaryDim, " on the GPU");
  check_argument(p.num_tokens < (std::int64_t(1) << 31), where, "num_tokens", p.num_tokens,
                 "< 2^31 on the GPU");
  if (p.num_tokens == 0) return cudaSuccess;
  dispatch_dtype<FloatTypes>(p.dtype, where, "dtype", [&](auto tag) {
    using T = typename decltype(tag)::type;
    rope_kernel<T><<<unsigned(p.num_tokens), kRopeThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

}  // namespace detail

/// Rotates q and k in place on `stream` (see kvkit::apply_rope). All pointers
/// in `p` are device pointers. Positions are not read on the host: a token
/// whose position lies outside the cos/sin table gets NaN in every rotated
/// dimension instead of a silent wrong answer. Throws kvkit::Error on bad
/// sizes; returns the launch status.
inline cudaError_t apply_rope(const RopeParams& p, cudaStream_t stream = nullptr) {
  return detail::launch_rope(p, "kvkit::cuda::apply_rope", stream);
}

/// Re-rotates cached keys in place by per-token deltas (see kvkit::rope_shift_keys).
inline cudaError_t rope_shift_keys(const RopeParams& p, cudaStream_t stream = nullptr) {
  constexpr const char* kWhere = "kvkit::cuda::rope_shift_keys";
  check_argument(p.q == nullptr, kWhere, "q", p.q, "nullptr (only keys are shifted)");
  check_argument(p.k != nullptr, kWhere, "k", p.k, "a non-null pointer");
  return detail::launch_rope(p, kWhere, stream);
}

}  // namespace kvkit::cuda
