#pragma once
/// @file cpu_vec.hpp
/// Float vectors for the CPU attention loops (4, 8 and 16 lanes), and the
/// exp they use.
///
/// With GCC or Clang the vectors are native vector types: the same source
/// compiles to SSE2 operations in the baseline build and to AVX2 or AVX-512
/// operations inside functions built with target("avx2") / target("avx512f"),
/// so one loop body serves every ISA (kvkit/core/x86_dispatch.hpp). Other
/// compilers get a plain 8-lane struct with the same operators.

#include <cstdint>
#include <cstring>

#include "kvkit/core/bits.hpp"
#include "kvkit/core/config.hpp"

namespace kvkit::detail {

/// Head rows in the CPU kernels' scratch are padded to a multiple of this
/// (the widest vector's lanes), so vector loops need no tails.
inline constexpr int kVecPadLanes = 16;

#if defined(__GNUC__) || defined(__clang__)
typedef float Vec4 __attribute__((vector_size(16)));
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec16 __attribute__((vector_size(64)));

/// A vector at any address: `v`, of V under-aligned to a float's 4 bytes by a
/// typedef made inside the template. Two spellings that fault on the scratch
/// rows' 4-byte alignment with aligned moves (vmovaps), both seen: a typedef
/// with aligned(4) made outside and passed in as V (Clang drops its alignment
/// once the type passes through a template parameter), and a packed struct
/// (GCC 12 at -O0, i.e. Debug builds, ignores the packing when the member is
/// reached through the reference vec_at returns). Read `v` into a V or
/// operate on it in place; never bind a V& to it (that reference promises
/// V's alignment again).
template <class V>
struct __attribute__((may_alias)) UnalignedVec {
  typedef V Unaligned __attribute__((aligned(4)));
  Unaligned v;
};
#else
struct Vec8 {
  float lane[8];
  float& operator[](int i) { return lane[i]; }
  float operator[](int i) const { return lane[i]; }
  friend Vec8 operator+(Vec8 a, Vec8 b) { for (int i = 0; i < 8; ++i) a.lane[i] += b.lane[i]; return a; }
  friend Vec8 operator*(Vec8 a, Vec8 b) { for (int i = 0; i < 8; ++i) a.lane[i] *= b.lane[i]; return a; }
  friend Vec8 operator*(Vec8 a, float b) { for (int i = 0; i < 8; ++i) a.lane[i] *= b; return a; }
  Vec8& operator+=(Vec8 b) { return *this = *this + b; }
  Vec8& operator*=(Vec8 b) { return *this = *this * b; }
};
template <class V>
struct UnalignedVec {
  V v;
};
#endif

/// Float lanes of a vector type.
template <class V>
inline constexpr int kLanes = int(sizeof(V) / sizeof(float));

/// The floats at p (any alignment) as a vector: vec_at<V>(p).v. Loads and
/// stores go through these references, and no helper takes or returns a
/// vector by value: GCC warns (-Wpsabi) about by-value vectors in functions
/// that are not built for AVX, even when they are always inlined.
template <class V>
KVKIT_FORCEINLINE const UnalignedVec<V>& vec_at(const float* p) {
  return *reinterpret_cast<const UnalignedVec<V>*>(p);
}
template <class V>
KVKIT_FORCEINLINE UnalignedVec<V>& vec_at(float* p) {
  return *reinterpret_cast<UnalignedVec<V>*>(p);
}

/// Sum of the lanes, halves folded pairwise (in registers: the upper half is
/// added to the lower until four lanes remain).
#if defined(__GNUC__) || defined(__clang__)
KVKIT_FORCEINLINE float vec4_sum(const Vec4& v) { return (v[0] + v[2]) + (v[1] + v[3]); }
KVKIT_FORCEINLINE float vec_sum(const Vec4& v) { return vec4_sum(v); }
KVKIT_FORCEINLINE float vec_sum(const Vec8& v) {
  const Vec4 h = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return vec4_sum(h);
}
KVKIT_FORCEINLINE float vec_sum(const Vec16& v) {
  const Vec8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return vec_sum(h);
}
/// m = max(m, x) lane by lane, and the largest lane (halves folded).
template <class V>
KVKIT_FORCEINLINE void vec_max_into(V& m, const V& x) {
  m = m > x ? m : x;
}
KVKIT_FORCEINLINE float vec_max(const Vec4& v) {
  const float a = v[0] > v[2] ? v[0] : v[2], b = v[1] > v[3] ? v[1] : v[3];
  return a > b ? a : b;
}
KVKIT_FORCEINLINE float vec_max(const Vec8& v) {
  const Vec4 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3), hi = __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return vec_max(Vec4(lo > hi ? lo : hi));
}
KVKIT_FORCEINLINE float vec_max(const Vec16& v) {
  const Vec8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const Vec8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return vec_max(Vec8(lo > hi ? lo : hi));
}
#else
KVKIT_FORCEINLINE void vec_max_into(Vec8& m, const Vec8& x) {
  for (int i = 0; i < 8; ++i) m.lane[i] = m.lane[i] > x.lane[i] ? m.lane[i] : x.lane[i];
}
KVKIT_FORCEINLINE float vec_max(const Vec8& v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
KVKIT_FORCEINLINE float vec_sum(const Vec8& v) {
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}
#endif

/// e^r for |r| <= ln2/2: Cephes' expf polynomial, for a float or a vector
/// of floats (out through a reference: see vec_at on by-value vectors).
template <class T>
KVKIT_FORCEINLINE void exp_polynomial(const T& r, T& y) {
  y = T{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = (y * r) * r + r + 1.0f;
}

/// e^x for the softmax weights, x <= 0 (a score minus the running max):
/// Cephes' expf (x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6
/// polynomial, 2^n from exponent bits), about 1 ulp from expf. Branch-free so
/// that loops over it vectorize; x < -87.3 (including -inf, a masked key)
/// gives exactly 0. The rounding of x·log2(e) to an integer uses the
/// 1.5·2^23 trick, whose low mantissa bits are n, so no float-to-int
/// conversion (undefined for NaN) is needed.
KVKIT_FORCEINLINE float exp_nonpositive(float x) {
  const float c = x < -87.3f ? -87.3f : (x > 0.0f ? 0.0f : x);
  const float shifted = c * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const std::uint32_t n_bits = float_to_bits(shifted) - 0x4B400000u;  // n as two's complement
  float r = c - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y;
  exp_polynomial(r, y);
  const float two_n = bits_to_float((n_bits + 127u) << 23);
  return x < -87.3f ? 0.0f : y * two_n;
}

#if defined(__GNUC__) || defined(__clang__)
/// 32-bit integer lanes of the same width as V: its bits, for bit tricks.
template <class V>
struct VecBits;
template <>
struct VecBits<Vec4> {
  typedef std::uint32_t type __attribute__((vector_size(16)));
};
template <>
struct VecBits<Vec8> {
  typedef std::uint32_t type __attribute__((vector_size(32)));
};
template <>
struct VecBits<Vec16> {
  typedef std::uint32_t type __attribute__((vector_size(64)));
};

/// p[0, kLanes<V>) = exp_nonpositive(p[i] - minus), a vector at a time: the
/// same operations as the scalar function, lane by lane (GCC left the
/// scalar one in a loop over lanes unvectorized in the AVX2 decode).
template <class V>
KVKIT_FORCEINLINE void exp_nonpositive_in_place(float* p, float minus) {
  typedef typename VecBits<V>::type Bits;
  const V x = vec_at<V>(p).v - minus;
  const V lowest = V{} - 87.3f;
  V c = x > 0.0f ? V{} : x;
  c = x < lowest ? lowest : c;
  const V shifted = c * 1.44269504088896341f + 12582912.0f;
  const V n = shifted - 12582912.0f;
  const Bits n_bits = reinterpret_cast<Bits>(shifted) - 0x4B400000u;
  V r = c - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V y;
  exp_polynomial(r, y);
  const V two_n = reinterpret_cast<V>((n_bits + 127u) << 23);
  vec_at<V>(p).v = x < lowest ? V{} : y * two_n;
}
#endif

}  // namespace kvkit::detail
