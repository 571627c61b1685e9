#pragma once
/// @file quantize.hpp
/// Quantize-on-append to fp8 (e4m3, e5m2) or int8 KV caches, and the matching
/// dequantize, on the CPU. The CUDA kernels (kvkit/cuda/quantize.cuh) take the
/// same argument structs and produce the same bytes.
///
/// stored = Q(x / scale), dequantized = float(stored) * scale, where Q is
///   e4m3 / e5m2: round to nearest even, saturating to ±448 / ±57344 (±inf
///                saturates too), NaN -> NaN (0x7F), ±0 keeps its sign;
///   int8:        round to nearest even, clamped to [-127, 127], NaN -> 0,
///                ±0 -> 0 (int8 has no -0).
/// Scales (kvkit/layout/kv_scales.hpp): per tensor or per head (static, read
/// from the caller's float array) or per (token, head) (dynamic: amax of the
/// finite |x| of the head row / max representable, 1 when that is 0; written
/// to a float array [num_slots, num_heads] beside the cache).
///
/// Error bounds for |x| <= max_representable * scale (beyond it the value
/// saturates to ±max * scale), with float rounding of the division and the
/// dequantizing product adding at most 2 ulp of float:
///   e4m3: |deq - x| <= max(2^-4 |x|, 2^-10 scale)   (3 mantissa bits, subnormals 2^-9)
///   e5m2: |deq - x| <= max(2^-3 |x|, 2^-17 scale)   (2 mantissa bits, subnormals 2^-16)
///   int8: |deq - x| <= scale / 2
/// With per-(token, head) scales nothing saturates, so the bound holds for
/// every finite input. The scale must be explicit: vLLM's default of 1.0 for
/// fp8 silently saturates activations above 448.

#include <cmath>
#include <algorithm>
#include <cstdint>

#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/layout/kv_scales.hpp"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"
#include "kvkit/ops/append.hpp"
#include "kvkit/ops/gather.hpp"
#include "kvkit/ops/quantize_row_x86.hpp"
#include "kvkit/ops/token_chunks.hpp"

namespace kvkit {

/// Stored byte of x / scale in `cache_dtype` (fp8 e4m3, fp8 e5m2 or int8).
KVKIT_HOST_DEVICE inline std::uint8_t quantize_value(float x, float scale, DType cache_dtype) {
  const float v = x / scale;
  if (cache_dtype == DType::kFloat8E4M3) return float_to_e4m3_bits(v);
  if (cache_dtype == DType::kFloat8E5M2) return float_to_e5m2_bits(v);
  if (!(v == v)) return 0;  // NaN
  const float c = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
#if KVKIT_DEVICE_CODE
  const float r = rintf(c);
#else
  const float r = std::nearbyint(c);  // default rounding mode: nearest even
#endif
  return std::uint8_t(std::int8_t(r));
}

/// float(stored) * scale.
KVKIT_HOST_DEVICE inline float dequantize_value(std::uint8_t stored, float scale,
                                                DType cache_dtype) {
  const float v = cache_dtype == DType::kFloat8E4M3   ? e4m3_bits_to_float(stored)
                  : cache_dtype == DType::kFloat8E5M2 ? e5m2_bits_to_float(stored)
                                                      : float(std::int8_t(stored));
  return v * scale;
}

/// Dynamic per-(token, head) scale from the largest finite |x| of a row:
/// amax / max_representable, or 1 when that is 0 (all zeros or non-finite).
KVKIT_HOST_DEVICE inline float dynamic_scale(float amax, DType cache_dtype) {
  const float s = amax / quantized_max(cache_dtype);
  return s > 0.0f ? s : 1.0f;
}

/// Folds |x| into a running max of finite magnitudes (NaN and inf ignored).
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float fold_amax(float amax, float x) {
  const float a = x < 0.0f ? -x : x;
  return (a <= 3.402823466e38f && a > amax) ? a : amax;
}

namespace detail {
template <class T>
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float load_as_float(const void* p, std::int64_t i) {
  return float(static_cast<const T*>(p)[i]);
}
/// Element i of a float32 / float16 / bfloat16 array as float.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float load_float(const void* p, std::int64_t i, DType t) {
  return t == DType::kFloat32   ? static_cast<const float*>(p)[i]
         : t == DType::kFloat16 ? load_as_float<half>(p, i)
                                : load_as_float<bfloat16>(p, i);
}
}  // namespace detail

