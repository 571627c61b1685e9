#pragma once
/// @file mla_compress.cuh
/// MLA compress on the GPU: the CUDA twin of kvkit::mla_compress
/// (ops/mla_compress.hpp), same arguments with device pointers. One block per
/// token: a block-wide sum of squares for the RMSNorm of c_kv, then the
/// normalized c_kv and the rotated k_pe are written to the token's latent row.
/// The sum is reduced in a fixed order, so results are deterministic; they
/// equal the CPU op's to within float rounding of that sum (the CPU adds
/// sequentially).

#include <cuda_runtime.h>

#include <cstdint>

#include "kvkit/core/dispatch.hpp"
#include "kvkit/cuda/check.hpp"
#include "kvkit/ops/mla_compress.hpp"

namespace kvkit::cuda {

namespace detail {

constexpr int kMlaCompressThreads = 128;

template <class T>
__global__ void __launch_bounds__(kMlaCompressThreads)
    mla_compress_kernel(const LatentKVLayout layout, const MlaCompressArgs a, const RopeParams rope) {
  const std::int64_t t = blockIdx.x;
  const std::int64_t slot = a.slot_mapping[t];
  if (slot < 0 || slot >= layout.num_slots()) return;  // padding, or out of range (the CPU op throws)
  const int rank = int(layout.kv_lora_rank), rope_dim = int(layout.rope_dim);
  const T* src = static_cast<const T*>(a.kv_a) + t * a.kv_a_stride_token;
  T* row = static_cast<T*>(a.cache) + layout.slot_offset(slot);

  __shared__ float warp_sums[kMlaCompressThreads / 32];
  float partial = 0.0f;
  for (int c = threadIdx.x; c < rank; c += blockDim.x) {
    const float x = to_float(src[c]);
    partial += x * x;
  }
  for (int offset = 16; offset > 0; offset /= 2) partial += __shfl_xor_sync(0xffffffffu, partial, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = partial;
  __syncthreads();
  float sum_sq = 0.0f;
  for (int w = 0; w < kMlaCompressThreads / 32; ++w) sum_sq += warp_sums[w];
  const float inv_rms = 1.0f / sqrtf(sum_sq / float(rank) + a.norm_eps);
  for (int c = threadIdx.x; c < rank; c += blockDim.x) {
    row[c] = from_float<T>(to_float(src[c]) * inv_rms * a.norm_weight[c]);
  }

  const std::int64_t position = a.positions[t];
  const bool valid = position >= 0 && position < a.cache_positions;
  for (int i = threadIdx.x; i < rope_dim / 2; i += blockDim.x) {
    const RopePair pair = rope_pair(a.rope_style, rope_dim, i);
    float x = to_float(src[rank + pair.first]);
    float y = to_float(src[rank + pair.second]);
    if (valid) {
      float c, s;
      rope_cos_sin(rope, position, i, c, s);
      rope_rotate(x, y, c, s);
    } else {
      x = y = __int_as_float(0x7fc00000);  // position outside the table: make it loud
    }
    row[rank + pair.first] = from_float<T>(x);
    row[rank + pair.second] = from_float<T>(y);
  }
}

}  // namespace detail

/// Fused MLA compress on `stream` (see kvkit::mla_compress). All pointers are
/// device pointers. Positions and slots are not read on the host: a token
/// whose position is outside the table gets NaN in k_pe; one whose slot is
/// out of range writes nothing. Throws kvkit::Error on bad arguments or a
/// failed launch.
inline void mla_compress(const LatentKVLayout& layout, const MlaCompressArgs& a,
                         cudaStream_t stream = nullptr) {
  constexpr const char* kWhere = "kvkit::cuda::mla_compress";
  ::kvkit::detail::validate_mla_compress(layout, a, kWhere);
  check_argument(a.num_tokens < (std::int64_t(1) << 31), kWhere, "num_tokens", a.num_tokens,
                 "< 2^31 on the GPU");
  if (a.num_tokens == 0) return;
  const RopeParams rope = ::kvkit::detail::mla_kpe_rope(layout, a);
  dispatch_dtype<FloatTypes>(a.dtype, kWhere, "dtype", [&](auto tag) {
    using T = typename decltype(tag)::type;
    detail::mla_compress_kernel<T>
        <<<unsigned(a.num_tokens), detail::kMlaCompressThreads, 0, stream>>>(layout, a, rope);
  });
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvkit::cuda
