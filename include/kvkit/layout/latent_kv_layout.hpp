#pragma once
/// @file latent_kv_layout.hpp
/// kvkit::LatentKVLayout: the MLA (DeepSeek) cache, one latent row per token
/// and no separate V:
///   [pages, page_size, kv_lora_rank + rope_dim]     e.g. 512 + 64 = 576
/// Each row is [c_kv (kv_lora_rank) | k_pe (rope_dim)]. The two parts are also
/// available as PagedKVLayout views (one head each), so every paged op
/// (append, copy_blocks, gather) works on the latent cache or on either part.
/// Page size 64 (FlashMLA's) or any power of two.

#include <cstdint>

#include "kvkit/core/config.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"

namespace kvkit {

/// Strided description of a paged latent cache of one layer.
struct LatentKVLayout {
  std::int64_t num_pages = 0;
  std::int64_t page_size = 1;     ///< tokens per page (power of two)
  std::int64_t kv_lora_rank = 0;  ///< width of c_kv (512 for DeepSeek-V2/V3)
  std::int64_t rope_dim = 0;      ///< width of k_pe (64 for DeepSeek-V2/V3)
  std::int64_t stride_page = 0;   ///< elements between pages
  std::int64_t stride_slot = 0;   ///< elements between tokens (>= kv_lora_rank + rope_dim)
  int page_shift = 0;

  /// Elements of one token's row: kv_lora_rank + rope_dim.
  KVKIT_HOST_DEVICE std::int64_t row_elements() const { return kv_lora_rank + rope_dim; }

  /// Element offset of column `dim` (0 .. row_elements()-1) of (page, slot_in_page).
  KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t offset(std::int64_t page,
                                                          std::int64_t slot_in_page,
                                                          std::int64_t dim) const {
    return page * stride_page + slot_in_page * stride_slot + dim;
  }

  /// Element offset of the row of global slot `slot`.
  KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t slot_offset(std::int64_t slot) const {
    return offset(slot >> page_shift, slot & (page_size - 1), 0);
  }

  KVKIT_HOST_DEVICE std::int64_t num_slots() const { return num_pages * page_size; }

  /// Element offset of k_pe inside a row (= kv_lora_rank): the rope view's
  /// pointer is the cache pointer plus this.
  KVKIT_HOST_DEVICE std::int64_t rope_begin() const { return kv_lora_rank; }

  /// The whole row as a one-head paged layout (head_dim = rank + rope).
  PagedKVLayout as_paged() const { return view(row_elements()); }
  /// The c_kv part: one head of kv_lora_rank elements, same pointer.
  PagedKVLayout nope_view() const { return view(kv_lora_rank); }
  /// The k_pe part: one head of rope_dim elements, at pointer + rope_begin().
  PagedKVLayout rope_view() const { return view(rope_dim); }

  /// Throws kvkit::Error on non-positive widths, a non power-of-two page size
  /// or strides that make rows or pages overlap.
  void validate(const char* where = "kvkit::LatentKVLayout") const {
    check_argument(kv_lora_rank > 0, where, "kv_lora_rank", kv_lora_rank, "> 0");
    check_argument(rope_dim >= 0, where, "rope_dim", rope_dim, ">= 0");
    check_argument(stride_slot >= row_elements(), where, "stride_slot", stride_slot,
                   ">= kv_lora_rank + rope_dim (", row_elements(), ")");
    as_paged().validate(where);
  }

  /// [pages, page_size, kv_lora_rank + rope_dim], densely packed.
  static LatentKVLayout dense(std::int64_t num_pages, std::int64_t page_size,
                              std::int64_t kv_lora_rank, std::int64_t rope_dim) {
    const std::int64_t row = kv_lora_rank + rope_dim;
    return strided(num_pages, page_size, kv_lora_rank, rope_dim, page_size * row, row);
  }

  /// Any page and token strides (elements).
  static LatentKVLayout strided(std::int64_t num_pages, std::int64_t page_size,
                                std::int64_t kv_lora_rank, std::int64_t rope_dim,
                                std::int64_t stride_page, std::int64_t stride_slot) {
    LatentKVLayout l;
    l.num_pages = num_pages;
    l.page_size = page_size;
    l.kv_lora_rank = kv_lora_rank;
    l.rope_dim = rope_dim;
    l.stride_page = stride_page;
    l.stride_slot = stride_slot;
    l.page_shift = page_shift_of(page_size);
    l.validate("kvkit::LatentKVLayout::strided");
    return l;
  }

 private:
  PagedKVLayout view(std::int64_t width) const {
    PagedKVLayout p;
    p.num_pages = num_pages;
    p.page_size = page_size;
    p.num_heads = 1;
    p.head_dim = width > 0 ? width : 1;
    p.stride_page = stride_page;
    p.stride_slot = stride_slot;
    p.stride_head = p.head_dim;
    p.page_shift = page_shift;
    return p;
  }
};

}  // namespace kvkit