/// Arguments of quantize_append_kv: append_kv's, plus the scales.
struct QuantizeAppendArgs {
  const void* key = nullptr;                  ///< [num_tokens, num_heads, head_dim]
  const void* value = nullptr;                ///< [num_tokens, num_heads, head_dim]
  std::int64_t key_stride_token = 0, key_stride_head = 0;      ///< elements
  std::int64_t value_stride_token = 0, value_stride_head = 0;  ///< elements
  const std::int64_t* slot_mapping = nullptr; ///< [num_tokens]; < 0: padding
  std::int64_t num_tokens = 0;
  void* k_cache = nullptr;                    ///< 1-byte elements, laid out by the layout
  void* v_cache = nullptr;
  DType src_dtype = DType::kBFloat16;         ///< float32, float16 or bfloat16
  DType cache_dtype = DType::kFloat8E4M3;     ///< float8_e4m3, float8_e5m2 or int8
  ScaleGranularity granularity = ScaleGranularity::kPerTensor;
  const float* k_scale = nullptr;  ///< kPerTensor: [1]; kPerHead: [num_heads]
  const float* v_scale = nullptr;
  float* k_scale_cache = nullptr;  ///< kPerTokenHead: [num_slots, num_heads], written
  float* v_scale_cache = nullptr;
};

/// Validates what does not need to read device memory (shared with CUDA).
template <class Layout>
void validate_quantize_append(const Layout& layout, const QuantizeAppendArgs& a,
                              const char* where) {
  layout.validate(where);
  check_argument(a.src_dtype == DType::kFloat32 || a.src_dtype == DType::kFloat16 ||
                     a.src_dtype == DType::kBFloat16,
                 where, "src_dtype", a.src_dtype, "float32, float16 or bfloat16");
  check_argument(is_quantized_cache_dtype(a.cache_dtype), where, "cache_dtype", a.cache_dtype,
                 "float8_e4m3, float8_e5m2 or int8");
  check_argument(a.num_tokens >= 0, where, "num_tokens", a.num_tokens, ">= 0");
  const bool used = a.num_tokens > 0;
  detail::check_pointer(a.key, used, a.src_dtype, where, "key");
  detail::check_pointer(a.value, used, a.src_dtype, where, "value");
  detail::check_pointer(a.slot_mapping, used, DType::kInt64, where, "slot_mapping");
  detail::check_pointer(a.k_cache, used, a.cache_dtype, where, "k_cache");
  detail::check_pointer(a.v_cache, used, a.cache_dtype, where, "v_cache");
  const bool dynamic = a.granularity == ScaleGranularity::kPerTokenHead;
  detail::check_pointer(a.k_scale, used && !dynamic, DType::kFloat32, where, "k_scale");
  detail::check_pointer(a.v_scale, used && !dynamic, DType::kFloat32, where, "v_scale");
  detail::check_pointer(a.k_scale_cache, used && dynamic, DType::kFloat32, where, "k_scale_cache");
  detail::check_pointer(a.v_scale_cache, used && dynamic, DType::kFloat32, where, "v_scale_cache");
  const std::int64_t hd = layout.head_dim;
  check_argument(layout.num_heads == 1 || a.key_stride_head >= hd, where, "key_stride_head",
                 a.key_stride_head, ">= head_dim (", hd, ")");
  check_argument(layout.num_heads == 1 || a.value_stride_head >= hd, where, "value_stride_head",
                 a.value_stride_head, ">= head_dim (", hd, ")");
  check_argument(a.key_stride_token >= 0, where, "key_stride_token", a.key_stride_token, ">= 0");
  check_argument(a.value_stride_token >= 0, where, "value_stride_token", a.value_stride_token, ">= 0");
}

