#pragma once
/// @file mla_decode.cuh
/// Absorbed MLA decode attention on the GPU (FlashMLA's formulation): one
/// MQA problem over the paged latent cache whose keys are the 576-wide rows
/// [c_kv (512) | k_pe (64)] and whose values are their first 512 columns,
/// read from the same shared-memory copy. The CUDA twin of
/// kvkit::mla_decode_attention (ops/mla_decode.hpp): same PagedDecodeParams
/// (device pointers), same masking (attention_visible), score
/// (attention_logit), key ranges and lse.
///
///   MlaDecodePlan plan = plan_mla_decode(params, host_seq_lens, num_sms);  // host only
///   workspace of plan.workspace_bytes, allocated once by the caller
///   run_mla_decode(params, plan, workspace, bytes, stream);                // no alloc, no sync
///
/// Caches: bfloat16 or float16 rows (mla_decode_params), or FlashMLA's fp8
/// rows of 656 bytes (mla_decode_params_fp8: e4m3 c_kv with a float32 scale
/// per 128 values, bf16 k_pe), dequantized in registers. q and o: float32,
/// float16 or bfloat16 (chosen at run time inside the kernel, so that only
/// three kernels are compiled). Accumulation is float32.
///
/// Two kernels (MlaDecodePlan::kernel, chosen by plan_mla_decode): the
/// tensor-core kernel of cuda/mla_decode_tc.cuh (bf16/fp16 cache with q of
/// the same dtype, sm_80+; the default there when a sequence has >= 16 query
/// rows), and the CUDA-core kernel below (every cache and q dtype).
///
/// CUDA-core kernel: one block of 8 warps per
/// (sequence, key chunk, row chunk of up to 32 query rows = heads x q_len).
/// The block streams tiles of 16 latent rows into shared memory with 16-byte
/// cp.async copies, double-buffered; every warp owns 4 query rows and uses
/// every row of the tile, so a tile is read from global memory once for the
/// block's 32 query rows. A lane owns 18 of the 576 key columns (two 8-wide
/// c_kv pieces and two k_pe values), i.e. 16 of the 512 value columns: the
/// value is the key's own c_kv piece, already in the lane's registers. The
/// row chunks of one key chunk are neighbours in the grid, so for 128 heads
/// the four blocks that share a key range run together and three of them
/// find the rows in L2. Split-KV as in cuda/attention_decode.cuh: partial
/// (o, lse) per chunk in the workspace, merged by merge_row.

#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kvkit/core/error.hpp"
#include "kvkit/cuda/attention_decode.cuh"
#include "kvkit/cuda/check.hpp"
#include "kvkit/cuda/merge_states.cuh"
#include "kvkit/cuda/mla_decode_plan.hpp"
#include "kvkit/cuda/mla_decode_tc.cuh"
#include "kvkit/cuda/vector_copy.cuh"
#include "kvkit/layout/latent_fp8_layout.hpp"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/ops/attention_params.hpp"
#include "kvkit/ops/attention_state.hpp"

