#pragma once
/// @file attention_cpu_kernels.hpp
/// The building blocks of the CPU decode (attention_decode.hpp), written once
/// over a vector type (cpu_vec.hpp) and always inlined into each ISA's
/// variant: rows read two vectors at a time (bf16 and fp32 in place, other
/// dtypes from tiles converted or dequantized to float), scores of a few
/// query rows against a tile of keys, one online-softmax step per row, and
/// the weighted sum of the values.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/half.hpp"
#include "kvkit/core/prefetch.hpp"
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

/// One head row of the cache as float: `n` elements at element offset `off`
/// (bytes for latent rows), times `scale` for the 1-byte dtypes
/// (float(stored) * scale, exactly dequantize_value). A switch on the dtype
/// per row, so that one tile body serves every cache dtype; each case's loop
/// is branch-free and vectorizes (the fp8 conversions are written for it).
/// kF16C: the caller is built for F16C.
template <bool kF16C>
KVKIT_FORCEINLINE void load_cache_row(DType dtype, bool latent_rows, const void* cache, std::int64_t off, int n,
                                      float scale, float* dst) {
  if (latent_rows) {
    // FlashMLA's fp8 latent rows (layout/latent_fp8_layout.hpp): e4m3 c_kv
    // with one float scale per 128 values, then bf16 k_pe. Equal to
    // mla_fp8_value (one exact float product).
    const std::uint8_t* row = static_cast<const std::uint8_t*>(cache) + off;
    const int c_kv = n < MlaFp8Row::kRank ? n : MlaFp8Row::kRank;
    for (int g = 0; g * MlaFp8Row::kGroupSize < c_kv; ++g) {
      const float group_scale = mla_fp8_scale(row, g);
      const int end = std::min(c_kv, (g + 1) * MlaFp8Row::kGroupSize);
      for (int d = g * MlaFp8Row::kGroupSize; d < end; ++d) dst[d] = group_scale * e4m3_bits_to_float(row[d]);
    }
    for (int d = c_kv; d < n; ++d) {
      std::uint16_t bits;
      std::memcpy(&bits, row + MlaFp8Row::kRopeOffset + 2 * (d - MlaFp8Row::kRank), 2);
      dst[d] = bfloat16_bits_to_float(bits);
    }
    return;
  }
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(dst, static_cast<const float*>(cache) + off, sizeof(float) * std::size_t(n));
      return;
    case DType::kBFloat16: {
      const auto* src = reinterpret_cast<const std::uint16_t*>(static_cast<const bfloat16*>(cache) + off);
      for (int d = 0; d < n; ++d) dst[d] = bfloat16_bits_to_float(src[d]);
      return;
    }
    case DType::kFloat16: {
      const auto* src = reinterpret_cast<const std::uint16_t*>(static_cast<const half*>(cache) + off);
#if KVKIT_X86_DISPATCH
      if constexpr (kF16C) {
        half_row_to_float_f16c(src, n, dst);
        return;
      }
#endif
      for (int d = 0; d < n; ++d) dst[d] = half_bits_to_float(src[d]);
      return;
    }
    case DType::kFloat8E4M3: {
      const std::uint8_t* src = static_cast<const std::uint8_t*>(cache) + off;
      for (int d = 0; d < n; ++d) dst[d] = e4m3_bits_to_float(src[d]) * scale;
      return;
    }
    case DType::kFloat8E5M2: {
      const std::uint8_t* src = static_cast<const std::uint8_t*>(cache) + off;
      for (int d = 0; d < n; ++d) dst[d] = e5m2_bits_to_float(src[d]) * scale;
      return;
    }
    case DType::kInt8: {
      const std::int8_t* src = static_cast<const std::int8_t*>(cache) + off;
      for (int d = 0; d < n; ++d) dst[d] = float(src[d]) * scale;
      return;
    }
    default:
      return;  // validated before
  }
}

/// Elements of a head row per step of the vector loops: two vectors.
template <class V>
inline constexpr int kChunk = 2 * kLanes<V>;

