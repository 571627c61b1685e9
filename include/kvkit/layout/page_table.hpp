#pragma once
/// @file page_table.hpp
/// Views of the two common page-table formats, their validation and
/// converters between them.
///
/// Padded (vLLM):  block_table [batch, max_blocks] (row stride stride_batch),
///                 seq_lens [batch]; sequence b uses the first
///                 ceil(seq_lens[b] / page_size) entries of row b.
/// CSR (FlashInfer): indptr [batch + 1], indices [indptr[batch]],
///                 last_page_len [batch]; sequence b uses
///                 indices[indptr[b] .. indptr[b+1]), and its last page holds
///                 last_page_len[b] tokens (1..page_size; 0 only for a
///                 sequence with no pages).
/// The views are plain structs of pointers (host or device memory) with
/// KVKIT_HOST_DEVICE accessors; validation and conversion read host memory.

#include <cstdint>
#include <vector>

#include "kvkit/core/config.hpp"
#include "kvkit/core/error.hpp"

namespace kvkit {

/// vLLM-style padded block table. Does not own its arrays.
struct PaddedPageTable {
  const std::int32_t* block_table = nullptr;  ///< [batch_size, max_blocks], row stride stride_batch
  const std::int32_t* seq_lens = nullptr;     ///< [batch_size] tokens per sequence
  std::int64_t batch_size = 0;
  std::int64_t max_blocks = 0;
  std::int64_t stride_batch = 0;              ///< elements between rows (>= max_blocks)

  /// Page id of the i-th page of sequence b.
  KVKIT_HOST_DEVICE std::int32_t page(std::int64_t b, std::int64_t i) const {
    return block_table[b * stride_batch + i];
  }
  /// The row of sequence b (its page list).
  KVKIT_HOST_DEVICE const std::int32_t* pages(std::int64_t b) const {
    return block_table + b * stride_batch;
  }
  KVKIT_HOST_DEVICE std::int64_t seq_len(std::int64_t b) const { return seq_lens[b]; }
  /// Pages used by sequence b: ceil(seq_len / page_size).
  KVKIT_HOST_DEVICE std::int64_t num_pages(std::int64_t b, std::int64_t page_size) const {
    return (std::int64_t(seq_lens[b]) + page_size - 1) / page_size;
  }
};

/// The most pages one sequence can use: seq_lens are int32, so no sequence
/// holds more than 2^31 - 1 tokens. A padded table wider than this only
/// wastes memory; the builders below refuse it.
inline constexpr std::int64_t max_pages_per_sequence(std::int64_t page_size) {
  return (std::int64_t(INT32_MAX) + page_size - 1) / page_size;
}

/// FlashInfer-style CSR page table. Does not own its arrays.
struct CsrPageTable {
  const std::int32_t* indptr = nullptr;         ///< [batch_size + 1], indptr[0] == 0
  const std::int32_t* indices = nullptr;        ///< [indptr[batch_size]] page ids
  const std::int32_t* last_page_len = nullptr;  ///< [batch_size]
  std::int64_t batch_size = 0;

  KVKIT_HOST_DEVICE std::int32_t page(std::int64_t b, std::int64_t i) const {
    return indices[indptr[b] + i];
  }
  KVKIT_HOST_DEVICE const std::int32_t* pages(std::int64_t b) const { return indices + indptr[b]; }
  KVKIT_HOST_DEVICE std::int64_t num_pages(std::int64_t b) const {
    return std::int64_t(indptr[b + 1]) - indptr[b];
  }
  /// Tokens of sequence b: (num_pages - 1) * page_size + last_page_len (0 without pages).
  KVKIT_HOST_DEVICE std::int64_t seq_len(std::int64_t b, std::int64_t page_size) const {
    const std::int64_t n = num_pages(b);
    return n == 0 ? 0 : (n - 1) * page_size + last_page_len[b];
  }
};

/// Slot (page * page_size + in-page) of token t of a sequence whose pages are `pages`.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t token_slot(const std::int32_t* pages,
                                                            std::int64_t t, int page_shift) {
  const std::int64_t page_size = std::int64_t(1) << page_shift;
  return (std::int64_t(pages[t >> page_shift]) << page_shift) + (t & (page_size - 1));
}

