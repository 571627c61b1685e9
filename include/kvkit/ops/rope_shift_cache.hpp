#pragma once
/// @file rope_shift_cache.hpp
/// K-shift inside a cache (CPU): re-rotates the keys stored at given slots of
/// a paged or contiguous cache by per-token position deltas — llama.cpp's
/// context shift (drop old tokens, move the rest back) and StreamingLLM's
/// position remapping — without gathering them out. Works on float32/16/bf16
/// caches and on fp8/int8 caches written by quantize_append_kv.
///
/// Quantized caches: each key row is dequantized, rotated in float32 and
/// quantized again. With a static scale (per tensor or per head) the stored
/// value becomes quantize(rotate(dequantize(k))): one more rounding of the
/// format (half an ulp: 2⁻⁴ relative for e4m3, 2⁻³ for e5m2, scale/2 for
/// int8) on top of the error already stored; rotation can raise a component
/// by up to √2 times the pair's largest, so values near the format's maximum
/// saturate there. With per-(token, head) scales the scale is recomputed from
/// the rotated row (no saturation) and the whole row is re-quantized with it.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kvkit/core/dispatch.hpp"
#include "kvkit/layout/kv_scales.hpp"
#include "kvkit/ops/append.hpp"
#include "kvkit/ops/quantize.hpp"
#include "kvkit/ops/rope.hpp"

