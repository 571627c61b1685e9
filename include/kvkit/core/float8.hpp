#pragma once
/// @file float8.hpp
/// OCP 8-bit floats, usable on host and device without CUDA headers:
/// - kvkit::float8_e4m3: 1 sign, 4 exponent (bias 7), 3 mantissa bits. No
///   infinities; S.1111.111 is NaN; largest finite ±448; smallest subnormal 2^-9.
/// - kvkit::float8_e5m2: 1 sign, 5 exponent (bias 15), 2 mantissa bits; IEEE
///   style (±inf = S.11111.00, NaN above it); largest finite ±57344; smallest
///   subnormal 2^-16. It is the top byte of a binary16.
///
/// Rules of float -> fp8 (bit-compatible with CUDA's `__nv_cvt_float_to_fp8`
/// and the `__nv_fp8_e4m3` / `__nv_fp8_e5m2` constructors):
/// - round to nearest, ties to even, including into and out of subnormals;
/// - |x| that rounds beyond the largest finite value, and ±inf:
///   Saturation::kFinite (the default, as CUDA's constructors) gives ±max
///   finite; Saturation::kNone gives NaN (e4m3, 0xFF/0x7F by sign) or ±inf (e5m2);
/// - every NaN input gives 0x7F (CUDA's canonical NaN, sign dropped);
/// - ±0 and values that round to zero keep their sign.
/// fp8 -> float is exact; NaN stays NaN.

#include <cstdint>

#include "kvkit/core/bits.hpp"
#include "kvkit/core/config.hpp"
#include "kvkit/core/half.hpp"

namespace kvkit {

/// What float -> fp8 does with values beyond the largest finite fp8 value.
enum class Saturation : std::uint8_t {
  kFinite,  ///< clamp to ±max finite (CUDA __NV_SATFINITE)
  kNone,    ///< produce NaN (e4m3) or ±inf (e5m2) (CUDA __NV_NOSAT)
};

namespace detail {

/// Shared encoder for the two OCP formats. kExpBits/kManBits give the format;
/// kHasInf says whether the top exponent encodes inf/NaN (e5m2) or whether
/// only the all-ones pattern is NaN (e4m3).
template <int kExpBits, int kManBits, bool kHasInf>
KVKIT_HOST_DEVICE inline std::uint8_t float_to_fp8_bits_soft(float f, Saturation saturation) {
  constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  constexpr std::uint32_t kMaxFinite = kHasInf ? 0x7bu : 0x7eu;
  constexpr std::uint32_t kOverflow = kHasInf ? 0x7cu : 0x7fu;  // inf, or NaN
  const std::uint32_t x = float_to_bits(f);
  const std::uint32_t sign = (x >> 24) & 0x80u;
  const std::uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fu;
  const std::uint32_t on_overflow = saturation == Saturation::kFinite ? kMaxFinite : kOverflow;
  if (a == 0x7f800000u) return std::uint8_t(sign | on_overflow);
  const int exponent = int(a >> 23) - 127;
  if ((a >> 23) == 0) return std::uint8_t(sign);  // float zero or subnormal: far below fp8's range
  const std::uint32_t mantissa = (a & 0x7fffffu) | 0x800000u;  // with the implicit bit
  std::uint32_t code;
  if (exponent >= 1 - kBias) {  // normal fp8
    if (exponent + kBias >= (1 << kExpBits)) return std::uint8_t(sign | on_overflow);
    constexpr int kDrop = 23 - kManBits;
    code = (std::uint32_t(exponent + kBias) << kManBits) | ((a & 0x7fffffu) >> kDrop);
    const std::uint32_t rest = a & ((1u << kDrop) - 1u);
    const std::uint32_t halfway = 1u << (kDrop - 1);
    if (rest > halfway || (rest == halfway && (code & 1u))) ++code;
  } else {  // subnormal fp8: count in units of 2^(1 - bias - man_bits)
    const int shift = (23 - kManBits) + (1 - kBias - exponent);
    if (shift > 24) return std::uint8_t(sign);  // below half the smallest subnormal
    code = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (code & 1u))) ++code;
  }
  if (code > kMaxFinite) code = on_overflow;
  return std::uint8_t(sign | code);
}

/// The constants of the branch-free encoders below, per format: mantissa
/// bits, and the float bits of the smallest normal and of the largest finite
/// fp8 value.
struct E4m3Encoding {
  static constexpr int kManBits = 3;
  static constexpr std::int32_t kMinNormal = 0x3c800000, kMaxFinite = 0x43e00000;  // 2^-6, 448
};
struct E5m2Encoding {
  static constexpr int kManBits = 2;
  static constexpr std::int32_t kMinNormal = 0x38800000, kMaxFinite = 0x47600000;  // 2^-14, 57344
};