/// Throws kvkit::Error unless the padded table (host memory) is consistent:
/// non-null arrays, page_size a power of two, stride_batch >= max_blocks,
/// seq_lens >= 0 and needing at most max_blocks pages, and every used page
/// id in [0, num_cache_pages) (not checked when num_cache_pages < 0).
inline void validate_page_table(const PaddedPageTable& t, std::int64_t page_size,
                                std::int64_t num_cache_pages = -1) {
  constexpr const char* kWhere = "kvkit::validate_page_table(padded)";
  check_argument(is_power_of_two(page_size), kWhere, "page_size", page_size, "a power of two");
  check_argument(t.batch_size >= 0, kWhere, "batch_size", t.batch_size, ">= 0");
  check_argument(t.max_blocks >= 0, kWhere, "max_blocks", t.max_blocks, ">= 0");
  check_argument(t.stride_batch >= t.max_blocks, kWhere, "stride_batch", t.stride_batch,
                 ">= max_blocks (", t.max_blocks, ")");
  if (t.batch_size == 0) return;
  check_argument(t.seq_lens != nullptr, kWhere, "seq_lens", t.seq_lens, "a non-null pointer");
  check_argument(t.block_table != nullptr || t.max_blocks == 0, kWhere, "block_table",
                 t.block_table, "a non-null pointer");
  for (std::int64_t b = 0; b < t.batch_size; ++b) {
    if (t.seq_lens[b] < 0) {
      fail(kWhere, "seq_lens[", b, "] = ", t.seq_lens[b], ": expected >= 0");
    }
    const std::int64_t n = t.num_pages(b, page_size);
    if (n > t.max_blocks) {
      fail(kWhere, "seq_lens[", b, "] = ", t.seq_lens[b], " needs ", n, " pages of ", page_size,
           " tokens: expected at most max_blocks (", t.max_blocks, ")");
    }
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int32_t p = t.page(b, i);
      if (p < 0 || (num_cache_pages >= 0 && p >= num_cache_pages)) {
        fail(kWhere, "block_table[", b, "][", i, "] = ", p, ": expected a page id in [0, ",
             num_cache_pages, ")");
      }
    }
  }
}

/// Throws kvkit::Error unless the CSR table (host memory) is consistent:
/// indptr[0] == 0 and non-decreasing, last_page_len in [1, page_size] for a
/// sequence with pages and 0 for one without, every page id in
/// [0, num_cache_pages) (not checked when num_cache_pages < 0).
inline void validate_page_table(const CsrPageTable& t, std::int64_t page_size,
                                std::int64_t num_cache_pages = -1) {
  constexpr const char* kWhere = "kvkit::validate_page_table(csr)";
  check_argument(is_power_of_two(page_size), kWhere, "page_size", page_size, "a power of two");
  check_argument(t.batch_size >= 0, kWhere, "batch_size", t.batch_size, ">= 0");
  check_argument(t.indptr != nullptr, kWhere, "indptr", t.indptr, "a non-null pointer");
  check_argument(t.indptr[0] == 0, kWhere, "indptr[0]", t.indptr[0], "0");
  if (t.batch_size == 0) return;
  check_argument(t.last_page_len != nullptr, kWhere, "last_page_len", t.last_page_len,
                 "a non-null pointer");
  for (std::int64_t b = 0; b < t.batch_size; ++b) {
    if (t.indptr[b + 1] < t.indptr[b]) {
      fail(kWhere, "indptr[", b + 1, "] = ", t.indptr[b + 1], ": expected >= indptr[", b,
           "] = ", t.indptr[b], " (non-decreasing)");
    }
    const std::int32_t last = t.last_page_len[b];
    const bool ok = t.num_pages(b) == 0 ? last == 0 : (last >= 1 && last <= page_size);
    if (!ok) {
      fail(kWhere, "last_page_len[", b, "] = ", last, ": expected ",
           t.num_pages(b) == 0 ? "0 for a sequence with no pages" : "a value in [1, page_size]",
           " (page_size ", page_size, ", ", t.num_pages(b), " pages)");
    }
  }
  check_argument(t.indices != nullptr || t.indptr[t.batch_size] == 0, kWhere, "indices",
                 t.indices, "a non-null pointer");
  for (std::int64_t i = 0; i < t.indptr[t.batch_size]; ++i) {
    const std::int32_t p = t.indices[i];
    if (p < 0 || (num_cache_pages >= 0 && p >= num_cache_pages)) {
      fail(kWhere, "indices[", i, "] = ", p, ": expected a page id in [0, ", num_cache_pages, ")");
    }
  }
}

