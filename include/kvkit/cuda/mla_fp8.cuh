#pragma once
/// @file mla_fp8.cuh
/// CUDA mla_fp8_append: quantize-on-append of latent rows [c_kv (512) |
/// k_pe (64)] into the fp8 latent cache (FlashMLA's 656-byte rows,
/// layout/latent_fp8_layout.hpp). The twin of kvkit::mla_fp8_append
/// (ops/mla_fp8.hpp): same MlaFp8AppendArgs (device pointers), same layout,
/// same bytes. Bit-identical because the group amax is a max (exact in any
/// order), the scale and every e4m3 byte come from the shared
/// mla_fp8_group_scale / mla_fp8_encode (IEEE division: do not build with
/// --use_fast_math), and k_pe is rounded to bf16 by the shared
/// float_to_bfloat16_bits.
///
/// One warp per token, in the column split of cuda/mla_decode.cuh: lane l
/// owns c_kv columns [8 l, 8 l + 8) and [256 + 8 l, 256 + 8 l + 8) and k_pe
/// columns 2 l, 2 l + 1. Group g of 128 values is then lanes 16 (g % 2) ..
/// 16 (g % 2) + 15 of one half, so each group's amax is a 16-lane shuffle
/// reduction, and every load and store of a warp is contiguous.
///
/// Device-side differences from the CPU op (the data lives in device memory
/// and the launcher does not read it): a slot >= num_slots is skipped like
/// padding instead of reported, and a row with inf or NaN is not rejected
/// (its bytes are unspecified). Check both on the host where that matters.

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/cuda/check.hpp"
#include "kvkit/cuda/vector_copy.cuh"
#include "kvkit/layout/latent_fp8_layout.hpp"
#include "kvkit/ops/mla_fp8.hpp"

