#pragma once
/// @file contiguous_page_view.hpp
/// A contiguous per-sequence cache (ContiguousKVLayout) described as a paged
/// one (PagedKVLayout + a PaddedPageTable), so that every attention op that
/// reads a paged cache (paged_decode_attention, cuda::run_decode,
/// cuda::run_prefill, merge-based split-KV and cascade) reads it without
/// kernels of its own.
///
/// Sequence b's `capacity` rows are cut into pages of P rows, P a power of two
/// dividing the capacity:
///   - capacity a power of two: P = capacity, one page per sequence,
///     stride_page = stride_seq. Any strides (token-major, head-major, padded).
///   - otherwise: P = the largest power of two dividing capacity (16 for 48,
///     1 for an odd capacity), stride_page = P * stride_token. The page index
///     page = b * (capacity / P) + i is then linear only if one sequence
///     follows the last row of the previous one: stride_seq == capacity *
///     stride_token, which holds for a token-major cache and not for a
///     head-major one (its heads lie between the sequences), so a head-major
///     cache with more than one sequence needs a power-of-two capacity.
/// Page p of the view holds rows [(p % pps) * P, +P) of sequence p / pps
/// (pps = capacity / P), so the view's slot p * P + j is the contiguous
/// layout's slot b * capacity + row: per-(token, head) scales of a quantized
/// cache (indexed by slot) line up too.
///
/// A ring buffer (ContiguousKVLayout::ring) keeps position t in row
/// t % capacity; block i of a sequence maps to page (i mod pps) of it, so the
/// block table has ceil(seq_len / P) columns and revisits the sequence's pages.
/// Positions < seq_len - capacity were overwritten by later ones: the call
/// must not read them, i.e. it needs a sliding window with
/// window + q_len - 1 <= capacity (and no sinks, unless nothing has wrapped
/// yet). fill_contiguous_page_table checks this for the access it is given.

// <cmath> before attention_params.hpp, which uses tanhf without including it.
#include <cmath>
#include <cstdint>

#include "kvkit/core/config.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/layout/contiguous_kv_layout.hpp"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"
#include "kvkit/ops/attention_params.hpp"

namespace kvkit {

/// A ContiguousKVLayout as pages. Use `layout` as PagedDecodeParams::layout
/// (with the same K and V pointers as the contiguous cache) and a table from
/// fill_contiguous_page_table as its page_table.
struct ContiguousPageView {
  PagedKVLayout layout{};          ///< num_pages = num_seqs * pages_per_seq
  std::int64_t pages_per_seq = 1;  ///< capacity / layout.page_size
  std::int64_t num_seqs = 0;
  std::int64_t capacity = 1;       ///< rows per sequence
  bool ring = false;               ///< positions wrap modulo capacity

  /// Block-table columns a sequence of `seq_len` tokens uses:
  /// ceil(seq_len / page_size) (more than pages_per_seq for a wrapped ring).
  KVKIT_HOST_DEVICE std::int64_t blocks_for(std::int64_t seq_len) const {
    return (seq_len + layout.page_size - 1) >> layout.page_shift;
  }

