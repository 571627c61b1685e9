#pragma once
/// @file copy_blocks.hpp
/// Copy whole pages from (src, dst) pairs across many caches (every layer's
/// K and V) in one call: copy-on-write when a shared page is about to be
/// written, or compaction. CPU implementation; the CUDA one, with the same
/// arguments, is kvkit/cuda/copy_blocks.cuh.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"
#include "kvkit/ops/append.hpp"

namespace kvkit {

/// Arguments of copy_blocks. Every cache has the same layout and dtype. For
/// an interleaved layout list the K pointer and K pointer + v_offset.
struct CopyBlocksArgs {
  void* const* caches = nullptr;        ///< [num_caches] cache base pointers
  std::int64_t num_caches = 0;
  const std::int64_t* pairs = nullptr;  ///< [num_pairs, 2]: (src page, dst page)
  std::int64_t num_pairs = 0;
  DType dtype = DType::kBFloat16;
};

/// Throws kvkit::Error unless every page id is in [0, num_pages), no page is
/// a destination twice and no destination is also a source (so that the
/// result does not depend on the order of the copies). Host memory.
inline void validate_copy_pairs(const std::int64_t* pairs, std::int64_t num_pairs,
                                std::int64_t num_pages, const char* where) {
  check_argument(num_pairs >= 0, where, "num_pairs", num_pairs, ">= 0");
  if (num_pairs == 0) return;
  check_argument(pairs != nullptr, where, "pairs", pairs, "a non-null pointer");
  for (std::int64_t i = 0; i < num_pairs; ++i) {
    for (int j = 0; j < 2; ++j) {
      const std::int64_t p = pairs[2 * i + j];
      if (p < 0 || p >= num_pages) {
        fail(where, "argument 'pairs' has pairs[", i, "][", j, "] = ", p,
             ": expected a page id in [0, ", num_pages, ")");
      }
    }
  }
  // Sorted copies rather than a table of num_pages entries: memory follows
  // the pairs, not the cache (which may hold millions of pages).
  const std::size_t n = std::size_t(num_pairs);
  std::vector<std::int64_t> sources(n);
  std::vector<std::pair<std::int64_t, std::int64_t>> destinations(n);  // (page, pair)
  for (std::size_t i = 0; i < n; ++i) {
    sources[i] = pairs[2 * i];
    destinations[i] = {pairs[2 * i + 1], std::int64_t(i)};
  }
  std::sort(sources.begin(), sources.end());
  std::sort(destinations.begin(), destinations.end());
  std::vector<char> repeats_earlier(n, 0);  // its destination is an earlier pair's
  for (std::size_t k = 1; k < n; ++k) {
    if (destinations[k].first == destinations[k - 1].first) {
      repeats_earlier[std::size_t(destinations[k].second)] = 1;
    }
  }
  for (std::size_t i = 0; i < n; ++i) {
    const std::int64_t d = pairs[2 * i + 1];
    if (repeats_earlier[i] != 0 || std::binary_search(sources.begin(), sources.end(), d)) {
      fail(where, "argument 'pairs' has pairs[", i, "][1] = ", d,
           ": expected a destination that is neither another pair's destination nor a source");
    }
  }
}

/// Validates what does not need reading `pairs` or `caches` (shared with the
/// CUDA launcher): layout, counts, non-null arrays.
inline void validate_copy_blocks(const PagedKVLayout& layout, const CopyBlocksArgs& a,
                                 const char* where) {
  layout.validate(where);
  check_argument(a.num_caches >= 0, where, "num_caches", a.num_caches, ">= 0");
  check_argument(a.num_pairs >= 0, where, "num_pairs", a.num_pairs, ">= 0");
  const bool used = a.num_caches > 0 && a.num_pairs > 0;
  check_argument(!used || a.caches != nullptr, where, "caches", a.caches, "a non-null pointer");
  check_argument(!used || a.pairs != nullptr, where, "pairs", a.pairs, "a non-null pointer");
}

namespace detail {

/// The copies of copy_blocks, with the stores chosen at compile time.
template <bool kStreaming>
inline void copy_block_pairs(const PagedKVLayout& layout, const CopyBlocksArgs& a) {
  const std::int64_t es = std::int64_t(dtype_size(a.dtype));
  const bool dense = layout.page_is_dense();
  for (std::int64_t c = 0; c < a.num_caches; ++c) {
    auto* base = static_cast<unsigned char*>(a.caches[c]);
    for (std::int64_t i = 0; i < a.num_pairs; ++i) {
      const std::int64_t src = a.pairs[2 * i], dst = a.pairs[2 * i + 1];
      if (dense) {
        copy_row<kStreaming>(base + layout.offset(dst, 0, 0, 0) * es, base + layout.offset(src, 0, 0, 0) * es,
                             std::size_t(layout.page_elements() * es));
        continue;
      }
      for (std::int64_t s = 0; s < layout.page_size; ++s) {
        for (std::int64_t h = 0; h < layout.num_heads; ++h) {
          copy_row<kStreaming>(base + layout.offset(dst, s, h, 0) * es, base + layout.offset(src, s, h, 0) * es,
                               std::size_t(layout.head_dim * es));
        }
      }
    }
  }
  if constexpr (kStreaming) streaming_store_fence();
}

}  // namespace detail

/// Copies page pairs[i][0] to page pairs[i][1] in every cache (CPU). Throws
/// kvkit::Error on invalid arguments (see validate_copy_pairs), a null or
/// misaligned cache pointer, before copying anything. Caches of at least
/// kStreamingStoreMinCacheBytes are written with streaming stores, as the
/// appends do: a copied-to page is usually cold, and ordinary stores would
/// first read each of its lines from memory (read-for-ownership).
inline void copy_blocks(const PagedKVLayout& layout, const CopyBlocksArgs& a) {
  constexpr const char* kWhere = "kvkit::copy_blocks";
  validate_copy_blocks(layout, a, kWhere);
  if (a.num_caches == 0 || a.num_pairs == 0) return;
  validate_copy_pairs(a.pairs, a.num_pairs, layout.num_pages, kWhere);
  for (std::int64_t c = 0; c < a.num_caches; ++c) {
    detail::check_pointer(a.caches[c], true, a.dtype, kWhere, "caches[i]");
  }
  const std::int64_t cache_bytes = layout.num_pages * layout.page_elements() * std::int64_t(dtype_size(a.dtype));
  if (detail::use_streaming_stores(detail::StoreKind::kAuto, cache_bytes)) {
    detail::copy_block_pairs<true>(layout, a);
  } else {
    detail::copy_block_pairs<false>(layout, a);
  }
}

}  // namespace kvkit