/// Head rows in the CPU decode's scratch (q, accumulators, float tiles) are
/// padded with zeros to a multiple of the widest chunk, so loops need no tails.
inline int round_up_to_chunk(int n) { return (n + 2 * kVecPadLanes - 1) / (2 * kVecPadLanes) * (2 * kVecPadLanes); }

/// Elements [0, kChunk) of a float row as two vectors, in order.
template <class V>
KVKIT_FORCEINLINE void load_chunk(const float* row, V& lo, V& hi) {
  lo = vec_at<V>(row).v;
  hi = vec_at<V>(row + kLanes<V>).v;
}

#if defined(__GNUC__) || defined(__clang__)
/// The CPU decode reads caches in place (no float tile): fp32 and bf16 with
/// the generic loaders here, fp16 / fp8 / int8 with the x86 ones below; see
/// decode_one_sequence_body.
#define KVKIT_CPU_DECODE_READS_IN_PLACE 1
/// Elements [0, kChunk) of a bf16 row (its bits) as two float vectors: the
/// even elements, then the odd ones. A 32-bit lane holds a pair; shifting it
/// left by 16 gives the even one as a float, masking the low half the odd one:
/// two integer operations per 2L elements and no lane shuffles. q and the
/// accumulators are kept in the same order (bf16_chunk_position).
template <class V>
KVKIT_FORCEINLINE void load_chunk(const std::uint16_t* row, V& lo, V& hi) {
  // The row is only 2-byte aligned: read through a packed struct (see UnalignedVec).
  const typename VecBits<V>::type pairs =
      reinterpret_cast<const UnalignedVec<typename VecBits<V>::type>*>(row)->v;
  lo = reinterpret_cast<V>(pairs << 16);
  hi = reinterpret_cast<V>(pairs & 0xFFFF0000u);
}
#else
#define KVKIT_CPU_DECODE_READS_IN_PLACE 0
#endif

