#pragma once
/// @file bits.hpp
/// Bit reinterpretation between float and its integer pattern, on host and device.

#include <cstdint>
#include <cstring>

#include "kvkit/core/config.hpp"

namespace kvkit {

/// The IEEE-754 bit pattern of a float.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::uint32_t float_to_bits(float f) {
#if KVKIT_DEVICE_CODE
  return __float_as_uint(f);
#else
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

/// The float whose IEEE-754 bit pattern is u.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float bits_to_float(std::uint32_t u) {
#if KVKIT_DEVICE_CODE
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

}  // namespace kvkit