namespace kvkit::cuda {

namespace detail {

/// The cache formats the kernel is compiled for.
enum class MlaCacheFormat { kBFloat16, kFloat16, kFp8 };

template <MlaCacheFormat F>
struct MlaCacheTraits {
  static constexpr bool kFp8 = F == MlaCacheFormat::kFp8;
  static constexpr int kRowBytes = kFp8 ? MlaFp8Row::kBytes : 2 * kMlaKeyDim;  // 656 or 1,152
  static constexpr int kElemBytes = kFp8 ? 1 : 2;  ///< unit of the layout's offsets
  static constexpr int kUnits = kRowBytes / 16;    ///< 16-byte copies per row
  static constexpr std::size_t kStageBytes = std::size_t(kMlaTileKeys) * kRowBytes;
  static constexpr std::size_t kScoreBytes = std::size_t(kMlaWarps) * kMlaRowsPerWarp * kMlaTileKeys * sizeof(float);
  static constexpr std::size_t kSmemBytes = kMlaStages * kStageBytes + kScoreBytes;
  static_assert(kRowBytes % 16 == 0, "rows must be whole 16-byte units");
  static_assert(kSmemBytes <= 48 * 1024, "stay within the default dynamic shared memory limit");
};

__device__ KVKIT_FORCEINLINE float mla_load(const void* base, DType dtype, std::int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    case DType::kBFloat16:
      return bfloat16_bits_to_float(static_cast<const std::uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

__device__ KVKIT_FORCEINLINE void mla_store(void* base, DType dtype, std::int64_t i, float v) {
  switch (dtype) {
    case DType::kFloat16: static_cast<__half*>(base)[i] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<std::uint16_t*>(base)[i] = float_to_bfloat16_bits(v); break;
    default: static_cast<float*>(base)[i] = v; break;
  }
}

/// Two 16-bit values (low half first) as floats.
template <MlaCacheFormat F>
__device__ KVKIT_FORCEINLINE float2 mla_pair(std::uint32_t w) {
  if constexpr (F == MlaCacheFormat::kFloat16) {
    __half2 h;
    static_assert(sizeof(h) == 4, "half2 is 4 bytes");
    memcpy(&h, &w, 4);
    return __half22float2(h);
  } else {  // bfloat16 (also the k_pe of fp8 rows)
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
}

/// Eight e4m3 values (lowest byte first) as floats, exactly (e4m3 -> f16 is exact).
__device__ KVKIT_FORCEINLINE void mla_fp8x8(uint2 raw, float (&out)[8]) {
  const std::uint32_t words[2] = {raw.x, raw.y};
#pragma unroll
  for (int w = 0; w < 2; ++w) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const __half2_raw hr =
          __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t((words[w] >> (16 * k)) & 0xffffu), __NV_E4M3);
      const float2 f = __half22float2(__half2(hr));
      out[4 * w + 2 * k] = f.x;
      out[4 * w + 2 * k + 1] = f.y;
    }
  }
}

/// A lane's 18 key columns of one latent row in shared memory: c_kv columns
/// [8 lane, 8 lane + 8) -> a, [256 + 8 lane, ...) -> b, k_pe columns
/// 2 lane, 2 lane + 1 -> r. For fp8 rows a and b are the raw e4m3 values and
/// scale_a, scale_b their groups' scales; otherwise the scales are 1.
template <MlaCacheFormat F>
struct MlaFragment {
  float a[8], b[8], r[2];
  float scale_a, scale_b;

