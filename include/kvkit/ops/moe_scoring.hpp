#pragma once
/// @file moe_scoring.hpp
/// Router arithmetic shared by the CPU router and the CUDA router kernel, written
/// so that both produce bit-identical selection scores and therefore identical
/// expert ids:
///  - moe_exp: our own expf from correctly rounded operations only (fma, mul,
///    rint), because libm's expf and CUDA's expf differ in the last bit;
///  - every multiply-add is an explicit fma and the products that could be
///    fused with a later add are made with fma(a, b, 0) (host) / __fmul_rn
///    (device), so no compiler contraction (nvcc -fmad, g++ -mfma) changes them;
///  - sums over experts use one fixed order, the one a 32-lane warp reduction
///    has: 32 strided partial sums, then a butterfly (xor 16, 8, 4, 2, 1);
///  - ranking uses a 64-bit key (score order, then lower index), a strict total
///    order, so ties resolve to the lower index everywhere.

#include <cmath>
#include <cstdint>

#include "kvkit/core/bits.hpp"
#include "kvkit/core/config.hpp"

namespace kvkit {
namespace moe_detail {

KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float fma_rn(float a, float b, float c) {
#if KVKIT_DEVICE_CODE
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

/// a * b rounded once, never fused into a following addition.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float mul_rn(float a, float b) {
#if KVKIT_DEVICE_CODE
  return __fmul_rn(a, b);
#elif defined(__FMA__)
  // With FMA hardware a host compiler may fuse a * b into a later add (GCC's
  // default -ffp-contract=fast); fma(a, b, +0) cannot be fused and equals a * b
  // (but for -0 becoming +0, which no caller can see).
  return std::fma(a, b, 0.0f);
#else
  return a * b;  // no FMA instructions: nothing can be fused
#endif
}

KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float rint_rn(float x) {
#if KVKIT_DEVICE_CODE
  return rintf(x);
#else
  return std::rint(x);
#endif
}

/// 2^n for n in [-126, 127], exactly.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float pow2i(int n) {
  return bits_to_float(std::uint32_t(n + 127) << 23);
}

}  // namespace moe_detail

/// exp(x) in fp32, within 2 ulp, bit-identical on host and device.
/// Overflow gives +inf, underflow gives (sub)normal results down to 0, NaN stays NaN.
KVKIT_HOST_DEVICE inline float moe_exp(float x) {
  using namespace moe_detail;
  if (x != x) return x;
  if (x > 88.72283935546875f) return bits_to_float(0x7f800000u);
  if (x < -103.972084045410156f) return 0.0f;
  // x = n ln2 + r, |r| <= ln2/2; ln2 split in a high part with trailing zero bits
  // and a low part, so that r is accurate to well below an ulp of exp(r).
  const float n = rint_rn(x * 1.44269502925872802734375f);
  float r = fma_rn(n, -0.693145751953125f, x);
  r = fma_rn(n, -1.428606765330187045037746429443359375e-06f, r);
  // Taylor series to r^7: truncation error < 1e-8 relative on |r| <= 0.35.
  float p = 1.98412698412698412698e-4f;
  p = fma_rn(p, r, 1.38888888888888888889e-3f);
  p = fma_rn(p, r, 8.33333333333333333333e-3f);
  p = fma_rn(p, r, 4.16666666666666666667e-2f);
  p = fma_rn(p, r, 1.66666666666666666667e-1f);
  p = fma_rn(p, r, 0.5f);
  p = fma_rn(p, r, 1.0f);
  p = fma_rn(p, r, 1.0f);
  // Scale in two exact-range steps so that results near the overflow and
  // underflow ends are formed with a single final rounding.
  const int ni = int(n);
  const int n1 = ni / 2;
  return mul_rn(mul_rn(p, pow2i(n1)), pow2i(ni - n1));
}

/// sigmoid(x) = 1 / (1 + exp(-x)), bit-identical on host and device.
KVKIT_HOST_DEVICE inline float moe_sigmoid(float x) { return 1.0f / (1.0f + moe_exp(-x)); }

/// Number of partial sums in the canonical summation order (a warp's lanes).
inline constexpr int kMoeSumLanes = 32;

/// Combines 32 lane partials in the order of a warp butterfly reduction
/// (__shfl_xor with offsets 16, 8, 4, 2, 1); every lane of the warp ends with
/// the value this returns. `partial` is overwritten.
KVKIT_HOST_DEVICE inline float moe_butterfly_sum(float* partial) {
  for (int offset = kMoeSumLanes / 2; offset > 0; offset /= 2) {
    float next[kMoeSumLanes];
    for (int lane = 0; lane < kMoeSumLanes; ++lane) {
      next[lane] = partial[lane] + partial[lane ^ offset];
    }
    for (int lane = 0; lane < kMoeSumLanes; ++lane) partial[lane] = next[lane];
  }
  return partial[0];
}

/// Sum of v[0..n) in the canonical order: lane l sums v[l], v[l+32], ... in
/// ascending order, then the lanes are combined by moe_butterfly_sum.
KVKIT_HOST_DEVICE inline float moe_canonical_sum(const float* v, int n) {
  float partial[kMoeSumLanes];
  for (int lane = 0; lane < kMoeSumLanes; ++lane) {
    float s = 0.0f;
    for (int i = lane; i < n; i += kMoeSumLanes) s += v[i];
    partial[lane] = s;
  }
  return moe_butterfly_sum(partial);
}

/// Ranking key of (score, index): larger key = better. Higher score first,
/// then lower index; a NaN score ranks below every number (including -inf).
/// Never 0, so 0 can mark "already taken".
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::uint64_t moe_rank_key(float score, int index) {
  std::uint32_t u = float_to_bits(score);
  std::uint32_t ordered;
  if (score != score) {
    ordered = 0u;
  } else {
    // IEEE order as unsigned order: flip all bits of negatives, set the sign bit of positives.
    ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    // -0.0 and +0.0 compare equal as floats: rank them equal too.
    if ((u & 0x7fffffffu) == 0u) ordered = 0x80000000u;
  }
  return (std::uint64_t(ordered) << 32) | std::uint64_t(0xffffffffu - std::uint32_t(index));
}

/// The index stored in a key made by moe_rank_key.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE int moe_rank_key_index(std::uint64_t key) {
  return int(0xffffffffu - std::uint32_t(key & 0xffffffffu));
}

/// Score of one expert group from its selection scores s[0..n): the maximum,
/// or (top_two_sum) the sum of the two best (n >= 2), as the CPU and CUDA
/// routers both compute it.
KVKIT_HOST_DEVICE inline float moe_group_score(const float* s, int n, bool top_two_sum) {
  if (!top_two_sum) {
    float best = s[0];
    for (int i = 1; i < n; ++i) best = s[i] > best ? s[i] : best;
    return best;
  }
  std::uint64_t k1 = 0, k2 = 0;
  int i1 = 0, i2 = 0;
  for (int i = 0; i < n; ++i) {
    const std::uint64_t key = moe_rank_key(s[i], i);
    if (key > k1) {
      k2 = k1;
      i2 = i1;
      k1 = key;
      i1 = i;
    } else if (key > k2) {
      k2 = key;
      i2 = i;
    }
  }
  return s[i1] + s[i2];
}

}  // namespace kvkit
