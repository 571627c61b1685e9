// The index math of the tensor-core MLA decode kernel (cuda/mla_decode_tc.cuh),
// checked on the host: the shared-memory swizzle, bank-conflict freedom of
// every ldmatrix phase and P store, and one whole block's work on one key
// tile (8 warps, S = Q Kᵀ over 576 dims, P exchanged through shared memory,
// O = P V over 512 columns) with ldmatrix and mma.sync emulated per the PTX
// fragment tables (support/ptx_fragment_emulation.hpp). The kernel calls the
// same MlaTcLanes functions, so a wrong lane, row or swizzle fails here.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <set>
#include <vector>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/cuda/mla_decode_tc_layout.hpp"
#include "support/ptx_fragment_emulation.hpp"

using kvkit::cuda::detail::MlaTcLanes;
using kvkit::cuda::detail::mla_tc_swizzle;
namespace d = kvkit::cuda::detail;
namespace emu = kvkit_test;

TEST_CASE("the MLA tensor-core swizzle permutes the 16-byte units within each 128-byte group of a row") {
  for (const int width : {d::kMlaTcRowElems, d::kMlaTcTileKeys}) {
    for (int row = 0; row < 64; ++row) {
      std::set<int> offsets;
      for (int col = 0; col < width; ++col) {
        const int off = mla_tc_swizzle(row, col, width);
        INFO("width " << width << " row " << row << " col " << col);
        REQUIRE(off / width == row);                       // stays in its row
        REQUIRE(off % width / 64 == col / 64);             // and in its 128-byte group
        REQUIRE(off % 8 == col % 8);                       // units are not split
        if (col % 8 != 0) REQUIRE(off == mla_tc_swizzle(row, col - 1, width) + 1);
        offsets.insert(off);
      }
      REQUIRE(int(offsets.size()) == width);
    }
  }
  CHECK(mla_tc_swizzle(0, 8, 576) == 8);     // row 0: identity
  CHECK(mla_tc_swizzle(3, 0, 576) == 3 * 576 + 24);  // unit 0 of row 3 -> unit 3
  CHECK(mla_tc_swizzle(5, 22, 64) == 5 * 64 + (2 ^ 5) * 8 + 6);  // unit 2 of row 5 -> unit 7
  CHECK(mla_tc_swizzle(9, 64 + 8, 576) == 9 * 576 + 64 + (1 ^ 1) * 8);  // second group, unit 1 of row 9 -> 0
}

