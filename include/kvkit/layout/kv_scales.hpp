#pragma once
/// @file kv_scales.hpp
/// Scale granularity of a quantized (fp8 / int8) KV cache and where the
/// scales live.
///
/// dequantized = float(stored) * scale, with scale chosen by granularity:
///   kPerTensor   one float for all of K (and one for all of V)
///   kPerHead     one float per kv head, static (calibrated offline) [num_heads]
///   kPerTokenHead one float per (token, head), computed on append as
///                amax(|x| over head_dim) / max_representable and stored
///                "beside the page": a float32 array [num_slots, num_heads]
///                (= [pages, page_size, num_heads]) indexed by the same slot.

#include <cstdint>

#include "kvkit/core/config.hpp"
#include "kvkit/core/dtype.hpp"

namespace kvkit {

/// Which scale multiplies a stored value.
enum class ScaleGranularity : std::uint8_t {
  kPerTensor,
  kPerHead,
  kPerTokenHead,
};

/// Index into a scale array for (slot, head) under `granularity`.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t scale_index(ScaleGranularity granularity,
                                                             std::int64_t slot, std::int64_t head,
                                                             std::int64_t num_heads) {
  return granularity == ScaleGranularity::kPerTensor ? 0
         : granularity == ScaleGranularity::kPerHead ? head
                                                     : slot * num_heads + head;
}

/// Bytes of scale storage per token and head (4 for kPerTokenHead, else 0:
/// static scales do not grow with the cache).
constexpr std::int64_t scale_bytes_per_token_head(ScaleGranularity granularity) {
  return granularity == ScaleGranularity::kPerTokenHead ? 4 : 0;
}

/// Largest magnitude a quantized cache dtype stores: 448 (e4m3), 57344 (e5m2), 127 (int8).
KVKIT_HOST_DEVICE constexpr float quantized_max(DType t) {
  return t == DType::kFloat8E4M3 ? 448.0f : t == DType::kFloat8E5M2 ? 57344.0f : 127.0f;
}

/// True for the dtypes quantize-on-append writes: fp8 e4m3, fp8 e5m2, int8.
constexpr bool is_quantized_cache_dtype(DType t) {
  return t == DType::kFloat8E4M3 || t == DType::kFloat8E5M2 || t == DType::kInt8;
}

}  // namespace kvkit