#if KVKIT_X86_DISPATCH
/// fp16, fp8 and int8 rows read in place by the AVX2 and AVX-512 decode
/// bodies (F16C converts binary16 exactly; each fp8 byte widens to one):
/// elements [0, kChunk) as two float vectors in order, *without* the cache's
/// scale, which the decode applies to the scores and weights of each key
/// instead (for e4m3 times kE4m3InPlaceFactor).
///
/// Plain `inline`, not always-inline: the helpers that call load_chunk
/// (decode_scores, decode_accumulate_pass) are shared by every ISA and carry
/// no target, and GCC refuses to force a target-specific function into them.
/// Once those helpers are inlined into an AVX2 or AVX-512 body, the compiler
/// inlines these too (checked with nm: no load_chunk remains in the object).
///
/// e4m3's bits s.eeee.mmm placed in a binary16 as s.0eeee.mmm0000000 read as
/// the value times 2^-8 (exponent bias 15 instead of 7), subnormals
/// included, so the decode folds 2^8 into the scale; the NaN code s.1111.111
/// becomes a quiet NaN (e4m3 has no infinities). e5m2 is a binary16's high
/// byte.
///
/// e4m3_half_bits_16: 16 e4m3 bytes as the binary16 bits above, in 16-bit
/// lanes (the AVX2 and AVX-512 loaders both use it): each byte moved to the
/// high byte of its lane by one shuffle (of the 16 bytes loaded into both
/// halves), shifted into place, and the NaN code (magnitude 0x7f) replaced
/// by a quiet NaN; 16-bit lanes do it for 16 elements at once.
__attribute__((target("avx2,f16c"))) KVKIT_FORCEINLINE __m256i e4m3_half_bits_16(const float8_e4m3* row) {
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
  // Lane i of each 128-bit half takes byte i (low half) or 8 + i (high half); -128 zeroes the low byte.
  const __m256i to_high_bytes = _mm256_setr_epi8(-128, 0, -128, 1, -128, 2, -128, 3, -128, 4, -128, 5, -128, 6, -128, 7,
                                                 -128, 8, -128, 9, -128, 10, -128, 11, -128, 12, -128, 13, -128, 14, -128, 15);
  const __m256i words = _mm256_shuffle_epi8(bytes, to_high_bytes);  // s.eeee.mmm.00000000
  // >> 1 (arithmetic) = s.s.eeee.mmm.0000000; clear the copy of s.
  const __m256i half_bits = _mm256_and_si256(_mm256_srai_epi16(words, 1), _mm256_set1_epi16(std::int16_t(0xbf80)));
  const __m256i is_nan = _mm256_cmpeq_epi16(_mm256_and_si256(words, _mm256_set1_epi16(0x7f00)), _mm256_set1_epi16(0x7f00));
  return _mm256_blendv_epi8(half_bits, _mm256_set1_epi16(0x7e00), is_nan);
}
__attribute__((target("avx2,f16c"))) inline void load_chunk(const half* row, Vec8& lo, Vec8& hi) {
  lo = (Vec8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
  hi = (Vec8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 8)));
}
__attribute__((target("avx2,f16c"))) inline void load_chunk(const float8_e5m2* row, Vec8& lo, Vec8& hi) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
  lo = (Vec8)_mm256_cvtph_ps(_mm_unpacklo_epi8(_mm_setzero_si128(), bytes));
  hi = (Vec8)_mm256_cvtph_ps(_mm_unpackhi_epi8(_mm_setzero_si128(), bytes));
}
__attribute__((target("avx2,f16c"))) inline void load_chunk(const float8_e4m3* row, Vec8& lo, Vec8& hi) {
  const __m256i half_bits = e4m3_half_bits_16(row);
  lo = (Vec8)_mm256_cvtph_ps(_mm256_castsi256_si128(half_bits));
  hi = (Vec8)_mm256_cvtph_ps(_mm256_extracti128_si256(half_bits, 1));
}
__attribute__((target("avx2,f16c"))) inline void load_chunk(const std::int8_t* row, Vec8& lo, Vec8& hi) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
  lo = (Vec8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
  hi = (Vec8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
}

#define KVKIT_AVX512_ROWS_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c"
/// _mm512_cvtph_ps without its undefined pass-through vector, which GCC 12
/// reports as maybe-uninitialized once inlined.
__attribute__((target(KVKIT_AVX512_ROWS_TARGET))) KVKIT_FORCEINLINE __m512 cvtph_ps_512(__m256i half_bits) {
  return _mm512_maskz_cvtph_ps(__mmask16(0xffff), half_bits);
}
__attribute__((target(KVKIT_AVX512_ROWS_TARGET))) inline void load_chunk(const half* row, Vec16& lo, Vec16& hi) {
  lo = (Vec16)cvtph_ps_512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)));
  hi = (Vec16)cvtph_ps_512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16)));
}
__attribute__((target(KVKIT_AVX512_ROWS_TARGET))) inline void load_chunk(const float8_e5m2* row, Vec16& lo,
                                                                         Vec16& hi) {
  const __m256i words = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row))), 8);
  const __m256i words_hi =
      _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16))), 8);
  lo = (Vec16)cvtph_ps_512(words);
  hi = (Vec16)cvtph_ps_512(words_hi);
}
__attribute__((target(KVKIT_AVX512_ROWS_TARGET))) inline void load_chunk(const float8_e4m3* row, Vec16& lo,
                                                                         Vec16& hi) {
  lo = (Vec16)cvtph_ps_512(e4m3_half_bits_16(row));
  hi = (Vec16)cvtph_ps_512(e4m3_half_bits_16(row + 16));
}
__attribute__((target(KVKIT_AVX512_ROWS_TARGET))) inline void load_chunk(const std::int8_t* row, Vec16& lo,
                                                                         Vec16& hi) {
  // (maskz forms: the plain ones pass an undefined vector GCC 12 warns about, as cvtph_ps_512.)
  const __mmask16 all = 0xffff;
  lo = (Vec16)_mm512_maskz_cvtepi32_ps(
      all, _mm512_maskz_cvtepi8_epi32(all, _mm_loadu_si128(reinterpret_cast<const __m128i*>(row))));
  hi = (Vec16)_mm512_maskz_cvtepi32_ps(
      all, _mm512_maskz_cvtepi8_epi32(all, _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16))));
}
#endif

