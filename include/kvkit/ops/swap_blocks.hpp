#pragma once
/// @file swap_blocks.hpp
/// Swap whole pages between two caches with the same page shape, for every
/// layer's K and V: device memory <-> pinned host memory when a scheduler
/// preempts a sequence (swap out) and resumes it (swap in).
///
/// The host builds a kvkit::SwapPlan once per step from the (src, dst) page
/// pairs its allocator chose; the plan validates them and coalesces runs of
/// consecutive pages (src and dst both consecutive) into one copy. The copy
/// itself is kvkit::swap_blocks (CPU, both caches in host memory: what the
/// tests exercise) or kvkit::cuda::swap_blocks (kvkit/cuda/swap_blocks.hpp:
/// one cudaMemcpyAsync, or cudaMemcpy2DAsync for interleaved K/V, per run
/// and cache, on a stream).
///
/// Pages must be dense (PagedKVLayout::page_is_dense: a page is one run of
/// page_elements() elements); the page pitch (stride_page) may differ
/// between the two sides, e.g. interleaved on the device, separate on the host.

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

/// Which way a swap moves pages. The CPU op treats both alike; the CUDA op
/// uses it for the copy kind and to check where the pointers live.
enum class SwapDirection : std::uint8_t {
  kDeviceToHost,  ///< swap out: device cache -> pinned host cache
  kHostToDevice,  ///< swap in: pinned host cache -> device cache
};

/// `count` consecutive pages from src..src+count-1 to dst..dst+count-1.
struct BlockRun {
  std::int64_t src = 0;
  std::int64_t dst = 0;
  std::int64_t count = 0;
};

/// Validated, coalesced list of page copies between two caches.
/// Build with SwapPlan::make; immutable afterwards.
class SwapPlan {
 public:
  SwapPlan() = default;

  /// Validates `pairs` [num_pairs, 2] of (src page, dst page) against the
  /// page counts of the two caches and coalesces them into runs: pairs are
  /// ordered by source page and merged while both source and destination
  /// advance by one. Throws kvkit::Error (naming the pair) when a page id is
  /// outside [0, src_num_pages) / [0, dst_num_pages) or a destination page
  /// appears twice (the result would depend on the copy order). A source may
  /// appear more than once.
  static SwapPlan make(SwapDirection direction, const std::int64_t* pairs, std::int64_t num_pairs,
                       std::int64_t src_num_pages, std::int64_t dst_num_pages) {
    constexpr const char* kWhere = "kvkit::SwapPlan::make";
    check_argument(num_pairs >= 0, kWhere, "num_pairs", num_pairs, ">= 0");
    check_argument(num_pairs == 0 || pairs != nullptr, kWhere, "pairs", pairs, "a non-null pointer");
    check_argument(src_num_pages >= 0, kWhere, "src_num_pages", src_num_pages, ">= 0");
    check_argument(dst_num_pages >= 0, kWhere, "dst_num_pages", dst_num_pages, ">= 0");
    std::vector<std::pair<std::int64_t, std::int64_t>> sorted;
    sorted.reserve(std::size_t(num_pairs));
    for (std::int64_t i = 0; i < num_pairs; ++i) {
      const std::int64_t src = pairs[2 * i], dst = pairs[2 * i + 1];
      if (src < 0 || src >= src_num_pages) {
        fail(kWhere, "argument 'pairs' has pairs[", i, "][0] = ", src,
             ": expected a source page id in [0, ", src_num_pages, ")");
      }
      if (dst < 0 || dst >= dst_num_pages) {
        fail(kWhere, "argument 'pairs' has pairs[", i, "][1] = ", dst,
             ": expected a destination page id in [0, ", dst_num_pages, ")");
      }
      sorted.emplace_back(src, dst);
    }
    std::vector<std::int64_t> dsts;
    dsts.reserve(sorted.size());
    for (const auto& p : sorted) dsts.push_back(p.second);
    std::sort(dsts.begin(), dsts.end());
    const auto dup = std::adjacent_find(dsts.begin(), dsts.end());
    if (dup != dsts.end()) {
      fail(kWhere, "argument 'pairs' names destination page ", *dup,
           " twice: expected distinct destination pages");
    }
    std::sort(sorted.begin(), sorted.end());
    SwapPlan plan;
    plan.direction_ = direction;
    plan.num_pages_ = num_pairs;
    plan.src_num_pages_ = src_num_pages;
    plan.dst_num_pages_ = dst_num_pages;
    for (const auto& p : sorted) {
      if (!plan.runs_.empty()) {
        BlockRun& last = plan.runs_.back();
        if (p.first == last.src + last.count && p.second == last.dst + last.count) {
          ++last.count;
          continue;
        }
      }
      plan.runs_.push_back({p.first, p.second, 1});
    }
    return plan;
  }

  /// From a vector of (src, dst) pairs.
  static SwapPlan make(SwapDirection direction,
                       const std::vector<std::pair<std::int64_t, std::int64_t>>& pairs,
                       std::int64_t src_num_pages, std::int64_t dst_num_pages) {
    std::vector<std::int64_t> flat;
    flat.reserve(2 * pairs.size());
    for (const auto& p : pairs) {
      flat.push_back(p.first);
      flat.push_back(p.second);
    }
    return make(direction, flat.data(), std::int64_t(pairs.size()), src_num_pages, dst_num_pages);
  }

