#pragma once
/// @file attention_cpu_kernels.hpp
/// The building blocks of the CPU decode (attention_decode.hpp), written once
/// over a vector type (cpu_vec.hpp) and always inlined into each ISA's
/// variant: tiles of cache rows converted (dequantized) to float, scores of
/// a few query rows against a tile, one online-softmax step per row, and the
/// weighted sum of the values.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/half.hpp"
#include "kvkit/core/x86_dispatch.hpp"
#include "kvkit/layout/kv_scales.hpp"
#include "kvkit/layout/latent_fp8_layout.hpp"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/ops/attention_params.hpp"
#include "kvkit/ops/attention_state.hpp"
#include "kvkit/ops/cpu_vec.hpp"
#include "kvkit/ops/quantize.hpp"

#if KVKIT_X86_DISPATCH
#include <immintrin.h>
#endif

namespace kvkit::detail {

/// Keys per tile: scores of a tile are computed before the softmax rescale,
/// so the rescale costs one pass per tile rather than per key. 16 keys keep
/// the float tiles of 8 kv heads x 128 dims in L1/L2 (measured: 16 read from
/// DRAM ~15% faster than 32, 64 ~20% slower). A multiple of the widest
/// vector's lanes (16).
constexpr int kDecodeTile = 16;

inline int round_up_to_lanes(int n) { return (n + kVecPadLanes - 1) / kVecPadLanes * kVecPadLanes; }
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
      dst[d] = bfloat16_bits_to_float(bits);
    }
  } else if constexpr (kKV == DType::kFloat32) {
    std::memcpy(dst, static_cast<const float*>(cache) + off, sizeof(float) * std::size_t(n));
  } else if constexpr (kKV == DType::kBFloat16) {
    const auto* src = reinterpret_cast<const std::uint16_t*>(static_cast<const bfloat16*>(cache) + off);
    for (int d = 0; d < n; ++d) dst[d] = bfloat16_bits_to_float(src[d]);
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
  if (!attention_keys_all_visible(p, q_pos, q_pos, first, first + n - 1)) {
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

}  // namespace kvkit::detail
