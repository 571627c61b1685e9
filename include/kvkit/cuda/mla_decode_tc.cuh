#pragma once
/// @file mla_decode_tc.cuh
/// The tensor-core kernel of the absorbed MLA decode (run by
/// cuda::run_mla_decode when plan.kernel is MlaDecodeKernel::kTensorCores):
/// FlashMLA's formulation on mma.sync.m16n8k16 (sm_80+), bf16 or fp16 cache
/// with q and o of the same dtype, float32 accumulation.
///
/// One block of 8 warps per (sequence, key chunk, row chunk of up to 64
/// query rows = heads x q_len). Q (64 x 576) stays in shared memory; tiles of
/// 64 latent rows (64 x 576) stream in with 16-byte cp.async, double-buffered
/// (Q + 2 tiles + P = 225 KiB, one block per SM). Per tile:
///   1. S = Q Kᵀ: warp (rg, hf) computes rows 16 rg.. x keys 32 hf.. over
///      the 576 dims (36 k steps; A by ldmatrix from Q, B by ldmatrix from K);
///   2. mask (attention_visible) and logits (attention_logit); the two warps
///      of a row group exchange their tile maxima through shared memory and
///      both apply the same running max, so their rescale factors agree;
///   3. P = exp(logit - max), rounded to the input dtype, written to shared
///      memory (each warp its 16 x 32 half);
///   4. O (64 x 512, float32) += P V: warp (rg, hf) owns columns 256 hf..
///      (128 accumulators per thread) and reads all 64 keys of P (ldmatrix)
///      and V = the first 512 columns of the same K tile (ldmatrix.trans):
///      no second load of the cache.
/// The row sums stay per half (each over its own keys) and are added at the
/// end. Row groups with no query rows (16 heads: 3 of 4) skip the math but
/// keep the barriers. Shared rows are swizzled (mla_tc_swizzle), not padded:
/// padding would not fit in 227 KiB. Index math: cuda/mla_decode_tc_layout.hpp,
/// checked on the host by tests/test_mla_decode_tc_layout.cpp.

#include <cuda_runtime.h>

#include <cstdint>

#include "kvkit/cuda/attention_decode.cuh"   // copy_unit_16, cp_async_*, decode_num_chunks
#include "kvkit/cuda/attention_prefill.cuh"  // mma_16816, ldmatrix_x4, pack2, quad_max, quad_sum
#include "kvkit/cuda/mla_decode_plan.hpp"
#include "kvkit/cuda/mla_decode_tc_layout.hpp"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/ops/attention_params.hpp"