  SwapDirection direction() const { return direction_; }
  /// Coalesced runs, ordered by source page.
  const std::vector<BlockRun>& runs() const { return runs_; }
  /// Pages copied per cache (the number of pairs).
  std::int64_t num_pages() const { return num_pages_; }
  /// Page counts the plan was validated against.
  std::int64_t src_num_pages() const { return src_num_pages_; }
  std::int64_t dst_num_pages() const { return dst_num_pages_; }

 private:
  SwapDirection direction_ = SwapDirection::kDeviceToHost;
  std::vector<BlockRun> runs_;
  std::int64_t num_pages_ = 0, src_num_pages_ = 0, dst_num_pages_ = 0;
};

/// The caches a swap copies between: cache i of the source side goes to
/// cache i of the destination side (e.g. [layer0 K, layer0 V, layer1 K, ...]).
/// For an interleaved layout list the K pointer and K pointer + v_offset.
struct SwapBlocksArgs {
  void* const* src_caches = nullptr;  ///< [num_caches] base pointers, laid out by src_layout
  void* const* dst_caches = nullptr;  ///< [num_caches] base pointers, laid out by dst_layout
  std::int64_t num_caches = 0;
  DType dtype = DType::kBFloat16;     ///< element type of every cache
};

/// Validates what does not need to read the caches (shared with CUDA):
/// both layouts valid with dense pages of the same shape, page counts equal
/// to those the plan was made for, non-null element-aligned cache pointers.
/// Throws kvkit::Error.
inline void validate_swap_blocks(const PagedKVLayout& src_layout,
                                 const PagedKVLayout& dst_layout, const SwapPlan& plan,
                                 const SwapBlocksArgs& a, const char* where) {
  src_layout.validate(where);
  dst_layout.validate(where);
  check(src_layout.page_is_dense() && dst_layout.page_is_dense(), where,
        "pages must be dense (one run of page_size * num_heads * head_dim elements) on both sides");
  check(src_layout.page_size == dst_layout.page_size && src_layout.num_heads == dst_layout.num_heads &&
            src_layout.head_dim == dst_layout.head_dim &&
            src_layout.stride_slot == dst_layout.stride_slot &&
            src_layout.stride_head == dst_layout.stride_head,
        where, "source pages (page_size ", src_layout.page_size, ", heads ", src_layout.num_heads,
        ", head_dim ", src_layout.head_dim, ") and destination pages (page_size ",
        dst_layout.page_size, ", heads ", dst_layout.num_heads, ", head_dim ",
        dst_layout.head_dim, ") differ in shape or order; expected the same page layout");
  check_argument(plan.src_num_pages() == src_layout.num_pages, where, "plan.src_num_pages()",
                 plan.src_num_pages(), "the source layout's num_pages (", src_layout.num_pages, ")");
  check_argument(plan.dst_num_pages() == dst_layout.num_pages, where, "plan.dst_num_pages()",
                 plan.dst_num_pages(), "the destination layout's num_pages (",
                 dst_layout.num_pages, ")");
  check_argument(a.num_caches >= 0, where, "num_caches", a.num_caches, ">= 0");
  if (a.num_caches == 0 || plan.num_pages() == 0) return;
  check_argument(a.src_caches != nullptr, where, "src_caches", a.src_caches, "a non-null pointer");
  check_argument(a.dst_caches != nullptr, where, "dst_caches", a.dst_caches, "a non-null pointer");
  for (std::int64_t c = 0; c < a.num_caches; ++c) {
    detail::check_pointer(a.src_caches[c], true, a.dtype, where, "src_caches[i]");
    detail::check_pointer(a.dst_caches[c], true, a.dtype, where, "dst_caches[i]");
  }
}

/// Copies the plan's pages from every source cache to the matching
/// destination cache, both in host memory (CPU). A run is one memcpy when
/// both sides store pages back to back, else one memcpy per page. Throws
/// kvkit::Error on invalid arguments, before copying anything.
inline void swap_blocks(const PagedKVLayout& src_layout, const PagedKVLayout& dst_layout,
                        const SwapPlan& plan, const SwapBlocksArgs& a) {
  constexpr const char* kWhere = "kvkit::swap_blocks";
  validate_swap_blocks(src_layout, dst_layout, plan, a, kWhere);
  const std::int64_t es = std::int64_t(dtype_size(a.dtype));
  const std::int64_t page_bytes = src_layout.page_elements() * es;
  const std::int64_t src_pitch = src_layout.stride_page * es, dst_pitch = dst_layout.stride_page * es;
  const bool packed = src_pitch == page_bytes && dst_pitch == page_bytes;
  for (std::int64_t c = 0; c < a.num_caches; ++c) {
    const auto* src = static_cast<const unsigned char*>(a.src_caches[c]);
    auto* dst = static_cast<unsigned char*>(a.dst_caches[c]);
    for (const BlockRun& r : plan.runs()) {
      if (packed) {
        std::memcpy(dst + r.dst * dst_pitch, src + r.src * src_pitch, std::size_t(r.count * page_bytes));
        continue;
      }
      for (std::int64_t i = 0; i < r.count; ++i) {
        std::memcpy(dst + (r.dst + i) * dst_pitch, src + (r.src + i) * src_pitch, std::size_t(page_bytes));
      }
    }
  }
}

}  // namespace kvkit