/// What load_chunk's in-place e4m3 values are multiplied by to give
/// float(stored) (see above); the other dtypes' values are float(stored).
constexpr float kE4m3InPlaceFactor = 256.0f;

/// Where element d of a row sits in the order load_chunk gives it: in place
/// for float rows; evens then odds within each chunk for bf16 rows.
template <class Elem, class V>
KVKIT_FORCEINLINE int chunk_position(int d) {
  if constexpr (std::is_same_v<Elem, std::uint16_t>) {
    const int e = d % kChunk<V>;
    return d - e + (e & 1) * kLanes<V> + e / 2;
  } else {
    return d;
  }
}

/// Asks for the cache lines of kBytes bytes at p (a whole number of lines
/// when p is line-aligned).
template <std::size_t kBytes>
KVKIT_FORCEINLINE void prefetch_bytes(const void* p) {
  const char* c = static_cast<const char*>(p);
  for (std::size_t b = 0; b < kBytes; b += 64) prefetch_line(c + b);
}

/// The 2R dot products of 4 rows x 2 keys (a0: key 0, a1: key 1) summed
/// across lanes together, by halving shuffles (a few operations per sum
/// instead of a full reduction each): out = r0k0 r0k1 r1k0 r1k1 ... r3k1.
#if defined(__GNUC__) || defined(__clang__)
KVKIT_FORCEINLINE void fold_4x2(const Vec16 (&a0)[4], const Vec16 (&a1)[4], float* out) {
  Vec16 b[4];
  for (int i = 0; i < 4; ++i) {
    b[i] = __builtin_shufflevector(a0[i], a1[i], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a0[i], a1[i], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  Vec16 c[2];
  for (int i = 0; i < 2; ++i) {
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  const Vec16 d = __builtin_shufflevector(c[0], c[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
                  __builtin_shufflevector(c[0], c[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  vec_at<Vec8>(out).v = __builtin_shufflevector(d, d, 0, 2, 4, 6, 8, 10, 12, 14) +
                      __builtin_shufflevector(d, d, 1, 3, 5, 7, 9, 11, 13, 15);
}
KVKIT_FORCEINLINE void fold_4x2(const Vec8 (&a0)[4], const Vec8 (&a1)[4], float* out) {
  Vec8 b[4];
  for (int i = 0; i < 4; ++i) {
    b[i] = __builtin_shufflevector(a0[i], a1[i], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(a0[i], a1[i], 4, 5, 6, 7, 12, 13, 14, 15);
  }
  Vec8 c[2];
  for (int i = 0; i < 2; ++i) {
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  }
  vec_at<Vec8>(out).v = __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14) +
                      __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15);
}
#endif

/// Scores of R query rows against the n key rows `keys[j] + offset` of one
/// kv head (the row pointers are a tile's, the offset picks the head), two
/// keys at a time (2R running sums in registers; each q and k load feeds
/// several of them), over `len` elements (a multiple of kChunk). q: [R,
/// q_stride] in load_chunk's order; scores: q·k before attention_logit
/// (decode_softmax_step applies it a tile at a time), row stride
/// kDecodeTile. Before a pair of keys is read, the same keys of the next
/// tile (`next`, when not null) are prefetched: pages are scattered, so the
/// hardware prefetcher loses the stream at every page, and requests spread
/// over the math overlap it instead of queueing at once.
template <int R, class V, class Elem>
KVKIT_FORCEINLINE void decode_scores(const float* q, int q_stride, const Elem* const* keys,
                                     const Elem* const* next, std::int64_t offset, int n, int len,
                                     float* scores) {
  int j = 0;
  for (; j + 2 <= n; j += 2) {
    const Elem* k0 = keys[j] + offset;
    const Elem* k1 = keys[j + 1] + offset;
    if (next != nullptr) {
      // Before the math, not inside its loop: measured 20% faster.
      for (int d = 0; d < len; d += kChunk<V>) {
        prefetch_bytes<kChunk<V> * sizeof(Elem)>(next[j] + offset + d);
        prefetch_bytes<kChunk<V> * sizeof(Elem)>(next[j + 1] + offset + d);
      }
    }
    V a0[R] = {}, a1[R] = {};
    for (int d = 0; d < len; d += kChunk<V>) {
      V x0, y0, x1, y1;
      load_chunk(k0 + d, x0, y0);
      load_chunk(k1 + d, x1, y1);
      for (int i = 0; i < R; ++i) {
        const V qa = vec_at<V>(q + std::size_t(i) * q_stride + d).v;
        const V qb = vec_at<V>(q + std::size_t(i) * q_stride + d + kLanes<V>).v;
        a0[i] += qa * x0;
        a1[i] += qa * x1;
        a0[i] += qb * y0;
        a1[i] += qb * y1;
      }
    }
#if defined(__GNUC__) || defined(__clang__)
    if constexpr (R == 4 && kLanes<V> >= 8) {
      float sums[8];
      fold_4x2(a0, a1, sums);
      for (int i = 0; i < 4; ++i) {
        scores[i * kDecodeTile + j] = sums[2 * i];
        scores[i * kDecodeTile + j + 1] = sums[2 * i + 1];
      }
      continue;
    }
#endif
    for (int i = 0; i < R; ++i) {
      scores[i * kDecodeTile + j] = vec_sum(a0[i]);
      scores[i * kDecodeTile + j + 1] = vec_sum(a1[i]);
    }
  }
  if (j < n) {
    const Elem* k0 = keys[j] + offset;
    if (next != nullptr) {
      for (int d = 0; d < len; d += kChunk<V>) prefetch_bytes<kChunk<V> * sizeof(Elem)>(next[j] + offset + d);
    }
    V a0[R] = {};
    for (int d = 0; d < len; d += kChunk<V>) {
      V x0, y0;
      load_chunk(k0 + d, x0, y0);
      for (int i = 0; i < R; ++i) {
        a0[i] += vec_at<V>(q + std::size_t(i) * q_stride + d).v * x0;
        a0[i] += vec_at<V>(q + std::size_t(i) * q_stride + d + kLanes<V>).v * y0;
      }
    }
    for (int i = 0; i < R; ++i) scores[i * kDecodeTile + j] = vec_sum(a0[i]);
  }
}

#if KVKIT_X86_DISPATCH
/// The target of the decode variant for CPUs with AVX512-BF16.
#define KVKIT_AVX512_BF16_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16"

/// decode_scores for bf16 query rows against a bf16 cache read in place,
/// with AVX512-BF16: one vdpbf16ps multiplies 16 pairs of bf16 (exact
/// products) and adds them to 16 float sums, twice the multiply-adds of an
/// fp32 FMA and no conversion of the key rows. q: [R, q_stride] bf16 bits in
/// the row's own order; len a multiple of 32. Only for q already in bf16:
/// rounding an fp32 q to bf16 would lose precision the fp32 path keeps.
/// The instruction treats subnormal inputs as zero (|x| < 2^-126, far below
/// anything a score depends on).
template <int R>
__attribute__((target(KVKIT_AVX512_BF16_TARGET))) inline void decode_scores_bf16_pairs(
    const std::uint16_t* q, int q_stride, const std::uint16_t* const* keys, const std::uint16_t* const* next,
    std::int64_t offset, int n, int len, float* scores) {
  int j = 0;
  for (; j + 2 <= n; j += 2) {
    const std::uint16_t* k0 = keys[j] + offset;
    const std::uint16_t* k1 = keys[j + 1] + offset;
    if (next != nullptr) {
      for (int d = 0; d < len; d += 32) {
        prefetch_line(next[j] + offset + d);
        prefetch_line(next[j + 1] + offset + d);
      }
    }
    Vec16 a0[R] = {}, a1[R] = {};
    for (int d = 0; d < len; d += 32) {
      // (A lambda for these loads would not inherit the function's target.)
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(k0 + d);
      const __m512bh x1 = (__m512bh)_mm512_loadu_si512(k1 + d);
      for (int i = 0; i < R; ++i) {
        const __m512bh qi = (__m512bh)_mm512_loadu_si512(q + std::size_t(i) * q_stride + d);
        a0[i] = (Vec16)_mm512_dpbf16_ps((__m512)a0[i], qi, x0);
        a1[i] = (Vec16)_mm512_dpbf16_ps((__m512)a1[i], qi, x1);
      }
    }
    if constexpr (R == 4) {
      float sums[8];
      fold_4x2(a0, a1, sums);
      for (int i = 0; i < 4; ++i) {
        scores[i * kDecodeTile + j] = sums[2 * i];
        scores[i * kDecodeTile + j + 1] = sums[2 * i + 1];
      }
    } else {
      for (int i = 0; i < R; ++i) {
        scores[i * kDecodeTile + j] = vec_sum(a0[i]);
        scores[i * kDecodeTile + j + 1] = vec_sum(a1[i]);
      }
    }
  }
  if (j < n) {
    const std::uint16_t* k0 = keys[j] + offset;
    if (next != nullptr) {
      for (int d = 0; d < len; d += 32) prefetch_line(next[j] + offset + d);
    }
    Vec16 a0[R] = {};
    for (int d = 0; d < len; d += 32) {
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(k0 + d);
      for (int i = 0; i < R; ++i) {
        const __m512bh qi = (__m512bh)_mm512_loadu_si512(q + std::size_t(i) * q_stride + d);
        a0[i] = (Vec16)_mm512_dpbf16_ps((__m512)a0[i], qi, x0);
      }
    }
    for (int i = 0; i < R; ++i) scores[i * kDecodeTile + j] = vec_sum(a0[i]);
  }
}

/// decode_scores_bf16_pairs over `rows` rows in blocks of at most 4 (one
/// call per tile and kv head: the caller is not built for AVX512-BF16).
__attribute__((target(KVKIT_AVX512_BF16_TARGET))) inline void decode_scores_bf16_rows(
    const std::uint16_t* q, int q_stride, const std::uint16_t* const* keys, const std::uint16_t* const* next,
    std::int64_t offset, int n, int len, float* scores, int rows) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    decode_scores_bf16_pairs<4>(q + std::size_t(r) * q_stride, q_stride, keys, next, offset, n, len,
                                scores + std::size_t(r) * kDecodeTile);
    next = nullptr;  // once per tile
  }
  const std::uint16_t* qr = q + std::size_t(r) * q_stride;
  float* sr = scores + std::size_t(r) * kDecodeTile;
  switch (rows - r) {
    case 3: decode_scores_bf16_pairs<3>(qr, q_stride, keys, next, offset, n, len, sr); break;
    case 2: decode_scores_bf16_pairs<2>(qr, q_stride, keys, next, offset, n, len, sr); break;
    case 1: decode_scores_bf16_pairs<1>(qr, q_stride, keys, next, offset, n, len, sr); break;
    default: break;
  }
}
#endif

/// acc[R, cols d0 .. d0 + P chunks) += weights[R, n] · values[n][same cols],
/// keeping the 2PR sums in registers across the keys; prefetches the same
/// columns of the next tile's rows (see decode_scores).
template <int R, int P, class V, class Elem>
KVKIT_FORCEINLINE void decode_accumulate_pass(const float* weights, const Elem* const* values,
                                              const Elem* const* next, std::int64_t offset, int n, int d0,
                                              float* acc, int acc_stride) {
  constexpr int kVecs = 2 * P;
  V a[R][kVecs];
  for (int i = 0; i < R; ++i) {
    for (int u = 0; u < kVecs; ++u) a[i][u] = vec_at<V>(acc + std::size_t(i) * acc_stride + d0 + u * kLanes<V>).v;
  }
  for (int j = 0; j < n; ++j) {
    const Elem* row = values[j] + offset + d0;
    if (next != nullptr) prefetch_bytes<P * kChunk<V> * sizeof(Elem)>(next[j] + offset + d0);
    V x[kVecs];
    for (int c = 0; c < P; ++c) load_chunk(row + c * kChunk<V>, x[2 * c], x[2 * c + 1]);
    for (int i = 0; i < R; ++i) {
      const float w = weights[i * kDecodeTile + j];
      for (int u = 0; u < kVecs; ++u) a[i][u] += x[u] * w;
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int u = 0; u < kVecs; ++u) vec_at<V>(acc + std::size_t(i) * acc_stride + d0 + u * kLanes<V>).v = a[i][u];
  }
}

/// acc[R, 0 .. len) += weights[R, n] · values[n, 0 .. len), len a multiple
/// of kChunk: two chunks per pass where the registers allow (16 lanes).
template <int R, class V, class Elem>
KVKIT_FORCEINLINE void decode_accumulate(const float* weights, const Elem* const* values, const Elem* const* next,
                                         std::int64_t offset, int n, int len, float* acc, int acc_stride) {
  constexpr int P = kLanes<V> == 16 ? 2 : 1;
  int d = 0;
  for (; d + P * kChunk<V> <= len; d += P * kChunk<V>) {
    decode_accumulate_pass<R, P, V>(weights, values, next, offset, n, d, acc, acc_stride);
  }
  for (; d < len; d += kChunk<V>) decode_accumulate_pass<R, 1, V>(weights, values, next, offset, n, d, acc, acc_stride);
}

/// decode_scores / decode_accumulate over `rows` rows in blocks of at most 4.
template <class V, class Elem>
KVKIT_FORCEINLINE void decode_scores_rows(const float* q, int q_stride, const Elem* const* keys,
                                          const Elem* const* next, std::int64_t offset, int n, int len,
                                          float* scores, int rows) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    decode_scores<4, V>(q + std::size_t(r) * q_stride, q_stride, keys, next, offset, n, len,
                        scores + std::size_t(r) * kDecodeTile);
    next = nullptr;  // once per tile
  }
  const float* qr = q + std::size_t(r) * q_stride;
  float* sr = scores + std::size_t(r) * kDecodeTile;
  switch (rows - r) {
    case 3: decode_scores<3, V>(qr, q_stride, keys, next, offset, n, len, sr); break;
    case 2: decode_scores<2, V>(qr, q_stride, keys, next, offset, n, len, sr); break;
    case 1: decode_scores<1, V>(qr, q_stride, keys, next, offset, n, len, sr); break;
    default: break;
  }
}
template <class V, class Elem>
KVKIT_FORCEINLINE void decode_accumulate_rows(const float* weights, const Elem* const* values, const Elem* const* next,
                                              std::int64_t offset, int n, int len, float* acc, int acc_stride,
                                              int rows) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    decode_accumulate<4, V>(weights + std::size_t(r) * kDecodeTile, values, next, offset, n, len,
                            acc + std::size_t(r) * acc_stride, acc_stride);
    next = nullptr;
  }
  const float* wr = weights + std::size_t(r) * kDecodeTile;
  float* ar = acc + std::size_t(r) * acc_stride;
  switch (rows - r) {
    case 3: decode_accumulate<3, V>(wr, values, next, offset, n, len, ar, acc_stride); break;
    case 2: decode_accumulate<2, V>(wr, values, next, offset, n, len, ar, acc_stride); break;
    case 1: decode_accumulate<1, V>(wr, values, next, offset, n, len, ar, acc_stride); break;
    default: break;
  }
}

