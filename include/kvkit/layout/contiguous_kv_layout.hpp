#pragma once
/// @file contiguous_kv_layout.hpp
/// kvkit::ContiguousKVLayout: a per-sequence contiguous K (or V) cache with a
/// fixed capacity of tokens per sequence (no paging):
///   token-major [seqs, capacity, kv_heads, head_dim]
///   head-major  [seqs, kv_heads, capacity, head_dim]
/// and a ring-buffer variant for sliding-window attention, where position p
/// of a sequence lives in row p % capacity (capacity = window).
/// Slots are seq * capacity + row, so the slot-mapping ops (append, gather,
/// quantize) take this layout exactly as they take a PagedKVLayout.

#include <cstdint>

#include "kvkit/core/config.hpp"
#include "kvkit/core/error.hpp"

namespace kvkit {

/// Strided description of a contiguous per-sequence cache of one layer.
struct ContiguousKVLayout {
  std::int64_t num_seqs = 0;   ///< sequences (batch rows)
  std::int64_t capacity = 1;   ///< token rows per sequence (the window for a ring)
  std::int64_t num_heads = 1;
  std::int64_t head_dim = 1;   ///< stride 1
  std::int64_t stride_seq = 1;
  std::int64_t stride_token = 1;
  std::int64_t stride_head = 1;
  bool ring = false;           ///< positions wrap modulo capacity (sliding window)

  /// Slot of token `position` of sequence `seq`; wraps for a ring buffer.
  /// Positions >= capacity are invalid for a non-ring layout (no check here:
  /// the ops check slots against num_slots()).
  KVKIT_HOST_DEVICE std::int64_t slot(std::int64_t seq, std::int64_t position) const {
    return seq * capacity + (ring ? position % capacity : position);
  }

  /// First position still held by a ring buffer after `seq_len` tokens
  /// (0 for a non-ring layout).
  KVKIT_HOST_DEVICE std::int64_t first_held_position(std::int64_t seq_len) const {
    return ring && seq_len > capacity ? seq_len - capacity : 0;
  }

  /// Element offset of (seq, row, head, dim).
  KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t offset(std::int64_t seq, std::int64_t row,
                                                          std::int64_t head,
                                                          std::int64_t dim) const {
    return seq * stride_seq + row * stride_token + head * stride_head + dim;
  }

  /// Element offset of dim 0 of `head` at slot `slot`.
  KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t slot_offset(std::int64_t slot,
                                                               std::int64_t head) const {
    const std::int64_t seq = slot / capacity;
    return offset(seq, slot - seq * capacity, head, 0);
  }

  KVKIT_HOST_DEVICE std::int64_t num_slots() const { return num_seqs * capacity; }

  /// Throws kvkit::Error on non-positive sizes, negative strides or strides
  /// that make two entries overlap (checked for the two standard orders and
  /// for strides at least as large as the inner extents).
  void validate(const char* where = "kvkit::ContiguousKVLayout") const {
    check_argument(num_seqs >= 0, where, "num_seqs", num_seqs, ">= 0");
    check_argument(capacity > 0, where, "capacity", capacity, "> 0");
    check_argument(num_heads > 0, where, "num_heads", num_heads, "> 0");
    check_argument(head_dim > 0, where, "head_dim", head_dim, "> 0");
    const bool token_major = stride_head >= head_dim &&
                             stride_token >= stride_head * (num_heads - 1) + head_dim;
    const bool head_major = stride_token >= head_dim &&
                            stride_head >= stride_token * (capacity - 1) + head_dim;
    check(token_major || head_major, where, "strides (token ", stride_token, ", head ",
          stride_head, ") overlap for num_heads ", num_heads, ", capacity ", capacity,
          ", head_dim ", head_dim, "; expected token-major or head-major order");
    const std::int64_t seq_extent =
        stride_token * (capacity - 1) + stride_head * (num_heads - 1) + head_dim;
    check_argument(num_seqs <= 1 || stride_seq >= seq_extent, where, "stride_seq", stride_seq,
                   ">= ", seq_extent, " (one sequence's extent)");
  }

  /// [seqs, capacity, heads, head_dim].
  static ContiguousKVLayout token_major(std::int64_t num_seqs, std::int64_t capacity,
                                        std::int64_t num_heads, std::int64_t head_dim,
                                        bool ring = false) {
    return make(num_seqs, capacity, num_heads, head_dim, capacity * num_heads * head_dim,
                num_heads * head_dim, head_dim, ring);
  }

  /// [seqs, heads, capacity, head_dim].
  static ContiguousKVLayout head_major(std::int64_t num_seqs, std::int64_t capacity,
                                       std::int64_t num_heads, std::int64_t head_dim,
                                       bool ring = false) {
    return make(num_seqs, capacity, num_heads, head_dim, capacity * num_heads * head_dim,
                head_dim, capacity * head_dim, ring);
  }

  /// Any strides (elements).
  static ContiguousKVLayout make(std::int64_t num_seqs, std::int64_t capacity,
                                 std::int64_t num_heads, std::int64_t head_dim,
                                 std::int64_t stride_seq, std::int64_t stride_token,
                                 std::int64_t stride_head, bool ring) {
    ContiguousKVLayout l;
    l.num_seqs = num_seqs;
    l.capacity = capacity;
    l.num_heads = num_heads;
    l.head_dim = head_dim;
    l.stride_seq = stride_seq;
    l.stride_token = stride_token;
    l.stride_head = stride_head;
    l.ring = ring;
    l.validate("kvkit::ContiguousKVLayout::make");
    return l;
  }
};

}  // namespace kvkit
