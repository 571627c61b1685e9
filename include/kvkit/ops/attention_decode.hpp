#pragma once
/// @file attention_decode.hpp
/// Decode attention over a paged KV cache on the CPU: MHA, GQA and MQA,
/// q_len >= 1 with causal offsets, sliding window with sinks, logit soft-cap,
/// a key range for split-KV, and the log-sum-exp output that merge_states
/// combines. Each KV head is read once for all of its query heads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/core/half.hpp"
#include "kvkit/core/x86_dispatch.hpp"
#include "kvkit/layout/kv_scales.hpp"
#include "kvkit/layout/latent_fp8_layout.hpp"
#include "kvkit/ops/attention_params.hpp"
#include "kvkit/ops/attention_state.hpp"
#include "kvkit/ops/cpu_vec.hpp"
#include "kvkit/ops/quantize.hpp"

#if KVKIT_X86_DISPATCH
#include <immintrin.h>
#endif

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace kvkit {

namespace detail {

/// Keys per tile: scores of a tile are computed before the softmax rescale,
/// so the rescale costs one pass per tile rather than per key. 16 keys keep
/// the float tiles of 8 kv heads x 128 dims in L1/L2 (measured: 16 read from
/// DRAM ~15% faster than 32, 64 ~20% slower). A multiple of the widest
/// vector's lanes (16).
constexpr int kDecodeTile = 16;

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
  check_argument(p.logit_softcap >= 0.0f, where, "logit_softcap", p.logit_softcap,
                 ">= 0 (0: no soft-cap)");
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
  check_argument(t.seq_lens != nullptr, where, "page_table.seq_lens", t.seq_lens, "a non-null pointer");
  check_argument(t.block_table != nullptr || t.max_blocks == 0, where, "page_table.block_table",
                 t.block_table, "a non-null pointer");
  check_argument(p.q != nullptr, where, "q", p.q, "a non-null pointer");
  check_argument(p.o != nullptr, where, "o", p.o, "a non-null pointer");
  check_argument(p.k_cache != nullptr, where, "k_cache", p.k_cache, "a non-null pointer");
  check_argument(p.v_cache != nullptr, where, "v_cache", p.v_cache, "a non-null pointer");
  check_argument(p.q_stride_head >= head_dim, where, "q_stride_head", p.q_stride_head,
                 ">= head_dim (", head_dim, ")");
  check_argument(p.q_stride_token >= p.num_q_heads * p.q_stride_head || rows == 1, where,
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
  check_argument(p.o_stride_token >= p.num_q_heads * p.o_stride_head || rows == 1, where,
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

/// float(stored) of every byte of a 1-byte cache dtype, built once.
struct ByteDequantTable {
  float value[256];
};
inline const ByteDequantTable& byte_dequant_table(DType t) {
  static const auto make = [](DType dtype) {
    ByteDequantTable table{};
    for (int b = 0; b < 256; ++b) table.value[b] = dequantize_value(std::uint8_t(b), 1.0f, dtype);
    return table;
  };
  static const ByteDequantTable e4m3 = make(DType::kFloat8E4M3);
  static const ByteDequantTable e5m2 = make(DType::kFloat8E5M2);
  static const ByteDequantTable int8 = make(DType::kInt8);
  return t == DType::kFloat8E4M3 ? e4m3 : t == DType::kFloat8E5M2 ? e5m2 : int8;
}

#if KVKIT_X86_DISPATCH
/// float16 -> float with F16C, 8 at a time (exact, like half_bits_to_float).
/// Not inlined: a default-target caller cannot inline an F16C function.
__attribute__((target("avx2,f16c"))) inline void half_row_to_float_f16c(
    const std::uint16_t* src, int n, float* dst) {
  int d = 0;
  for (; d + 8 <= n; d += 8) {
    _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d))));
  }
  for (; d < n; ++d) dst[d] = half_bits_to_float(src[d]);
}
#endif