/// The scale of (slot, head) in a quantized cache's scale array; 1 for float caches.
KVKIT_FORCEINLINE float kv_scale_at(const PagedDecodeParams& p, const float* scales, std::int64_t slot,
                                    std::int64_t head) {
  return scales != nullptr ? scales[scale_index(p.kv_scale_granularity, slot, head, p.layout.num_heads)] : 1.0f;
}

/// Keys [first, first + n) of one sequence, one kv head, as float rows of
/// `width` floats: tile[j][0, elements) (the rest stays zero).
template <bool kF16C>
KVKIT_FORCEINLINE void load_kv_head_tile(const PagedDecodeParams& p, const void* cache, const float* scales,
                                         bool latent_rows, const std::int32_t* pages, std::int64_t first, int n,
                                         int head, int elements, float* tile, int width) {
  for (int j = 0; j < n; ++j) {
    const std::int64_t slot = token_slot(pages, first + j, p.layout.page_shift);
    const std::int64_t off = p.layout.slot_offset(slot, head);
    load_cache_row<kF16C>(p.kv_dtype, latent_rows, cache, off, elements, kv_scale_at(p, scales, slot, head),
                          tile + std::size_t(j) * width);
  }
}

/// Asks for the cache lines of one kv head's rows (row_bytes each) of keys
/// [first, first + n), so that the next tile's rows arrive while this one is
/// computed: pages are scattered, so the hardware prefetcher loses the stream
/// at every page boundary.
KVKIT_FORCEINLINE void prefetch_kv_tile(const PagedDecodeParams& p, const void* cache, const std::int32_t* pages,
                                        std::int64_t first, int n, int head, std::int64_t row_bytes) {
  const auto* base = static_cast<const char*>(cache);
  const std::int64_t elem_bytes = std::int64_t(dtype_size(p.kv_dtype));
  for (int j = 0; j < n; ++j) {
    const std::int64_t slot = token_slot(pages, first + j, p.layout.page_shift);
    const char* row = base + p.layout.slot_offset(slot, head) * elem_bytes;
    for (std::int64_t b = 0; b < row_bytes; b += 64) prefetch_line(row + b);
  }
}