namespace kvkit::cuda::detail {

template <class T>
__global__ void __launch_bounds__(kMlaTcThreads, 1)
    mla_decode_tc_kernel(const PagedDecodeParams p, const MlaLaunch L) {
  using Lanes = MlaTcLanes;
  constexpr int kD = kMlaTcRowElems;
  constexpr int kTile = kMlaTcTileKeys;
  extern __shared__ uint4 smem[];
  T* s_q = reinterpret_cast<T*>(smem);                  // [64][576], swizzled
  T* s_k = s_q + kMlaTcQElems;                          // [2][64][576], swizzled
  T* s_p = s_k + kMlaTcStages * kMlaTcStageElems;       // [64][64], swizzled
  float* s_red = reinterpret_cast<float*>(s_p + kMlaTcPElems);  // [2 halves][64 rows]

  const MlaBlockWork work = mla_block_work(p, L, blockIdx.x);
  if (!work.active) return;  // uniform over the block: before any barrier
  const std::int64_t b = work.b;
  const std::int64_t seq_len = p.page_table.seq_len(b);
  const AttentionKeySpan span = work.span;
  const std::int64_t key_begin = work.key_begin, key_end = work.key_end;
  const int split = work.split;
  const std::int64_t num_tiles = (key_end - key_begin + kTile - 1) / kTile;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int rg = Lanes::row_group(warp);
  const int hf = Lanes::half(warp);
  const int row_begin = work.row_begin, rows = work.rows;
  const bool active = 16 * rg < rows;  // warp-uniform; both halves of a row group agree

  // Q rows -> shared memory; rows past the chunk are zeros.
  {
    const T* q = static_cast<const T*>(p.q);
    for (int u = tid; u < kMlaTcRowsPerBlock * kMlaTcUnits; u += kMlaTcThreads) {
      const int r = u / kMlaTcUnits;
      const int unit = u - r * kMlaTcUnits;
      T* dst = s_q + mla_tc_swizzle(r, 8 * unit, kD);
      if (r < rows) {
        const int row = row_begin + r;
        const std::int64_t token = row / p.num_q_heads;
        const std::int64_t head = row - token * p.num_q_heads;
        copy_unit_16(dst, q + (b * p.q_len + token) * p.q_stride_token + head * p.q_stride_head + 8 * unit,
                     L.q_async, 2);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  }

  const std::int32_t* pages = p.page_table.pages(b);
  const T* cache = static_cast<const T*>(p.k_cache);
  // Tile t -> stage t % 2. Rows past the chunk's keys are zeros, so that
  // P = 0 never meets NaN in V.
  const auto load_tile = [&](std::int64_t t) {
    const std::int64_t first = key_begin + t * kTile;
    const int n = key_end - first < kTile ? int(key_end - first) : kTile;
    T* stage = s_k + (t % kMlaTcStages) * kMlaTcStageElems;
#pragma unroll 2
    for (int u = tid; u < kTile * kMlaTcUnits; u += kMlaTcThreads) {
      const int j = u / kMlaTcUnits;
      const int unit = u - j * kMlaTcUnits;
      T* dst = stage + mla_tc_swizzle(j, 8 * unit, kD);
      if (j < n) {
        const std::int64_t pos = span.position(first + j);
        const std::int64_t off = p.layout.slot_offset(token_slot(pages, pos, p.layout.page_shift), 0);
        copy_unit_16(dst, cache + off + 8 * unit, L.async_copy, 2);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  };

  // This thread's two rows (h = 0: c_row(.., 0), h = 1: c_row(.., 2)).
  std::int64_t q_pos[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = Lanes::c_row(warp, lane, 2 * h);
    const int row = row_begin + (r < rows ? r : rows - 1);
    q_pos[h] = seq_len - p.q_len + row / p.num_q_heads;
  }
  float o_acc[kMlaTcColsPerWarp / 8][4];
#pragma unroll
  for (int nb = 0; nb < kMlaTcColsPerWarp / 8; ++nb) {
#pragma unroll
    for (int i = 0; i < 4; ++i) o_acc[nb][i] = 0.0f;
  }
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of the logits, same in both halves
  float row_sum[2] = {0.0f, 0.0f};            // this thread's part of Σ exp(logit - max) over its half's keys

  if (num_tiles > 0) load_tile(0);
  cp_async_commit();  // group: Q and tile 0
  for (std::int64_t t = 0; t < num_tiles; ++t) {
    cp_async_wait<0>();
    __syncthreads();  // (A) tile t (and Q) landed; every warp is done with tile t - 1
    if (t + 1 < num_tiles) load_tile(t + 1);  // into tile t - 1's stage
    cp_async_commit();

    const T* stage = s_k + (t % kMlaTcStages) * kMlaTcStageElems;
    const std::int64_t first = key_begin + t * kTile;
    const int n = key_end - first < kTile ? int(key_end - first) : kTile;
    float s[kMlaTcKeysPerWarp / 8][4];
    float tile_max[2] = {-INFINITY, -INFINITY};
    if (active) {
#pragma unroll
      for (int nb = 0; nb < kMlaTcKeysPerWarp / 8; ++nb) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s[nb][i] = 0.0f;
      }
      // S = Q Kᵀ: 16 rows x 32 keys per warp over 576 dims.
#pragma unroll 4
      for (int kk = 0; kk < kMlaTcKSteps; ++kk) {
        std::uint32_t a[4];
        ldmatrix_x4<false>(a, s_q + Lanes::q_offset(warp, lane, kk));
#pragma unroll
        for (int jp = 0; jp < kMlaTcKeysPerWarp / 16; ++jp) {
          std::uint32_t bk[4];
          ldmatrix_x4<false>(bk, stage + Lanes::k_offset(warp, lane, jp, kk));
          mma_16816<T>(s[2 * jp], a, bk[0], bk[1]);
          mma_16816<T>(s[2 * jp + 1], a, bk[2], bk[3]);
        }
      }
      // Mask and logits; element (nb, i) is row c_row(i), key s_key(nb, i).
#pragma unroll
      for (int nb = 0; nb < kMlaTcKeysPerWarp / 8; ++nb) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int h = i / 2;
          const int j = Lanes::s_key(warp, lane, nb, i);
          const bool visible = j < n && attention_visible(p, q_pos[h], span.position(first + j));
          s[nb][i] = visible ? attention_logit(p, s[nb][i]) : -INFINITY;
          tile_max[h] = fmaxf(tile_max[h], s[nb][i]);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        tile_max[h] = quad_max(tile_max[h]);
        if ((lane & 3) == 0) s_red[hf * kMlaTcRowsPerBlock + Lanes::c_row(warp, lane, 2 * h)] = tile_max[h];
      }
    }
    __syncthreads();  // (B) both halves' tile maxima are in s_red

    float factor[2] = {1.0f, 1.0f};
    if (active) {
      float base[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float other = s_red[(1 - hf) * kMlaTcRowsPerBlock + Lanes::c_row(warp, lane, 2 * h)];
        factor[h] = mla_tc_rescale(row_max[h], row_sum[h], tile_max[h], other, base[h]);
      }
#pragma unroll
      for (int nb = 0; nb < kMlaTcKeysPerWarp / 8; ++nb) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float p0 = mla_tc_weight(s[nb][2 * h], base[h]);
          const float p1 = mla_tc_weight(s[nb][2 * h + 1], base[h]);
          row_sum[h] += p0 + p1;
          *reinterpret_cast<std::uint32_t*>(s_p + Lanes::p_store_offset(warp, lane, nb, h)) = pack2<T>(p0, p1);
        }
      }
    }
    __syncthreads();  // (C) P of both halves is in s_p

    if (active) {
#pragma unroll
      for (int nb = 0; nb < kMlaTcColsPerWarp / 8; ++nb) {
#pragma unroll
        for (int i = 0; i < 4; ++i) o_acc[nb][i] *= factor[i / 2];
      }
      // O += P V: 16 rows x 256 columns per warp, over the tile's 64 keys.
#pragma unroll
      for (int kk = 0; kk < kTile / 16; ++kk) {
        std::uint32_t a[4];
        ldmatrix_x4<false>(a, s_p + Lanes::p_offset(warp, lane, kk));
#pragma unroll
        for (int dp = 0; dp < kMlaTcColsPerWarp / 16; ++dp) {
          std::uint32_t bv[4];
          ldmatrix_x4<true>(bv, stage + Lanes::v_offset(warp, lane, kk, dp));
          mma_16816<T>(o_acc[2 * dp], a, bv[0], bv[1]);
          mma_16816<T>(o_acc[2 * dp + 1], a, bv[2], bv[3]);
        }
      }
    }
  }
  cp_async_wait<0>();  // nothing may be in flight at exit (no key tiles: the Q copies)

  // Row sums: each half summed its own keys. s_red was last read before
  // barrier (C) of the last tile, which every warp has passed.
  float sum[2] = {0.0f, 0.0f};
  if (active) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      sum[h] = quad_sum(row_sum[h]);
      if ((lane & 3) == 0) s_red[hf * kMlaTcRowsPerBlock + Lanes::c_row(warp, lane, 2 * h)] = sum[h];
    }
  }
  __syncthreads();
  if (!active) return;

  const bool final_output = work.chunks == 1;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = Lanes::c_row(warp, lane, 2 * h);
    const float total = sum[h] + s_red[(1 - hf) * kMlaTcRowsPerBlock + r];
    if (r >= rows) continue;
    const int row = row_begin + r;
    const std::int64_t token = row / p.num_q_heads;
    const std::int64_t head = row - token * p.num_q_heads;
    const std::int64_t tq = b * p.q_len + token;
    const std::int64_t row_id = tq * p.num_q_heads + head;
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    const float lse = total > 0.0f ? row_max[h] + logf(total) : -INFINITY;
    if (final_output) {
      T* dst = static_cast<T*>(p.o) + tq * p.o_stride_token + head * p.o_stride_head;
#pragma unroll
      for (int nb = 0; nb < kMlaTcColsPerWarp / 8; ++nb) {
        const int col = Lanes::o_col(warp, lane, nb, 2 * h);
        dst[col] = T(o_acc[nb][2 * h] * inv);
        dst[col + 1] = T(o_acc[nb][2 * h + 1] * inv);
      }
      if (hf == 0 && (lane & 3) == 0 && p.lse != nullptr) p.lse[row_id] = lse;
    } else {
      const std::int64_t state = std::int64_t(split) * L.rows_total + row_id;
      float* dst = L.partial_o + state * kMlaTcValueDim;
#pragma unroll
      for (int nb = 0; nb < kMlaTcColsPerWarp / 8; ++nb) {
        const int col = Lanes::o_col(warp, lane, nb, 2 * h);
        dst[col] = o_acc[nb][2 * h] * inv;
        dst[col + 1] = o_acc[nb][2 * h + 1] * inv;
      }
      if (hf == 0 && (lane & 3) == 0) L.partial_lse[state] = lse;
    }
  }
}

/// Launches the tensor-core kernel for `blocks` blocks (the dtypes were
/// checked by the plan and run_mla_decode: bf16 or fp16, q = cache).
inline void launch_mla_decode_tc(const PagedDecodeParams& p, const MlaLaunch& L, std::int64_t blocks,
                                 cudaStream_t stream) {
  const auto launch = [&](auto kernel) {
    // Above 48 KiB of dynamic shared memory needs an opt-in (a per-function
    // attribute, not a stream operation: allowed while a graph is captured).
    KVKIT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMlaTcSmemBytes));
    kernel<<<unsigned(blocks), kMlaTcThreads, kMlaTcSmemBytes, stream>>>(p, L);
  };
  if (p.kv_dtype == DType::kBFloat16) {
    launch(mla_decode_tc_kernel<::kvkit::bfloat16>);
  } else {
    launch(mla_decode_tc_kernel<::kvkit::half>);
  }
}

}  // namespace kvkit::cuda::detail
