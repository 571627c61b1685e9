#pragma once
/// @file half.hpp
/// kvkit::half: IEEE-754 binary16, usable on host and device without CUDA headers.
///
/// Bit-compatible with CUDA's `__half`: float -> half rounds to nearest, ties to
/// even (`__float2half_rn`); overflow gives ±inf; every NaN becomes the
/// canonical NaN 0x7FFF (what CUDA's conversion produces). half -> float is
/// exact. On the device the conversions use the hardware `cvt` instructions.

#include <cstdint>

#include "kvkit/core/bits.hpp"
#include "kvkit/core/config.hpp"

namespace kvkit {

/// float -> binary16 bits, round to nearest even.
KVKIT_HOST_DEVICE inline std::uint16_t float_to_half_bits(float f) {
#if KVKIT_DEVICE_CODE
  std::uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  const std::uint32_t x = float_to_bits(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;                      // NaN -> canonical NaN
  if (a >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                                      // normal: |f| >= 2^-14
    const std::uint32_t m = a - 0x38000000u;                   // rebias exponent 127 -> 15
    std::uint32_t r = m >> 13;
    const std::uint32_t rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (r & 1u))) ++r;
    return std::uint16_t(sign | r);
  }
  if (a <= 0x33000000u) return std::uint16_t(sign);  // <= 2^-25 (half the smallest subnormal)
  // Subnormal result: count in units of 2^-24.
  const std::uint32_t exponent = a >> 23;
  const std::uint32_t mantissa = (a & 0x7fffffu) | 0x800000u;
  const std::uint32_t shift = 126u - exponent;  // 14..24
  std::uint32_t r = mantissa >> shift;
  const std::uint32_t rest = mantissa & ((1u << shift) - 1u);
  const std::uint32_t halfway = 1u << (shift - 1u);
  if (rest > halfway || (rest == halfway && (r & 1u))) ++r;
  return std::uint16_t(sign | r);
#endif
}

/// binary16 bits -> float, exact. NaN payloads are kept (quiet).
KVKIT_HOST_DEVICE inline float half_bits_to_float(std::uint16_t h) {
#if KVKIT_DEVICE_CODE
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  const std::uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) {
    return bits_to_float(sign | 0x7f800000u | (mantissa ? (0x400000u | (mantissa << 13)) : 0u));
  }
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = float(mantissa) * 5.9604644775390625e-08f;
    return bits_to_float(sign | float_to_bits(magnitude));
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

/// IEEE binary16 value (storage + conversions). Trivially copyable, 2 bytes.
struct alignas(2) half {
  std::uint16_t bits;

  half() = default;
  KVKIT_HOST_DEVICE explicit half(float f) : bits(float_to_half_bits(f)) {}
  KVKIT_HOST_DEVICE explicit operator float() const { return half_bits_to_float(bits); }
  KVKIT_HOST_DEVICE static half from_bits(std::uint16_t b) {
    half h;
    h.bits = b;
    return h;
  }
};

static_assert(sizeof(half) == 2, "half must be 2 bytes");

}  // namespace kvkit
