#pragma once
// PTX semantics emulated on the host, for tests of a kernel's lane index
// math without a GPU (PTX ISA, "Warp-level matrix fragments" for
// mma.m16n8k16 with .bf16/.f16 and "ldmatrix"):
//  - ldmatrix.x4 (optionally .trans) from a flat shared-memory array: lane
//    8i + r gives the element offset of row r of 8x8 matrix i (8 contiguous
//    elements); register i of lane l receives elements (l / 4, 2 (l % 4)) and
//    (l / 4, 2 (l % 4) + 1) of matrix i (of its transpose with .trans);
//  - mma.m16n8k16.row.col with g = l / 4, c = l % 4: a0 A(g, 2c..),
//    a1 A(g+8, 2c..), a2 A(g, 2c+8..), a3 A(g+8, 2c+8..); b0 B(2c.., g),
//    b1 B(2c+8.., g); d0, d1 D(g, 2c..), d2, d3 D(g+8, 2c..).
// A register is a pair of values (the low half first).

#include <array>
#include <cstddef>
#include <utility>
#include <vector>

namespace kvkit_test {

using Pair = std::pair<double, double>;
using Regs4 = std::vector<std::array<Pair, 4>>;     // [32 lanes][4 registers]
using Regs2 = std::vector<std::array<Pair, 2>>;     // [32 lanes][2 registers]
using Accum = std::vector<std::array<double, 4>>;   // [32 lanes][4 floats]

template <class Offset>
Regs4 ldmatrix_x4(const std::vector<double>& smem, Offset offset, bool trans) {
  Regs4 regs(32);
  for (int i = 0; i < 4; ++i) {
    double tile[8][8];
    for (int r = 0; r < 8; ++r) {
      const std::size_t start = std::size_t(offset(8 * i + r));
      for (int e = 0; e < 8; ++e) tile[r][e] = smem.at(start + std::size_t(e));
    }
    for (int l = 0; l < 32; ++l) {
      const int row = l / 4, col = 2 * (l % 4);
      regs[std::size_t(l)][std::size_t(i)] =
          trans ? Pair{tile[col][row], tile[col + 1][row]} : Pair{tile[row][col], tile[row][col + 1]};
    }
  }
  return regs;
}

/// Registers `first`, `first + 1` of an x4 load as a B operand.
inline Regs2 b_pair(const Regs4& r, int first) {
  Regs2 b(32);
  for (std::size_t l = 0; l < 32; ++l) b[l] = {r[l][std::size_t(first)], r[l][std::size_t(first + 1)]};
  return b;
}

inline void mma_16816(Accum& d, const Regs4& a, const Regs2& b) {
  double A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, c = l % 4;
    const int ar[4] = {g, g + 8, g, g + 8}, ac[4] = {2 * c, 2 * c, 2 * c + 8, 2 * c + 8};
    for (int j = 0; j < 4; ++j) {
      A[ar[j]][ac[j]] = a[std::size_t(l)][std::size_t(j)].first;
      A[ar[j]][ac[j] + 1] = a[std::size_t(l)][std::size_t(j)].second;
    }
    for (int j = 0; j < 2; ++j) {
      B[2 * c + 8 * j][g] = b[std::size_t(l)][std::size_t(j)].first;
      B[2 * c + 8 * j + 1][g] = b[std::size_t(l)][std::size_t(j)].second;
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, c = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * c + i % 2;
      double sum = 0.0;
      for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
      d[std::size_t(l)][std::size_t(i)] += sum;
    }
  }
}

}  // namespace kvkit_test
