#pragma once
/// @file quantize_row.hpp
/// Host row kernels behind kvkit::quantize_append_kv: one head row
/// [head_dim] of float32 / float16 / bfloat16 in, fp8 e4m3 / e5m2 / int8
/// bytes out. Every step is written without data-dependent branches (selects
/// on integer bit patterns, float rounding done by the FPU with magic
/// constants), so that the compiler vectorizes the loops over head_dim; the
/// results equal kvkit::quantize_value, fold_amax and the element types'
/// conversions bit for bit (tests/test_layout_quantize_fast.cpp compares them
/// over a sweep of float bit patterns).
///
/// Assumes the default floating-point environment (round to nearest even;
/// flush-to-zero and denormals-are-zero off), as the scalar rules do.

#include <cstdint>
#include <type_traits>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/bits.hpp"
#include "kvkit/core/config.hpp"
#include "kvkit/core/dtype.hpp"
#include "kvkit/core/float8.hpp"
#include "kvkit/core/half.hpp"
#include "kvkit/core/x86_dispatch.hpp"

/// KVKIT_QUANTIZE_X86_DISPATCH: 1 where quantize_append_kv also compiles its
/// loop for AVX2 and AVX-512 and picks one at run time (see
/// core/x86_dispatch.hpp; defaults to KVKIT_X86_DISPATCH). Define it to 0 to disable.
#ifndef KVKIT_QUANTIZE_X86_DISPATCH
#define KVKIT_QUANTIZE_X86_DISPATCH KVKIT_X86_DISPATCH
#endif

