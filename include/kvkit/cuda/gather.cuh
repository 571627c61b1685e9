#pragma once
/// @file gather.cuh
/// CUDA gather_kv: a sequence's cached K/V into dense [num_tokens, num_heads,
/// head_dim] tensors, with the arguments of kvkit::gather_kv
/// (kvkit/ops/gather.hpp); `pages` is a device array. A page id outside
/// [0, num_pages) cannot be reported from the device: its tokens are left
/// unwritten. One block per token.

#include <cuda_runtime.h>

#include <cstdint>

#include "kvkit/cuda/check.hpp"
#include "kvkit/cuda/vector_copy.cuh"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/ops/gather.hpp"

namespace kvkit::cuda {

namespace detail {

template <class Unit>
__global__ void gather_kv_kernel(PagedKVLayout layout, GatherKVArgs a, int es,
                                 std::int64_t row_units) {
  const std::int64_t per_cache = layout.num_heads * row_units;
  const int caches = a.v_cache != nullptr ? 2 : 1;
  for (std::int64_t t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    const std::int32_t page = a.pages[t >> layout.page_shift];
    if (page < 0 || page >= layout.num_pages) continue;
    const std::int64_t slot = token_slot(a.pages, t, layout.page_shift);
    for (std::int64_t u = threadIdx.x; u < caches * per_cache; u += blockDim.x) {
      const bool is_v = u >= per_cache;
      const std::int64_t r = is_v ? u - per_cache : u;
      const std::int64_t h = r / row_units;
      const std::int64_t i = r - h * row_units;
      const Unit* src = reinterpret_cast<const Unit*>(
          static_cast<const char*>(is_v ? a.v_cache : a.k_cache) + layout.slot_offset(slot, h) * es);
      Unit* dst = reinterpret_cast<Unit*>(static_cast<char*>(is_v ? a.value_out : a.key_out) +
                                          (t * a.out_stride_token + h * a.out_stride_head) * es);
      dst[i] = src[i];
    }
  }
}

}  // namespace detail

/// Gathers on `stream` (device pointers). Throws kvkit::Error on invalid
/// arguments or a failed launch.
inline void gather_kv(const PagedKVLayout& layout, const GatherKVArgs& a, cudaStream_t stream) {
  validate_gather_kv(layout, a, "kvkit::cuda::gather_kv");
  if (a.num_tokens == 0) return;
  const std::uint64_t es = dtype_size(a.dtype);
  const int unit = detail::copy_unit_bytes(
      {detail::address_of(a.k_cache), detail::address_of(a.v_cache), detail::address_of(a.key_out),
       detail::address_of(a.value_out), std::uint64_t(layout.head_dim) * es,
       std::uint64_t(layout.stride_page | layout.stride_slot | layout.stride_head) * es,
       std::uint64_t(a.out_stride_token | a.out_stride_head) * es});
  detail::dispatch_copy_unit(unit, [&](auto u) {
    using Unit = decltype(u);
    detail::gather_kv_kernel<Unit><<<detail::grid_for(a.num_tokens), 128, 0, stream>>>(
        layout, a, int(es), layout.head_dim * std::int64_t(es) / unit);
  });
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvkit::cuda
