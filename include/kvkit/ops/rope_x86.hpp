#pragma once
/// @file rope_x86.hpp
/// AVX2 kernels for RoPE on 16-bit rows, bit-identical to the baseline loop
/// of ops/rope.hpp; rotate_heads picks them through the run-time ISA
/// dispatch (core/x86_dispatch.hpp):
/// - interleaved pairs (dims 2i and 2i + 1: RopeStyle::kGptJ, DeepSeek's
///   q_pe / k_pe) on bfloat16 and float16 rows;
/// - rotate-half pairs (dims i and i + d/2: RopeStyle::kNeox, Llama) on the
///   same types. The compiler vectorizes the baseline loop for these by
///   itself, but without F16C's conversions for float16 (2026-12-06, Zen 4,
///   Llama-3-8B, 8,192 tokens: 19.5 ms -> 3.0 ms) and ~13% slower for
///   bfloat16 (4.6 -> 4.0 ms, medians of 6).
/// float16 goes through F16C, which the dispatch's AVX2 level includes.
///
/// Why a hand-written kernel: for 16-bit rows the baseline loop is compute-bound.
/// Compiled for SSE2 it separates and re-joins the pairs with shuffles and
/// rounds to bfloat16 without SSE4's min/blend/pack: about 30 ns per 64-dim
/// head even in L1 cache, 11 ns here (this machine, 2026-11-23). A
/// compiler-vectorized AVX2 build of the elementwise form below was slower
/// still on large buffers: its 32-byte loads and stores cross a cache line
/// every other time on rows that are only 16-byte aligned (std::vector
/// storage, q_pe inside a 192-wide head), and such split accesses to lines
/// that miss in cache ran about 3x slower. This kernel touches memory 16 bytes
/// at a time.

#include "kvkit/core/x86_dispatch.hpp"

#if KVKIT_X86_DISPATCH

#include <immintrin.h>

#include <cstdint>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/config.hpp"
#include "kvkit/core/half.hpp"
#include "kvkit/ops/rope_math.hpp"

namespace kvkit::detail {

// 8 bfloat16 lanes to floats and back, 16 bytes of memory per access.
__attribute__((target("avx2"))) inline __m256 rope_load8(const bfloat16* x) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
/// float_to_bfloat16_bits on 8 lanes: round to nearest even by adding 0x7fff
/// plus the lowest kept bit, every NaN to the canonical 0x7fff.
__attribute__((target("avx2"))) inline void rope_store8(bfloat16* x, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb);
  rounded = _mm256_srli_epi32(rounded, 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fff), nan);
  // packus works within 128-bit halves; the permute brings both halves' words together.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(x), _mm256_castsi256_si128(packed));
}

