#pragma once
/// @file rope_shift_cache.cuh
/// K-shift inside a cache on the GPU: the CUDA twin of
/// kvkit::rope_shift_cache_keys (ops/rope_shift_cache.hpp), same arguments with
/// device pointers, same results (the rotation and the quantization use the
/// same host/device functions; per-(token, head) scales are recomputed from an
/// exact max, so they match too). One warp per (token, head).

#include <cuda_runtime.h>

#include <cstdint>

#include "kvkit/core/dispatch.hpp"
#include "kvkit/cuda/check.hpp"
#include "kvkit/ops/rope_shift_cache.hpp"

namespace kvkit::cuda {

namespace detail {

constexpr int kShiftWarps = 4;
/// Largest head_dim the kernel keeps in registers (8 values per lane).
constexpr int kShiftMaxHeadDim = 256;

template <class Layout, class T>
__global__ void __launch_bounds__(kShiftWarps * 32)
    rope_shift_cache_kernel(const RopeParams rope, const Layout layout, const RopeShiftCacheArgs a) {
  const int lane = threadIdx.x % 32;
  const std::int64_t work = std::int64_t(blockIdx.x) * kShiftWarps + threadIdx.x / 32;  // (token, head)
  const std::int64_t t = work / layout.num_heads;
  const std::int64_t h = work % layout.num_heads;
  if (t >= rope.num_tokens) return;
  const std::int64_t slot = a.slots[t];
  if (slot < 0 || slot >= layout.num_slots()) return;  // padding, or out of range (the CPU op throws)
  const std::int64_t delta = rope.positions[t];
  const std::int64_t magnitude = delta < 0 ? -delta : delta;
  const bool valid = rope.cos_sin_cache == nullptr || magnitude < rope.cache_positions;
  const int head_dim = int(layout.head_dim);
  const int half = rope.rotary_dim / 2;
  const std::int64_t off = layout.slot_offset(slot, h);
  constexpr bool kQuantized = sizeof(T) == 1;
  float scale = 1.0f;
  std::int64_t si = 0;
  if constexpr (kQuantized) {
    si = scale_index(a.granularity, slot, h, layout.num_heads);
    scale = a.granularity == ScaleGranularity::kPerTokenHead ? a.k_scale_cache[si] : a.k_scale[si];
  }
  auto load = [&](int d) -> float {
    if constexpr (kQuantized) {
      return dequantize_value(static_cast<const std::uint8_t*>(a.k_cache)[off + d], scale, a.cache_dtype);
    } else {
      return to_float(static_cast<const T*>(a.k_cache)[off + d]);
    }
  };
  // Lane-owned values: rotated pairs i = lane + 32 k, then tail dims.
  constexpr int kSlots = kShiftMaxHeadDim / 32;
  float first[kSlots / 2], second[kSlots / 2], tail[kSlots];
  float amax = 0.0f;
  for (int k = 0; k < kSlots / 2; ++k) {
    const int i = lane + 32 * k;
    if (i >= half) break;
    const RopePair pair = rope_pair(rope.style, rope.rotary_dim, i);
    float x = load(pair.first), y = load(pair.second);
    if (valid) {
      float c, s;
      rope_cos_sin(rope, delta, i, c, s);
      rope_rotate(x, y, c, s);
    } else {
      x = y = __int_as_float(0x7fc00000);
    }
    first[k] = x;
    second[k] = y;
    amax = fold_amax(fold_amax(amax, x), y);
  }
  for (int k = 0; k < kSlots; ++k) {
    const int d = rope.rotary_dim + lane + 32 * k;
    if (d >= head_dim) break;
    tail[k] = load(d);
    amax = fold_amax(amax, tail[k]);
  }
  if constexpr (kQuantized) {
    if (a.granularity == ScaleGranularity::kPerTokenHead) {
      for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      scale = dynamic_scale(amax, a.cache_dtype);
      if (lane == 0) a.k_scale_cache[si] = scale;
    }
  }
  auto store = [&](int d, float v) {
    if constexpr (kQuantized) {
      static_cast<std::uint8_t*>(a.k_cache)[off + d] = quantize_value(v, scale, a.cache_dtype);
    } else {
      static_cast<T*>(a.k_cache)[off + d] = from_float<T>(v);
    }
  };
  for (int k = 0; k < kSlots / 2; ++k) {
    const int i = lane + 32 * k;
    if (i >= half) break;
    const RopePair pair = rope_pair(rope.style, rope.rotary_dim, i);
    store(pair.first, first[k]);
    store(pair.second, second[k]);
  }
  // A new per-(token, head) scale re-quantizes the tail too; a static scale
  // leaves it as it is, like the CPU op (re-encoding would turn e5m2 inf into
  // 57344 and canonicalize NaN codes).
  if (kQuantized && a.granularity == ScaleGranularity::kPerTokenHead) {
    for (int k = 0; k < kSlots; ++k) {
      const int d = rope.rotary_dim + lane + 32 * k;
      if (d >= head_dim) break;
      store(d, tail[k]);
    }
  }
}

}  // namespace detail

/// K-shift inside a cache on `stream` (see kvkit::rope_shift_cache_keys). All
/// pointers are device pointers; slots and deltas are not read on the host:
/// an out-of-range slot writes nothing and a |delta| beyond the table writes
/// NaN. head_dim up to 256. Throws kvkit::Error on bad arguments or a failed launch.
template <class Layout>
void rope_shift_cache_keys(const RopeParams& rope, const Layout& layout, const RopeShiftCacheArgs& a,
                           cudaStream_t stream = nullptr) {
  constexpr const char* kWhere = "kvkit::cuda::rope_shift_cache_keys";
  ::kvkit::detail::validate_rope_shift_cache(rope, layout, a, kWhere);
  check_argument(layout.head_dim <= detail::kShiftMaxHeadDim, kWhere, "layout.head_dim", layout.head_dim,
                 "<= ", detail::kShiftMaxHeadDim, " on the GPU");
  const std::int64_t work = rope.num_tokens * layout.num_heads;
  if (work == 0) return;
  check_argument(work / detail::kShiftWarps < (std::int64_t(1) << 31), kWhere, "num_tokens", rope.num_tokens,
                 "fewer (tokens x heads) on the GPU");
  const unsigned blocks = unsigned((work + detail::kShiftWarps - 1) / detail::kShiftWarps);
  auto launch = [&](auto tag) {
    using T = typename decltype(tag)::type;
    detail::rope_shift_cache_kernel<Layout, T><<<blocks, detail::kShiftWarps * 32, 0, stream>>>(rope, layout, a);
  };
  if (is_quantized_cache_dtype(a.cache_dtype)) {
    launch(TypeTag<std::uint8_t>{});
  } else {
    dispatch_dtype<FloatTypes>(a.cache_dtype, kWhere, "cache_dtype", launch);
  }
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvkit::cuda