namespace detail {

/// The token loop of quantize_append_kv for one (source, cache) type pair:
/// no per-element dtype dispatch, scale lookups hoisted out of the rows.
/// Always inlined, so that each caller below compiles it for its own ISA.
template <class Src, DType kCache, class Layout, bool kAvx2Rows = false>
KVKIT_FORCEINLINE void quantize_append_loop(const Layout& layout, const QuantizeAppendArgs& a) {
  const std::int64_t heads = layout.num_heads, hd = layout.head_dim;
  const bool dynamic = a.granularity == ScaleGranularity::kPerTokenHead;
  const auto source_row = [&](int which, std::int64_t t, std::int64_t h) {
    const std::int64_t stride_token = which ? a.value_stride_token : a.key_stride_token;
    const std::int64_t stride_head = which ? a.value_stride_head : a.key_stride_head;
    return static_cast<const Src*>(which ? a.value : a.key) + t * stride_token + h * stride_head;
  };
  for (std::int64_t t = 0; t < a.num_tokens; ++t) {
    const std::int64_t slot = a.slot_mapping[t];
    if (slot < 0) continue;
    if (dynamic) {
      // Every row scale of the token (K and V) first: the amax passes read
      // the token's rows from memory together, and the divisions overlap
      // instead of each stalling its row's quantization.
      for (int which = 0; which < 2; ++which) {
        float* scales = (which ? a.v_scale_cache : a.k_scale_cache) + slot * heads;
        for (std::int64_t h = 0; h < heads; ++h) {
          scales[h] = dynamic_scale(row_amax(source_row(which, t, h), hd), kCache);
        }
      }
    }
    for (int which = 0; which < 2; ++which) {
      // Dynamic scales were just written to the scale cache; static ones are the caller's.
      const float* scales = dynamic ? (which ? a.v_scale_cache : a.k_scale_cache) : (which ? a.v_scale : a.k_scale);
      auto* cache = static_cast<std::uint8_t*>(which ? a.v_cache : a.k_cache);
      for (std::int64_t h = 0; h < heads; ++h) {
        quantize_row_for_isa<Src, kCache, kAvx2Rows>(source_row(which, t, h), hd,
                                                     scales[scale_index(a.granularity, slot, h, heads)],
                                                     cache + layout.slot_offset(slot, h));
      }
    }
  }
}

/// quantize_append_loop on the widest ISA (the AVX2 and AVX-512 copies have 8
/// or 16 lanes instead of SSE2's 4, and cheaper narrowing to bytes: about 2x
/// and 6x faster; the AVX2 copy's rows are hand-written). IEEE operations
/// give the same results on every ISA, and the loop has no multiply-add for
/// the compiler to contract into an FMA.
template <class Src, DType kCache, class Layout>
void quantize_append_isa(const Layout& layout, const QuantizeAppendArgs& a) {
  constexpr X86Level kWidest = KVKIT_QUANTIZE_X86_DISPATCH ? X86Level::kAvx512 : X86Level::kBaseline;
  run_loops_on_widest_isa<kWidest, &quantize_append_loop<Src, kCache, Layout>,
                          &quantize_append_loop<Src, kCache, Layout, true>,
                          &quantize_append_loop<Src, kCache, Layout>>(layout, a);
}

/// Splits the tokens into chunks of 256, shared among OpenMP threads from
/// 512 tokens where the program enables OpenMP (tokens are independent; with
/// duplicate slots, which token's row lands is unspecified, as on the GPU).
template <class Src, DType kCache, class Layout>
void quantize_append_typed(const Layout& layout, const QuantizeAppendArgs& a) {
  for_each_token_chunk(a.num_tokens, /*chunk=*/256, /*min_tokens_to_thread=*/512,
                       [&](std::int64_t first, std::int64_t end) {
                         QuantizeAppendArgs part = a;
                         part.num_tokens = end - first;
                         part.slot_mapping = a.slot_mapping + first;
                         part.key = static_cast<const Src*>(a.key) + first * a.key_stride_token;
                         part.value = static_cast<const Src*>(a.value) + first * a.value_stride_token;
                         quantize_append_isa<Src, kCache>(layout, part);
                       });
}

template <class Src, class Layout>
void quantize_append_to(const Layout& layout, const QuantizeAppendArgs& a) {
  switch (a.cache_dtype) {
    case DType::kFloat8E4M3: return quantize_append_typed<Src, DType::kFloat8E4M3>(layout, a);
    case DType::kFloat8E5M2: return quantize_append_typed<Src, DType::kFloat8E5M2>(layout, a);
    default: return quantize_append_typed<Src, DType::kInt8>(layout, a);  // validated
  }
}

}  // namespace detail

