#pragma once
/// @file stride_overlap.hpp
/// kvkit::detail::find_stride_overlap: the no-aliasing rule for strided
/// shapes, shared by PagedKVLayout::validate and the RoPE argument checks so
/// that the two cannot drift apart. Host code only (validation, not indexing).

#include <cstdint>

namespace kvkit::detail {

/// One dimension of a strided shape: `size` entries, `stride` elements apart.
struct StrideDim {
  std::int64_t stride;  ///< elements between consecutive entries (callers pass |stride|)
  std::int64_t size;    ///< entries; size <= 1 never steps, so it is ignored
};

/// Why a dimension breaks the rule.
enum class StrideOverlapKind : std::uint8_t {
  kNone,      ///< the rule holds: no two index tuples address the same element
  kTooClose,  ///< stride < the extent of the dimensions inside it
  kOverflow,  ///< the shape would span more than INT64_MAX elements
};

/// Result of find_stride_overlap.
struct StrideOverlap {
  StrideOverlapKind kind = StrideOverlapKind::kNone;
  int dim = -1;                   ///< index into the caller's array; -1 for kNone
  std::int64_t inner_extent = 0;  ///< elements spanned by the dimensions inside `dim` (its lower bound)
};

/// Checks a sufficient condition for no aliasing: ordered by stride, every
/// dimension of size > 1 steps over the whole extent of the dimensions inside
/// it, the innermost of which start from `inner_extent` (>= 1) contiguous
/// elements. Equal strides keep the array's order, so a tie blames the later
/// dimension. Returns the first dimension that breaks the rule, or kNone.
template <int N>
StrideOverlap find_stride_overlap(const StrideDim (&dims)[N], std::int64_t inner_extent) {
  int order[N];
  int n = 0;
  for (int i = 0; i < N; ++i) {
    if (dims[i].size > 1) order[n++] = i;
  }
  for (int i = 1; i < n; ++i) {  // stable insertion sort: a handful of entries
    for (int j = i; j > 0 && dims[order[j]].stride < dims[order[j - 1]].stride; --j) {
      const int t = order[j];
      order[j] = order[j - 1];
      order[j - 1] = t;
    }
  }
  std::int64_t extent = inner_extent;
  for (int i = 0; i < n; ++i) {
    const StrideDim& d = dims[order[i]];
    if (d.stride < extent) return {StrideOverlapKind::kTooClose, order[i], extent};
    // stride >= extent >= 1 here, so the division is safe.
    if (d.size - 1 > (INT64_MAX - extent) / d.stride) return {StrideOverlapKind::kOverflow, order[i], extent};
    extent += d.stride * (d.size - 1);
  }
  return {};
}

}  // namespace kvkit::detail
