#pragma once
/// @file rope_math.hpp
/// RoPE index math and the pair rotation, shared by the CPU ops and the CUDA
/// kernels so that both rotate the same dimensions the same way.

#include <cstdint>

#include "kvkit/core/config.hpp"
#include "kvkit/ops/rope_config.hpp"

namespace kvkit {

/// Dimensions (first, second) of rotation pair `i` in [0, rotary_dim / 2).
struct RopePair {
  int first;
  int second;
};

KVKIT_HOST_DEVICE KVKIT_FORCEINLINE RopePair rope_pair(RopeStyle style, int rotary_dim, int i) {
  return style == RopeStyle::kNeox ? RopePair{i, i + rotary_dim / 2} : RopePair{2 * i, 2 * i + 1};
}

/// Rotates (x, y) by the angle whose cosine and sine are given:
/// x' = x cos - y sin, y' = y cos + x sin. On the device the products are
/// rounded separately (no fused multiply-add), as on the host, so that the
/// CUDA kernels give the CPU op's results bit for bit.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE void rope_rotate(float& x, float& y, float cos_a, float sin_a) {
  const float x0 = x;
#if KVKIT_DEVICE_CODE
  x = __fsub_rn(__fmul_rn(x0, cos_a), __fmul_rn(y, sin_a));
  y = __fadd_rn(__fmul_rn(y, cos_a), __fmul_rn(x0, sin_a));
#else
  x = x0 * cos_a - y * sin_a;
  y = y * cos_a + x0 * sin_a;
#endif
}

}  // namespace kvkit
