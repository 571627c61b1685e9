#pragma once
/// @file attention_checks.hpp
/// The argument checks of decode attention (PagedDecodeParams), shared by
/// the CPU op (attention_decode.hpp) and the CUDA plans, whose page tables
/// live on the device: shapes, strides, flags, pointers, dtypes, scales, and
/// (host memory only) the page table and sequence lengths.

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/layout/kv_scales.hpp"
#include "kvkit/ops/attention_params.hpp"

namespace kvkit::detail {

/// Calls f(std::integral_constant<DType, t>) for a cache dtype the CPU
/// decode reads: float32, float16, bfloat16, float8_e4m3, float8_e5m2, int8.
template <class F>
void dispatch_kv_cache_dtype(DType t, const char* where, F&& f) {
  switch (t) {
    case DType::kFloat32: return f(std::integral_constant<DType, DType::kFloat32>{});
    case DType::kFloat16: return f(std::integral_constant<DType, DType::kFloat16>{});
    case DType::kBFloat16: return f(std::integral_constant<DType, DType::kBFloat16>{});
    case DType::kFloat8E4M3: return f(std::integral_constant<DType, DType::kFloat8E4M3>{});
    case DType::kFloat8E5M2: return f(std::integral_constant<DType, DType::kFloat8E5M2>{});
    case DType::kInt8: return f(std::integral_constant<DType, DType::kInt8>{});
    default:
      fail_argument(where, "kv_dtype", t, "float32, float16, bfloat16, float8_e4m3, float8_e5m2 or int8");
  }
}

/// Checks everything about a decode call that needs no memory reads (shapes,
/// strides, flags, pointers, dtypes). Shared by the CPU op and the CUDA plan,
/// whose page tables live on the device.
inline void validate_decode_shapes(const PagedDecodeParams& p, const char* where) {
  p.layout.validate(where);
  const std::int64_t kv_heads = p.layout.num_heads;
  const std::int64_t head_dim = p.layout.head_dim;
  check_argument(p.q_len >= 1, where, "q_len", p.q_len, ">= 1");
  check_argument(p.num_q_heads > 0 && p.num_q_heads % kv_heads == 0, where, "num_q_heads",
                 p.num_q_heads, "a positive multiple of the kv heads (", kv_heads, ")");
  check_argument(std::isfinite(p.sm_scale) && p.sm_scale > 0.0f, where, "sm_scale", p.sm_scale,
                 "a finite value > 0 (usually head_dim^-0.5)");
  check_argument(p.window >= 0, where, "window", p.window, ">= 0 (0: no window)");
  check_argument(p.num_sinks >= 0, where, "num_sinks", p.num_sinks, ">= 0");
  // An infinite cap would score cap * tanh(s / cap) = inf * 0 = NaN.
  check_argument(p.logit_softcap >= 0.0f && std::isfinite(p.logit_softcap), where, "logit_softcap",
                 p.logit_softcap, "a finite value >= 0 (0: no soft-cap)");
  check_argument(p.kv_begin >= 0 && p.kv_begin <= p.kv_end, where, "kv_begin", p.kv_begin,
                 ">= 0 and <= kv_end (", p.kv_end, ")");
  check_argument(p.causal || p.window == 0, where, "window", p.window,
                 "0 when causal is false (a window needs query positions)");
  const PaddedPageTable& t = p.page_table;
  check_argument(t.batch_size >= 0, where, "page_table.batch_size", t.batch_size, ">= 0");
  check_argument(t.max_blocks >= 0, where, "page_table.max_blocks", t.max_blocks, ">= 0");
  check_argument(t.stride_batch >= t.max_blocks, where, "page_table.stride_batch", t.stride_batch,
                 ">= max_blocks (", t.max_blocks, ")");
  dispatch_dtype<FloatTypes>(p.q_dtype, where, "q_dtype", [](auto) {});
  dispatch_kv_cache_dtype(p.kv_dtype, where, [](auto) {});
  const std::int64_t rows = t.batch_size * p.q_len;
  if (rows == 0) return;
  // One query row may have any token stride; ragged queries (q_indptr) may
  // hold many rows whatever batch_size x q_len says.
  const bool one_row = rows == 1 && p.q_indptr == nullptr;
  check_argument(t.seq_lens != nullptr, where, "page_table.seq_lens", t.seq_lens, "a non-null pointer");
  check_argument(t.block_table != nullptr || t.max_blocks == 0, where, "page_table.block_table",
                 t.block_table, "a non-null pointer");
  check_argument(p.q != nullptr, where, "q", p.q, "a non-null pointer");
  check_argument(p.o != nullptr, where, "o", p.o, "a non-null pointer");
  check_argument(p.k_cache != nullptr, where, "k_cache", p.k_cache, "a non-null pointer");
  check_argument(p.v_cache != nullptr, where, "v_cache", p.v_cache, "a non-null pointer");
  check_argument(p.q_stride_head >= head_dim, where, "q_stride_head", p.q_stride_head,
                 ">= head_dim (", head_dim, ")");
  check_argument(p.q_stride_token >= p.num_q_heads * p.q_stride_head || one_row, where,
                 "q_stride_token", p.q_stride_token, ">= num_q_heads * q_stride_head (",
                 p.num_q_heads * p.q_stride_head, ")");
  if (is_quantized_cache_dtype(p.kv_dtype)) {
    check_argument(p.k_scale != nullptr, where, "k_scale", p.k_scale,
                   "a non-null pointer for a ", p.kv_dtype,
                   " cache (the scales of quantize_append_kv; FlashMLA's 656-byte fp8 latent rows go to "
                   "mla_decode_attention)");
    check_argument(p.v_scale != nullptr, where, "v_scale", p.v_scale,
                   "a non-null pointer for a ", p.kv_dtype, " cache (the scales of quantize_append_kv)");
  } else {
    check_argument(p.k_scale == nullptr && p.v_scale == nullptr, where, "k_scale", p.k_scale,
                   "nullptr for a ", p.kv_dtype, " cache (scales belong to float8 / int8 caches)");
  }
  check_argument(p.v_head_dim >= 0 && p.v_head_dim <= head_dim, where, "v_head_dim", p.v_head_dim,
                 "in [0, head_dim (", head_dim, ")] (0: head_dim)");
  const std::int64_t v_dim = attention_v_dim(p);
  check_argument(p.o_stride_head >= v_dim, where, "o_stride_head", p.o_stride_head,
                 ">= the value width (", v_dim, ")");
  check_argument(p.o_stride_token >= p.num_q_heads * p.o_stride_head || one_row, where,
                 "o_stride_token", p.o_stride_token, ">= num_q_heads * o_stride_head (",
                 p.num_q_heads * p.o_stride_head, ")");
}

/// For ops without ragged queries (the CUDA kernels, the fp8 MLA loop).
inline void reject_ragged_queries(const PagedDecodeParams& p, const char* where) {
  check_argument(p.q_indptr == nullptr, where, "q_indptr", p.q_indptr,
                 "nullptr here (ragged queries: one call per sequence, or the CPU paged_decode_attention)");
}

/// Checks one sequence length (host memory): with causal attention the q_len
/// new tokens must already be in the cache.
inline void check_decode_seq_len(const PagedDecodeParams& p, std::int64_t b, std::int64_t len,
                                 const char* where, std::int64_t q_len) {
  if (p.causal && len < q_len) {
    fail(where, "sequence ", b, " has seq_len ", len, " < q_len (", q_len,
         "); expected the new tokens to be in the cache already");
  }
}
inline void check_decode_seq_len(const PagedDecodeParams& p, std::int64_t b, std::int64_t len,
                                 const char* where) {
  check_decode_seq_len(p, b, len, where, p.q_len);
}

inline void validate_decode_params(const PagedDecodeParams& p, const char* where) {
  validate_decode_shapes(p, where);
  validate_page_table(p.page_table, p.layout.page_size, p.layout.num_pages);
  if (p.q_indptr != nullptr) {
    check_argument(p.q_indptr[0] == 0, where, "q_indptr[0]", p.q_indptr[0], "0");
    for (std::int64_t b = 0; b < p.page_table.batch_size; ++b) {
      if (p.q_indptr[b + 1] < p.q_indptr[b]) {
        fail(where, "argument 'q_indptr[", b + 1, "]' = ", p.q_indptr[b + 1], ": expected >= q_indptr[", b,
             "] (", p.q_indptr[b], ")");
      }
    }
  }
  for (std::int64_t b = 0; b < p.page_table.batch_size; ++b) {
    check_decode_seq_len(p, b, p.page_table.seq_len(b), where, attention_q_count(p, b));
  }
}

/// The CPU op's check of static quantized-cache scales (host memory; the
/// CUDA launchers cannot read theirs): a NaN, infinite or non-positive
/// scale would make the output 0 or NaN without a word. Per-(token, head)
/// scales come from quantize_append_kv, which only writes valid ones.
inline void check_static_kv_scales(const PagedDecodeParams& p, const char* where) {
  if (!is_quantized_cache_dtype(p.kv_dtype) || p.kv_scale_granularity == ScaleGranularity::kPerTokenHead) return;
  const std::int64_t n = p.kv_scale_granularity == ScaleGranularity::kPerHead ? p.layout.num_heads : 1;
  for (const float* s : {p.k_scale, p.v_scale}) {
    for (std::int64_t i = 0; i < n; ++i) {
      if (!(s[i] > 0.0f && s[i] <= 3.402823466e38f)) {
        fail(where, "argument '", s == p.k_scale ? "k_scale" : "v_scale", "' has ",
             s == p.k_scale ? "k_scale[" : "v_scale[", i, "] = ", s[i], ": expected a finite scale > 0");
      }
    }
  }
}

}  // namespace kvkit::detail
