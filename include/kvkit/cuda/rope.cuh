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
#include "kvkit/cuda/check.hpp"
#include "kvkit/ops/rope.hpp"
#include "kvkit/ops/rope_append.hpp"

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

/// Block-wide: loads token t's cos/sin into shared memory (all threads of the
/// block must call it). Returns false when t's position lies outside the table
/// or is negative where that is not allowed (the CPU op would throw for both).
__device__ KVKIT_FORCEINLINE bool stage_cos_sin(const RopeParams& p, std::int64_t t, float* cos_s,
                                                float* sin_s, bool allow_negative) {
  const std::int64_t position = p.positions[t];
  // Compared without negating (-INT64_MIN overflows).
  const bool valid = (allow_negative || position >= 0) &&
                     (p.cos_sin_cache == nullptr || (position < p.cache_positions && position > -p.cache_positions));
  for (int i = threadIdx.x; i < p.rotary_dim / 2 && valid; i += blockDim.x) {
    rope_cos_sin(p, position, i, cos_s[i], sin_s[i]);
  }
  __syncthreads();
  return valid;
}

/// One block per token: stage the token's cos/sin in shared memory once, then
/// rotate all of its query and key heads. Consecutive threads take
/// consecutive pairs, so NeoX's two halves are each read coalesced.
template <class T>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(const RopeParams p, bool allow_negative) {
  __shared__ float cos_s[kRopeMaxRotaryDim / 2];
  __shared__ float sin_s[kRopeMaxRotaryDim / 2];
  const std::int64_t t = blockIdx.x;
  const bool valid = stage_cos_sin(p, t, cos_s, sin_s, allow_negative);
  if (p.q != nullptr) {
    rotate_token_heads(static_cast<T*>(p.q) + t * p.q_token_stride, p.q_head_stride,
                       p.num_q_heads, p, cos_s, sin_s, valid);
  }
  if (p.k != nullptr) {
    rotate_token_heads(static_cast<T*>(p.k) + t * p.k_token_stride, p.k_head_stride,
                       p.num_k_heads, p, cos_s, sin_s, valid);
  }
}

/// allow_negative: positions are deltas (K-shift) rather than positions.
inline void launch_rope(const RopeParams& p, const char* where, cudaStream_t stream, bool allow_negative) {
  ::kvkit::detail::validate_rope_params(p, where);
  check_argument(p.rotary_dim <= kRopeMaxRotaryDim, where, "rotary_dim", p.rotary_dim, "<= ",
                 kRopeMaxRotaryDim, " on the GPU");
  check_argument(p.num_tokens < (std::int64_t(1) << 31), where, "num_tokens", p.num_tokens,
                 "< 2^31 on the GPU");
  if (p.num_tokens == 0) return;
  dispatch_dtype<FloatTypes>(p.dtype, where, "dtype", [&](auto tag) {
    using T = typename decltype(tag)::type;
    rope_kernel<T><<<unsigned(p.num_tokens), kRopeThreads, 0, stream>>>(p, allow_negative);
  });
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

/// Fused rope + append: one block per token. Rotated key pairs go straight
/// from the source rows to the cache; the unrotated tail and the values are
/// copied. Tokens with a negative or out-of-range slot write nothing to the
/// cache (the CPU op throws for an out-of-range slot; device arrays are not
/// read on the host).
template <class T, class Layout>
__global__ void __launch_bounds__(kRopeThreads)
    rope_append_kernel(const RopeParams p, const Layout layout, const AppendKVArgs a) {
  __shared__ float cos_s[kRopeMaxRotaryDim / 2];
  __shared__ float sin_s[kRopeMaxRotaryDim / 2];
  const std::int64_t t = blockIdx.x;
  const bool valid = stage_cos_sin(p, t, cos_s, sin_s, /*allow_negative=*/false);
  if (p.q != nullptr) {
    rotate_token_heads(static_cast<T*>(p.q) + t * p.q_token_stride, p.q_head_stride,
                       p.num_q_heads, p, cos_s, sin_s, valid);
  }
  const std::int64_t slot = a.slot_mapping[t];
  if (slot < 0 || slot >= layout.num_slots()) return;
  const int heads = int(layout.num_heads);
  const int head_dim = int(layout.head_dim);
  const int half = p.rotary_dim / 2;
  const T* key = static_cast<const T*>(a.key) + t * a.key_stride_token;
  const T* value = static_cast<const T*>(a.value) + t * a.value_stride_token;
  T* k_cache = static_cast<T*>(a.k_cache);
  T* v_cache = static_cast<T*>(a.v_cache);
  for (int w = threadIdx.x; w < heads * half; w += blockDim.x) {
    const int h = w / half;
    const int i = w - h * half;
    const RopePair pair = rope_pair(p.style, p.rotary_dim, i);
    const T* src = key + h * a.key_stride_head;
    T* dst = k_cache + layout.slot_offset(slot, h);
    float x = to_float(src[pair.first]);
    float y = to_float(src[pair.second]);
    if (valid) {
      rope_rotate(x, y, cos_s[i], sin_s[i]);
    } else {
      x = y = __int_as_float(0x7fc00000);
    }
    dst[pair.first] = from_float<T>(x);
    dst[pair.second] = from_float<T>(y);
  }
  const int tail = head_dim - p.rotary_dim;
  for (int w = threadIdx.x; w < heads * tail; w += blockDim.x) {
    const int h = w / tail;
    const int d = p.rotary_dim + (w - h * tail);
    k_cache[layout.slot_offset(slot, h) + d] = key[h * a.key_stride_head + d];
  }
  for (int w = threadIdx.x; w < heads * head_dim; w += blockDim.x) {
    const int h = w / head_dim;
    const int d = w - h * head_dim;
    v_cache[layout.slot_offset(slot, h) + d] = value[h * a.value_stride_head + d];
  }
}

}  // namespace detail

