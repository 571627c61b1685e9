#pragma once
/// @file vector_copy.cuh
/// Picking the widest copy unit (16, 8, 4, 2 or 1 bytes) that every pointer,
/// stride and row length of a copy is a multiple of, and dispatching a
/// kernel template on it. Shared by the layout kernels (append, copy_blocks,
/// gather): 16-byte units give 128-bit loads and stores; the narrower ones
/// are the fallback for odd strides or head sizes.

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

namespace kvkit::cuda::detail {

/// Largest of 16, 8, 4, 2, 1 dividing every value (byte addresses, byte strides, row bytes).
inline int copy_unit_bytes(std::initializer_list<std::uint64_t> values) {
  std::uint64_t bits = 16;
  for (std::uint64_t v : values) bits |= v;
  // The lowest set bit of the OR is the largest power of two dividing all.
  const std::uint64_t low = bits & (~bits + 1);
  return low >= 16 ? 16 : int(low);
}

template <int kBytes> struct CopyUnit;
template <> struct CopyUnit<16> { using type = uint4; };
template <> struct CopyUnit<8> { using type = uint2; };
template <> struct CopyUnit<4> { using type = unsigned int; };
template <> struct CopyUnit<2> { using type = unsigned short; };
template <> struct CopyUnit<1> { using type = unsigned char; };

/// Calls f(CopyUnit<N>::type{}) for N = unit_bytes.
template <class F>
void dispatch_copy_unit(int unit_bytes, F&& f) {
  switch (unit_bytes) {
    case 16: f(typename CopyUnit<16>::type{}); break;
    case 8: f(typename CopyUnit<8>::type{}); break;
    case 4: f(typename CopyUnit<4>::type{}); break;
    case 2: f(typename CopyUnit<2>::type{}); break;
    default: f(typename CopyUnit<1>::type{}); break;
  }
}

inline std::uint64_t address_of(const void* p) { return std::uint64_t(reinterpret_cast<std::uintptr_t>(p)); }

/// Blocks for a grid over `n` items (at least 1, at most 2^31 - 1).
inline unsigned grid_for(std::int64_t n) {
  return unsigned(n < 1 ? 1 : n > 0x7fffffff ? 0x7fffffff : n);
}

}  // namespace kvkit::cuda::detail
