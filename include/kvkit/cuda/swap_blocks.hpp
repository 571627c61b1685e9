#pragma once
/// @file swap_blocks.hpp
/// CUDA swap_blocks: copies a kvkit::SwapPlan's pages between device caches
/// and pinned host caches with asynchronous copies on a stream, for every
/// cache (all layers' K and V). Same arguments as kvkit::swap_blocks
/// (kvkit/ops/swap_blocks.hpp), whose host logic (validation, coalescing)
/// the CPU tests cover. Needs the CUDA runtime only (no kernel, no nvcc).
///
/// One cudaMemcpyAsync per (run, cache) when both sides store pages back to
/// back, else one cudaMemcpy2DAsync per (run, cache) with the two page
/// pitches (e.g. interleaved K/V pages). Host caches must be page-locked
/// (cudaHostAlloc / cudaHostRegister): with pageable memory the copies would
/// not be asynchronous, so that is reported as an error.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kvkit/cuda/check.hpp"
#include "kvkit/ops/swap_blocks.hpp"

namespace kvkit::cuda {

namespace detail {

/// Throws kvkit::Error unless `p` is device memory (want_device) or
/// page-locked host memory (!want_device).
inline void check_memory_kind(const void* p, bool want_device, const char* where,
                              const char* arg) {
  cudaPointerAttributes attributes{};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, p);
  if (status != cudaSuccess) {
    (void)cudaGetLastError();
    fail(where, "argument '", arg, "' = ", p, ": cudaPointerGetAttributes failed (",
         cudaGetErrorName(status), ")");
  }
  const bool device = attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged;
  const bool pinned = attributes.type == cudaMemoryTypeHost;
  if (want_device && !device) {
    fail(where, "argument '", arg, "' = ", p, ": expected device memory (swap direction)");
  }
  if (!want_device && !pinned) {
    fail(where, "argument '", arg, "' = ", p,
         ": expected page-locked host memory (cudaHostAlloc or cudaHostRegister)");
  }
}

}  // namespace detail

/// Enqueues the plan's copies on `stream` and returns; the caller
/// synchronizes (or records an event) before reusing either side. The
/// direction is the plan's: kDeviceToHost copies src (device) to dst (pinned
/// host), kHostToDevice src (pinned host) to dst (device). Throws
/// kvkit::Error on invalid arguments (checked before the first copy) or a
/// failed enqueue.
inline void swap_blocks(const PagedKVLayout& src_layout, const PagedKVLayout& dst_layout,
                        const SwapPlan& plan, const SwapBlocksArgs& a, cudaStream_t stream) {
  constexpr const char* kWhere = "kvkit::cuda::swap_blocks";
  validate_swap_blocks(src_layout, dst_layout, plan, a, kWhere);
  if (a.num_caches == 0 || plan.num_pages() == 0) return;
  const bool to_host = plan.direction() == SwapDirection::kDeviceToHost;
  for (std::int64_t c = 0; c < a.num_caches; ++c) {
    detail::check_memory_kind(a.src_caches[c], to_host, kWhere, "src_caches[i]");
    detail::check_memory_kind(a.dst_caches[c], !to_host, kWhere, "dst_caches[i]");
  }
  const cudaMemcpyKind kind = to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
  const std::size_t es = dtype_size(a.dtype);
  const std::size_t page_bytes = std::size_t(src_layout.page_elements()) * es;
  const std::size_t src_pitch = std::size_t(src_layout.stride_page) * es;
  const std::size_t dst_pitch = std::size_t(dst_layout.stride_page) * es;
  const bool packed = src_pitch == page_bytes && dst_pitch == page_bytes;
  for (std::int64_t c = 0; c < a.num_caches; ++c) {
    const auto* src = static_cast<const unsigned char*>(a.src_caches[c]);
    auto* dst = static_cast<unsigned char*>(a.dst_caches[c]);
    for (const BlockRun& r : plan.runs()) {
      const unsigned char* from = src + std::size_t(r.src) * src_pitch;
      unsigned char* to = dst + std::size_t(r.dst) * dst_pitch;
      // A single page is one run whatever the pitches (a one-page cache may
      // have stride_page 0, which cudaMemcpy2DAsync rejects as a pitch).
      if (packed || r.count == 1) {
        KVKIT_CUDA_CHECK(cudaMemcpyAsync(to, from, std::size_t(r.count) * page_bytes, kind, stream));
      } else {
        KVKIT_CUDA_CHECK(cudaMemcpy2DAsync(to, dst_pitch, from, src_pitch, page_bytes,
                                           std::size_t(r.count), kind, stream));
      }
    }
  }
}

}  // namespace kvkit::cuda
