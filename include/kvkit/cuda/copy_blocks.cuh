#pragma once
/// @file copy_blocks.cuh
/// CUDA copy_blocks: one launch copies every (src, dst) page pair in every
/// cache (all layers' K and V). Same arguments as kvkit::copy_blocks
/// (kvkit/ops/copy_blocks.hpp), except that `caches` and `pairs` are device
/// arrays. Dense pages are copied as one run of 16-byte units where aligned;
/// strided pages row by row.
///
/// The launcher cannot read device arrays, so it does not check page ids;
/// the kernel skips a pair with an id outside [0, num_pages). Validate pairs
/// on the host with kvkit::validate_copy_pairs before uploading them.

#include <cuda_runtime.h>

#include <cstdint>

#include "kvkit/cuda/check.hpp"
#include "kvkit/cuda/vector_copy.cuh"
#include "kvkit/ops/copy_blocks.hpp"

namespace kvkit::cuda {

namespace detail {

inline constexpr int kCopyBlocksThreads = 256;

/// grid: (pairs, caches). Dense pages: row_units = the page's units.
/// Index math in 32 bits (the launcher checks that a page fits): a 64-bit
/// division per 16-byte unit costs about as many instructions as the copy
/// allows at HBM speed.
template <class Unit>
__global__ void copy_blocks_kernel(PagedKVLayout layout, void* const* caches,
                                   const std::int64_t* pairs, std::int64_t num_pairs, int es,
                                   bool dense, int row_units) {
  for (std::int64_t p = blockIdx.x; p < num_pairs; p += gridDim.x) {
    const std::int64_t src = pairs[2 * p], dst = pairs[2 * p + 1];
    if (src < 0 || src >= layout.num_pages || dst < 0 || dst >= layout.num_pages) continue;
    char* base = static_cast<char*>(caches[blockIdx.y]);
    if (dense) {  // one run of units per page
      const Unit* from = reinterpret_cast<const Unit*>(base + layout.offset(src, 0, 0, 0) * es);
      Unit* to = reinterpret_cast<Unit*>(base + layout.offset(dst, 0, 0, 0) * es);
      for (int u = threadIdx.x; u < row_units; u += blockDim.x) to[u] = from[u];
      continue;
    }
    const int heads = int(layout.num_heads);
    const int page_units = int(layout.page_size) * heads * row_units;
    for (int u = threadIdx.x; u < page_units; u += blockDim.x) {
      const int r = u / row_units;
      const int i = u - r * row_units;
      const int s = r / heads;
      const int h = r - s * heads;
      const Unit* from = reinterpret_cast<const Unit*>(base + layout.offset(src, s, h, 0) * es);
      Unit* to = reinterpret_cast<Unit*>(base + layout.offset(dst, s, h, 0) * es);
      to[i] = from[i];
    }
  }
}

}  // namespace detail

/// Copies page pairs in every cache on `stream`. `caches` points to a device
/// array of num_caches device pointers, each a multiple of `cache_alignment`
/// bytes (the launcher cannot read them: say 256 for cudaMalloc'd caches,
/// or the element size when unsure; wider alignment allows 16-byte copies).
/// Throws kvkit::Error on invalid arguments or a failed launch.
inline void copy_blocks(const PagedKVLayout& layout, const CopyBlocksArgs& a,
                        std::size_t cache_alignment, cudaStream_t stream) {
  constexpr const char* kWhere = "kvkit::cuda::copy_blocks";
  validate_copy_blocks(layout, a, kWhere);
  check_argument(is_power_of_two(cache_alignment) && cache_alignment >= dtype_size(a.dtype),
                 kWhere, "cache_alignment", cache_alignment,
                 "a power of two >= the element size (the alignment every cache pointer has)");
  check_argument(a.num_caches <= 65535, kWhere, "num_caches", a.num_caches, "<= 65535");
  if (a.num_caches == 0 || a.num_pairs == 0) return;
  const std::uint64_t es = dtype_size(a.dtype);
  const bool dense = layout.page_is_dense();
  const std::uint64_t row_bytes = std::uint64_t(dense ? layout.page_elements() : layout.head_dim) * es;
  const int unit = detail::copy_unit_bytes(
      {std::uint64_t(cache_alignment), row_bytes,
       // v_offset: the V pointer of an interleaved cache is K + v_offset.
       std::uint64_t(layout.stride_page | layout.stride_slot | layout.stride_head | layout.v_offset) * es});
  const std::int64_t row_units = std::int64_t(row_bytes) / unit;
  const std::int64_t page_units = dense ? row_units : layout.page_size * layout.num_heads * row_units;
  check_argument(page_units <= std::int64_t(INT32_MAX), kWhere, "layout.page_size", layout.page_size,
                 "small enough that one page holds < 2^31 copy units (", page_units, " here)");
  dim3 grid(detail::grid_for(a.num_pairs > 65535 ? 65535 : a.num_pairs), unsigned(a.num_caches));
  detail::dispatch_copy_unit(unit, [&](auto u) {
    using Unit = decltype(u);
    detail::copy_blocks_kernel<Unit><<<grid, detail::kCopyBlocksThreads, 0, stream>>>(
        layout, a.caches, a.pairs, a.num_pairs, int(es), dense, int(row_units));
  });
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvkit::cuda