  __device__ KVKIT_FORCEINLINE void load(const unsigned char* row, int lane, bool with_rope) {
    if constexpr (F == MlaCacheFormat::kFp8) {
      mla_fp8x8(*reinterpret_cast<const uint2*>(row + 8 * lane), a);
      mla_fp8x8(*reinterpret_cast<const uint2*>(row + 256 + 8 * lane), b);
      const float* scales = reinterpret_cast<const float*>(row + MlaFp8Row::kScalesOffset);
      scale_a = scales[lane >> 4];
      scale_b = scales[2 + (lane >> 4)];
      if (with_rope) {
        const float2 f =
            mla_pair<MlaCacheFormat::kBFloat16>(*reinterpret_cast<const std::uint32_t*>(row + MlaFp8Row::kRopeOffset + 4 * lane));
        r[0] = f.x;
        r[1] = f.y;
      }
    } else {
      const uint4 ua = *reinterpret_cast<const uint4*>(row + 16 * lane);
      const uint4 ub = *reinterpret_cast<const uint4*>(row + 512 + 16 * lane);
      const std::uint32_t wa[4] = {ua.x, ua.y, ua.z, ua.w};
      const std::uint32_t wb[4] = {ub.x, ub.y, ub.z, ub.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float2 fa = mla_pair<F>(wa[k]);
        const float2 fb = mla_pair<F>(wb[k]);
        a[2 * k] = fa.x;
        a[2 * k + 1] = fa.y;
        b[2 * k] = fb.x;
        b[2 * k + 1] = fb.y;
      }
      scale_a = scale_b = 1.0f;
      if (with_rope) {
        const float2 f = mla_pair<F>(*reinterpret_cast<const std::uint32_t*>(row + 1024 + 4 * lane));
        r[0] = f.x;
        r[1] = f.y;
      }
    }
  }
};

template <MlaCacheFormat F>
__global__ void __launch_bounds__(kMlaThreads, 1)
    mla_decode_kernel(const PagedDecodeParams p, const MlaLaunch L) {
  using Tr = MlaCacheTraits<F>;
  constexpr int kTile = kMlaTileKeys;
  constexpr int kRows = kMlaRowsPerWarp;
  extern __shared__ uint4 smem[];

  const MlaBlockWork work = mla_block_work(p, L, blockIdx.x);
  if (!work.active) return;
  const std::int64_t b = work.b;
  const std::int64_t seq_len = p.page_table.seq_len(b);
  const AttentionKeySpan span = work.span;
  const std::int64_t key_begin = work.key_begin, key_end = work.key_end;
  const int split = work.split;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int row_begin = work.row_begin, rows = work.rows;
  // This warp's rows: local rows warp, warp + 8, ... (warp-uniform count).
  const int my_rows = warp < rows ? (rows - warp + kMlaWarps - 1) / kMlaWarps : 0;

  float qa[kRows][8], qb[kRows][8], qr[kRows][2];
  float acc_a[kRows][8], acc_b[kRows][8];
  OnlineSoftmax softmax[kRows];
  std::int64_t q_pos[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int r = row_begin + (i < my_rows ? warp + i * kMlaWarps : 0);
    const std::int64_t token = r / p.num_q_heads;
    const std::int64_t head = r - token * p.num_q_heads;
    q_pos[i] = seq_len - p.q_len + token;
    const std::int64_t base = (b * p.q_len + token) * p.q_stride_token + head * p.q_stride_head;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      qa[i][e] = i < my_rows ? mla_load(p.q, p.q_dtype, base + 8 * lane + e) : 0.0f;
      qb[i][e] = i < my_rows ? mla_load(p.q, p.q_dtype, base + 256 + 8 * lane + e) : 0.0f;
      acc_a[i][e] = acc_b[i][e] = 0.0f;
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) qr[i][e] = i < my_rows ? mla_load(p.q, p.q_dtype, base + 512 + 2 * lane + e) : 0.0f;
  }

  const std::int32_t* pages = p.page_table.pages(b);
  const unsigned char* cache = static_cast<const unsigned char*>(p.k_cache);
  unsigned char* stages = reinterpret_cast<unsigned char*>(smem);
  float* scores = reinterpret_cast<float*>(stages + kMlaStages * Tr::kStageBytes) + warp * kRows * kTile;
  const std::int64_t num_tiles = (key_end - key_begin + kTile - 1) / kTile;

  const auto load_tile = [&](std::int64_t tile) {
    const std::int64_t first = key_begin + tile * kTile;
    const int n = key_end - first < kTile ? int(key_end - first) : kTile;
    unsigned char* dst = stages + std::size_t(tile % kMlaStages) * Tr::kStageBytes;
    constexpr int kWork = kTile * Tr::kUnits;
#pragma unroll
    for (int it = 0; it < (kWork + kMlaThreads - 1) / kMlaThreads; ++it) {
      const int u = tid + it * kMlaThreads;
      const int j = u / Tr::kUnits;
      const int unit = u - j * Tr::kUnits;
      if (u < kWork && j < n) {
        const std::int64_t pos = span.position(first + j);
        const std::int64_t off = p.layout.slot_offset(token_slot(pages, pos, p.layout.page_shift), 0);
        copy_unit_16(dst + j * Tr::kRowBytes + unit * 16, cache + off * Tr::kElemBytes + unit * 16, L.async_copy, 2);
      }
    }
  };