/// One online-softmax step of a query row at q_pos over the tile's n dot
/// products (keys first..first+n-1): turns them into logits
/// (attention_logit), masks invisible keys, turns the logits into weights
/// exp(s - max) in place (0 beyond n and for masked keys), and rescales the
/// row's accumulator. Returns whether any key had weight.
template <class V>
KVKIT_FORCEINLINE bool decode_softmax_step(const PagedDecodeParams& p, std::int64_t q_pos, std::int64_t first, int n,
                                           float* s, OnlineSoftmax& softmax, float* acc, int v_width) {
  static_assert(kDecodeTile % kLanes<V> == 0, "a tile is whole vectors");
  if (p.logit_softcap > 0.0f) {
    for (int j = 0; j < n; ++j) s[j] = attention_logit(p, s[j]);
  } else {
    const float scale = p.sm_scale;
    for (int j = 0; j < kDecodeTile; j += kLanes<V>) vec_at<V>(s + j).v *= scale;
  }
  if (!attention_keys_all_visible(p, q_pos, q_pos, first, first + n - 1)) {
    for (int j = 0; j < n; ++j) {
      if (!attention_visible(p, q_pos, first + j)) s[j] = -INFINITY;
    }
  }
  for (int j = n; j < kDecodeTile; ++j) s[j] = -INFINITY;
  V m = vec_at<V>(s).v;
  for (int j = kLanes<V>; j < kDecodeTile; j += kLanes<V>) {
    const V x = vec_at<V>(s + j).v;  // a copy: a V& bound to the member would promise V's alignment
    vec_max_into(m, x);
  }
  const float tile_max = vec_max(m);
  if (tile_max == -INFINITY) {
    for (int j = 0; j < kDecodeTile; ++j) s[j] = 0.0f;
    return false;
  }
  const float factor = softmax.rescale_for(tile_max);
  const float row_max = softmax.max;
  V sum = {};
  for (int j = 0; j < kDecodeTile; j += kLanes<V>) {
#if defined(__GNUC__) || defined(__clang__)
    exp_nonpositive_in_place<V>(s + j, row_max);
#else
    for (int l = 0; l < kLanes<V>; ++l) s[j + l] = exp_nonpositive(s[j + l] - row_max);
#endif
    sum += vec_at<V>(s + j).v;
  }
  softmax.sum += vec_sum(sum);
  if (factor != 1.0f) {
    for (int d = 0; d < v_width; d += kLanes<V>) vec_at<V>(acc + d).v *= factor;
  }
  return true;
}

}  // namespace kvkit::detail
