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

namespace detail {

/// The rounding shared by the host's float -> half and float -> fp8
/// conversions: the code (exponent and mantissa bits, no sign) of the
/// format's value nearest to |x|, ties to even, for c = the bits of |x|
/// (finite, already clamped by the caller). kManBits: the format's mantissa
/// bits; kMinNormal: the float bits of its smallest normal value.
///
/// One FPU add rounds normal and subnormal results alike: with E = max(the
/// exponent of |x|, that of the smallest normal) and the magic number
/// m = 2^(E + 23 - kManBits), the float ulp of |x| + m is the format's step
/// in |x|'s binade (the subnormal step below it), so the FPU rounds |x| to
/// it, nearest even (|x| < 2m, and m adds only its leading bit, so "even" is
/// the format's lowest mantissa bit). The sum's bits minus m's are the
/// mantissa with its leading bit, or the subnormal count; adding the
/// binade's offset (E - E_min) << kManBits gives the code (a carry into the
/// next binade lands on the right code too). No subnormal float is
/// produced, so flush-to-zero modes do not change the result, and nothing
/// branches, so loops of conversions vectorize.
template <int kManBits, std::uint32_t kMinNormal>
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::uint32_t round_magnitude_to_code(std::uint32_t c) {
  const std::uint32_t exponent = c & 0x7f800000u;
  const std::uint32_t e = exponent > kMinNormal ? exponent : kMinNormal;
  const std::uint32_t m = e + (std::uint32_t(23 - kManBits) << 23);
  return (float_to_bits(bits_to_float(c) + bits_to_float(m)) - m) + ((e - kMinNormal) >> (23 - kManBits));
}

}  // namespace detail

/// float -> binary16 bits, round to nearest even.
KVKIT_HOST_DEVICE inline std::uint16_t float_to_half_bits(float f) {
#if KVKIT_DEVICE_CODE
  std::uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  // Branch-free (detail::round_magnitude_to_code), so that loops of
  // conversions vectorize. |f| is clamped to 2^16 first, which rounds to
  // inf as everything >= 65520 does. The NaN select is a mask: a ternary
  // over a float result may stay a branch (-ftrapping-math).
  const std::uint32_t x = float_to_bits(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t a = x & 0x7fffffffu;
  const std::uint32_t code = detail::round_magnitude_to_code<10, 0x38800000u>(a < 0x47800000u ? a : 0x47800000u);
  const std::uint32_t nan = std::uint32_t(std::int32_t(0x7f800000u - a) >> 31);  // all ones for NaN
  return std::uint16_t(((sign | code) & ~nan) | (0x7fffu & nan));               // NaN -> canonical NaN
#endif
}

/// binary16 bits -> float, exact. NaN payloads are kept (quiet).
KVKIT_HOST_DEVICE inline float half_bits_to_float(std::uint16_t h) {
#if KVKIT_DEVICE_CODE
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  // Branch-free, so that loops of conversions vectorize; the select that
  // involves a float product is a mask (a ternary may stay a branch under
  // -ftrapping-math).
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t em = h & 0x7fffu;
  // Normal: rebias the exponent 15 -> 127. Subnormal: mantissa * 2^-24, exact
  // and computed on an integer so that no float subnormal is involved.
  const std::uint32_t normal = (em << 13) + (112u << 23);
  const std::uint32_t subnormal = float_to_bits(float(std::int32_t(em)) * 5.9604644775390625e-08f);
  // inf stays inf; NaN keeps its payload and becomes quiet.
  const std::uint32_t special = em > 0x7c00u ? (0x7fc00000u | ((em & 0x3ffu) << 13)) : 0x7f800000u;
  const std::uint32_t large = em < 0x7c00u ? normal : special;
  const std::uint32_t small = std::uint32_t(std::int32_t(em - 0x400u) >> 31);  // all ones below 2^-14
  return bits_to_float(sign | (subnormal & small) | (large & ~small));
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