/// Rotates q and k in place on `stream` (see kvkit::apply_rope). All pointers
/// in `p` are device pointers. Positions are not read on the host: a token
/// whose position is negative or lies outside the cos/sin table gets NaN in
/// every rotated dimension instead of a silent wrong answer (the CPU op
/// throws). Throws kvkit::Error on bad sizes or a failed launch.
inline void apply_rope(const RopeParams& p, cudaStream_t stream = nullptr) {
  detail::launch_rope(p, "kvkit::cuda::apply_rope", stream, /*allow_negative=*/false);
}

/// Re-rotates cached keys in place by per-token deltas (see kvkit::rope_shift_keys).
inline void rope_shift_keys(const RopeParams& p, cudaStream_t stream = nullptr) {
  constexpr const char* kWhere = "kvkit::cuda::rope_shift_keys";
  check_argument(p.q == nullptr, kWhere, "q", p.q, "nullptr (only keys are shifted)");
  check_argument(p.k != nullptr, kWhere, "k", p.k, "a non-null pointer");
  detail::launch_rope(p, kWhere, stream, /*allow_negative=*/true);
}

/// Fused rope + append on `stream` (see kvkit::rope_append_kv): rotates q in
/// place and writes rotated keys and the values into the cache. All pointers
/// are device pointers. Positions and slots are not read on the host: a token
/// whose position is negative or lies outside the table gets NaN, and one whose slot is out
/// of range writes nothing. Throws kvkit::Error on bad arguments or a failed
/// launch. `Layout` is PagedKVLayout or ContiguousKVLayout.
template <class Layout>
void rope_append_kv(const RopeParams& rope, const Layout& layout, const AppendKVArgs& append,
                    cudaStream_t stream = nullptr) {
  constexpr const char* kWhere = "kvkit::cuda::rope_append_kv";
  ::kvkit::detail::validate_rope_append(rope, layout, append, kWhere);
  check_argument(rope.rotary_dim <= detail::kRopeMaxRotaryDim, kWhere, "rotary_dim",
                 rope.rotary_dim, "<= ", detail::kRopeMaxRotaryDim, " on the GPU");
  check_argument(rope.num_tokens < (std::int64_t(1) << 31), kWhere, "num_tokens",
                 rope.num_tokens, "< 2^31 on the GPU");
  if (rope.num_tokens == 0) return;
  dispatch_dtype<FloatTypes>(rope.dtype, kWhere, "rope.dtype", [&](auto tag) {
    using T = typename decltype(tag)::type;
    detail::rope_append_kernel<T, Layout>
        <<<unsigned(rope.num_tokens), detail::kRopeThreads, 0, stream>>>(rope, layout, append);
  });
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvkit::cuda
