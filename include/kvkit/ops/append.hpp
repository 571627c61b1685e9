#pragma once
/// @file append.hpp
/// Append new K/V rows (prefill chunks or decode tokens) into a cache by slot
/// mapping, on the CPU. The parameter structs and their validation are shared
/// with the CUDA launchers in kvkit/cuda/append.cuh.
///
/// Token t's rows go to slot slot_mapping[t] (page * page_size + in-page for
/// a paged layout, seq * capacity + row for a contiguous one); a negative slot
/// is padding and is skipped (vLLM's convention). Slots must be distinct.
/// Source and cache dtypes must match: the copy is bit-exact. For fp8/int8
/// caches use quantize_append_kv (kvkit/ops/quantize.hpp).

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/layout/latent_kv_layout.hpp"
#include "kvkit/ops/streaming_copy.hpp"

namespace kvkit {

/// Arguments of append_kv. Strides are in elements; head_dim is contiguous.
struct AppendKVArgs {
  const void* key = nullptr;            ///< [num_tokens, num_heads, head_dim]
  const void* value = nullptr;          ///< [num_tokens, num_heads, head_dim]
  std::int64_t key_stride_token = 0;
  std::int64_t key_stride_head = 0;
  std::int64_t value_stride_token = 0;
  std::int64_t value_stride_head = 0;
  const std::int64_t* slot_mapping = nullptr;  ///< [num_tokens]; < 0: padding
  std::int64_t num_tokens = 0;
  void* k_cache = nullptr;              ///< laid out by the layout argument
  void* v_cache = nullptr;              ///< laid out by the layout argument
  DType src_dtype = DType::kBFloat16;   ///< dtype of key and value
  DType cache_dtype = DType::kBFloat16; ///< dtype of the caches (must equal src_dtype)

