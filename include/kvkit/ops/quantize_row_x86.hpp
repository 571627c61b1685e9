#pragma once
/// @file quantize_row_x86.hpp
/// AVX2 row kernel for quantize-on-append (float32 / float16 / bfloat16 in,
/// fp8 e4m3 / e5m2 or int8 out), bit-identical to quantize_row
/// (quantize_row.hpp) and so to kvkit::quantize_value. The AVX2 copy of the
/// quantize loops calls it (quantize.hpp, mla_fp8.hpp); baseline and
/// AVX-512 copies keep the compiler-vectorized quantize_row.
///
/// Why by hand: the encoder is compute-bound. GCC's AVX2 vectorization of
/// quantize_row (per-value NaN select then) took about 31 vector
/// instructions per 8 values, register spills from its 4x unrolling
/// included, and on a 2-core Zen 2 VM (2026-12-07) the append ran at a third
/// of memcpy with two threads twice as fast as one. Here each 8 values cost
/// about 16:
/// - NaN is checked once per row (one compare and one OR per 8 values);
///   a row that holds one is patched afterwards, element by element;
/// - bfloat16 is widened by interleaving with zeros (one operation per 8
///   values instead of two); the interleave's lane order is undone for free
///   by the narrowing packs, whose order is the inverse;
/// - the sign bits come from packing the quotients' own bit patterns with
///   signed saturation, 3 packs per 32 values, instead of a shift, mask and
///   OR per 8;
/// - the codes are narrowed to bytes with two saturating packs and one
///   permute per 32 values.
/// Division stays a division: multiplying by 1 / scale would round
/// differently from the scalar rule (and from the CUDA kernel).

#include <cstdint>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/dtype.hpp"
#include "kvkit/core/half.hpp"
#include "kvkit/core/x86_dispatch.hpp"
#include "kvkit/ops/quantize_row.hpp"

#if KVKIT_X86_DISPATCH

#include <immintrin.h>

namespace kvkit::detail {

/// 32 source values as four vectors of 8 floats, exact. `kInterleaved`:
/// whether the lanes come out in the order of _mm256_unpacklo/hi_epi16
/// (bfloat16) rather than in memory order (see bytes_in_memory_order).
template <class Src>
struct Avx2RowSource;

template <>
struct Avx2RowSource<float> {
  static constexpr bool kInterleaved = false;
  __attribute__((target("avx2"))) static void load32(const float* p, __m256 v[4]) {
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(p + 8 * i);
  }
};

template <>
struct Avx2RowSource<half> {
  static constexpr bool kInterleaved = false;
  __attribute__((target("avx2,f16c"))) static void load32(const half* p, __m256 v[4]) {
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * i)));
    }
  }
};

template <>
struct Avx2RowSource<bfloat16> {
  static constexpr bool kInterleaved = true;
  // A bfloat16 is the high half of its float: interleaving zeros below each
  // one gives the float. Lanes come out as [0-3 | 8-11] (lo) and [4-7 |
  // 12-15] (hi) of each 16, the order the packs below put back.
  __attribute__((target("avx2"))) static void load32(const bfloat16* p, __m256 v[4]) {
    const __m256i zero = _mm256_setzero_si256();
    for (int i = 0; i < 2; ++i) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * i));
      v[2 * i] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, x));
      v[2 * i + 1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, x));
    }
  }
};

/// The fp8 code of |v| (encode_fp8_except_nan without the sign) on 8
/// lanes, in [0, 0x7e]: a NaN lane comes out as the largest finite code,
/// and `nan_seen` gets all ones in it. The same steps as
/// float_to_fp8_bits_except_nan and round_magnitude_to_code.
template <DType kCache>
__attribute__((target("avx2"))) KVKIT_FORCEINLINE __m256i fp8_magnitude_code_8(__m256 v, __m256i& nan_seen) {
  using E = Fp8Encoding<kCache>;
  constexpr int kManBits = E::kManBits;
  constexpr std::int32_t kMinNormal = E::kMinNormal, kMaxFinite = E::kMaxFinite;
  const __m256i a = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff));
  nan_seen = _mm256_or_si256(nan_seen, _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7f800000)));
  const __m256i c = _mm256_min_epi32(a, _mm256_set1_epi32(kMaxFinite));
  const __m256i e = _mm256_max_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x7f800000)),
                                     _mm256_set1_epi32(kMinNormal));
  const __m256i m = _mm256_add_epi32(e, _mm256_set1_epi32((23 - kManBits) << 23));
  const __m256i rounded =
      _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(c), _mm256_castsi256_ps(m))), m);
  return _mm256_add_epi32(rounded,
                          _mm256_srli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(kMinNormal)), 23 - kManBits));
}

