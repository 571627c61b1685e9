#pragma once
/// @file mla_decode_tc_layout.hpp
/// The index math of the tensor-core absorbed MLA decode kernel
/// (cuda/mla_decode_tc.cuh): block shape, shared-memory layout with its
/// swizzle, and which element each lane addresses with ldmatrix and holds in
/// an mma.m16n8k16 fragment. Plain C++ shared by the kernel and a host test
/// that emulates ldmatrix / mma.sync per the PTX ISA fragment tables, so that
/// the mapping is checked without a GPU.
///
/// Partition of one block (8 warps, 64 query rows x 64 keys per tile):
/// warp w has row group rg = w % 4 (query rows 16 rg .. 16 rg + 15, the mma
/// M) and half hf = w / 4. For S = Q Kᵀ the warp computes its 16 rows
/// against keys 32 hf .. 32 hf + 31 of the tile (4 n blocks of 8, 36 k steps
/// over the 576 dims); for O += P V it owns output columns 256 hf .. 256 hf +
/// 255 (32 n blocks: 128 fp32 accumulators per thread) against all 64 keys.
/// The two warps of a row group therefore exchange their tile maxima and
/// their halves of P through shared memory.

#include <cmath>

#include "kvkit/core/config.hpp"
#include "kvkit/cuda/prefill_plan.hpp"  // PrefillLdmatrixLanes

namespace kvkit::cuda::detail {

inline constexpr int kMlaTcRowElems = 576;   ///< latent row: c_kv 512 | k_pe 64
inline constexpr int kMlaTcValueDim = 512;   ///< V = the first 512 columns of the K tile
inline constexpr int kMlaTcRowsPerBlock = 64;  ///< M: query rows (heads x q_len) per block
inline constexpr int kMlaTcTileKeys = 64;      ///< N of S, K of P V: keys per shared tile
inline constexpr int kMlaTcRowGroups = 4;      ///< warps along M (16 rows each)
inline constexpr int kMlaTcHalves = 2;         ///< warps along the keys of S and the columns of O
inline constexpr int kMlaTcWarps = kMlaTcRowGroups * kMlaTcHalves;
inline constexpr int kMlaTcThreads = 32 * kMlaTcWarps;
inline constexpr int kMlaTcKeysPerWarp = kMlaTcTileKeys / kMlaTcHalves;  // 32: S n blocks 4
inline constexpr int kMlaTcColsPerWarp = kMlaTcValueDim / kMlaTcHalves;  // 256: O n blocks 32
inline constexpr int kMlaTcKSteps = kMlaTcRowElems / 16;                 // 36 k steps of S
inline constexpr int kMlaTcUnits = kMlaTcRowElems / 8;                   // 16-byte units per row
inline constexpr int kMlaTcStages = 2;

/// Shared memory, in 16-bit elements then floats: Q [64][576], K tiles
/// [2][64][576], P [64][64], then the row exchange (maxima, later sums)
/// [2 halves][64] floats. 229,888 bytes: under sm_90's 227 KiB per block, so
/// rows are swizzled rather than padded (a 16-byte pad would not fit).
inline constexpr int kMlaTcQElems = kMlaTcRowsPerBlock * kMlaTcRowElems;
inline constexpr int kMlaTcStageElems = kMlaTcTileKeys * kMlaTcRowElems;
inline constexpr int kMlaTcPElems = kMlaTcRowsPerBlock * kMlaTcTileKeys;
inline constexpr int kMlaTcSmemBytes =
    (kMlaTcQElems + kMlaTcStages * kMlaTcStageElems + kMlaTcPElems) * 2 + kMlaTcHalves * kMlaTcRowsPerBlock * 4;
static_assert(kMlaTcSmemBytes <= 227 * 1024, "must fit sm_90's shared memory per block");
static_assert(kMlaTcRowElems % 64 == 0 && kMlaTcTileKeys % 64 == 0, "swizzle groups are 8 units of 8 elements");

/// Element offset of (row, col) in a shared matrix of rows `row_elems` wide
/// (a multiple of 64): 16-byte unit u of row r is stored at unit u ^ (r % 8)
/// of the same 128-byte group. Rows of 1,152 or 128 bytes all start at bank
/// 0, so without it the eight rows of an ldmatrix phase (same column) would
/// hit the same four banks; with it they cover all 32. An 8-element unit is
/// never split, so 16-byte copies and ldmatrix rows stay contiguous.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE constexpr int mla_tc_swizzle(int row, int col, int row_elems) {
  return row * row_elems + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

/// Which element each lane addresses (ldmatrix: the row start of 8
/// elements) or holds (mma C fragments), for warp `warp` and lane `lane`.
/// ldmatrix lane patterns are the prefill kernel's (PrefillLdmatrixLanes).
struct MlaTcLanes {
  using L = PrefillLdmatrixLanes;
  KVKIT_HOST_DEVICE static constexpr int row_group(int warp) { return warp % kMlaTcRowGroups; }
  KVKIT_HOST_DEVICE static constexpr int half(int warp) { return warp / kMlaTcRowGroups; }

