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

/// grid: (pairs, caches). Dense pages: rows_per_page == 1, row_units = the page.
template <class Unit>
__global__ void copy_blocks_kernel(PagedKVLayout layout, void* const* caches,
                                   const std::int64_t* pairs, std::int64_t num_pairs, int es,
                                   bool dense, std::int64_t row_units) {
  for (std::int64_t p = blockIdx.x; p < num_pairs; p += gridDim.x) {
    const std::int64_t src = pairs[2 * p], dst = pairs[2 * p + 1];
    if (src < 0 || src >= layout.num_pages || dst < 0 || dst >= layout.num_pages) continue;
    char* base = static_cast<char*>(caches[blockIdx.y]);
    const std::int64_t rows = dense ? 1 : layout.page_size * layout.num_heads;
    for (std::int64_t u = threadIdx.x; u < rows * row_units; u += blockDim.x) {
      const std::int64_t r = u / row_units;
      const std::int64_t i = u - r * row_units;
      const std::int64_t s = r / layout.num_heads;
      const std::int64_t h = r - s * layout.num_heads;
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
  dim3 grid(detail::grid_for(a.num_pairs > 65535 ? 65535 : a.num_pairs), unsigned(a.num_caches));
  detail::dispatch_copy_unit(unit, [&](auto u) {
    using Unit = decltype(u);
    detail::copy_blocks_kernel<Unit><<<grid, detail::kCopyBlocksThreads, 0, stream>>>(
        layout, a.caches, a.pairs, a.num_pairs, int(es), dense, std::int64_t(row_bytes) / unit);
  });
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvkit::cuda