// 8 float16 lanes to floats and back with F16C, 16 bytes per access. The
// conversion to float is exact; back, it rounds to nearest even like
// float_to_half_bits, whose canonical NaN (0x7fff) replaces F16C's quieted
// payloads.
__attribute__((target("avx2,f16c"))) inline __m256 rope_load8(const half* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
__attribute__((target("avx2,f16c"))) inline void rope_store8(half* x, __m256 v) {
  const __m128i rounded = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i nan32 = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(nan32), _mm256_extracti128_si256(nan32, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(x), _mm_blendv_epi8(rounded, _mm_set1_epi16(0x7fff), nan16));
}

/// Rotates the first `rotary_dim` dims of `num_heads` rows of `base` (rows
/// head_stride elements apart) by interleaved pairs: pair i = dims (2i, 2i+1)
/// by cos_row[i], sin_row[i] ([rotary_dim / 2] each).
///
/// Each 8-lane chunk is one elementwise step, x' = x * cos_dup +
/// swap_pairs(x) * sin_signed with cos_dup = (c0, c0, c1, c1, ...) and
/// sin_signed = (-s0, s0, -s1, s1, ...); swap_pairs is one in-register lane
/// permute. The results equal rope_rotate's bit for bit: each product is
/// rounded alone (AVX2 has no FMA to contract into), y * (-s) is -(y * s)
/// exactly, and IEEE subtraction is the addition of the negation, so
/// x*c + y*(-s) == x*c - y*s, while y' = y*c + x*s is the same expression.
/// Pairs past the last full chunk go through rope_rotate itself.
/// T: bfloat16 or half.
template <class T>
__attribute__((target("avx2,f16c"))) inline void rotate_heads_interleaved_avx2(T* base, std::int64_t head_stride,
                                                                        int num_heads, int rotary_dim,
                                                                        const float* cos_row,
                                                                        const float* sin_row) {
  // The duplicated table is built per block of pairs so that the stack use
  // stays fixed (2 KiB) for any rotary_dim; one block covers rotary_dim <= 256.
  constexpr int kBlockPairs = 128;
  alignas(32) float cos_dup[2 * kBlockPairs];
  alignas(32) float sin_signed[2 * kBlockPairs];
  const int half = rotary_dim / 2;
  for (int first = 0; first < half; first += kBlockPairs) {
    const int pairs = half - first < kBlockPairs ? half - first : kBlockPairs;
    for (int i = 0; i < pairs; ++i) {
      const float c = cos_row[first + i], s = sin_row[first + i];
      cos_dup[2 * i] = c;
      cos_dup[2 * i + 1] = c;
      sin_signed[2 * i] = -s;
      sin_signed[2 * i + 1] = s;
    }
    const int dims = 2 * pairs, vector_dims = dims & ~7;
    for (int h = 0; h < num_heads; ++h) {
      T* x = base + h * head_stride + 2 * first;
      for (int j = 0; j < vector_dims; j += 8) {
        const __m256 v = rope_load8(x + j);
        const __m256 swapped = _mm256_permute_ps(v, 0xB1);  // lanes (1, 0, 3, 2, ...)
        const __m256 r = _mm256_add_ps(_mm256_mul_ps(v, _mm256_load_ps(cos_dup + j)),
                                       _mm256_mul_ps(swapped, _mm256_load_ps(sin_signed + j)));
        rope_store8(x + j, r);
      }
      for (int j = vector_dims; j < dims; j += 2) {
        float a = to_float(x[j]);
        float b = to_float(x[j + 1]);
        rope_rotate(a, b, cos_row[first + j / 2], sin_row[first + j / 2]);
        x[j] = from_float<T>(a);
        x[j + 1] = from_float<T>(b);
      }
    }
  }
}

/// Rotates the first `rotary_dim` dims of `num_heads` rows of `base` (rows
/// head_stride elements apart) by rotate-half pairs: pair i = dims (i, i + rotary_dim / 2)
/// by cos_row[i], sin_row[i]. Eight pairs per step, each lane exactly
/// rope_rotate (products rounded alone: no FMA in this target). Pairs past
/// the last full chunk go through rope_rotate itself. T: bfloat16 or half.
template <class T>
__attribute__((target("avx2,f16c"))) inline void rotate_heads_neox_avx2(T* base, std::int64_t head_stride,
                                                                 int num_heads, int rotary_dim,
                                                                 const float* cos_row, const float* sin_row) {
  const int half = rotary_dim / 2, vector_pairs = half & ~7;
  for (int h = 0; h < num_heads; ++h) {
    T* x = base + h * head_stride;
    T* y = x + half;
    for (int i = 0; i < vector_pairs; i += 8) {
      const __m256 a = rope_load8(x + i), b = rope_load8(y + i);
      const __m256 c = _mm256_loadu_ps(cos_row + i), s = _mm256_loadu_ps(sin_row + i);
      rope_store8(x + i, _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s)));
      rope_store8(y + i, _mm256_add_ps(_mm256_mul_ps(b, c), _mm256_mul_ps(a, s)));
    }
    for (int i = vector_pairs; i < half; ++i) {
      float a = to_float(x[i]);
      float b = to_float(y[i]);
      rope_rotate(a, b, cos_row[i], sin_row[i]);
      x[i] = from_float<T>(a);
      y[i] = from_float<T>(b);
    }
  }
}

}  // namespace kvkit::detail

#endif  // KVKIT_X86_DISPATCH