/// One head row of the cache as float: `n` elements at element offset `off`,
/// times `scale` for the 1-byte dtypes (float(stored) * scale, exactly
/// dequantize_value). kF16C: the caller is built for F16C.
template <DType kKV, bool kF16C, bool kLatentRows = false>
KVKIT_FORCEINLINE void load_cache_row(const void* cache, std::int64_t off, int n, float scale,
                                      const float* byte_table, float* dst) {
  if constexpr (kLatentRows) {
    // FlashMLA's fp8 latent rows (layout/latent_fp8_layout.hpp): e4m3 c_kv
    // with one float scale per 128 values, then bf16 k_pe; `off` in bytes.
    // Equal to mla_fp8_value (one exact float product).
    (void)scale;
    const std::uint8_t* row = static_cast<const std::uint8_t*>(cache) + off;
    const int c_kv = n < MlaFp8Row::kRank ? n : MlaFp8Row::kRank;
    for (int g = 0; g * MlaFp8Row::kGroupSize < c_kv; ++g) {
      const float group_scale = mla_fp8_scale(row, g);
      const int end = std::min(c_kv, (g + 1) * MlaFp8Row::kGroupSize);
      for (int d = g * MlaFp8Row::kGroupSize; d < end; ++d) dst[d] = group_scale * byte_table[row[d]];
    }
    for (int d = c_kv; d < n; ++d) {
      std::uint16_t bits;
      std::memcpy(&bits, row + MlaFp8Row::kRopeOffset + 2 * (d - MlaFp8Row::kRank), 2);
      dst[d] = bits_to_float(std::uint32_t(bits) << 16);
    }
  } else if constexpr (kKV == DType::kFloat32) {
    std::memcpy(dst, static_cast<const float*>(cache) + off, sizeof(float) * std::size_t(n));
  } else if constexpr (kKV == DType::kBFloat16) {
    const auto* src = reinterpret_cast<const std::uint16_t*>(static_cast<const bfloat16*>(cache) + off);
    for (int d = 0; d < n; ++d) dst[d] = bits_to_float(std::uint32_t(src[d]) << 16);
  } else if constexpr (kKV == DType::kFloat16) {
    const auto* src = reinterpret_cast<const std::uint16_t*>(static_cast<const half*>(cache) + off);
#if KVKIT_X86_DISPATCH
    if constexpr (kF16C) {
      half_row_to_float_f16c(src, n, dst);
      return;
    }
#endif
    for (int d = 0; d < n; ++d) dst[d] = half_bits_to_float(src[d]);
  } else {
    const std::uint8_t* src = static_cast<const std::uint8_t*>(cache) + off;
    for (int d = 0; d < n; ++d) dst[d] = byte_table[src[d]] * scale;
  }
}

/// Scores of R query rows against n keys of one kv head, two keys at a time
/// (2R running sums in registers; each q and k load feeds several of them).
/// q: [R, width] (row stride width); keys: [n, width]; scores row stride kDecodeTile.
template <int R, class V>
KVKIT_FORCEINLINE void decode_scores(const PagedDecodeParams& p, const float* q, const float* keys, int n,
                                     int width, float* scores) {
  int j = 0;
  for (; j + 2 <= n; j += 2) {
    const float* k0 = keys + std::size_t(j) * width;
    const float* k1 = k0 + width;
    V a0[R] = {}, a1[R] = {};
    for (int d = 0; d < width; d += kLanes<V>) {
      const V x0 = vec_at<V>(k0 + d), x1 = vec_at<V>(k1 + d);
      for (int i = 0; i < R; ++i) {
        const V qi = vec_at<V>(q + std::size_t(i) * width + d);
        a0[i] += qi * x0;
        a1[i] += qi * x1;
      }
    }
    for (int i = 0; i < R; ++i) {
      scores[i * kDecodeTile + j] = attention_logit(p, vec_sum(a0[i]));
      scores[i * kDecodeTile + j + 1] = attention_logit(p, vec_sum(a1[i]));
    }
  }
  if (j < n) {
    const float* k0 = keys + std::size_t(j) * width;
    V a0[R] = {};
    for (int d = 0; d < width; d += kLanes<V>) {
      const V x0 = vec_at<V>(k0 + d);
      for (int i = 0; i < R; ++i) a0[i] += vec_at<V>(q + std::size_t(i) * width + d) * x0;
    }
    for (int i = 0; i < R; ++i) scores[i * kDecodeTile + j] = attention_logit(p, vec_sum(a0[i]));
  }
}