namespace kvkit::detail {

/// All ones when x < y, else 0, for x and y in [0, 2^31) (patterns of |x|):
/// the sign of the difference, spread by an arithmetic shift.
KVKIT_FORCEINLINE std::int32_t mask_less(std::int32_t x, std::int32_t y) { return (x - y) >> 31; }

/// mask ? x : y, bitwise. Selects are written as masks because compilers
/// keep a ternary whose operands involve float operations as a branch (they
/// may trap under the default -ftrapping-math) and then do not vectorize.
KVKIT_FORCEINLINE std::int32_t blend(std::int32_t mask, std::int32_t x, std::int32_t y) {
  return (x & mask) | (y & ~mask);
}

/// Source element -> float, exact (the element types' host conversions are
/// branch-free, so these vectorize).
KVKIT_FORCEINLINE float load_source(float v) { return v; }
KVKIT_FORCEINLINE float load_source(bfloat16 v) { return bits_to_float(std::uint32_t(v.bits) << 16); }
KVKIT_FORCEINLINE float load_source(half v) { return half_bits_to_float(v.bits); }

/// The branch-free encoder constants (core/float8.hpp) of an fp8 cache dtype.
template <DType kCache>
using Fp8Encoding = std::conditional_t<kCache == DType::kFloat8E4M3, E4m3Encoding, E5m2Encoding>;

/// float -> fp8 bits, saturating (float_to_e4m3_bits / float_to_e5m2_bits,
/// Saturation::kFinite).
template <DType kCache>
KVKIT_FORCEINLINE std::int32_t encode_fp8(float v) {
  return float_to_fp8_bits_branchless<Fp8Encoding<kCache>>(v);
}

/// encode_fp8 except for NaN, which comes out as the largest finite code
/// (loops that check for NaN once per row).
template <DType kCache>
KVKIT_FORCEINLINE std::int32_t encode_fp8_except_nan(float v) {
  return float_to_fp8_bits_except_nan<Fp8Encoding<kCache>>(v);
}

/// float -> e4m3 bits, saturating to ±448.
KVKIT_FORCEINLINE std::int32_t encode_e4m3(float v) { return encode_fp8<DType::kFloat8E4M3>(v); }

/// float -> e5m2 bits, saturating to ±57344.
KVKIT_FORCEINLINE std::int32_t encode_e5m2(float v) { return encode_fp8<DType::kFloat8E5M2>(v); }

/// float -> int8 (as a byte): clamp to ±127, round to nearest even, NaN -> 0.
KVKIT_FORCEINLINE std::int32_t encode_int8(float v) {
  const std::uint32_t x = float_to_bits(v);
  const auto a = std::int32_t(x & 0x7fffffffu);
  // Clamp |v| to 127 on the bit pattern (inf and NaN too; NaN is replaced below).
  const std::int32_t c = a < 0x42fe0000 ? a : 0x42fe0000;
  const float clamped = bits_to_float((x & 0x80000000u) | std::uint32_t(c));
  // Adding 1.5 * 2^23 (float ulp 1) rounds to an integer, nearest even; the
  // integer is then the low bits of the sum's pattern.
  return ~mask_less(0x7f800000, a) & (std::int32_t(float_to_bits(clamped + 12582912.0f)) - 0x4b400000);
}

/// Encoder for a cache dtype, chosen at compile time.
template <DType kCache>
KVKIT_FORCEINLINE std::uint8_t encode_quantized(float v) {
  static_assert(kCache == DType::kFloat8E4M3 || kCache == DType::kFloat8E5M2 ||
                    kCache == DType::kInt8,
                "quantized caches are float8_e4m3, float8_e5m2 or int8");
  if constexpr (kCache == DType::kFloat8E4M3) return std::uint8_t(encode_e4m3(v));
  if constexpr (kCache == DType::kFloat8E5M2) return std::uint8_t(encode_e5m2(v));
  if constexpr (kCache == DType::kInt8) return std::uint8_t(encode_int8(v));
}

/// Pattern of |x| when x is finite, else 0 (an int32: |x| patterns fit).
template <class Src>
KVKIT_FORCEINLINE std::int32_t finite_magnitude_bits(Src x) {
  const auto a = std::int32_t(float_to_bits(load_source(x)) & 0x7fffffffu);
  return a < 0x7f800000 ? a : 0;
}

/// The pattern of +inf of a 16-bit float type (bfloat16 0x7f80, half
/// 0x7c00): magnitude patterns from it up are inf or NaN.
template <class Src>
inline constexpr std::int16_t kInfBits16 = std::is_same_v<Src, bfloat16> ? 0x7f80 : 0x7c00;

/// Pattern of |x| when x is finite, else 0, for a 16-bit source.
template <class Src>
KVKIT_FORCEINLINE std::int16_t finite_magnitude_bits16(Src x) {
  const auto a = std::int16_t(x.bits & 0x7fffu);
  return a < kInfBits16<Src> ? a : std::int16_t(0);
}

/// Largest finite |x| of a row, 0 when there is none (= fold_amax over the
/// row). Compared as bit patterns: for non-negative floats their order is
/// the order of the values, and an integer max reduction vectorizes (with
/// SSE4.1 / AVX2 / AVX-512 / NEON; plain SSE2 has no vector int32 max).
/// bfloat16 and half rows are compared on their 16-bit patterns, twice the
/// lanes per vector and no widening, and only the maximum is converted:
/// the conversion to float is exact and increasing, so this is the float
/// amax (about 2.5x faster for bfloat16 rows of 128 with AVX-512).
template <class Src>
KVKIT_FORCEINLINE float row_amax(const Src* __restrict__ src, std::int64_t n) {
  if constexpr (std::is_same_v<Src, bfloat16> || std::is_same_v<Src, half>) {
    std::int16_t m = 0;
    for (std::int64_t d = 0; d < n; ++d) {
      const std::int16_t a = finite_magnitude_bits16(src[d]);
      m = m > a ? m : a;
    }
    return load_source(Src::from_bits(std::uint16_t(m)));
  } else {
    std::int32_t m = 0;
    for (std::int64_t d = 0; d < n; ++d) {
      const std::int32_t a = finite_magnitude_bits(src[d]);
      m = m > a ? m : a;
    }
    return bits_to_float(std::uint32_t(m));
  }
}

/// Writes the canonical NaN code 0x7f (e4m3 and e5m2 alike) where src[d]
/// is a NaN, d < n: rows whose loop saw a NaN (scales are finite and > 0,
/// so v / scale is a NaN exactly where v is).
template <class Src>
inline void patch_nan_codes(const Src* src, std::int64_t n, std::uint8_t* out) {
  for (std::int64_t d = 0; d < n; ++d) {
    const float v = load_source(src[d]);
    if (v != v) out[d] = 0x7f;
  }
}

/// out[d] = quantize_value(src[d], scale, kCache) for d < n. Divides (rather
/// than multiplying by 1 / scale) so that the bytes equal the scalar rule's.
///
/// fp8: NaN is checked once per row (an OR of 0x7f800000 - |x| per value,
/// negative for a NaN), not selected per value: ~11% faster, SSE2 and AVX2.
/// The fp8 codes are already in [0, 255]; clamping them to 255 anyway (a
/// no-op) stops GCC from narrowing every intermediate of the encoder to bytes
/// (it may, as only the low 8 bits are stored) and makes it narrow the
/// finished 32-bit code once: ~10% faster with AVX-512, same bytes.
template <class Src, DType kCache>
KVKIT_FORCEINLINE void quantize_row(const Src* __restrict__ src, std::int64_t n, float scale,
                                    std::uint8_t* __restrict__ out) {
  if constexpr (kCache == DType::kInt8) {
    for (std::int64_t d = 0; d < n; ++d) out[d] = encode_quantized<kCache>(load_source(src[d]) / scale);
  } else {
    std::int32_t nan_seen = 0;
    for (std::int64_t d = 0; d < n; ++d) {
      const float v = load_source(src[d]) / scale;
      nan_seen |= 0x7f800000 - std::int32_t(float_to_bits(v) & 0x7fffffffu);
      const std::int32_t code = encode_fp8_except_nan<kCache>(v);
      out[d] = std::uint8_t(code < 0xff ? code : 0xff);
    }
    if (nan_seen < 0) patch_nan_codes(src, n, out);
  }
}

}  // namespace kvkit::detail
