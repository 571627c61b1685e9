#pragma once
/// @file append.cuh
/// CUDA append_kv / append_latent: the kernels behind kvkit/ops/append.hpp's
/// CPU ops, with the same argument structs and layouts (so results are
/// bit-identical). One thread block per token; threads copy 16-byte units
/// when every pointer, stride and row is 16-byte aligned, else the widest
/// unit that fits.
///
/// Device-side difference from the CPU op: slot_mapping lives in device
/// memory and is not read by the launcher, so a slot >= num_slots cannot be
/// reported; the kernel skips it like padding. Validate slots on the host
/// (kvkit::append_kv does) where that matters.

#include <cuda_runtime.h>

#include <cstdint>

#include "kvkit/cuda/check.hpp"
#include "kvkit/cuda/vector_copy.cuh"
#include "kvkit/layout/contiguous_kv_layout.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"
#include "kvkit/ops/append.hpp"

namespace kvkit::cuda {

namespace detail {

inline constexpr int kAppendThreads = 128;

/// OR of a layout's strides (elements): its lowest set bit bounds their common alignment.
inline std::uint64_t stride_bits(const PagedKVLayout& l) {
  return std::uint64_t(l.stride_page | l.stride_slot | l.stride_head);
}
inline std::uint64_t stride_bits(const ContiguousKVLayout& l) {
  return std::uint64_t(l.stride_seq | l.stride_token | l.stride_head);
}

template <class Unit, class Layout>
__global__ void append_kv_kernel(Layout layout, AppendKVArgs a, int es, int row_units) {
  const int per_token = int(layout.num_heads) * row_units;  // units of one token's K (or V) rows
  const std::int64_t num_slots = layout.num_slots();
  for (std::int64_t t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    const std::int64_t slot = a.slot_mapping[t];
    if (slot < 0 || slot >= num_slots) continue;
    const char* key = static_cast<const char*>(a.key) + t * a.key_stride_token * es;
    const char* value = static_cast<const char*>(a.value) + t * a.value_stride_token * es;
    // One 32-bit division per unit, shared by K and V (a 64-bit one per
    // 16 bytes would cost about as many instructions as the copy allows).
    for (int u = threadIdx.x; u < per_token; u += blockDim.x) {
      const int h = u / row_units;
      const int i = u - h * row_units;
      const std::int64_t dst = layout.slot_offset(slot, h) * es;
      reinterpret_cast<Unit*>(static_cast<char*>(a.k_cache) + dst)[i] =
          reinterpret_cast<const Unit*>(key + h * a.key_stride_head * es)[i];
      reinterpret_cast<Unit*>(static_cast<char*>(a.v_cache) + dst)[i] =
          reinterpret_cast<const Unit*>(value + h * a.value_stride_head * es)[i];
    }
  }
}

template <class Unit>
__global__ void append_latent_kernel(LatentKVLayout layout, AppendLatentArgs a, int es,
                                     std::int64_t nope_units, std::int64_t rope_units) {
  const std::int64_t num_slots = layout.num_slots();
  for (std::int64_t t = blockIdx.x; t < a.num_tokens; t += gridDim.x) {
    const std::int64_t slot = a.slot_mapping[t];
    if (slot < 0 || slot >= num_slots) continue;
    char* row = static_cast<char*>(a.cache) + layout.slot_offset(slot) * es;
    const Unit* c = reinterpret_cast<const Unit*>(static_cast<const char*>(a.c_kv) + t * a.c_kv_stride_token * es);
    const Unit* r = reinterpret_cast<const Unit*>(static_cast<const char*>(a.k_pe) + t * a.k_pe_stride_token * es);
    Unit* dst_c = reinterpret_cast<Unit*>(row);
    Unit* dst_r = reinterpret_cast<Unit*>(row + layout.rope_begin() * es);
    for (std::int64_t u = threadIdx.x; u < nope_units + rope_units; u += blockDim.x) {
      if (u < nope_units) {
        dst_c[u] = c[u];
      } else {
        dst_r[u - nope_units] = r[u - nope_units];
      }
    }
  }
}

}  // namespace detail

/// Appends key/value rows by slot mapping on `stream` (see kvkit::append_kv).
/// All pointers are device pointers. Throws kvkit::Error on invalid
/// arguments (before launching) or a failed launch. Never allocates.
template <class Layout>
void append_kv(const Layout& layout, const AppendKVArgs& a, cudaStream_t stream) {
  validate_append_kv(layout, a, "kvkit::cuda::append_kv");
  if (a.num_tokens == 0) return;
  const std::uint64_t es = dtype_size(a.src_dtype);
  const int unit = detail::copy_unit_bytes(
      {detail::address_of(a.key), detail::address_of(a.value), detail::address_of(a.k_cache),
       detail::address_of(a.v_cache), std::uint64_t(layout.head_dim) * es,
       std::uint64_t(a.key_stride_token) * es, std::uint64_t(a.key_stride_head) * es,
       std::uint64_t(a.value_stride_token) * es, std::uint64_t(a.value_stride_head) * es,
       detail::stride_bits(layout) * es});
  const std::int64_t row_units = layout.head_dim * std::int64_t(es) / unit;
  check_argument(layout.num_heads * row_units <= std::int64_t(INT32_MAX), "kvkit::cuda::append_kv",
                 "layout.num_heads", layout.num_heads, "small enough that one token's rows hold < 2^31 copy units");
  detail::dispatch_copy_unit(unit, [&](auto u) {
    using Unit = decltype(u);
    detail::append_kv_kernel<Unit, Layout>
        <<<detail::grid_for(a.num_tokens), detail::kAppendThreads, 0, stream>>>(layout, a, int(es),
                                                                               int(row_units));
  });
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

/// Appends latent rows [c_kv | k_pe] by slot mapping on `stream` (see
/// kvkit::append_latent). Throws kvkit::Error on invalid arguments.
inline void append_latent(const LatentKVLayout& layout, const AppendLatentArgs& a,
                          cudaStream_t stream) {
  validate_append_latent(layout, a, "kvkit::cuda::append_latent");
  if (a.num_tokens == 0) return;
  const std::uint64_t es = dtype_size(a.src_dtype);
  const int unit = detail::copy_unit_bytes(
      {detail::address_of(a.c_kv), detail::address_of(a.k_pe), detail::address_of(a.cache),
       std::uint64_t(layout.kv_lora_rank) * es, std::uint64_t(layout.rope_dim) * es,
       std::uint64_t(a.c_kv_stride_token) * es, std::uint64_t(a.k_pe_stride_token) * es,
       std::uint64_t(layout.stride_slot) * es, std::uint64_t(layout.stride_page) * es});
  detail::dispatch_copy_unit(unit, [&](auto u) {
    using Unit = decltype(u);
    detail::append_latent_kernel<Unit><<<detail::grid_for(a.num_tokens), detail::kAppendThreads, 0,
                                         stream>>>(layout, a, int(es),
                                                   layout.kv_lora_rank * std::int64_t(es) / unit,
                                                   layout.rope_dim * std::int64_t(es) / unit);
  });
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvkit::cuda