/// The same rules for Saturation::kFinite without branches, so that host
/// loops of conversions vectorize (ops/quantize_row.hpp), except for NaN:
/// |v| clamped to the largest finite value (which saturates, inf included,
/// and keeps anything from rounding up to a NaN / inf code), rounded by
/// round_magnitude_to_code (half.hpp), so that a NaN comes out as the
/// largest finite code with its sign (for loops that check NaN once per
/// row). E: E4m3Encoding or E5m2Encoding. Selects are masks: a ternary over
/// a float result may stay a branch under -ftrapping-math.
template <class E>
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int32_t float_to_fp8_bits_except_nan(float v) {
  const std::uint32_t x = float_to_bits(v);
  const auto sign = std::int32_t((x >> 24) & 0x80u);
  const auto a = std::int32_t(x & 0x7fffffffu);
  return sign | std::int32_t(round_magnitude_to_code<E::kManBits, std::uint32_t(E::kMinNormal)>(
                    std::uint32_t(a < E::kMaxFinite ? a : E::kMaxFinite)));
}
/// float_to_fp8_bits_except_nan with NaN replaced by the canonical 0x7f.
template <class E>
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int32_t float_to_fp8_bits_branchless(float v) {
  const std::int32_t nan = (0x7f800000 - std::int32_t(float_to_bits(v) & 0x7fffffffu)) >> 31;  // all ones for NaN
  return (float_to_fp8_bits_except_nan<E>(v) & ~nan) | (0x7f & nan);
}

}  // namespace detail

/// float -> e4m3 bits (see the file comment for the rules).
KVKIT_HOST_DEVICE inline std::uint8_t float_to_e4m3_bits(float f,
                                                         Saturation s = Saturation::kFinite) {
#if KVKIT_DEVICE_CODE && __CUDA_ARCH__ >= 890
  if (s == Saturation::kFinite) {
    std::uint16_t pair;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.0f), "f"(f));
    return std::uint8_t(pair & 0xffu);
  }
#endif
  if (s == Saturation::kFinite) return std::uint8_t(detail::float_to_fp8_bits_branchless<detail::E4m3Encoding>(f));
  return detail::float_to_fp8_bits_soft<4, 3, false>(f, s);
}

/// float -> e5m2 bits (see the file comment for the rules).
KVKIT_HOST_DEVICE inline std::uint8_t float_to_e5m2_bits(float f,
                                                         Saturation s = Saturation::kFinite) {
#if KVKIT_DEVICE_CODE && __CUDA_ARCH__ >= 890
  if (s == Saturation::kFinite) {
    std::uint16_t pair;
    asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.0f), "f"(f));
    return std::uint8_t(pair & 0xffu);
  }
#endif
  if (s == Saturation::kFinite) return std::uint8_t(detail::float_to_fp8_bits_branchless<detail::E5m2Encoding>(f));
  return detail::float_to_fp8_bits_soft<5, 2, true>(f, s);
}

/// e4m3 bits -> float, exact.
KVKIT_HOST_DEVICE inline float e4m3_bits_to_float(std::uint8_t b) {
  // Branch-free (mask selects), so that loops of conversions vectorize.
  const std::uint32_t sign = std::uint32_t(b & 0x80u) << 24;
  const std::uint32_t a = b & 0x7fu;
  const std::uint32_t normal = (a << 20) + (120u << 23);                                   // rebias 7 -> 127
  const std::uint32_t subnormal = float_to_bits(float(std::int32_t(a)) * 0.001953125f);  // a * 2^-9, exact
  const std::uint32_t small = std::uint32_t(std::int32_t(a - 8u) >> 31);                 // exponent 0
  const std::uint32_t nan = std::uint32_t(std::int32_t(0x7eu - a) >> 31);                // a == 0x7f
  const std::uint32_t magnitude = (subnormal & small) | (normal & ~small);
  return bits_to_float(sign | (magnitude & ~nan) | (0x7fc00000u & nan));
}

/// e5m2 bits -> float, exact (e5m2 is the top byte of a binary16).
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float e5m2_bits_to_float(std::uint8_t b) {
  return half_bits_to_float(std::uint16_t(std::uint16_t(b) << 8));
}

/// OCP FP8 E4M3 value (storage + conversions). Trivially copyable, 1 byte.
struct float8_e4m3 {
  std::uint8_t bits;

  float8_e4m3() = default;
  /// Rounds to nearest even and saturates to ±448 (CUDA's __nv_fp8_e4m3(float)).
  KVKIT_HOST_DEVICE explicit float8_e4m3(float f) : bits(float_to_e4m3_bits(f)) {}
  KVKIT_HOST_DEVICE explicit operator float() const { return e4m3_bits_to_float(bits); }
  KVKIT_HOST_DEVICE static float8_e4m3 from_bits(std::uint8_t b) {
    float8_e4m3 v;
    v.bits = b;
    return v;
  }
  /// Largest finite magnitude, 448.
  static constexpr float kMax = 448.0f;
};

/// OCP FP8 E5M2 value (storage + conversions). Trivially copyable, 1 byte.
struct float8_e5m2 {
  std::uint8_t bits;

  float8_e5m2() = default;
  /// Rounds to nearest even and saturates to ±57344 (CUDA's __nv_fp8_e5m2(float)).
  KVKIT_HOST_DEVICE explicit float8_e5m2(float f) : bits(float_to_e5m2_bits(f)) {}
  KVKIT_HOST_DEVICE explicit operator float() const { return e5m2_bits_to_float(bits); }
  KVKIT_HOST_DEVICE static float8_e5m2 from_bits(std::uint8_t b) {
    float8_e5m2 v;
    v.bits = b;
    return v;
  }
  /// Largest finite magnitude, 57344.
  static constexpr float kMax = 57344.0f;
};

static_assert(sizeof(float8_e4m3) == 1 && sizeof(float8_e5m2) == 1, "fp8 must be 1 byte");

}  // namespace kvkit