/// acc[R, width] += weights[R, n] · values[n, width], 16 columns at a time
/// so that the 2R sums stay in registers across the keys.
/// weights row stride kDecodeTile; acc row stride width.
template <int R, class V>
KVKIT_FORCEINLINE void decode_accumulate(const float* weights, const float* values, int n, int width,
                                         float* acc) {
  int d = 0;
  for (; d + 2 * kLanes<V> <= width; d += 2 * kLanes<V>) {
    V a0[R], a1[R];
    for (int i = 0; i < R; ++i) {
      a0[i] = vec_at<V>(acc + std::size_t(i) * width + d);
      a1[i] = vec_at<V>(acc + std::size_t(i) * width + d + kLanes<V>);
    }
    for (int j = 0; j < n; ++j) {
      const float* v = values + std::size_t(j) * width + d;
      const V x0 = vec_at<V>(v), x1 = vec_at<V>(v + kLanes<V>);
      for (int i = 0; i < R; ++i) {
        const float w = weights[i * kDecodeTile + j];
        a0[i] += x0 * w;
        a1[i] += x1 * w;
      }
    }
    for (int i = 0; i < R; ++i) {
      vec_at<V>(acc + std::size_t(i) * width + d) = a0[i];
      vec_at<V>(acc + std::size_t(i) * width + d + kLanes<V>) = a1[i];
    }
  }
  for (; d < width; d += kLanes<V>) {
    V a0[R];
    for (int i = 0; i < R; ++i) a0[i] = vec_at<V>(acc + std::size_t(i) * width + d);
    for (int j = 0; j < n; ++j) {
      const V x0 = vec_at<V>(values + std::size_t(j) * width + d);
      for (int i = 0; i < R; ++i) a0[i] += x0 * weights[i * kDecodeTile + j];
    }
    for (int i = 0; i < R; ++i) vec_at<V>(acc + std::size_t(i) * width + d) = a0[i];
  }
}

/// decode_scores / decode_accumulate over `rows` rows in blocks of at most 4
/// (4 rows x 2 keys or x 16 columns keep 8 of the 16 vector registers busy).
template <class V>
KVKIT_FORCEINLINE void decode_scores_rows(const PagedDecodeParams& p, const float* q, const float* keys, int n,
                                          int width, float* scores, int rows) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    decode_scores<4, V>(p, q + std::size_t(r) * width, keys, n, width, scores + std::size_t(r) * kDecodeTile);
  }
  const float* qr = q + std::size_t(r) * width;
  float* sr = scores + std::size_t(r) * kDecodeTile;
  switch (rows - r) {
    case 3: decode_scores<3, V>(p, qr, keys, n, width, sr); break;
    case 2: decode_scores<2, V>(p, qr, keys, n, width, sr); break;
    case 1: decode_scores<1, V>(p, qr, keys, n, width, sr); break;
    default: break;
  }
}
template <class V>
KVKIT_FORCEINLINE void decode_accumulate_rows(const float* weights, const float* values, int n, int width,
                                              float* acc, int rows) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    decode_accumulate<4, V>(weights + std::size_t(r) * kDecodeTile, values, n, width, acc + std::size_t(r) * width);
  }
  const float* wr = weights + std::size_t(r) * kDecodeTile;
  float* ar = acc + std::size_t(r) * width;
  switch (rows - r) {
    case 3: decode_accumulate<3, V>(wr, values, n, width, ar); break;
    case 2: decode_accumulate<2, V>(wr, values, n, width, ar); break;
    case 1: decode_accumulate<1, V>(wr, values, n, width, ar); break;
    default: break;
  }
}

/// Whether every key in [first, first + n) is visible to the query at q_pos
/// (the common case, which then needs no per-key mask). The keys come from
/// the sequence's key span, so they are inside [kv_begin, kv_end).
KVKIT_FORCEINLINE bool decode_tile_fully_visible(const PagedDecodeParams& p, std::int64_t q_pos,
                                                 std::int64_t first, int n) {
  if (!p.causal) return true;
  const std::int64_t last = first + n - 1;
  if (last > q_pos) return false;
  return p.window <= 0 || first > q_pos - p.window || last < p.num_sinks;
}

/// The scale of (slot, head) in a quantized cache's scale array; 1 for float caches.
KVKIT_FORCEINLINE float kv_scale_at(const PagedDecodeParams& p, const float* scales, std::int64_t slot,
                                    std::int64_t head) {
  return scales != nullptr ? scales[scale_index(p.kv_scale_granularity, slot, head, p.layout.num_heads)] : 1.0f;
}

