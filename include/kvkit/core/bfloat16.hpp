#pragma once
/// @file bfloat16.hpp
/// kvkit::bfloat16: the upper 16 bits of a float, usable on host and device
/// without CUDA headers.
///
/// Bit-compatible with CUDA's `__nv_bfloat16`: float -> bfloat16 rounds to
/// nearest, ties to even (`__float2bfloat16_rn`), overflow gives ±inf, every
/// NaN becomes the canonical NaN 0x7FFF. bfloat16 -> float is exact.

#include <cstdint>

#include "kvkit/core/bits.hpp"
#include "kvkit/core/config.hpp"

namespace kvkit {

/// float -> bfloat16 bits, round to nearest even.
KVKIT_HOST_DEVICE inline std::uint16_t float_to_bfloat16_bits(float f) {
#if KVKIT_DEVICE_CODE && __CUDA_ARCH__ >= 800
  std::uint16_t b;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
  return b;
#else
  const std::uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  // Adding 0x7fff plus the lowest kept bit rounds to nearest, ties to even;
  // a carry out of the mantissa correctly bumps the exponent (up to inf).
  return std::uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
#endif
}

/// bfloat16 bits -> float, exact.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float bfloat16_bits_to_float(std::uint16_t b) {
  return bits_to_float(std::uint32_t(b) << 16);
}

/// bfloat16 value (storage + conversions). Trivially copyable, 2 bytes.
struct alignas(2) bfloat16 {
  std::uint16_t bits;

  bfloat16() = default;
  KVKIT_HOST_DEVICE explicit bfloat16(float f) : bits(float_to_bfloat16_bits(f)) {}
  KVKIT_HOST_DEVICE explicit operator float() const { return bfloat16_bits_to_float(bits); }
  KVKIT_HOST_DEVICE static bfloat16 from_bits(std::uint16_t b) {
    bfloat16 v;
    v.bits = b;
    return v;
  }
};

static_assert(sizeof(bfloat16) == 2, "bfloat16 must be 2 bytes");

}  // namespace kvkit