  /// Q A fragment, k step kk (dims 16 kk ..): ldmatrix.x4 row start in Q.
  KVKIT_HOST_DEVICE static constexpr int q_offset(int warp, int lane, int kk) {
    return mla_tc_swizzle(16 * row_group(warp) + L::q_row(lane), 16 * kk + L::q_col(lane), kMlaTcRowElems);
  }
  /// K B fragments of the warp's key blocks 2 jp and 2 jp + 1 (registers
  /// 0, 1 and 2, 3), k step kk: ldmatrix.x4 row start in the K tile.
  KVKIT_HOST_DEVICE static constexpr int k_offset(int warp, int lane, int jp, int kk) {
    return mla_tc_swizzle(kMlaTcKeysPerWarp * half(warp) + 16 * jp + L::k_row(lane), 16 * kk + L::k_col(lane),
                          kMlaTcRowElems);
  }
  /// P A fragment of keys 16 kk ..: ldmatrix.x4 row start in P.
  KVKIT_HOST_DEVICE static constexpr int p_offset(int warp, int lane, int kk) {
    return mla_tc_swizzle(16 * row_group(warp) + L::q_row(lane), 16 * kk + L::q_col(lane), kMlaTcTileKeys);
  }
  /// V B fragments (.trans) of the warp's column blocks 2 dp and 2 dp + 1,
  /// keys 16 kk ..: ldmatrix.x4.trans row start in the K tile (V = its c_kv).
  KVKIT_HOST_DEVICE static constexpr int v_offset(int warp, int lane, int kk, int dp) {
    return mla_tc_swizzle(16 * kk + L::v_row(lane), kMlaTcColsPerWarp * half(warp) + 16 * dp + L::v_col(lane),
                          kMlaTcRowElems);
  }
  /// C fragment element i (0..3): its row in the block's 64 (g or g + 8).
  KVKIT_HOST_DEVICE static constexpr int c_row(int warp, int lane, int i) {
    return 16 * row_group(warp) + lane / 4 + 8 * (i / 2);
  }
  /// S C fragment element i of key block nb (0..3): its key in the tile.
  KVKIT_HOST_DEVICE static constexpr int s_key(int warp, int lane, int nb, int i) {
    return kMlaTcKeysPerWarp * half(warp) + 8 * nb + 2 * (lane % 4) + i % 2;
  }
  /// O C fragment element i of column block nb (0..31): its output column.
  KVKIT_HOST_DEVICE static constexpr int o_col(int warp, int lane, int nb, int i) {
    return kMlaTcColsPerWarp * half(warp) + 8 * nb + 2 * (lane % 4) + i % 2;
  }
  /// Where the pair (S elements 2h, 2h + 1 of key block nb, as P) goes in P:
  /// row c_row(.., 2h), keys s_key(.., 0) and + 1 (one 32-bit store).
  KVKIT_HOST_DEVICE static constexpr int p_store_offset(int warp, int lane, int nb, int h) {
    return mla_tc_swizzle(c_row(warp, lane, 2 * h), s_key(warp, lane, nb, 0), kMlaTcTileKeys);
  }
};

/// The online-softmax step of one query row for one key tile, as each warp
/// of a row group does it with its own tile max and its partner's (read
/// from shared memory): the running max becomes max(row_max, tile_max,
/// partner_max), the same in both warps (fmaxf is exact and order-free), so
/// both rescale by the same factor. `row_sum` (this warp's part, over its own
/// keys) is rescaled; the returned factor is for the output accumulators.
/// `base` is what the logits of this tile subtract before exp: 0 while the
/// row has seen no visible key, so that exp(-inf - base) = 0 and no NaN
/// appears (then the factor is 0 too, and everything is still 0).
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float mla_tc_rescale(float& row_max, float& row_sum, float tile_max,
                                                          float partner_max, float& base) {
  constexpr float kLog2e = 1.4426950408889634f;
  const float m = fmaxf(row_max, fmaxf(tile_max, partner_max));
  base = m == -INFINITY ? 0.0f : m;
  const float factor = exp2f((row_max - base) * kLog2e);  // 0 when row_max was -inf
  row_max = m;
  row_sum *= factor;
  return factor;
}

/// exp(logit - base) for a logit of the tile (-inf for a hidden key -> 0).
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float mla_tc_weight(float logit, float base) {
  constexpr float kLog2e = 1.4426950408889634f;
  return exp2f((logit - base) * kLog2e);
}

}  // namespace kvkit::cuda::detail
