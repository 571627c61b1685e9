#pragma once
/// @file paged_kv_layout.hpp
/// kvkit::PagedKVLayout: where element (page, slot_in_page, head, dim) of a
/// paged K or V cache lives, as int64 element strides. One value type serves
/// the CPU ops and the CUDA kernels (its index math is KVKIT_HOST_DEVICE), so
/// the addressing the host tests prove is the addressing the GPU runs.
///
/// The innermost dimension (head_dim) is always contiguous (stride 1); the
/// other three strides are free, so caches allocated by another engine can be
/// described:
///   NHD  [pages, page_size, kv_heads, head_dim]   (vLLM flash-attn, FlashInfer "NHD")
///   HND  [pages, kv_heads, page_size, head_dim]   (FlashInfer "HND")
///   interleaved K/V: [pages, 2, ...] (FlashInfer's single kv tensor); the V
///   cache then starts `v_offset` elements after the K cache.
/// Slots are numbered page * page_size + slot_in_page (vLLM's slot mapping).

#include <cstdint>

#include "kvkit/core/config.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/layout/stride_overlap.hpp"

namespace kvkit {

/// Smallest s with 2^s >= page_size (log2 for a power of two; validate()
/// then rejects any other page size). Shared by every paged layout's factory.
inline int page_shift_of(std::int64_t page_size) {
  int shift = 0;
  while (shift < 62 && (std::int64_t(1) << shift) < page_size) ++shift;
  return shift;
}

/// How K and V of one layer are stored.
enum class KVStorage : std::uint8_t {
  kSeparate,     ///< two allocations (or any two pointers); v_offset = 0
  kInterleaved,  ///< one allocation [pages, 2, page...]: K page then V page
};

/// Strided description of a paged K (or V) cache of one layer. Construct it
/// with the factories (nhd, hnd, strided), which validate; the fields are
/// public so that the struct can be passed to kernels by value.
struct PagedKVLayout {
  std::int64_t num_pages = 0;    ///< pages in the cache
  std::int64_t page_size = 1;    ///< tokens per page (a power of two)
  std::int64_t num_heads = 1;    ///< kv heads
  std::int64_t head_dim = 1;     ///< elements per head row (stride 1)
  std::int64_t stride_page = 1;  ///< elements between consecutive pages
  std::int64_t stride_slot = 1;  ///< elements between consecutive tokens of a page
  std::int64_t stride_head = 1;  ///< elements between consecutive heads
  std::int64_t v_offset = 0;     ///< elements from the K pointer to the V pointer (interleaved), else 0
  int page_shift = 0;            ///< log2(page_size)

  /// Element offset of (page, slot_in_page, head, dim) from the cache pointer.
  KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t offset(std::int64_t page,
                                                          std::int64_t slot_in_page,
                                                          std::int64_t head,
                                                          std::int64_t dim) const {
    return page * stride_page + slot_in_page * stride_slot + head * stride_head + dim;
  }

  /// Element offset of dim 0 of `head` at global slot `slot` (page * page_size + in-page).
  KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t slot_offset(std::int64_t slot,
                                                               std::int64_t head) const {
    return offset(slot >> page_shift, slot & (page_size - 1), head, 0);
  }

  /// Slots in the cache: num_pages * page_size.
  KVKIT_HOST_DEVICE std::int64_t num_slots() const { return num_pages * page_size; }

  /// Elements of one page: page_size * num_heads * head_dim.
  KVKIT_HOST_DEVICE std::int64_t page_elements() const { return page_size * num_heads * head_dim; }

  /// True when a page's elements fill [offset(p,0,0,0), + page_elements())
  /// without gaps, so that a page can be copied as one run.
  KVKIT_HOST_DEVICE bool page_is_dense() const {
    const bool nhd = (num_heads == 1 || stride_head == head_dim) &&
                     (page_size == 1 || stride_slot == num_heads * head_dim);
    const bool hnd = (page_size == 1 || stride_slot == head_dim) &&
                     (num_heads == 1 || stride_head == page_size * head_dim);
    return nhd || hnd;
  }

  /// Elements from the K pointer to one past the last addressed element
  /// (the V cache of an interleaved layout adds v_offset).
  std::int64_t span_elements() const {
    if (num_pages == 0) return 0;
    return offset(num_pages - 1, page_size - 1, num_heads - 1, head_dim);
  }