/// encode_int8 on 8 lanes: clamp to ±127 (NaN -> 0), round to nearest even
/// (the default rounding mode, as encode_int8 assumes), as int32.
__attribute__((target("avx2"))) KVKIT_FORCEINLINE __m256i encode_int8_8(__m256 v) {
  const __m256 ordered = _mm256_cmp_ps(v, v, _CMP_ORD_Q);
  // max_ps returns its second operand for a NaN first one; the mask then zeroes it.
  const __m256 c = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
  return _mm256_cvtps_epi32(_mm256_and_ps(c, ordered));
}

/// Four vectors of int32 to 32 bytes with signed saturation. The packs work
/// within 128-bit halves, so the bytes are not in lane order yet: see
/// bytes_in_memory_order.
__attribute__((target("avx2"))) KVKIT_FORCEINLINE __m256i pack_saturated_32(__m256i c0, __m256i c1, __m256i c2,
                                                                             __m256i c3) {
  return _mm256_packs_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
}

/// pack_saturated_32's bytes of the four vectors that Avx2RowSource::load32
/// filled, put in memory order.
template <bool kInterleaved>
__attribute__((target("avx2"))) KVKIT_FORCEINLINE __m256i bytes_in_memory_order(__m256i b) {
  if constexpr (kInterleaved) {
    // Lanes [0-3|8-11], [4-7|12-15] pack to words [0-7 | 8-15]; bytes are
    // then in 8-byte groups 0, 2, 1, 3.
    return _mm256_permute4x64_epi64(b, 0xd8);
  } else {
    // Memory-order lanes pack to 4-byte groups 0, 2, 4, 6, 1, 3, 5, 7.
    return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }
}

/// out[d] = quantize_value(src[d], scale, kCache) for d < n: 32 values per
/// step, the tail and NaN patching by quantize_row's scalar rules.
template <class Src, DType kCache>
__attribute__((target("avx2,f16c"))) inline void quantize_row_avx2(const Src* __restrict__ src, std::int64_t n,
                                                                    float scale, std::uint8_t* __restrict__ out) {
  using Source = Avx2RowSource<Src>;
  const __m256 divisor = _mm256_set1_ps(scale);
  __m256i nan_seen = _mm256_setzero_si256();
  std::int64_t d = 0;
  for (; d + 32 <= n; d += 32) {
    __m256 v[4];
    Source::load32(src + d, v);
    for (int i = 0; i < 4; ++i) v[i] = _mm256_div_ps(v[i], divisor);
    __m256i bytes;
    if constexpr (kCache == DType::kInt8) {
      bytes =
          pack_saturated_32(encode_int8_8(v[0]), encode_int8_8(v[1]), encode_int8_8(v[2]), encode_int8_8(v[3]));
    } else {
      __m256i code[4];
      for (int i = 0; i < 4; ++i) code[i] = fp8_magnitude_code_8<kCache>(v[i], nan_seen);
      // The sign bit of each byte: a float's pattern as int32 saturates to
      // a negative byte exactly when its sign is set.
      const __m256i sign = pack_saturated_32(_mm256_castps_si256(v[0]), _mm256_castps_si256(v[1]),
                                             _mm256_castps_si256(v[2]), _mm256_castps_si256(v[3]));
      bytes = _mm256_or_si256(pack_saturated_32(code[0], code[1], code[2], code[3]),
                              _mm256_and_si256(sign, _mm256_set1_epi8(char(0x80))));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + d), bytes_in_memory_order<Source::kInterleaved>(bytes));
  }
  if (!_mm256_testz_si256(nan_seen, nan_seen)) patch_nan_codes(src, d, out);
  quantize_row<Src, kCache>(src + d, n - d, scale, out + d);
}

}  // namespace kvkit::detail

#endif  // KVKIT_X86_DISPATCH

namespace kvkit::detail {

/// quantize_row, or quantize_row_avx2 where kAvx2Rows: only in the loops
/// that run_loops_on_widest_isa runs as its AVX2 copy.
template <class Src, DType kCache, bool kAvx2Rows>
KVKIT_FORCEINLINE void quantize_row_for_isa(const Src* src, std::int64_t n, float scale, std::uint8_t* out) {
#if KVKIT_X86_DISPATCH
  if constexpr (kAvx2Rows) return quantize_row_avx2<Src, kCache>(src, n, scale, out);
#endif
  quantize_row<Src, kCache>(src, n, scale, out);
}

}  // namespace kvkit::detail