  const auto compute_tile = [&](std::int64_t tile) {
    const std::int64_t first = key_begin + tile * kTile;
    const int n = key_end - first < kTile ? int(key_end - first) : kTile;
    const unsigned char* rows_smem = stages + std::size_t(tile % kMlaStages) * Tr::kStageBytes;
    float tile_max[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) tile_max[i] = -INFINITY;
    // Pass 1: scores of the tile (every lane ends with every score).
    for (int j = 0; j < n; ++j) {
      MlaFragment<F> k;
      k.load(rows_smem + j * Tr::kRowBytes, lane, true);
      const std::int64_t pos = span.position(first + j);
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        if (i >= my_rows) continue;
        float sa = 0.0f, sb = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          sa = fmaf(qa[i][e], k.a[e], sa);
          sb = fmaf(qb[i][e], k.b[e], sb);
        }
        float s = fmaf(qr[i][0], k.r[0], qr[i][1] * k.r[1]);
        s = fmaf(k.scale_a, sa, fmaf(k.scale_b, sb, s));
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
        const float logit = attention_visible(p, q_pos[i], pos) ? attention_logit(p, s) : -INFINITY;
        tile_max[i] = fmaxf(tile_max[i], logit);
        if (lane == 0) scores[i * kTile + j] = logit;
      }
    }
    __syncwarp();
    // Pass 2: one rescale per tile, then the weighted values (the lane's c_kv pieces).
    float factor[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      factor[i] = 1.0f;
      if (i < my_rows && tile_max[i] != -INFINITY) factor[i] = softmax[i].rescale_for(tile_max[i]);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        acc_a[i][e] *= factor[i];
        acc_b[i][e] *= factor[i];
      }
    }
    for (int j = 0; j < n; ++j) {
      MlaFragment<F> v;
      v.load(rows_smem + j * Tr::kRowBytes, lane, false);
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        if (i >= my_rows) continue;
        const float s = scores[i * kTile + j];
        const float w = s == -INFINITY ? 0.0f : expf(s - softmax[i].max);
        softmax[i].sum += w;
        const float wa = w * v.scale_a, wb = w * v.scale_b;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          acc_a[i][e] = fmaf(wa, v.a[e], acc_a[i][e]);
          acc_b[i][e] = fmaf(wb, v.b[e], acc_b[i][e]);
        }
      }
    }
    __syncwarp();  // scores are rewritten by the next tile
  };

  // Double buffer: tile t + 1 is in flight while t is used.
  if (num_tiles > 0) load_tile(0);
  cp_async_commit();
  for (std::int64_t tile = 0; tile < num_tiles; ++tile) {
    if (tile + 1 < num_tiles) load_tile(tile + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // tile is in shared memory for every thread
    compute_tile(tile);
    __syncthreads();  // every warp is done with the stage that tile + 2 will fill
  }
  cp_async_wait<0>();

  const bool final_output = work.chunks == 1;
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    if (i >= my_rows) continue;
    const int r = row_begin + warp + i * kMlaWarps;
    const std::int64_t token = r / p.num_q_heads;
    const std::int64_t head = r - token * p.num_q_heads;
    const std::int64_t t = b * p.q_len + token;
    const std::int64_t row_id = t * p.num_q_heads + head;
    const float inv = softmax[i].sum > 0.0f ? 1.0f / softmax[i].sum : 0.0f;
    if (final_output) {
      const std::int64_t base = t * p.o_stride_token + head * p.o_stride_head;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        mla_store(p.o, p.q_dtype, base + 8 * lane + e, acc_a[i][e] * inv);
        mla_store(p.o, p.q_dtype, base + 256 + 8 * lane + e, acc_b[i][e] * inv);
      }
      if (lane == 0 && p.lse != nullptr) p.lse[row_id] = softmax[i].lse();
    } else {
      const std::int64_t state = std::int64_t(split) * L.rows_total + row_id;
      float* dst = L.partial_o + state * kMlaValueDim;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        dst[8 * lane + e] = acc_a[i][e] * inv;
        dst[256 + 8 * lane + e] = acc_b[i][e] * inv;
      }
      if (lane == 0) L.partial_lse[state] = softmax[i].lse();
    }
  }
}