/// Owning CSR arrays (the result of padded_to_csr).
struct CsrPageTableStorage {
  std::vector<std::int32_t> indptr, indices, last_page_len;
  CsrPageTable view() const {
    return {indptr.data(), indices.data(), last_page_len.data(),
            std::int64_t(last_page_len.size())};
  }
};

/// Owning padded arrays (the result of csr_to_padded).
struct PaddedPageTableStorage {
  std::vector<std::int32_t> block_table, seq_lens;
  std::int64_t max_blocks = 0;
  PaddedPageTable view() const {
    return {block_table.data(), seq_lens.data(), std::int64_t(seq_lens.size()), max_blocks,
            max_blocks};
  }
};

/// Padded -> CSR. Validates the input first (throws kvkit::Error).
inline CsrPageTableStorage padded_to_csr(const PaddedPageTable& t, std::int64_t page_size) {
  validate_page_table(t, page_size);
  CsrPageTableStorage out;
  out.indptr.reserve(std::size_t(t.batch_size) + 1);
  out.indptr.push_back(0);
  for (std::int64_t b = 0; b < t.batch_size; ++b) {
    const std::int64_t n = t.num_pages(b, page_size);
    for (std::int64_t i = 0; i < n; ++i) out.indices.push_back(t.page(b, i));
    out.indptr.push_back(std::int32_t(out.indices.size()));
    out.last_page_len.push_back(
        n == 0 ? 0 : std::int32_t(t.seq_len(b) - (n - 1) * page_size));
  }
  return out;
}

/// CSR -> padded with `max_blocks` columns (0: the longest page list);
/// unused entries hold `pad_page`. Validates the input first and throws
/// kvkit::Error if a sequence needs more than max_blocks pages.
inline PaddedPageTableStorage csr_to_padded(const CsrPageTable& t, std::int64_t page_size,
                                            std::int64_t max_blocks = 0,
                                            std::int32_t pad_page = 0) {
  constexpr const char* kWhere = "kvkit::csr_to_padded";
  validate_page_table(t, page_size);
  check_argument(max_blocks >= 0 && max_blocks <= max_pages_per_sequence(page_size), kWhere, "max_blocks",
                 max_blocks, "in [0, ", max_pages_per_sequence(page_size),
                 "] (int32 sequence lengths over pages of ", page_size, " tokens)");
  std::int64_t longest = 0;
  for (std::int64_t b = 0; b < t.batch_size; ++b) {
    longest = t.num_pages(b) > longest ? t.num_pages(b) : longest;
    // seq_lens are int32: a longer CSR row would be truncated.
    if (t.seq_len(b, page_size) > INT32_MAX) {
      fail(kWhere, "sequence ", b, " has ", t.seq_len(b, page_size), " tokens (", t.num_pages(b),
           " pages of ", page_size, "): expected at most 2^31 - 1 (seq_lens are int32)");
    }
  }
  if (max_blocks == 0) max_blocks = longest;
  check_argument(longest <= max_blocks, kWhere, "max_blocks", max_blocks,
                 ">= the longest page list (", longest, " pages)");
  PaddedPageTableStorage out;
  out.max_blocks = max_blocks;
  out.block_table.assign(std::size_t(t.batch_size * max_blocks), pad_page);
  for (std::int64_t b = 0; b < t.batch_size; ++b) {
    for (std::int64_t i = 0; i < t.num_pages(b); ++i) {
      out.block_table[std::size_t(b * max_blocks + i)] = t.page(b, i);
    }
    out.seq_lens.push_back(std::int32_t(t.seq_len(b, page_size)));
  }
  return out;
}

}  // namespace kvkit