  /// Page id of block `block` of cache sequence `seq`.
  KVKIT_HOST_DEVICE std::int32_t page(std::int64_t seq, std::int64_t block) const {
    return std::int32_t(seq * pages_per_seq + (ring ? block % pages_per_seq : block));
  }
};

/// Describes `c` (validated first) as a paged layout; see the file comment
/// for the page size chosen. Throws kvkit::Error when `c` is invalid or
/// cannot be expressed as pages: capacity not a power of two while
/// stride_seq != capacity * stride_token (e.g. head-major with several
/// sequences), or more pages than an int32 page id holds.
inline ContiguousPageView contiguous_page_view(const ContiguousKVLayout& c) {
  constexpr const char* kWhere = "kvkit::contiguous_page_view";
  c.validate(kWhere);
  ContiguousPageView v;
  v.num_seqs = c.num_seqs;
  v.capacity = c.capacity;
  v.ring = c.ring;
  // Largest power of two dividing the capacity (the capacity itself when it is one).
  const std::int64_t page_size = c.capacity & -c.capacity;
  v.pages_per_seq = c.capacity / page_size;
  std::int64_t stride_page = c.stride_seq;
  if (v.pages_per_seq > 1) {
    stride_page = page_size * c.stride_token;
    if (c.num_seqs > 1 && c.stride_seq != c.capacity * c.stride_token) {
      fail(kWhere, "capacity ", c.capacity, " is not a power of two, so it is split into ",
           v.pages_per_seq, " pages of ", page_size,
           " rows that must be addressed as page * stride_page; that needs stride_seq = capacity * "
           "stride_token (", c.capacity * c.stride_token, "), got stride_seq = ", c.stride_seq,
           ". A head-major (or padded) cache with several sequences needs a power-of-two capacity");
    }
  }
  const std::int64_t num_pages = c.num_seqs * v.pages_per_seq;
  check_argument(num_pages <= 0x7fffffff, kWhere, "num_seqs", c.num_seqs,
                 "at most 2^31 - 1 pages in all (", num_pages, " pages of ", page_size, " rows needed)");
  v.layout = PagedKVLayout::strided(num_pages, page_size, c.num_heads, c.head_dim, stride_page,
                                    c.stride_token, c.stride_head);
  return v;
}

/// How a call reads the cache, for the ring-buffer check of
/// fill_contiguous_page_table: the PagedDecodeParams fields of the same names.
struct ContiguousAccess {
  int q_len = 1;                 ///< new tokens per sequence (the last q_len positions)
  int window = 0;                ///< > 0: sliding window (required once a ring has wrapped)
  int num_sinks = 0;             ///< with a window: first positions always attended
  bool causal = true;
  std::int64_t kv_begin = 0;     ///< first position the call reads (split-KV, cascade suffix)
  std::int64_t kv_end = INT64_MAX;
};

/// The access of a decode call (its q_len, window, sinks, causal, kv range).
inline ContiguousAccess contiguous_access(const PagedDecodeParams& p) {
  ContiguousAccess a;
  a.q_len = p.q_len;
  a.window = p.window;
  a.num_sinks = p.num_sinks;
  a.causal = p.causal;
  a.kv_begin = p.kv_begin;
  a.kv_end = p.kv_end;
  return a;
}

/// Fills `block_table` ([batch_size, max_blocks], host memory, row stride
/// max_blocks) so that batch row b reads cache sequence seq_ids[b] (b when
/// `seq_ids` is null) through the view, and returns the page table over it
/// and `seq_lens` ([batch_size], host memory, positions per sequence; for a
/// ring the total written so far, which may exceed the capacity). Entries
/// past a row's ceil(seq_len / page_size) blocks are left as they were.
/// Copy both arrays to the device for the CUDA ops.
///
/// Throws kvkit::Error, writing nothing, when: a pointer is null, a seq_id is
/// outside [0, num_seqs), a length is negative, a non-ring sequence is longer
/// than the capacity, a row needs more than max_blocks blocks, or a wrapped
/// ring sequence would be read at an overwritten position (see the file
/// comment) under `access`.
inline PaddedPageTable fill_contiguous_page_table(const ContiguousPageView& view,
                                                  const std::int32_t* seq_lens,
                                                  std::int64_t batch_size,
                                                  std::int32_t* block_table,
                                                  std::int64_t max_blocks,
                                                  const ContiguousAccess& access = {},
                                                  const std::int32_t* seq_ids = nullptr) {
  constexpr const char* kWhere = "kvkit::fill_contiguous_page_table";
  check_argument(batch_size >= 0, kWhere, "batch_size", batch_size, ">= 0");
  check_argument(max_blocks >= 0, kWhere, "max_blocks", max_blocks, ">= 0");
  check_argument(seq_lens != nullptr || batch_size == 0, kWhere, "seq_lens", seq_lens,
                 "a non-null pointer to batch_size lengths (host memory)");
  check_argument(block_table != nullptr || batch_size == 0 || max_blocks == 0, kWhere, "block_table",
                 block_table, "a non-null pointer to batch_size x max_blocks entries (host memory)");
  // The op's own rule for which positions a call reads (the key span).
  PagedDecodeParams p;
  p.q_len = access.q_len;
  p.window = access.window;
  p.num_sinks = access.num_sinks;
  p.causal = access.causal;
  p.kv_begin = access.kv_begin;
  p.kv_end = access.kv_end;
  for (std::int64_t b = 0; b < batch_size; ++b) {
    const std::int64_t seq = seq_ids != nullptr ? seq_ids[b] : b;
    const std::int64_t len = seq_lens[b];
    if (seq < 0 || seq >= view.num_seqs) {
      fail(kWhere, "seq_ids[", b, "] = ", seq, ": expected a sequence in [0, ", view.num_seqs, ")");
    }
    if (len < 0) fail(kWhere, "seq_lens[", b, "] = ", len, ": expected >= 0");
    if (!view.ring && len > view.capacity) {
      fail(kWhere, "seq_lens[", b, "] = ", len, ": expected at most the capacity (", view.capacity,
           ") of a contiguous cache that is not a ring buffer");
    }
    if (view.blocks_for(len) > max_blocks) {
      fail(kWhere, "seq_lens[", b, "] = ", len, " needs ", view.blocks_for(len), " blocks of ",
           view.layout.page_size, " tokens: expected max_blocks (", max_blocks, ") >= that");
    }
    if (view.ring && len > view.capacity) {
      const AttentionKeySpan span = attention_key_span(p, len);
      // The earliest position read: the sinks' range if it is not empty, else the window's.
      const std::int64_t first = span.first_end > span.begin ? span.begin : span.second_begin;
      const std::int64_t held = len - view.capacity;  // positions < held were overwritten
      if (span.size() > 0 && first < held) {
        fail(kWhere, "sequence ", b, " has seq_len ", len, " in a ring buffer of capacity ",
             view.capacity, ": positions < ", held,
             " were overwritten, but the call reads position ", first, " (window ", access.window,
             ", q_len ", access.q_len, ", sinks ", access.num_sinks, ", kv_begin ", access.kv_begin,
             "); expected a window with window + q_len - 1 <= capacity and no sinks");
      }
    }
  }
  for (std::int64_t b = 0; b < batch_size; ++b) {
    const std::int64_t seq = seq_ids != nullptr ? seq_ids[b] : b;
    const std::int64_t n = view.blocks_for(seq_lens[b]);
    for (std::int64_t i = 0; i < n; ++i) block_table[b * max_blocks + i] = view.page(seq, i);
  }
  PaddedPageTable t;
  t.block_table = block_table;
  t.seq_lens = seq_lens;
  t.batch_size = batch_size;
  t.max_blocks = max_blocks;
  t.stride_batch = max_blocks;
  return t;
}

}  // namespace kvkit