/// Merges the chunks of each split row into o/lse; rows of sequences that
/// needed one chunk were written by the decode kernel and are skipped.
__global__ void __launch_bounds__(kMergeThreads) mla_decode_merge_kernel(const PagedDecodeParams p, const MlaLaunch L) {
  const std::int64_t row_id = std::int64_t(blockIdx.x) * kMergeRowsPerBlock + threadIdx.x / 32;
  if (row_id >= L.rows_total) return;
  const std::int64_t t = row_id / p.num_q_heads;
  const std::int64_t head = row_id - t * p.num_q_heads;
  const std::int64_t b = t / p.q_len;
  const AttentionKeySpan span = attention_key_span(p, p.page_table.seq_len(b));
  const int chunks = decode_num_chunks(span.size(), L.chunk_keys, L.num_splits);
  if (chunks == 1) return;
  const std::int64_t base = t * p.o_stride_token + head * p.o_stride_head;
  const float lse = merge_row(L.partial_o + row_id * kMlaValueDim, L.rows_total * kMlaValueDim,
                              L.partial_lse + row_id, L.rows_total, chunks, kMlaValueDim,
                              [&](int d, float v) { mla_store(p.o, p.q_dtype, base + d, v); });
  if ((threadIdx.x & 31) == 0 && p.lse != nullptr) p.lse[row_id] = lse;
}

}  // namespace detail

/// The kernel argument for plan_mla_decode on the current device: kAuto where
/// the tensor-core kernel fits (sm_80+ with 225 KiB of shared memory per
/// block: sm_90), else kCudaCores, so that a plan made with it always runs
/// here. Queries device attributes only (no sync; allowed during capture).
inline MlaDecodeKernel mla_decode_kernel_for_current_device() {
  int device = 0, major = 0, optin = 0;
  KVKIT_CUDA_CHECK(cudaGetDevice(&device));
  KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const bool tc_fits = major >= 8 && std::size_t(optin) >= std::size_t(detail::kMlaTcSmemBytes);
  return tc_fits ? MlaDecodeKernel::kAuto : MlaDecodeKernel::kCudaCores;
}