/// Keys [first, first + n) of one sequence, heads [head_begin, head_begin +
/// heads), as float rows of `width` floats: tile[h][j][0, elements).
template <DType kKV, bool kF16C, bool kLatentRows>
KVKIT_FORCEINLINE void load_kv_tile(const PagedDecodeParams& p, const void* cache, const float* scales,
                                    const std::int32_t* pages, std::int64_t first, int n, int head_begin,
                                    int heads, int elements, const float* byte_table, float* tile, int width) {
  for (int j = 0; j < n; ++j) {
    const std::int64_t slot = token_slot(pages, first + j, p.layout.page_shift);
    for (int h = 0; h < heads; ++h) {
      const std::int64_t head = head_begin + h;
      load_cache_row<kKV, kF16C, kLatentRows>(cache, p.layout.slot_offset(slot, head), elements,
                                 kv_scale_at(p, scales, slot, head), byte_table,
                                 tile + (std::size_t(h) * kDecodeTile + j) * width);
    }
  }
}

/// Asks for the cache lines of keys [first, first + n), heads [head_begin,
/// head_begin + heads), so that the next tile's rows arrive while this one is
/// computed: pages are scattered, so the hardware prefetcher loses the stream
/// at every page boundary.
template <class Storage>
KVKIT_FORCEINLINE void prefetch_kv_tile(const PagedDecodeParams& p, const void* cache, const std::int32_t* pages,
                                        std::int64_t first, int n, int head_begin, int heads, int elements) {
  const auto* base = static_cast<const char*>(cache);
  const std::int64_t row_bytes = std::int64_t(elements) * std::int64_t(sizeof(Storage));
  for (int j = 0; j < n; ++j) {
    const std::int64_t slot = token_slot(pages, first + j, p.layout.page_shift);
    for (int h = 0; h < heads; ++h) {
      const char* row = base + p.layout.slot_offset(slot, head_begin + h) * std::int64_t(sizeof(Storage));
      for (std::int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(row + b);
    }
  }
}

/// One online-softmax step of a query row at q_pos over the tile's n scores
/// (keys first..first+n-1): masks invisible keys, turns the scores into
/// weights exp(s - max) in place (0 beyond n and for masked keys), and
/// rescales the row's accumulator. Returns whether any key had weight.
template <class V>
KVKIT_FORCEINLINE bool decode_softmax_step(const PagedDecodeParams& p, std::int64_t q_pos, std::int64_t first, int n,
                                           float* s, OnlineSoftmax& softmax, float* acc, int v_width) {
  if (!decode_tile_fully_visible(p, q_pos, first, n)) {
    for (int j = 0; j < n; ++j) {
      if (!attention_visible(p, q_pos, first + j)) s[j] = -INFINITY;
    }
  }
  for (int j = n; j < kDecodeTile; ++j) s[j] = -INFINITY;
  float tile_max = -INFINITY;
  for (int j = 0; j < kDecodeTile; ++j) tile_max = s[j] > tile_max ? s[j] : tile_max;
  if (tile_max == -INFINITY) {
    for (int j = 0; j < kDecodeTile; ++j) s[j] = 0.0f;
    return false;
  }
  const float factor = softmax.rescale_for(tile_max);
  const float row_max = softmax.max;
  V sum = {};
  for (int j = 0; j < kDecodeTile; j += kLanes<V>) {
    for (int l = 0; l < kLanes<V>; ++l) s[j + l] = exp_nonpositive(s[j + l] - row_max);
    sum += vec_at<V>(s + j);
  }
  softmax.sum += vec_sum(sum);
  if (factor != 1.0f) {
    for (int d = 0; d < v_width; ++d) acc[d] *= factor;
  }
  return true;
}

/// One work item of the CPU decode: sequence b, kv heads [kv_head_begin,
/// kv_head_end), and of each of their groups the q heads [group_begin,
/// group_end) (q head = kv head * group + index in the group).
struct DecodeWorkItem {
  std::int64_t b = 0;
  int kv_head_begin = 0, kv_head_end = 0;
  int group_begin = 0, group_end = 0;
};

/// Per-thread buffers of the CPU decode, reused across work items.
struct DecodeScratch {
  std::vector<float> floats;
  std::vector<OnlineSoftmax> softmax;
  std::vector<std::int64_t> token_pos;  ///< position of each query token
};

inline int round_up_to_lanes(int n) { return (n + kVecPadLanes - 1) / kVecPadLanes * kVecPadLanes; }

/// All query rows of one sequence for kv heads [kv_head_begin, kv_head_end).
/// Rows are ordered (kv head, token, q head in the group), so that a kv
/// head's rows are contiguous. Per tile of keys: the tile's K rows of every
/// head are converted (dequantized) to float in one pass over the cache (in
/// NHD a token's heads are contiguous, so the cache is read as a stream),
/// scores for all rows, one online-softmax step per row, then the same for V.
/// Head rows are zero-padded to a multiple of 16 floats so that the vector
/// loops need no tails.
template <class QT, DType kKV, bool kF16C, class V, bool kLatentRows>
KVKIT_FORCEINLINE void decode_one_sequence_body(const PagedDecodeParams& p, const DecodeWorkItem& item,
                                                DecodeScratch& scratch) {
  const std::int64_t b = item.b;
  const int kv_head_begin = item.kv_head_begin, kv_head_end = item.kv_head_end;
  const int head_dim = int(p.layout.head_dim);
  const int v_dim = attention_v_dim(p);
  const int k_width = round_up_to_lanes(head_dim);
  const int v_width = round_up_to_lanes(v_dim);
  const int kv_heads = kv_head_end - kv_head_begin;
  // This item's q heads of each kv head: [group_begin, group_begin + group)
  // of the kv head's group_all.
  const int group_all = p.num_q_heads / int(p.layout.num_heads);
  const int group = item.group_end - item.group_begin;
  const int q_len = int(attention_q_count(p, b));
  const int head_rows = q_len * group;
  const int rows = kv_heads * head_rows;
  if (rows == 0) return;
  const std::int64_t q_begin = attention_q_begin(p, b);
  const std::int64_t seq_len = p.page_table.seq_len(b);
  const std::int32_t* pages = p.page_table.pages(b);

  const std::size_t q_floats = std::size_t(rows) * k_width;
  const std::size_t acc_floats = std::size_t(rows) * v_width;
  const std::size_t k_tile_floats = std::size_t(kv_heads) * kDecodeTile * k_width;
  const std::size_t v_tile_floats = std::size_t(kv_heads) * kDecodeTile * v_width;
  scratch.floats.assign(q_floats + acc_floats + k_tile_floats + v_tile_floats + std::size_t(rows) * kDecodeTile,
                        0.0f);
  float* q = scratch.floats.data();       // [rows, k_width]
  float* acc = q + q_floats;              // [rows, v_width]
  float* k_tile = acc + acc_floats;       // [kv_heads, tile, k_width]
  float* v_tile = k_tile + k_tile_floats; // [kv_heads, tile, v_width]
  float* scores = v_tile + v_tile_floats; // [rows, tile]: scores, then softmax weights
  scratch.softmax.assign(std::size_t(rows), OnlineSoftmax{});
  OnlineSoftmax* softmax = scratch.softmax.data();
  scratch.token_pos.resize(std::size_t(q_len));
  std::int64_t* token_pos = scratch.token_pos.data();

  // Row r = (h * q_len + t) * group + g is token q_begin + t, q head
  // (kv_head_begin + h) * group_all + group_begin + g.
  const QT* q_base = static_cast<const QT*>(p.q);
  for (int t = 0; t < q_len; ++t) token_pos[t] = seq_len - q_len + t;
  for (int r = 0; r < rows; ++r) {
    const int h = r / head_rows, t = (r % head_rows) / group, g = r % group;
    const std::int64_t q_head = std::int64_t(kv_head_begin + h) * group_all + item.group_begin + g;
    const QT* src = q_base + (q_begin + t) * p.q_stride_token + q_head * p.q_stride_head;
    for (int d = 0; d < head_dim; ++d) q[std::size_t(r) * k_width + d] = to_float(src[d]);
  }

  using Storage = std::conditional_t<kKV == DType::kFloat32, float,
                                     std::conditional_t<dtype_size(kKV) == 2, std::uint16_t, std::uint8_t>>;
  const float* byte_table = nullptr;
  if constexpr (kKV == DType::kFloat8E4M3 || kKV == DType::kFloat8E5M2 || kKV == DType::kInt8) {
    byte_table = byte_dequant_table(kKV).value;
  }
  // The keys some row may see (the window's gap between sinks and window is
  // skipped), a tile at a time.
  PagedDecodeParams seq_params = p;
  seq_params.q_len = q_len;  // ragged queries: this sequence's count
  const AttentionKeySpan span = attention_key_span(seq_params, seq_len);
  const std::int64_t ranges[2][2] = {{span.begin, span.first_end}, {span.second_begin, span.end}};
  for (const auto& range : ranges) {
    for (std::int64_t first = range[0]; first < range[1]; first += kDecodeTile) {
      const int n = int(std::min<std::int64_t>(kDecodeTile, range[1] - first));
      const std::int64_t next = first + n;
      const int next_n = int(std::min<std::int64_t>(kDecodeTile, range[1] - next));
      load_kv_tile<kKV, kF16C, kLatentRows>(p, p.k_cache, p.k_scale, pages, first, n, kv_head_begin, kv_heads, head_dim,
                               byte_table, k_tile, k_width);
      for (int h = 0; h < kv_heads; ++h) {
        // The next tile's rows of this head, spread over the heads' work so
        // that the requests overlap the math instead of queueing at once.
        if (next_n > 0) {
          prefetch_kv_tile<Storage>(p, p.k_cache, pages, next, next_n, kv_head_begin + h, 1,
                                    kLatentRows ? int(MlaFp8Row::kBytes) : head_dim);
          prefetch_kv_tile<Storage>(p, p.v_cache, pages, next, next_n, kv_head_begin + h, 1, v_dim);
        }
        const std::size_t row0 = std::size_t(h) * head_rows;
        decode_scores_rows<V>(p, q + row0 * k_width, k_tile + std::size_t(h) * kDecodeTile * k_width, n, k_width,
                              scores + row0 * kDecodeTile, head_rows);
      }
      bool any_weight = false;
      for (int r = 0; r < rows; ++r) {
        any_weight |= decode_softmax_step<V>(p, token_pos[(r % head_rows) / group], first, n,
                                             scores + std::size_t(r) * kDecodeTile, softmax[r],
                                             acc + std::size_t(r) * v_width, v_width);
      }
      if (!any_weight) continue;
      load_kv_tile<kKV, kF16C, kLatentRows>(p, p.v_cache, p.v_scale, pages, first, n, kv_head_begin, kv_heads, v_dim,
                               byte_table, v_tile, v_width);
      for (int h = 0; h < kv_heads; ++h) {
        const std::size_t row0 = std::size_t(h) * head_rows;
        decode_accumulate_rows<V>(scores + row0 * kDecodeTile, v_tile + std::size_t(h) * kDecodeTile * v_width, n,
                                  v_width, acc + row0 * v_width, head_rows);
      }
    }
  }

  QT* o_base = static_cast<QT*>(p.o);
  for (int r = 0; r < rows; ++r) {
    const int h = r / head_rows, t = (r % head_rows) / group, g = r % group;
    const std::int64_t token = q_begin + t;
    const std::int64_t q_head = std::int64_t(kv_head_begin + h) * group_all + item.group_begin + g;
    QT* dst = o_base + token * p.o_stride_token + q_head * p.o_stride_head;
    const float inv = softmax[r].sum > 0.0f ? 1.0f / softmax[r].sum : 0.0f;
    for (int d = 0; d < v_dim; ++d) dst[d] = from_float<QT>(acc[std::size_t(r) * v_width + d] * inv);
    if (p.lse != nullptr) p.lse[token * p.num_q_heads + q_head] = softmax[r].lse();
  }
}

#if KVKIT_X86_DISPATCH
/// The same work with AVX2 (8 lanes) or AVX-512 (16 lanes), FMA, and F16C for
/// float16 caches. The lane count sets the order of the float additions, so
/// results differ between ISAs in the last bits (the tests compare every
/// path against float64 with the same tolerances).
template <class QT, DType kKV, bool kLatentRows>
__attribute__((target("avx2,fma,f16c"))) void decode_one_sequence_avx2(const PagedDecodeParams& p,
                                                                       const DecodeWorkItem& item,
                                                                       DecodeScratch& scratch) {
  decode_one_sequence_body<QT, kKV, true, Vec8, kLatentRows>(p, item, scratch);
}
template <class QT, DType kKV, bool kLatentRows>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) void decode_one_sequence_avx512(
    const PagedDecodeParams& p, const DecodeWorkItem& item, DecodeScratch& scratch) {
  decode_one_sequence_body<QT, kKV, true, Vec16, kLatentRows>(p, item, scratch);
}
#endif