  /// Throws kvkit::Error unless the fields describe a valid cache: sizes
  /// positive (num_pages >= 0), page_size a power of two matching page_shift,
  /// strides non-negative and no two (page, slot, head, dim) addressing the
  /// same element (K and V of an interleaved layout included).
  void validate(const char* where = "kvkit::PagedKVLayout") const {
    check_argument(num_pages >= 0, where, "num_pages", num_pages, ">= 0");
    check_argument(is_power_of_two(page_size), where, "page_size", page_size,
                   "a power of two (1, 2, 4, ..., 16, 64, ...)");
    check_argument((std::int64_t(1) << page_shift) == page_size, where, "page_shift", page_shift,
                   "log2(page_size) for page_size ", page_size);
    check_argument(num_heads > 0, where, "num_heads", num_heads, "> 0");
    check_argument(head_dim > 0, where, "head_dim", head_dim, "> 0");
    check_argument(stride_page >= 0, where, "stride_page", stride_page, ">= 0");
    check_argument(stride_slot >= 0, where, "stride_slot", stride_slot, ">= 0");
    check_argument(stride_head >= 0, where, "stride_head", stride_head, ">= 0");
    check_argument(v_offset >= 0, where, "v_offset", v_offset, ">= 0");
    // No aliasing (detail::find_stride_overlap). head_dim is a dimension of
    // stride 1 rather than the inner extent, so that a stride of 0 is blamed
    // with "expected >= 1"; an interleaved V cache is a fifth one of size 2.
    const detail::StrideDim dims[5] = {{1, head_dim},
                                       {stride_head, num_heads},
                                       {stride_slot, page_size},
                                       {stride_page, num_pages},
                                       {v_offset, v_offset > 0 ? 2 : 1}};
    const char* const names[5] = {"head_dim", "stride_head", "stride_slot", "stride_page", "v_offset"};
    const detail::StrideOverlap bad = detail::find_stride_overlap(dims, 1);
    if (bad.kind == detail::StrideOverlapKind::kTooClose) {
      fail(where, "argument '", names[bad.dim], "' = ", dims[bad.dim].stride,
           ": expected >= ", bad.inner_extent, " (the elements spanned by the inner dimensions), "
           "otherwise two cache entries share memory");
    }
    if (bad.kind == detail::StrideOverlapKind::kOverflow) {  // offset() would overflow
      fail(where, "argument '", names[bad.dim], "' = ", dims[bad.dim].stride, " with ", dims[bad.dim].size,
           " entries: expected the cache to span at most 2^63 - 1 elements");
    }
  }

  /// Any strides (elements). `v_offset` > 0 when V shares K's allocation.
  static PagedKVLayout strided(std::int64_t num_pages, std::int64_t page_size,
                               std::int64_t num_heads, std::int64_t head_dim,
                               std::int64_t stride_page, std::int64_t stride_slot,
                               std::int64_t stride_head, std::int64_t v_offset = 0) {
    PagedKVLayout l;
    l.num_pages = num_pages;
    l.page_size = page_size;
    l.num_heads = num_heads;
    l.head_dim = head_dim;
    l.stride_page = stride_page;
    l.stride_slot = stride_slot;
    l.stride_head = stride_head;
    l.v_offset = v_offset;
    l.page_shift = page_shift_of(page_size);
    l.validate("kvkit::PagedKVLayout::strided");
    return l;
  }

  /// NHD: [pages, page_size, num_heads, head_dim]; interleaved storage is
  /// [pages, 2, page_size, num_heads, head_dim] (K page then V page).
  static PagedKVLayout nhd(std::int64_t num_pages, std::int64_t page_size,
                           std::int64_t num_heads, std::int64_t head_dim,
                           KVStorage storage = KVStorage::kSeparate) {
    const std::int64_t page = page_size * num_heads * head_dim;
    const bool inter = storage == KVStorage::kInterleaved;
    return strided(num_pages, page_size, num_heads, head_dim, inter ? 2 * page : page,
                   num_heads * head_dim, head_dim, inter ? page : 0);
  }

  /// HND: [pages, num_heads, page_size, head_dim]; interleaved storage is
  /// [pages, 2, num_heads, page_size, head_dim].
  static PagedKVLayout hnd(std::int64_t num_pages, std::int64_t page_size,
                           std::int64_t num_heads, std::int64_t head_dim,
                           KVStorage storage = KVStorage::kSeparate) {
    const std::int64_t page = page_size * num_heads * head_dim;
    const bool inter = storage == KVStorage::kInterleaved;
    return strided(num_pages, page_size, num_heads, head_dim, inter ? 2 * page : page, head_dim,
                   page_size * head_dim, inter ? page : 0);
  }
};

}  // namespace kvkit