namespace {

// The 16-byte bank group (0..7) of an element offset from a 128-byte aligned base.
int bank_group(int elem_offset, int base_bytes) { return (base_bytes + 2 * elem_offset) / 16 % 8; }

// Whether each 8-lane phase of an ldmatrix.x4 hits 8 distinct bank groups.
template <class Offset>
bool conflict_free(Offset offset, int base_bytes) {
  for (int phase = 0; phase < 4; ++phase) {
    std::set<int> groups;
    for (int r = 0; r < 8; ++r) groups.insert(bank_group(offset(8 * phase + r), base_bytes));
    if (groups.size() != 8) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("every ldmatrix phase and P store of the MLA tensor-core kernel is free of bank conflicts") {
  // Base of each array in the kernel's dynamic shared memory (all 128-byte aligned).
  const int q_base = 0, k_base = 2 * d::kMlaTcQElems, p_base = k_base + 2 * d::kMlaTcStages * d::kMlaTcStageElems;
  CHECK(k_base % 128 == 0);
  CHECK(d::kMlaTcStageElems * 2 % 128 == 0);
  CHECK(p_base % 128 == 0);
  CHECK(d::kMlaTcSmemBytes == p_base + 2 * d::kMlaTcPElems + 2 * 64 * 4);
  CHECK(d::kMlaTcSmemBytes == 229888);
  for (int warp = 0; warp < d::kMlaTcWarps; ++warp) {
    INFO("warp " << warp);
    for (int kk = 0; kk < d::kMlaTcKSteps; ++kk) {
      REQUIRE(conflict_free([&](int l) { return MlaTcLanes::q_offset(warp, l, kk); }, q_base));
      for (int jp = 0; jp < 2; ++jp) {
        REQUIRE(conflict_free([&](int l) { return MlaTcLanes::k_offset(warp, l, jp, kk); }, k_base));
      }
    }
    for (int kk = 0; kk < 4; ++kk) {
      REQUIRE(conflict_free([&](int l) { return MlaTcLanes::p_offset(warp, l, kk); }, p_base));
      for (int dp = 0; dp < 16; ++dp) {
        REQUIRE(conflict_free([&](int l) { return MlaTcLanes::v_offset(warp, l, kk, dp); }, k_base));
      }
    }
    // P stores: 32 lanes x 4 bytes hit 32 distinct banks.
    for (int nb = 0; nb < 4; ++nb) {
      for (int h = 0; h < 2; ++h) {
        std::set<int> banks;
        for (int l = 0; l < 32; ++l) {
          const int off = MlaTcLanes::p_store_offset(warp, l, nb, h);
          REQUIRE(off % 2 == 0);  // 4-byte aligned pair
          banks.insert((p_base + 2 * off) / 4 % 32);
        }
        REQUIRE(banks.size() == 32);
      }
    }
  }
}

TEST_CASE("one MLA tensor-core block computes S = Q K^T (64 x 64 over 576) and O = P V (64 x 512), "
          "every element by exactly one lane") {
  constexpr int kRows = 64, kKeys = 64, kD = 576, kV = 512;
  std::mt19937 rng(7);
  std::normal_distribution<double> normal;
  std::vector<double> q(kRows * kD), k(kKeys * kD);  // logical row-major
  for (auto& x : q) x = normal(rng);
  for (auto& x : k) x = normal(rng);
  // Shared memory as the kernel fills it (16-byte units through the swizzle).
  std::vector<double> s_q(kRows * kD), s_k(kKeys * kD), s_p(kRows * kKeys, std::nan(""));
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kD; ++c) {
      s_q[std::size_t(mla_tc_swizzle(r, c, kD))] = q[std::size_t(r * kD + c)];
      s_k[std::size_t(mla_tc_swizzle(r, c, kD))] = k[std::size_t(r * kD + c)];
    }
  }
  const auto score = [&](int r, int key) {
    double sum = 0.0;
    for (int c = 0; c < kD; ++c) sum += q[std::size_t(r * kD + c)] * k[std::size_t(key * kD + c)];
    return sum;
  };
  // A P that tells rows and keys apart: P(r, key) = S(r, key) / 16 + r / 64.
  const auto p_of = [](double s_value, int r) { return s_value / 16.0 + r / 64.0; };

  std::vector<int> s_seen(kRows * kKeys, 0), o_seen(kRows * kV, 0);
  // Step 1-3 for every warp: S, then P into shared memory.
  for (int warp = 0; warp < d::kMlaTcWarps; ++warp) {
    std::vector<emu::Accum> s(4, emu::Accum(32, {0, 0, 0, 0}));
    for (int kk = 0; kk < d::kMlaTcKSteps; ++kk) {
      const auto a = emu::ldmatrix_x4(s_q, [&](int l) { return MlaTcLanes::q_offset(warp, l, kk); }, false);
      for (int jp = 0; jp < 2; ++jp) {
        const auto bk = emu::ldmatrix_x4(s_k, [&](int l) { return MlaTcLanes::k_offset(warp, l, jp, kk); }, false);
        emu::mma_16816(s[std::size_t(2 * jp)], a, emu::b_pair(bk, 0));
        emu::mma_16816(s[std::size_t(2 * jp + 1)], a, emu::b_pair(bk, 2));
      }
    }
    for (int l = 0; l < 32; ++l) {
      for (int nb = 0; nb < 4; ++nb) {
        for (int i = 0; i < 4; ++i) {
          const int r = MlaTcLanes::c_row(warp, l, i), key = MlaTcLanes::s_key(warp, l, nb, i);
          INFO("warp " << warp << " lane " << l << " nb " << nb << " i " << i << ": row " << r << " key " << key);
          REQUIRE(std::fabs(s[std::size_t(nb)][std::size_t(l)][std::size_t(i)] - score(r, key)) < 1e-9);
          ++s_seen[std::size_t(r * kKeys + key)];
        }
        for (int h = 0; h < 2; ++h) {
          const int off = MlaTcLanes::p_store_offset(warp, l, nb, h);
          const int r = MlaTcLanes::c_row(warp, l, 2 * h);
          s_p[std::size_t(off)] = p_of(s[std::size_t(nb)][std::size_t(l)][std::size_t(2 * h)], r);
          s_p[std::size_t(off + 1)] = p_of(s[std::size_t(nb)][std::size_t(l)][std::size_t(2 * h + 1)], r);
        }
      }
    }
  }
  for (int x : s_seen) REQUIRE(x == 1);
  for (double x : s_p) REQUIRE_FALSE(std::isnan(x));  // both halves filled all of P

  // Step 4 for every warp: O = P V with V = the first 512 columns of K.
  for (int warp = 0; warp < d::kMlaTcWarps; ++warp) {
    std::vector<emu::Accum> o(32, emu::Accum(32, {0, 0, 0, 0}));
    for (int kk = 0; kk < 4; ++kk) {
      const auto a = emu::ldmatrix_x4(s_p, [&](int l) { return MlaTcLanes::p_offset(warp, l, kk); }, false);
      for (int dp = 0; dp < 16; ++dp) {
        const auto bv = emu::ldmatrix_x4(s_k, [&](int l) { return MlaTcLanes::v_offset(warp, l, kk, dp); }, true);
        emu::mma_16816(o[std::size_t(2 * dp)], a, emu::b_pair(bv, 0));
        emu::mma_16816(o[std::size_t(2 * dp + 1)], a, emu::b_pair(bv, 2));
      }
    }
    for (int l = 0; l < 32; ++l) {
      for (int nb = 0; nb < 32; ++nb) {
        for (int i = 0; i < 4; ++i) {
          const int r = MlaTcLanes::c_row(warp, l, i), col = MlaTcLanes::o_col(warp, l, nb, i);
          REQUIRE(col < kV);
          double want = 0.0;
          for (int key = 0; key < kKeys; ++key) want += p_of(score(r, key), r) * k[std::size_t(key * kD + col)];
          INFO("warp " << warp << " lane " << l << " nb " << nb << " i " << i << ": row " << r << " column " << col);
          REQUIRE(std::fabs(o[std::size_t(nb)][std::size_t(l)][std::size_t(i)] - want) < 1e-8 * (1.0 + std::fabs(want)));
          ++o_seen[std::size_t(r * kV + col)];
        }
      }
    }
  }
  for (int x : o_seen) REQUIRE(x == 1);
}

TEST_CASE("the two warps of an MLA tensor-core row group share rows, split keys and output columns") {
  for (int warp = 0; warp < 4; ++warp) {
    const int partner = warp + 4;
    for (int l = 0; l < 32; ++l) {
      for (int i = 0; i < 4; ++i) {
        CHECK(MlaTcLanes::c_row(warp, l, i) == MlaTcLanes::c_row(partner, l, i));
        CHECK(MlaTcLanes::s_key(warp, l, 0, i) < 32);
        CHECK(MlaTcLanes::s_key(partner, l, 0, i) >= 32);
        CHECK(MlaTcLanes::o_col(warp, l, 31, i) < 256);
        CHECK(MlaTcLanes::o_col(partner, l, 0, i) >= 256);
      }
    }
  }
}

TEST_CASE("the MLA tensor-core row update (two key halves, shared max, P rounded to bf16) equals a float64 softmax") {
  // One query row over tiles of 64 keys, keys 0-31 of each tile in half 0 and
  // 32-63 in half 1, as the kernel's two warps of a row group see them; each
  // half keeps its own max/sum and calls mla_tc_rescale with its partner's
  // tile max. Hidden keys are -inf logits: whole tiles, whole halves, single keys.
  using kvkit::cuda::detail::mla_tc_rescale;
  using kvkit::cuda::detail::mla_tc_weight;
  constexpr int kTiles = 7, kKeys = 64 * kTiles, kDims = 8;
  std::mt19937 rng(21);
  std::uniform_real_distribution<float> logit_dist(-12.0f, 12.0f), value_dist(-2.0f, 2.0f);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<float> logits(kKeys);
    std::vector<double> v(kKeys * kDims);
    for (auto& x : v) x = value_dist(rng);
    const int pattern = trial % 4;  // 0: scattered, 1: leading tiles hidden, 2: half 1 hidden, 3: all hidden
    for (int k = 0; k < kKeys; ++k) {
      bool hidden = std::uniform_int_distribution<int>(0, 3)(rng) == 0;
      if (pattern == 1) hidden = hidden || k < 128 || (k >= 256 && k < 320);
      if (pattern == 2) hidden = hidden || k % 64 >= 32;
      if (pattern == 3) hidden = true;
      logits[std::size_t(k)] = hidden ? -INFINITY : logit_dist(rng);
    }
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
    std::vector<float> o(kDims, 0.0f);
    for (int t = 0; t < kTiles; ++t) {
      float tile_max[2] = {-INFINITY, -INFINITY};
      for (int j = 0; j < 64; ++j) tile_max[j / 32] = std::max(tile_max[j / 32], logits[std::size_t(64 * t + j)]);
      float base[2], factor[2];
      for (int h = 0; h < 2; ++h) factor[h] = mla_tc_rescale(row_max[h], row_sum[h], tile_max[h], tile_max[1 - h], base[h]);
      INFO("trial " << trial << " tile " << t);
      REQUIRE(row_max[0] == row_max[1]);  // both warps of the row group agree ...
      REQUIRE(factor[0] == factor[1]);    // ... so O (owned by column, not by key half) is rescaled once
      REQUIRE(base[0] == base[1]);
      REQUIRE_FALSE(std::isnan(factor[0]));
      for (float& x : o) x *= factor[0];
      for (int j = 0; j < 64; ++j) {
        const float w = mla_tc_weight(logits[std::size_t(64 * t + j)], base[j / 32]);
        REQUIRE_FALSE(std::isnan(w));
        row_sum[j / 32] += w;
        const float p = float(kvkit::bfloat16(w));  // the mma operand
        for (int d = 0; d < kDims; ++d) o[std::size_t(d)] += p * float(v[std::size_t((64 * t + j) * kDims + d)]);
      }
    }
    const float total = row_sum[0] + row_sum[1];
    // float64 reference.
    double m = -INFINITY;
    for (float x : logits) m = std::max(m, double(x));
    if (m == -INFINITY) {
      CHECK(total == 0.0f);
      CHECK(row_max[0] == -INFINITY);
      for (float x : o) REQUIRE(x == 0.0f);
      continue;
    }
    double sum = 0.0;
    std::vector<double> want(kDims, 0.0);
    for (int k = 0; k < kKeys; ++k) {
      const double w = std::exp(double(logits[std::size_t(k)]) - m);
      sum += w;
      for (int d = 0; d < kDims; ++d) want[std::size_t(d)] += w * v[std::size_t(k * kDims + d)];
    }
    INFO("trial " << trial);
    REQUIRE(std::fabs((double(row_max[0]) + std::log(double(total))) - (m + std::log(sum))) < 1e-5 * (1 + std::fabs(m)));
    for (int d = 0; d < kDims; ++d) {
      // P rounding to bf16 moves each weight by <= 2^-9 relative: |Δo| <= 2^-9 max|v|.
      REQUIRE(std::fabs(double(o[std::size_t(d)]) / total - want[std::size_t(d)] / sum) <= std::ldexp(2.0, -9) * 1.01);
    }
  }
}