template <class QT, DType kKV, bool kLatentRows>
void decode_one_sequence(const PagedDecodeParams& p, const DecodeWorkItem& item, DecodeScratch& scratch) {
#if KVKIT_X86_DISPATCH
  const X86Level level = x86_level();
  if (level == X86Level::kAvx512) return decode_one_sequence_avx512<QT, kKV, kLatentRows>(p, item, scratch);
  if (level == X86Level::kAvx2) return decode_one_sequence_avx2<QT, kKV, kLatentRows>(p, item, scratch);
#endif
  decode_one_sequence_body<QT, kKV, false, Vec8, kLatentRows>(p, item, scratch);
}

/// Runs every work item of a validated call: (sequence, kv heads, q heads
/// of their groups). With fewer sequences than threads the kv heads are split
/// first (each item still reads its heads' part of every key row once), then
/// the q heads of each group (MQA / MLA: one kv head, many q heads; those
/// items read the same keys, which suits their compute-bound case). Threads:
/// OpenMP where the program is built with it (kvkit adds no flags itself),
/// else one.
template <class QT, DType kKV, bool kLatentRows>
void decode_all_sequences(const PagedDecodeParams& p) {
  const std::int64_t batch = p.page_table.batch_size;
  const int kv_heads = int(p.layout.num_heads);
  const int group = p.num_q_heads / kv_heads;
  int threads = 1;
#if defined(_OPENMP)
  threads = omp_get_max_threads();
#endif
  int head_splits = 1, group_splits = 1;
  while (batch * head_splits < threads && head_splits * 2 <= kv_heads) head_splits *= 2;
  while (batch * head_splits * group_splits < threads && group_splits * 2 <= group / 4) group_splits *= 2;
  const std::int64_t splits = std::int64_t(head_splits) * group_splits;
  const std::int64_t items = batch * splits;
#if defined(_OPENMP)
#pragma omp parallel if (items > 1 && threads > 1)
#endif
  {
    DecodeScratch scratch;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
    for (std::int64_t i = 0; i < items; ++i) {
      DecodeWorkItem item;
      item.b = i / splits;
      const int hs = int((i % splits) / group_splits), gs = int(i % group_splits);
      item.kv_head_begin = int(std::int64_t(kv_heads) * hs / head_splits);
      item.kv_head_end = int(std::int64_t(kv_heads) * (hs + 1) / head_splits);
      item.group_begin = int(std::int64_t(group) * gs / group_splits);
      item.group_end = int(std::int64_t(group) * (gs + 1) / group_splits);
      decode_one_sequence<QT, kKV, kLatentRows>(p, item, scratch);
    }
  }
}

}  // namespace detail

/// Decode attention on the CPU (see PagedDecodeParams). Writes o and, if
/// requested, lse for every query row; a row that sees no key (e.g. its keys
/// lie outside [kv_begin, kv_end)) gets o = 0 and lse = −inf, which
/// merge_states treats as empty. Throws kvkit::Error before writing anything
/// on bad input (shapes, strides, page table, dtypes).
inline void paged_decode_attention(const PagedDecodeParams& p) {
  constexpr const char* kWhere = "kvkit::paged_decode_attention";
  detail::validate_decode_params(p, kWhere);
  dispatch_dtype<FloatTypes>(p.q_dtype, kWhere, "q_dtype", [&](auto qtag) {
    detail::dispatch_kv_cache_dtype(p.kv_dtype, kWhere, [&](auto kv_dtype) {
      using QT = typename decltype(qtag)::type;
      constexpr DType kKV = decltype(kv_dtype)::value;
      detail::decode_all_sequences<QT, kKV, false>(p);
    });
  });
}

}  // namespace kvkit
