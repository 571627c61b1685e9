#pragma once
/// @file gather.hpp
/// Gather one sequence's cached K/V (its pages, in order) into dense tensors
/// [num_tokens, num_heads, head_dim]: for debugging, export and moving a
/// prefilled cache to a decode worker. CPU implementation; the CUDA one is
/// kvkit/cuda/gather.cuh with the same arguments.

#include <cstdint>
#include <cstring>

#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"
#include "kvkit/ops/append.hpp"
#include "kvkit/ops/token_chunks.hpp"

namespace kvkit {

/// Arguments of gather_kv. Token t is read from page pages[t / page_size],
/// in-page slot t % page_size. Leave v_cache and value_out null to gather K
/// only (e.g. a latent cache through LatentKVLayout::as_paged()).
struct GatherKVArgs {
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;               ///< optional (null with value_out null)
  const std::int32_t* pages = nullptr;         ///< [ceil(num_tokens / page_size)] page ids
  std::int64_t num_tokens = 0;
  void* key_out = nullptr;                     ///< [num_tokens, num_heads, head_dim]
  void* value_out = nullptr;                   ///< [num_tokens, num_heads, head_dim] or null
  std::int64_t out_stride_token = 0;           ///< elements
  std::int64_t out_stride_head = 0;            ///< elements (>= head_dim)
  DType dtype = DType::kBFloat16;
};

/// Validates what does not need to read `pages` (shared with the CUDA launcher).
inline void validate_gather_kv(const PagedKVLayout& layout, const GatherKVArgs& a,
                               const char* where) {
  layout.validate(where);
  check_argument(a.num_tokens >= 0, where, "num_tokens", a.num_tokens, ">= 0");
  const bool used = a.num_tokens > 0;
  detail::check_pointer(a.k_cache, used, a.dtype, where, "k_cache");
  detail::check_pointer(a.key_out, used, a.dtype, where, "key_out");
  detail::check_pointer(a.pages, used, DType::kInt32, where, "pages");
  check((a.v_cache == nullptr) == (a.value_out == nullptr), where,
        "v_cache and value_out must both be given or both be null");
  detail::check_pointer(a.value_out, used && a.value_out != nullptr, a.dtype, where, "value_out");
  detail::check_pointer(a.v_cache, used && a.v_cache != nullptr, a.dtype, where, "v_cache");
  check_argument(layout.num_heads == 1 || a.out_stride_head >= layout.head_dim, where,
                 "out_stride_head", a.out_stride_head, ">= head_dim (", layout.head_dim, ")");
  detail::check_output_token_stride(a.out_stride_token, a.num_tokens, layout, a.out_stride_head, where);
}

namespace detail {

/// Throws unless every page id of the sequence is in [0, num_pages).
inline void check_sequence_pages(const PagedKVLayout& layout, const std::int32_t* pages, std::int64_t num_tokens,
                                 const char* where) {
  const std::int64_t n_pages = (num_tokens + layout.page_size - 1) / layout.page_size;
  for (std::int64_t i = 0; i < n_pages; ++i) {
    if (pages[i] < 0 || pages[i] >= layout.num_pages) {
      fail(where, "argument 'pages' has pages[", i, "] = ", pages[i], ": expected a page id in [0, ",
           layout.num_pages, ")");
    }
  }
}

/// gather_kv's copy of tokens [first, end), after validation.
template <bool kStreaming>
void gather_kv_tokens(const PagedKVLayout& layout, const GatherKVArgs& a, std::int64_t first, std::int64_t end) {
  const std::int64_t es = std::int64_t(dtype_size(a.dtype));
  for (int which = 0; which < 2; ++which) {
    const auto* cache = static_cast<const unsigned char*>(which == 0 ? a.k_cache : a.v_cache);
    auto* out = static_cast<unsigned char*>(which == 0 ? a.key_out : a.value_out);
    if (cache == nullptr) continue;
    for (std::int64_t t = first; t < end; ++t) {
      const std::int64_t slot = token_slot(a.pages, t, layout.page_shift);
      copy_head_rows<kStreaming>(out + t * a.out_stride_token * es, a.out_stride_head * es,
                                 cache + layout.slot_offset(slot, 0) * es, layout.stride_head * es, layout.num_heads,
                                 layout.head_dim * es);
    }
  }
  if (kStreaming) streaming_store_fence();
}

/// gather_kv with the stores chosen by `stores` (tests force each kind):
/// streaming when the output (K's) is at least kStreamingStoreMinCacheBytes,
/// since a gathered sequence is written once and read later, often by
/// another device or process. Chunks of 256 tokens are shared among OpenMP
/// threads from 512 tokens where the program enables OpenMP.
inline void gather_kv_with(const PagedKVLayout& layout, const GatherKVArgs& a, StoreKind stores) {
  constexpr const char* kWhere = "kvkit::gather_kv";
  validate_gather_kv(layout, a, kWhere);
  check_sequence_pages(layout, a.pages, a.num_tokens, kWhere);
  const std::int64_t out_bytes =
      a.num_tokens * layout.num_heads * layout.head_dim * std::int64_t(dtype_size(a.dtype));
  const bool streaming = use_streaming_stores(stores, out_bytes);
  for_each_token_chunk(a.num_tokens, /*chunk=*/256, /*min_tokens_to_thread=*/512,
                       [&](std::int64_t first, std::int64_t end) {
                         if (streaming) {
                           gather_kv_tokens<true>(layout, a, first, end);
                         } else {
                           gather_kv_tokens<false>(layout, a, first, end);
                         }
                       });
}

}  // namespace detail

/// Copies the sequence's tokens 0..num_tokens-1 out of the cache (CPU).
/// Throws kvkit::Error on invalid arguments or a page id outside
/// [0, num_pages), before writing anything.
inline void gather_kv(const PagedKVLayout& layout, const GatherKVArgs& a) {
  detail::gather_kv_with(layout, a, detail::StoreKind::kAuto);
}

}  // namespace kvkit
