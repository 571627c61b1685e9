#pragma once
/// @file quantize.cuh
/// CUDA quantize_append_kv and dequantize_gather_kv, with the argument
/// structs and scalar rules of kvkit/ops/quantize.hpp, so the stored bytes,
/// scales and dequantized floats equal the CPU op's bit for bit (nvcc's
/// default IEEE division is required: do not build with --use_fast_math),
/// except NaN payloads: a NaN code dequantizes to the GPU's canonical NaN.
/// One block per token, one warp per (K or V, head) row; the per-row amax is
/// a warp max (exact, so order does not matter).
/// Slots >= num_slots and page ids outside [0, num_pages) cannot be reported
/// from the device and are skipped; static scales are not checked here.

#include <cuda_runtime.h>

#include <cstdint>

#include "kvkit/cuda/check.hpp"
#include "kvkit/cuda/vector_copy.cuh"
#include "kvkit/ops/quantize.hpp"

namespace kvkit::cuda {

namespace detail {

inline constexpr int kQuantizeWarps = 4;

template <class Layout>
__global__ void quantize_append_kernel(Layout layout, QuantizeAppendArgs a) {
  const std::int64_t heads = layout.num_heads, hd = layout.head_dim;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (std::int64_t t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    const std::int64_t slot = a.slot_mapping[t];
    if (slot < 0 || slot >= layout.num_slots()) continue;
    for (std::int64_t r = warp; r < 2 * heads; r += kQuantizeWarps) {
      const bool is_v = r >= heads;
      const std::int64_t h = is_v ? r - heads : r;
      const void* src = is_v ? a.value : a.key;
      const std::int64_t base = t * (is_v ? a.value_stride_token : a.key_stride_token) +
                                h * (is_v ? a.value_stride_head : a.key_stride_head);
      float scale;
      if (a.granularity == ScaleGranularity::kPerTokenHead) {
        float amax = 0.0f;
        for (std::int64_t d = lane; d < hd; d += 32) amax = fold_amax(amax, kvkit::detail::load_float(src, base + d, a.src_dtype));
        for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        scale = dynamic_scale(amax, a.cache_dtype);
        if (lane == 0) (is_v ? a.v_scale_cache : a.k_scale_cache)[slot * heads + h] = scale;
      } else {
        scale = (is_v ? a.v_scale : a.k_scale)[scale_index(a.granularity, slot, h, heads)];
      }
      std::uint8_t* row = static_cast<std::uint8_t*>(is_v ? a.v_cache : a.k_cache) + layout.slot_offset(slot, h);
      for (std::int64_t d = lane; d < hd; d += 32) {
        row[d] = quantize_value(kvkit::detail::load_float(src, base + d, a.src_dtype), scale, a.cache_dtype);
      }
    }
  }
}

__global__ inline void dequantize_gather_kernel(PagedKVLayout layout, DequantizeGatherArgs a) {
  const std::int64_t heads = layout.num_heads, hd = layout.head_dim;
  for (std::int64_t t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    const std::int32_t page = a.pages[t >> layout.page_shift];
    if (page < 0 || page >= layout.num_pages) continue;
    const std::int64_t slot = token_slot(a.pages, t, layout.page_shift);
    for (std::int64_t u = threadIdx.x; u < 2 * heads * hd; u += blockDim.x) {
      const bool is_v = u >= heads * hd;
      const std::int64_t r = is_v ? u - heads * hd : u;
      const std::int64_t h = r / hd, d = r - h * hd;
      const float scale = (is_v ? a.v_scale : a.k_scale)[scale_index(a.granularity, slot, h, heads)];
      const std::uint8_t q = static_cast<const std::uint8_t*>(is_v ? a.v_cache : a.k_cache)[layout.slot_offset(slot, h) + d];
      (is_v ? a.value_out : a.key_out)[t * a.out_stride_token + h * a.out_stride_head + d] =
          dequantize_value(q, scale, a.cache_dtype);
    }
  }
}

}  // namespace detail

/// Quantizes and appends on `stream` (device pointers; see
/// kvkit::quantize_append_kv). Throws kvkit::Error on invalid arguments.
template <class Layout>
void quantize_append_kv(const Layout& layout, const QuantizeAppendArgs& a, cudaStream_t stream) {
  validate_quantize_append(layout, a, "kvkit::cuda::quantize_append_kv");
  if (a.num_tokens == 0) return;
  detail::quantize_append_kernel<Layout>
      <<<detail::grid_for(a.num_tokens), 32 * detail::kQuantizeWarps, 0, stream>>>(layout, a);
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

/// Dequantizes a sequence into float32 on `stream` (see kvkit::dequantize_gather_kv).
inline void dequantize_gather_kv(const PagedKVLayout& layout, const DequantizeGatherArgs& a,
                                 cudaStream_t stream) {
  validate_dequantize_gather(layout, a, "kvkit::cuda::dequantize_gather_kv");
  if (a.num_tokens == 0) return;
  detail::dequantize_gather_kernel<<<detail::grid_for(a.num_tokens), 256, 0, stream>>>(layout, a);
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvkit::cuda