/// Runs absorbed MLA decode attention on `stream` as planned: writes o ([rows,
/// num_q_heads, 512], q's dtype) and lse if requested, like
/// kvkit::mla_decode_attention. All pointers in `p` are device pointers;
/// `workspace` (device memory, >= plan.workspace_bytes, 4-byte aligned; may
/// be null when that is 0) holds the split partial states. Neither allocates
/// nor synchronizes, so it can be captured in a CUDA graph. Throws
/// kvkit::Error (launching nothing) on invalid params, a shape or cache
/// dtype the kernel is not built for (kv_lora_rank 512 + rope 64 only), a
/// plan made for another shape, a missing or too small workspace, or a
/// tensor-core plan on a GPU older than sm_80 or without 225 KiB of shared
/// memory per block (sm_80 / sm_86 / sm_89: plan with kCudaCores, or with
/// mla_decode_kernel_for_current_device()); or a failed launch.
inline void run_mla_decode(const PagedDecodeParams& p, const MlaDecodePlan& plan, void* workspace,
                           std::size_t workspace_bytes, cudaStream_t stream = nullptr) {
  constexpr const char* kWhere = "kvkit::cuda::run_mla_decode";
  detail::validate_cuda_mla_decode_shapes(p, kWhere);
  const bool same_shape = plan.batch_size == p.page_table.batch_size && plan.q_len == p.q_len &&
                          plan.num_q_heads == p.num_q_heads && plan.q_dtype == p.q_dtype &&
                          plan.kv_dtype == p.kv_dtype;
  if (!same_shape) {
    fail(kWhere, "the plan was made for batch ", plan.batch_size, ", q_len ", plan.q_len, ", ", plan.num_q_heads,
         " heads, ", plan.q_dtype, "/", plan.kv_dtype, "; expected the same as params (batch ",
         p.page_table.batch_size, ", q_len ", p.q_len, ", ", p.num_q_heads, " heads, ", p.q_dtype, "/", p.kv_dtype,
         "): call plan_mla_decode again");
  }
  const std::int64_t rows = std::int64_t(p.q_len) * p.num_q_heads;
  const bool tc = plan.kernel == MlaDecodeKernel::kTensorCores;
  check_argument(plan.num_splits >= 1 && plan.num_splits <= kMaxDecodeSplits &&
                     (plan.num_splits == 1 || plan.chunk_keys > 0) && plan.row_chunks >= 1 &&
                     (tc || plan.kernel == MlaDecodeKernel::kCudaCores) && plan.rows_per_chunk >= 1 &&
                     plan.rows_per_chunk <= detail::mla_rows_per_block(plan.kernel) &&
                     std::int64_t(plan.row_chunks) * plan.rows_per_chunk >= rows,
                 kWhere, "plan.num_splits", plan.num_splits, "a plan made by plan_mla_decode");
  const std::int64_t rows_total = p.page_table.batch_size * rows;
  if (plan.num_splits > 1) {
    const std::size_t needed = std::size_t(plan.num_splits) * std::size_t(rows_total) *
                               std::size_t(detail::kMlaValueDim + 1) * sizeof(float);
    detail::check_workspace(workspace, workspace_bytes, needed, kWhere);
  }
  check_argument(detail::address_of(p.k_cache) % (p.kv_dtype == DType::kFloat8E4M3 ? 4 : 2) == 0, kWhere,
                 "k_cache", p.k_cache, "aligned to its elements (2 bytes; 4 for fp8 rows, whose scales are float32)");
  if (tc) {
    check_argument(detail::mla_tensor_core_dtypes(p), kWhere, "plan.kernel", "kTensorCores",
                   "a plan for a bfloat16 or float16 cache with q of the same dtype");
    int device = 0, major = 0;
    KVKIT_CUDA_CHECK(cudaGetDevice(&device));
    KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    check_argument(major >= 8, kWhere, "plan.kernel", "kTensorCores",
                   "a GPU with compute capability 8.0 or newer for the tensor-core kernel (this one is ", major,
                   ".x): plan with MlaDecodeKernel::kCudaCores");
    // Its 225 KiB of shared memory fit sm_90 (227 KiB per block) but not
    // sm_80 (163 KiB) or sm_86 / sm_89 (99 KiB), where kAuto still picks it.
    detail::check_smem_optin(std::size_t(detail::kMlaTcSmemBytes), kWhere,
                             "the tensor-core kernel does not fit; plan with MlaDecodeKernel::kCudaCores");
  }
  if (rows_total == 0) return;

  detail::MlaLaunch L;
  L.rows_total = rows_total;
  L.chunk_keys = plan.num_splits > 1 ? plan.chunk_keys : 0;
  L.num_splits = plan.num_splits;
  L.row_chunks = plan.row_chunks;
  L.rows_per_chunk = plan.rows_per_chunk;
  if (plan.num_splits > 1) {
    L.partial_o = static_cast<float*>(workspace);
    L.partial_lse = L.partial_o + std::size_t(plan.num_splits) * std::size_t(rows_total) * detail::kMlaValueDim;
  }
  const std::uint64_t es = p.kv_dtype == DType::kFloat8E4M3 ? 1 : 2;
  L.async_copy = detail::copy_unit_bytes({detail::address_of(p.k_cache), std::uint64_t(p.layout.stride_page) * es,
                                          std::uint64_t(p.layout.stride_slot) * es}) == 16;
  L.q_async = detail::copy_unit_bytes({detail::address_of(p.q), std::uint64_t(p.q_stride_token) * 2,
                                       std::uint64_t(p.q_stride_head) * 2}) == 16;
  const std::int64_t blocks = p.page_table.batch_size * plan.row_chunks * plan.num_splits;
  const auto launch = [&](auto format) {
    constexpr detail::MlaCacheFormat kF = decltype(format)::value;
    detail::mla_decode_kernel<kF>
        <<<unsigned(blocks), detail::kMlaThreads, detail::MlaCacheTraits<kF>::kSmemBytes, stream>>>(p, L);
  };
  using detail::MlaCacheFormat;
  if (tc) {
    detail::launch_mla_decode_tc(p, L, blocks, stream);
  } else {
    switch (p.kv_dtype) {
      case DType::kBFloat16: launch(std::integral_constant<MlaCacheFormat, MlaCacheFormat::kBFloat16>{}); break;
      case DType::kFloat16: launch(std::integral_constant<MlaCacheFormat, MlaCacheFormat::kFloat16>{}); break;
      default: launch(std::integral_constant<MlaCacheFormat, MlaCacheFormat::kFp8>{}); break;
    }
  }
  if (plan.num_splits > 1) {
    detail::mla_decode_merge_kernel<<<detail::merge_blocks(rows_total), detail::kMergeThreads, 0, stream>>>(p, L);
  }
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvkit::cuda