namespace kvkit::cuda {

namespace detail {

inline constexpr int kMlaFp8AppendWarps = 4;

/// Eight consecutive source values as floats: one or two 16-byte loads when
/// `kVector` (row and stride 16-byte aligned), else element by element.
template <class T, bool kVector>
__device__ KVKIT_FORCEINLINE void mla_fp8_load8(const T* src, float (&out)[8]) {
  if constexpr (kVector) {
    constexpr int kUnits = int(8 * sizeof(T) / 16);
    T values[8];
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const uint4 raw = reinterpret_cast<const uint4*>(src)[u];
      memcpy(values + u * (16 / sizeof(T)), &raw, 16);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = to_float(values[e]);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = to_float(src[e]);
  }
}

/// Eight e4m3 bytes of one group into a uint2 (lowest column first).
__device__ KVKIT_FORCEINLINE uint2 mla_fp8_pack8(const float (&v)[8], float scale) {
  std::uint32_t w[2] = {0u, 0u};
#pragma unroll
  for (int e = 0; e < 8; ++e) w[e / 4] |= std::uint32_t(mla_fp8_encode(v[e], scale)) << (8 * (e % 4));
  return make_uint2(w[0], w[1]);
}

/// Largest |v| over this lane's 8 values and the 15 other lanes of its half-warp.
__device__ KVKIT_FORCEINLINE float mla_fp8_group_amax(const float (&v)[8]) {
  float amax = 0.0f;
#pragma unroll
  for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(v[e]));
#pragma unroll
  for (int offset = 8; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  return amax;
}

/// `kVectorLoad`: source rows 16-byte aligned; `kVectorStore`: cache rows 8-byte aligned.
template <class T, bool kVectorLoad, bool kVectorStore>
__global__ void __launch_bounds__(32 * kMlaFp8AppendWarps)
    mla_fp8_append_kernel(const LatentFp8Layout layout, const MlaFp8AppendArgs a) {
  const int lane = threadIdx.x & 31;
  const std::int64_t num_slots = layout.num_slots();
  const std::int64_t stride = std::int64_t(gridDim.x) * kMlaFp8AppendWarps;
  for (std::int64_t t = std::int64_t(blockIdx.x) * kMlaFp8AppendWarps + (threadIdx.x >> 5); t < a.num_tokens;
       t += stride) {
    const std::int64_t slot = a.slot_mapping[t];  // warp-uniform: the whole warp skips or works
    if (slot < 0 || slot >= num_slots) continue;
    const T* src = static_cast<const T*>(a.latent) + t * a.latent_stride_token;
    float lo[8], hi[8];  // columns 8 lane.. (group lane / 16) and 256 + 8 lane.. (group 2 + lane / 16)
    mla_fp8_load8<T, kVectorLoad>(src + 8 * lane, lo);
    mla_fp8_load8<T, kVectorLoad>(src + 256 + 8 * lane, hi);
    const float pe0 = to_float(src[MlaFp8Row::kRank + 2 * lane]);
    const float pe1 = to_float(src[MlaFp8Row::kRank + 2 * lane + 1]);
    const float scale_lo = mla_fp8_group_scale(mla_fp8_group_amax(lo));
    const float scale_hi = mla_fp8_group_scale(mla_fp8_group_amax(hi));
    const uint2 q_lo = mla_fp8_pack8(lo, scale_lo);
    const uint2 q_hi = mla_fp8_pack8(hi, scale_hi);

    std::uint8_t* row = a.cache + layout.slot_offset(slot);
    if constexpr (kVectorStore) {
      *reinterpret_cast<uint2*>(row + 8 * lane) = q_lo;
      *reinterpret_cast<uint2*>(row + 256 + 8 * lane) = q_hi;
    } else {  // rows are 4-byte aligned (checked by the launcher and the layout)
      std::uint32_t* w_lo = reinterpret_cast<std::uint32_t*>(row + 8 * lane);
      std::uint32_t* w_hi = reinterpret_cast<std::uint32_t*>(row + 256 + 8 * lane);
      w_lo[0] = q_lo.x;
      w_lo[1] = q_lo.y;
      w_hi[0] = q_hi.x;
      w_hi[1] = q_hi.y;
    }
    if ((lane & 15) == 0) {
      float* scales = reinterpret_cast<float*>(row + MlaFp8Row::kScalesOffset);
      scales[lane >> 4] = scale_lo;
      scales[2 + (lane >> 4)] = scale_hi;
    }
    *reinterpret_cast<std::uint32_t*>(row + MlaFp8Row::kRopeOffset + 4 * lane) =
        std::uint32_t(float_to_bfloat16_bits(pe0)) | (std::uint32_t(float_to_bfloat16_bits(pe1)) << 16);
  }
}

}  // namespace detail

/// Quantizes each token's latent row ([num_tokens, 576] of float32, float16
/// or bfloat16, rows latent_stride_token elements apart) into its slot of the
/// fp8 cache on `stream`; slots < 0 are padding and skipped. All pointers in
/// `a` are device pointers; the bytes written equal kvkit::mla_fp8_append's.
/// Never allocates or synchronizes. Throws kvkit::Error (launching nothing)
/// on a bad layout, null pointers, a row stride < 576, an unsupported dtype
/// or a cache pointer that is not 4-byte aligned (the scales are float32);
/// or on a failed launch. Slots and values are not checked (see the file
/// comment).
inline void mla_fp8_append(const LatentFp8Layout& layout, const MlaFp8AppendArgs& a, cudaStream_t stream = nullptr) {
  constexpr const char* kWhere = "kvkit::cuda::mla_fp8_append";
  ::kvkit::detail::validate_mla_fp8_append(layout, a, kWhere);
  if (a.num_tokens == 0) return;
  check_argument(detail::address_of(a.cache) % 4 == 0, kWhere, "cache", static_cast<const void*>(a.cache),
                 "4-byte aligned (the row scales are float32)");
  const std::uint64_t es = dtype_size(a.dtype);
  const bool vector_load =
      detail::copy_unit_bytes({detail::address_of(a.latent), std::uint64_t(a.latent_stride_token) * es}) == 16;
  const bool vector_store =
      detail::copy_unit_bytes({detail::address_of(a.cache), std::uint64_t(layout.stride_slot),
                               std::uint64_t(layout.stride_page)}) >= 8;
  const std::int64_t blocks = (a.num_tokens + detail::kMlaFp8AppendWarps - 1) / detail::kMlaFp8AppendWarps;
  const auto launch = [&](auto type_tag, auto load_tag, auto store_tag) {
    using T = typename decltype(type_tag)::type;
    detail::mla_fp8_append_kernel<T, decltype(load_tag)::value, decltype(store_tag)::value>
        <<<detail::grid_for(blocks), 32 * detail::kMlaFp8AppendWarps, 0, stream>>>(layout, a);
  };
  const auto with_store = [&](auto type_tag, auto load_tag) {
    if (vector_store) {
      launch(type_tag, load_tag, std::true_type{});
    } else {
      launch(type_tag, load_tag, std::false_type{});
    }
  };
  dispatch_dtype<FloatTypes>(a.dtype, kWhere, "dtype", [&](auto type_tag) {
    if (vector_load) {
      with_store(type_tag, std::true_type{});
    } else {
      with_store(type_tag, std::false_type{});
    }
  });
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvkit::cuda
