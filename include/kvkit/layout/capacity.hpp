#pragma once
/// @file capacity.hpp
/// Bytes a cache layout needs per token and per page for a dtype (one layer;
/// multiply by the number of layers for a model). Used by capacity planners
/// to turn a memory budget into a number of pages.

#include <cstdint>

#include "kvkit/core/dtype.hpp"
#include "kvkit/layout/contiguous_kv_layout.hpp"
#include "kvkit/layout/kv_scales.hpp"
#include "kvkit/layout/latent_kv_layout.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"

namespace kvkit {

/// K + V bytes of one token: 2 * num_heads * head_dim * dtype_size, plus
/// 2 * num_heads * 4 when per-(token, head) scales are stored beside the page.
/// Padding introduced by larger strides is not counted.
inline std::int64_t bytes_per_token(const PagedKVLayout& l, DType dtype,
                                    ScaleGranularity scales = ScaleGranularity::kPerTensor) {
  return 2 * l.num_heads *
         (l.head_dim * std::int64_t(dtype_size(dtype)) + scale_bytes_per_token_head(scales));
}

/// K + V bytes of one page: page_size * bytes_per_token.
inline std::int64_t bytes_per_page(const PagedKVLayout& l, DType dtype,
                                   ScaleGranularity scales = ScaleGranularity::kPerTensor) {
  return l.page_size * bytes_per_token(l, dtype, scales);
}

/// Latent bytes of one token: (kv_lora_rank + rope_dim) * dtype_size (no V).
inline std::int64_t bytes_per_token(const LatentKVLayout& l, DType dtype) {
  return l.row_elements() * std::int64_t(dtype_size(dtype));
}

/// Latent bytes of one page.
inline std::int64_t bytes_per_page(const LatentKVLayout& l, DType dtype) {
  return l.page_size * bytes_per_token(l, dtype);
}

/// K + V bytes of one token of a contiguous cache.
inline std::int64_t bytes_per_token(const ContiguousKVLayout& l, DType dtype) {
  return 2 * l.num_heads * l.head_dim * std::int64_t(dtype_size(dtype));
}

/// K + V bytes reserved per sequence by a contiguous cache (capacity tokens).
inline std::int64_t bytes_per_sequence(const ContiguousKVLayout& l, DType dtype) {
  return l.capacity * bytes_per_token(l, dtype);
}

}  // namespace kvkit