  /// Arguments for densely packed key/value [num_tokens, num_heads, head_dim].
  static AppendKVArgs dense(const void* key, const void* value,
                            const std::int64_t* slot_mapping, std::int64_t num_tokens,
                            std::int64_t num_heads, std::int64_t head_dim, void* k_cache,
                            void* v_cache, DType dtype) {
    AppendKVArgs a;
    a.key = key;
    a.value = value;
    a.key_stride_token = a.value_stride_token = num_heads * head_dim;
    a.key_stride_head = a.value_stride_head = head_dim;
    a.slot_mapping = slot_mapping;
    a.num_tokens = num_tokens;
    a.k_cache = k_cache;
    a.v_cache = v_cache;
    a.src_dtype = a.cache_dtype = dtype;
    return a;
  }
};

/// Arguments of append_latent (MLA): row t = [c_kv[t] | k_pe[t]].
struct AppendLatentArgs {
  const void* c_kv = nullptr;           ///< [num_tokens, kv_lora_rank]
  const void* k_pe = nullptr;           ///< [num_tokens, rope_dim]
  std::int64_t c_kv_stride_token = 0;   ///< elements
  std::int64_t k_pe_stride_token = 0;   ///< elements
  const std::int64_t* slot_mapping = nullptr;  ///< [num_tokens]; < 0: padding
  std::int64_t num_tokens = 0;
  void* cache = nullptr;                ///< laid out by the LatentKVLayout
  DType src_dtype = DType::kBFloat16;
  DType cache_dtype = DType::kBFloat16;
};

namespace detail {

inline bool aligned_to(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

/// Checks a pointer that must be non-null (when used) and element-aligned.
inline void check_pointer(const void* p, bool used, DType dtype, const char* where,
                          const char* arg) {
  if (!used) return;
  check_argument(p != nullptr, where, arg, p, "a non-null pointer");
  check_argument(aligned_to(p, dtype_size(dtype)), where, arg, p, "an address aligned to ",
                 dtype_size(dtype), " bytes (", dtype_name(dtype), ")");
}

/// Checks the token stride of a dense output [num_tokens, num_heads, head_dim]
/// (head stride `stride_head`): rows of different tokens must not overlap,
/// or the result would depend on the order of the writes.
template <class Layout>
inline void check_output_token_stride(std::int64_t stride_token, std::int64_t num_tokens, const Layout& layout,
                                      std::int64_t stride_head, const char* where) {
  const std::int64_t token_extent = (layout.num_heads - 1) * stride_head + layout.head_dim;
  check_argument(num_tokens <= 1 || stride_token >= token_extent, where, "out_stride_token", stride_token,
                 ">= (num_heads - 1) x out_stride_head + head_dim (", token_extent,
                 ") so that the tokens' rows do not overlap");
}

/// Throws kvkit::Error naming the first token whose slot is >= num_slots.
/// Reads slot_mapping: host memory only.
inline void check_slots(const std::int64_t* slot_mapping, std::int64_t num_tokens,
                        std::int64_t num_slots, const char* where) {
  for (std::int64_t t = 0; t < num_tokens; ++t) {
    if (slot_mapping[t] >= num_slots) {
      fail(where, "argument 'slot_mapping' has slot_mapping[", t, "] = ", slot_mapping[t],
           ": expected < num_slots (", num_slots, ") or negative for padding");
    }
  }
}

}  // namespace detail

/// Validates everything about an append that does not need to read
/// slot_mapping (so the CUDA launcher can call it on device pointers):
/// layout, dtypes equal, non-null and element-aligned pointers, strides that
/// keep one token's heads apart. Throws kvkit::Error.
template <class Layout>
void validate_append_kv(const Layout& layout, const AppendKVArgs& a, const char* where) {
  layout.validate(where);
  check(a.src_dtype == a.cache_dtype, where, "source dtype ", dtype_name(a.src_dtype),
        " differs from cache dtype ", dtype_name(a.cache_dtype),
        "; expected equal dtypes (use quantize_append_kv for fp8/int8 caches)");
  check_argument(a.num_tokens >= 0, where, "num_tokens", a.num_tokens, ">= 0");
  const bool used = a.num_tokens > 0;
  detail::check_pointer(a.key, used, a.src_dtype, where, "key");
  detail::check_pointer(a.value, used, a.src_dtype, where, "value");
  detail::check_pointer(a.slot_mapping, used, DType::kInt64, where, "slot_mapping");
  detail::check_pointer(a.k_cache, used, a.cache_dtype, where, "k_cache");
  detail::check_pointer(a.v_cache, used, a.cache_dtype, where, "v_cache");
  const std::int64_t hd = layout.head_dim;
  check_argument(layout.num_heads == 1 || a.key_stride_head >= hd, where, "key_stride_head",
                 a.key_stride_head, ">= head_dim (", hd, ")");
  check_argument(layout.num_heads == 1 || a.value_stride_head >= hd, where, "value_stride_head",
                 a.value_stride_head, ">= head_dim (", hd, ")");
  check_argument(a.key_stride_token >= 0, where, "key_stride_token", a.key_stride_token, ">= 0");
  check_argument(a.value_stride_token >= 0, where, "value_stride_token", a.value_stride_token,
                 ">= 0");
}

/// Validates an append_latent (see validate_append_kv).
inline void validate_append_latent(const LatentKVLayout& layout, const AppendLatentArgs& a,
                                   const char* where) {
  layout.validate(where);
  check(a.src_dtype == a.cache_dtype, where, "source dtype ", dtype_name(a.src_dtype),
        " differs from cache dtype ", dtype_name(a.cache_dtype), "; expected equal dtypes");
  check_argument(a.num_tokens >= 0, where, "num_tokens", a.num_tokens, ">= 0");
  const bool used = a.num_tokens > 0;
  detail::check_pointer(a.c_kv, used, a.src_dtype, where, "c_kv");
  detail::check_pointer(a.k_pe, used && layout.rope_dim > 0, a.src_dtype, where, "k_pe");
  detail::check_pointer(a.slot_mapping, used, DType::kInt64, where, "slot_mapping");
  detail::check_pointer(a.cache, used, a.cache_dtype, where, "cache");
  check_argument(a.c_kv_stride_token >= 0, where, "c_kv_stride_token", a.c_kv_stride_token,
                 ">= 0");
  check_argument(a.k_pe_stride_token >= 0, where, "k_pe_stride_token", a.k_pe_stride_token,
                 ">= 0");
}

namespace detail {

/// Which stores an append writes the cache with (see streaming_copy.hpp).
enum class StoreKind {
  kAuto,       ///< streaming when the cache holds >= kStreamingStoreMinCacheBytes
  kOrdinary,   ///< memcpy
  kStreaming,  ///< copy_row_streaming, then a fence
};

/// kAuto resolved for a cache holding `cache_bytes` bytes of data.
inline bool use_streaming_stores(StoreKind kind, std::int64_t cache_bytes) {
  return kind == StoreKind::kStreaming ||
         (kind == StoreKind::kAuto && cache_bytes >= kStreamingStoreMinCacheBytes);
}

/// Copies n bytes with the stores chosen at compile time.
template <bool kStreaming>
KVKIT_FORCEINLINE void copy_row(void* dst, const void* src, std::size_t n) {
  if constexpr (kStreaming) {
    copy_row_streaming(dst, src, n);
  } else {
    std::memcpy(dst, src, n);
  }
}

/// Copies one token's `heads` head rows of `row_bytes` bytes, which lie
/// `dst_stride` / `src_stride` bytes apart: as one copy when both sides are
/// packed (2 KiB for Llama-3-8B bf16), else row by row. Shared by the
/// appends (into the cache) and gather_kv (out of it).
template <bool kStreaming>
KVKIT_FORCEINLINE void copy_head_rows(unsigned char* dst, std::int64_t dst_stride, const unsigned char* src,
                                      std::int64_t src_stride, std::int64_t heads, std::int64_t row_bytes) {
  if (heads == 1 || (dst_stride == row_bytes && src_stride == row_bytes)) {
    copy_row<kStreaming>(dst, src, std::size_t(heads * row_bytes));
    return;
  }
  for (std::int64_t h = 0; h < heads; ++h) {
    copy_row<kStreaming>(dst + h * dst_stride, src + h * src_stride, std::size_t(row_bytes));
  }
}

/// append_kv's token loop, after validation.
template <bool kStreaming, class Layout>
void append_kv_rows(const Layout& layout, const AppendKVArgs& a) {
  const std::int64_t es = std::int64_t(dtype_size(a.src_dtype));
  const std::int64_t row_bytes = layout.head_dim * es, cache_stride = layout.stride_head * es;
  auto* kc = static_cast<unsigned char*>(a.k_cache);
  auto* vc = static_cast<unsigned char*>(a.v_cache);
  const auto* ks = static_cast<const unsigned char*>(a.key);
  const auto* vs = static_cast<const unsigned char*>(a.value);
  for (std::int64_t t = 0; t < a.num_tokens; ++t) {
    const std::int64_t slot = a.slot_mapping[t];
    if (slot < 0) continue;
    const std::int64_t at = layout.slot_offset(slot, 0) * es;
    copy_head_rows<kStreaming>(kc + at, cache_stride, ks + t * a.key_stride_token * es, a.key_stride_head * es,
                               layout.num_heads, row_bytes);
    copy_head_rows<kStreaming>(vc + at, cache_stride, vs + t * a.value_stride_token * es, a.value_stride_head * es,
                               layout.num_heads, row_bytes);
  }
  if (kStreaming) streaming_store_fence();
}

/// append_kv with the stores chosen by `stores` (tests force each kind).
template <class Layout>
void append_kv_with(const Layout& layout, const AppendKVArgs& a, StoreKind stores) {
  constexpr const char* kWhere = "kvkit::append_kv";
  validate_append_kv(layout, a, kWhere);
  check_slots(a.slot_mapping, a.num_tokens, layout.num_slots(), kWhere);
  const std::int64_t cache_bytes =
      layout.num_slots() * layout.num_heads * layout.head_dim * std::int64_t(dtype_size(a.cache_dtype));
  if (use_streaming_stores(stores, cache_bytes)) {
    append_kv_rows<true>(layout, a);
  } else {
    append_kv_rows<false>(layout, a);
  }
}

/// append_latent's token loop, after validation: the row's two parts are
/// adjacent in the cache, so with streaming stores only the line that holds
/// the junction (when the row is not 64-byte aligned) is written by memcpy.
template <bool kStreaming>
void append_latent_rows(const LatentKVLayout& layout, const AppendLatentArgs& a) {
  const std::int64_t es = std::int64_t(dtype_size(a.src_dtype));
  auto* cache = static_cast<unsigned char*>(a.cache);
  const auto* c = static_cast<const unsigned char*>(a.c_kv);
  const auto* r = static_cast<const unsigned char*>(a.k_pe);
  const std::size_t c_bytes = std::size_t(layout.kv_lora_rank * es);
  const std::size_t r_bytes = std::size_t(layout.rope_dim * es);
  const std::int64_t rope_at = layout.rope_begin() * es;
  for (std::int64_t t = 0; t < a.num_tokens; ++t) {
    const std::int64_t slot = a.slot_mapping[t];
    if (slot < 0) continue;
    unsigned char* row = cache + layout.slot_offset(slot) * es;
    copy_row<kStreaming>(row, c + t * a.c_kv_stride_token * es, c_bytes);
    if (r_bytes > 0) copy_row<kStreaming>(row + rope_at, r + t * a.k_pe_stride_token * es, r_bytes);
  }
  if (kStreaming) streaming_store_fence();
}

/// append_latent with the stores chosen by `stores` (tests force each kind).
inline void append_latent_with(const LatentKVLayout& layout, const AppendLatentArgs& a,
                               StoreKind stores) {
  constexpr const char* kWhere = "kvkit::append_latent";
  validate_append_latent(layout, a, kWhere);
  check_slots(a.slot_mapping, a.num_tokens, layout.num_slots(), kWhere);
  const std::int64_t cache_bytes =
      layout.num_slots() * layout.row_elements() * std::int64_t(dtype_size(a.cache_dtype));
  if (use_streaming_stores(stores, cache_bytes)) {
    append_latent_rows<true>(layout, a);
  } else {
    append_latent_rows<false>(layout, a);
  }
}

}  // namespace detail

/// Copies key/value rows of each token into the caches at its slot (CPU).
/// `layout`: PagedKVLayout or ContiguousKVLayout (anything with num_heads,
/// head_dim, stride_head, num_slots(), slot_offset(slot, head), validate()).
/// Throws kvkit::Error on invalid arguments or a slot >= num_slots, before
/// writing anything. Whole tokens are copied at once when heads are
/// contiguous in both source and cache. A cache of at least
/// kStreamingStoreMinCacheBytes is written with streaming (non-temporal)
/// stores, which skip reading the destination lines (~2.4x faster for
/// decode-sized appends into a large cache; see streaming_copy.hpp); the
/// bytes written are the same either way.
template <class Layout>
void append_kv(const Layout& layout, const AppendKVArgs& a) {
  detail::append_kv_with(layout, a, detail::StoreKind::kAuto);
}

/// Writes [c_kv[t] | k_pe[t]] into the latent cache row of slot_mapping[t]
/// (CPU). Negative slots are skipped. Throws kvkit::Error on invalid
/// arguments or a slot >= num_slots, before writing anything. Streaming
/// stores as append_kv.
inline void append_latent(const LatentKVLayout& layout, const AppendLatentArgs& a) {
  detail::append_latent_with(layout, a, detail::StoreKind::kAuto);
}

}  // namespace kvkit