namespace kvkit {

/// Where the keys to shift are. `rope` (separately) gives the rotation: its
/// positions are the deltas, its num_tokens the number of slots; its q/k
/// pointers and strides are ignored.
struct RopeShiftCacheArgs {
  void* k_cache = nullptr;                      ///< laid out by the layout
  DType cache_dtype = DType::kBFloat16;         ///< float32/16/bf16, or fp8 e4m3/e5m2 / int8
  const std::int64_t* slots = nullptr;          ///< [rope.num_tokens]; < 0: skipped
  ScaleGranularity granularity = ScaleGranularity::kPerTensor;  ///< quantized caches only
  const float* k_scale = nullptr;               ///< kPerTensor: [1]; kPerHead: [num_heads]
  float* k_scale_cache = nullptr;               ///< kPerTokenHead: [num_slots, num_heads], rewritten
};

namespace detail {

/// The rotation described as an in-place shift of the cache's key rows, for validation.
template <class Layout>
RopeParams rope_shift_keys_in_cache(const RopeParams& rope, const Layout& layout, const RopeShiftCacheArgs& a) {
  RopeParams keys = rope;
  keys.q = nullptr;
  keys.k = a.k_cache;
  keys.num_k_heads = int(layout.num_heads);
  keys.k_head_stride = layout.stride_head;
  keys.dtype = DType::kFloat32;  // the rotation runs in float32 whatever the cache holds
  return keys;
}

/// Everything that can be checked without reading slots or deltas (shared
/// with the CUDA launcher). Throws kvkit::Error.
template <class Layout>
void validate_rope_shift_cache(const RopeParams& rope, const Layout& layout, const RopeShiftCacheArgs& a,
                               const char* where) {
  layout.validate(where);
  check_argument(rope.head_dim == layout.head_dim, where, "rope.head_dim", rope.head_dim,
                 "the layout's head_dim (", layout.head_dim, ")");
  validate_rope_params(rope_shift_keys_in_cache(rope, layout, a), where, /*check_token_rows=*/false);
  const bool quantized = is_quantized_cache_dtype(a.cache_dtype);
  check_argument(quantized || a.cache_dtype == DType::kFloat32 || a.cache_dtype == DType::kFloat16 ||
                     a.cache_dtype == DType::kBFloat16,
                 where, "cache_dtype", a.cache_dtype, "float32, float16, bfloat16, float8_e4m3, float8_e5m2 or int8");
  if (rope.num_tokens == 0) return;
  check_argument(a.slots != nullptr, where, "slots", a.slots, "a non-null pointer");
  if (quantized) {
    if (a.granularity == ScaleGranularity::kPerTokenHead) {
      check_argument(a.k_scale_cache != nullptr, where, "k_scale_cache", a.k_scale_cache,
                     "a non-null [num_slots, num_heads] array for per-(token, head) scales");
    } else {
      check_argument(a.k_scale != nullptr, where, "k_scale", a.k_scale, "a non-null static scale");
    }
  }
}

}  // namespace detail

/// Re-rotates the keys at each slot by its delta (see the file comment).
/// Throws kvkit::Error before changing anything on bad input: sizes, dtypes,
/// missing scales, a slot beyond the cache, a |delta| beyond the table.
template <class Layout>
void rope_shift_cache_keys(const RopeParams& rope, const Layout& layout, const RopeShiftCacheArgs& a) {
  constexpr const char* kWhere = "kvkit::rope_shift_cache_keys";
  detail::validate_rope_shift_cache(rope, layout, a, kWhere);
  if (rope.num_tokens == 0) return;
  detail::check_positions(detail::rope_shift_keys_in_cache(rope, layout, a), kWhere, /*allow_negative=*/true);
  detail::check_slots(a.slots, rope.num_tokens, layout.num_slots(), kWhere);
  const bool quantized = is_quantized_cache_dtype(a.cache_dtype);
  // A static scale that is NaN, inf or <= 0 would turn every re-quantized key
  // into NaN or garbage: reject it, as quantize_append_kv does.
  if (quantized && a.granularity != ScaleGranularity::kPerTokenHead) {
    const std::int64_t n = a.granularity == ScaleGranularity::kPerHead ? layout.num_heads : 1;
    for (std::int64_t i = 0; i < n; ++i) {
      if (!(a.k_scale[i] > 0.0f && a.k_scale[i] <= 3.402823466e38f)) {
        fail(kWhere, "argument 'k_scale' has k_scale[", i, "] = ", a.k_scale[i],
             ": expected a finite scale > 0");
      }
    }
  }

  const int head_dim = int(layout.head_dim), half_rot = rope.rotary_dim / 2;
  std::vector<float> cos_row(static_cast<std::size_t>(half_rot)), sin_row(cos_row.size());
  auto load_cos_sin = [&](std::int64_t t) {
    detail::load_cos_sin_row(rope, rope.positions[t], cos_row.data(), sin_row.data());
  };
  if (!quantized) {  // rotate each token's heads in place, the dtype chosen once
    dispatch_dtype<FloatTypes>(a.cache_dtype, kWhere, "cache_dtype", [&](auto tag) {
      using T = typename decltype(tag)::type;
      for (std::int64_t t = 0; t < rope.num_tokens; ++t) {
        const std::int64_t slot = a.slots[t];
        if (slot < 0) continue;
        load_cos_sin(t);
        detail::rotate_heads(static_cast<T*>(a.k_cache) + layout.slot_offset(slot, 0), layout.stride_head,
                             int(layout.num_heads), rope, cos_row.data(), sin_row.data());
      }
    });
    return;
  }
  std::vector<float> row(static_cast<std::size_t>(head_dim));
  for (std::int64_t t = 0; t < rope.num_tokens; ++t) {
    const std::int64_t slot = a.slots[t];
    if (slot < 0) continue;
    load_cos_sin(t);
    for (std::int64_t h = 0; h < layout.num_heads; ++h) {
      auto* bytes = static_cast<std::uint8_t*>(a.k_cache) + layout.slot_offset(slot, h);
      const std::int64_t si = scale_index(a.granularity, slot, h, layout.num_heads);
      const float old_scale = a.granularity == ScaleGranularity::kPerTokenHead ? a.k_scale_cache[si] : a.k_scale[si];
      for (int d = 0; d < head_dim; ++d) row[d] = dequantize_value(bytes[d], old_scale, a.cache_dtype);
      detail::rotate_heads(row.data(), 0, 1, rope, cos_row.data(), sin_row.data());
      float scale = old_scale;
      if (a.granularity == ScaleGranularity::kPerTokenHead) {
        float amax = 0.0f;
        for (int d = 0; d < head_dim; ++d) amax = fold_amax(amax, row[d]);
        scale = dynamic_scale(amax, a.cache_dtype);
        a.k_scale_cache[si] = scale;
      }
      // A static scale leaves the unrotated tail as it is; a new per-(token, head)
      // scale re-quantizes the whole row.
      const int written = a.granularity == ScaleGranularity::kPerTokenHead ? head_dim : rope.rotary_dim;
      for (int d = 0; d < written; ++d) bytes[d] = quantize_value(row[d], scale, a.cache_dtype);
    }
  }
}

}  // namespace kvkit