/// Quantizes each token's K/V rows into the caches at its slot (CPU).
/// Throws kvkit::Error on invalid arguments, a slot >= num_slots, or a
/// static scale that is not finite and > 0, before writing anything.
/// The bytes (and dynamic scales) are those of quantize_value / fold_amax /
/// dynamic_scale applied element by element, which is what the CUDA kernel
/// computes; the loops are specialised per (source, cache) dtype and
/// vectorizable (kvkit/ops/quantize_row.hpp).
template <class Layout>
void quantize_append_kv(const Layout& layout, const QuantizeAppendArgs& a) {
  constexpr const char* kWhere = "kvkit::quantize_append_kv";
  validate_quantize_append(layout, a, kWhere);
  detail::check_slots(a.slot_mapping, a.num_tokens, layout.num_slots(), kWhere);
  const std::int64_t heads = layout.num_heads;
  if (a.granularity != ScaleGranularity::kPerTokenHead && a.num_tokens > 0) {
    const std::int64_t n = a.granularity == ScaleGranularity::kPerHead ? heads : 1;
    for (std::int64_t i = 0; i < n; ++i) {
      for (const float* s : {a.k_scale, a.v_scale}) {
        if (!(s[i] > 0.0f && s[i] <= 3.402823466e38f)) {
          // Name the array: "scale[0]" alone does not say whether K's or V's is bad.
          fail(kWhere, "argument '", s == a.k_scale ? "k_scale" : "v_scale", "' has ",
               s == a.k_scale ? "k_scale[" : "v_scale[", i, "] = ", s[i], ": expected a finite scale > 0");
        }
      }
    }
  }
  switch (a.src_dtype) {
    case DType::kFloat32: return detail::quantize_append_to<float>(layout, a);
    case DType::kFloat16: return detail::quantize_append_to<half>(layout, a);
    default: return detail::quantize_append_to<bfloat16>(layout, a);  // validated
  }
}

/// Arguments of dequantize_gather_kv: a sequence's quantized K/V, by page
/// list, into float32 [num_tokens, num_heads, head_dim].
struct DequantizeGatherArgs {
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  const std::int32_t* pages = nullptr;  ///< [ceil(num_tokens / page_size)]
  std::int64_t num_tokens = 0;
  float* key_out = nullptr;
  float* value_out = nullptr;
  std::int64_t out_stride_token = 0, out_stride_head = 0;  ///< elements
  DType cache_dtype = DType::kFloat8E4M3;
  ScaleGranularity granularity = ScaleGranularity::kPerTensor;
  const float* k_scale = nullptr;  ///< [1], [num_heads] or [num_slots, num_heads] by granularity
  const float* v_scale = nullptr;
};

/// Validates what does not need to read device memory (shared with CUDA).
inline void validate_dequantize_gather(const PagedKVLayout& layout, const DequantizeGatherArgs& a,
                                       const char* where) {
  layout.validate(where);
  check_argument(is_quantized_cache_dtype(a.cache_dtype), where, "cache_dtype", a.cache_dtype,
                 "float8_e4m3, float8_e5m2 or int8");
  check_argument(a.num_tokens >= 0, where, "num_tokens", a.num_tokens, ">= 0");
  const bool used = a.num_tokens > 0;
  for (const void* p : {a.k_cache, a.v_cache}) {
    detail::check_pointer(p, used, a.cache_dtype, where, p == a.k_cache ? "k_cache" : "v_cache");
  }
  detail::check_pointer(a.pages, used, DType::kInt32, where, "pages");
  detail::check_pointer(a.key_out, used, DType::kFloat32, where, "key_out");
  detail::check_pointer(a.value_out, used, DType::kFloat32, where, "value_out");
  detail::check_pointer(a.k_scale, used, DType::kFloat32, where, "k_scale");
  detail::check_pointer(a.v_scale, used, DType::kFloat32, where, "v_scale");
  check_argument(layout.num_heads == 1 || a.out_stride_head >= layout.head_dim, where,
                 "out_stride_head", a.out_stride_head, ">= head_dim (", layout.head_dim, ")");
  detail::check_output_token_stride(a.out_stride_token, a.num_tokens, layout, a.out_stride_head, where);
}

namespace detail {

/// float(stored) for a cache dtype chosen at compile time (dequantize_value
/// without the scale); branch-free, so that loops of it vectorize.
template <DType kCache>
KVKIT_FORCEINLINE float quantized_to_float(std::uint8_t stored) {
  if constexpr (kCache == DType::kFloat8E4M3) return e4m3_bits_to_float(stored);
  if constexpr (kCache == DType::kFloat8E5M2) return e5m2_bits_to_float(stored);
  if constexpr (kCache == DType::kInt8) return float(std::int8_t(stored));
}

/// dequantize_gather_kv's tokens [first, end) for one cache dtype, after
/// validation: per head row one scale lookup, then a loop the compiler
/// vectorizes. Each value is dequantize_value's single product. Always
/// inlined into one copy per ISA.
template <DType kCache>
KVKIT_FORCEINLINE void dequantize_gather_tokens(const PagedKVLayout& layout, const DequantizeGatherArgs& a,
                                                std::int64_t first, std::int64_t end) {
  const std::int64_t heads = layout.num_heads, hd = layout.head_dim;
  for (int which = 0; which < 2; ++which) {
    const auto* cache = static_cast<const std::uint8_t*>(which ? a.v_cache : a.k_cache);
    const float* scales = which ? a.v_scale : a.k_scale;
    float* out = which ? a.value_out : a.key_out;
    for (std::int64_t t = first; t < end; ++t) {
      const std::int64_t slot = token_slot(a.pages, t, layout.page_shift);
      for (std::int64_t h = 0; h < heads; ++h) {
        const float scale = scales[scale_index(a.granularity, slot, h, heads)];
        const std::uint8_t* __restrict__ row = cache + layout.slot_offset(slot, h);
        float* __restrict__ o = out + t * a.out_stride_token + h * a.out_stride_head;
        for (std::int64_t d = 0; d < hd; ++d) o[d] = quantized_to_float<kCache>(row[d]) * scale;
      }
    }
  }
}

template <DType kCache>
void dequantize_gather_isa(const PagedKVLayout& layout, const DequantizeGatherArgs& a, std::int64_t first,
                           std::int64_t end) {
  constexpr X86Level kWidest = KVKIT_QUANTIZE_X86_DISPATCH ? X86Level::kAvx512 : X86Level::kBaseline;
  run_loop_on_widest_isa<kWidest, &dequantize_gather_tokens<kCache>>(layout, a, first, end);
}

}  // namespace detail

/// Dequantizes a sequence's K/V into float32 (CPU). Throws kvkit::Error on
/// invalid arguments or a page id outside [0, num_pages), before writing
/// anything. Each value is dequantize_value(stored, scale, cache_dtype), the
/// CUDA kernel's too; the loops are specialised per cache dtype, compiled
/// per ISA and shared among OpenMP threads (chunks of 256 tokens, from 512)
/// where the program enables OpenMP.
inline void dequantize_gather_kv(const PagedKVLayout& layout, const DequantizeGatherArgs& a) {
  constexpr const char* kWhere = "kvkit::dequantize_gather_kv";
  validate_dequantize_gather(layout, a, kWhere);
  detail::check_sequence_pages(layout, a.pages, a.num_tokens, kWhere);
  using detail::dequantize_gather_isa;
  detail::for_each_token_chunk(a.num_tokens, /*chunk=*/256, /*min_tokens_to_thread=*/512,
                               [&](std::int64_t first, std::int64_t end) {
                                 switch (a.cache_dtype) {
                                   case DType::kFloat8E4M3:
                                     return dequantize_gather_isa<DType::kFloat8E4M3>(layout, a, first, end);
                                   case DType::kFloat8E5M2:
                                     return dequantize_gather_isa<DType::kFloat8E5M2>(layout, a, first, end);
                                   default:  // validated: int8
                                     return dequantize_gather_isa<DType::kInt8>(layout, a, first, end);
                                 }
                               });
}

}  // namespace kvkit
