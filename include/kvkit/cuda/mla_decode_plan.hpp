#pragma once
/// @file mla_decode_plan.hpp
/// The host half of the GPU absorbed MLA decode (cuda/mla_decode.cuh):
/// MlaDecodePlan and plan_mla_decode, the argument checks that need no
/// device memory, and the block shape the kernel is built with. Plain C++
/// (no CUDA headers): planning and its checks are tested on machines without
/// a GPU.

#include <cstddef>
#include <cstdint>

#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/cuda/decode_plan.hpp"
#include "kvkit/cuda/mla_decode_tc_layout.hpp"
#include "kvkit/layout/latent_fp8_layout.hpp"
#include "kvkit/ops/attention_params.hpp"
#include "kvkit/ops/mla_decode.hpp"

namespace kvkit::cuda {

/// Which kernel runs an absorbed MLA decode (MlaDecodePlan::kernel).
///  - kCudaCores: FMAs on CUDA cores, 32 query rows per block; any cache
///    (bf16, fp16, fp8 656-byte rows) and any q dtype.
///  - kTensorCores: mma.sync m16n8k16, 64 query rows per block, 225 KiB of
///    shared memory (sm_90; sm_80 / sm_86 / sm_89 cannot hold it and
///    run_mla_decode refuses); bf16 or fp16 cache with q (and o) of the same dtype.
///  - kAuto (plan argument only): tensor cores where they apply and a
///    sequence has at least 16 query rows (q_len x num_q_heads), else CUDA
///    cores. The plan does not see the device: before sm_90, ask for kCudaCores.
enum class MlaDecodeKernel { kAuto, kCudaCores, kTensorCores };

/// What run_mla_decode needs besides the params (see DecodePlan, whose rules
/// it follows: made on the host from host copies of the sequence lengths;
/// valid for any device lengths up to those; plain data).
struct MlaDecodePlan {
  std::int64_t batch_size = 0;  ///< the shape the plan was made for; run_mla_decode checks it
  int q_len = 0;
  int num_q_heads = 0;
  DType q_dtype = DType::kFloat32;
  DType kv_dtype = DType::kBFloat16;
  MlaDecodeKernel kernel = MlaDecodeKernel::kCudaCores;  ///< never kAuto in a made plan
  int row_chunks = 1;           ///< blocks along one sequence's q_len x num_q_heads query rows
  int rows_per_chunk = 1;       ///< query rows per block (the last chunk may have fewer)
  int num_splits = 1;           ///< most key chunks of any sequence (1: no split-KV)
  std::int64_t chunk_keys = 0;  ///< keys per chunk; 0 without split-KV
  std::size_t workspace_bytes = 0;  ///< partial o (512 floats) and lse per split and row; 0 without split-KV
};

namespace detail {

/// The compiled case: kv_lora_rank 512 + rope 64, values = the first 512.
inline constexpr int kMlaKeyDim = 576;
inline constexpr int kMlaValueDim = 512;
inline constexpr int kMlaThreads = 256;
inline constexpr int kMlaWarps = kMlaThreads / 32;
/// Query rows a warp keeps in registers (q fragment + 512-wide accumulator).
inline constexpr int kMlaRowsPerWarp = 4;
inline constexpr int kMlaRowsPerBlock = kMlaWarps * kMlaRowsPerWarp;  // 32
/// Keys per shared-memory tile and pipeline stages (2 x 16 bf16 rows = 36 KiB).
inline constexpr int kMlaTileKeys = 16;
inline constexpr int kMlaStages = 2;

/// Launch-time values the decode kernels need besides PagedDecodeParams.
struct MlaLaunch {
  float* partial_o = nullptr;    ///< [num_splits, rows_total, 512]
  float* partial_lse = nullptr;  ///< [num_splits, rows_total]
  std::int64_t rows_total = 0;   ///< batch * q_len * num_q_heads
  std::int64_t chunk_keys = 0;
  int num_splits = 1;
  int row_chunks = 1;
  int rows_per_chunk = 1;
  bool async_copy = true;        ///< cache pointer and strides are 16-byte aligned
  bool q_async = true;           ///< q pointer and strides are 16-byte aligned (tensor-core kernel)
};

/// What one block of either MLA decode kernel works on: blocks are
/// (sequence, split, row chunk) with row chunks innermost, so that the blocks
/// sharing a key range run side by side (L2 reuse). `active` is false for a
/// split beyond the sequence's chunks (the block returns at once).
struct MlaBlockWork {
  std::int64_t b = 0;  ///< sequence
  int split = 0;       ///< key chunk (index of the partial state)
  int chunks = 1;      ///< key chunks of this sequence (1: the block writes o and lse itself)
  AttentionKeySpan span{};
  std::int64_t key_begin = 0, key_end = 0;  ///< this split's keys, indices into the span
  int row_begin = 0, rows = 0;              ///< this chunk's query rows of the sequence
  bool active = false;
};

KVKIT_HOST_DEVICE KVKIT_FORCEINLINE MlaBlockWork mla_block_work(const PagedDecodeParams& p, const MlaLaunch& L,
                                                                std::int64_t block) {
  MlaBlockWork w;
  const int row_chunk = int(block % L.row_chunks);
  block /= L.row_chunks;
  const int split = int(block % L.num_splits);
  w.split = split;
  w.b = block / L.num_splits;
  w.span = attention_key_span(p, p.page_table.seq_len(w.b));
  const std::int64_t span_keys = w.span.size();
  const int chunks = decode_num_chunks(span_keys, L.chunk_keys, L.num_splits);
  w.chunks = chunks;
  w.active = split < chunks;
  w.key_begin = std::int64_t(split) * L.chunk_keys;
  w.key_end = split == chunks - 1 ? span_keys : w.key_begin + L.chunk_keys;
  w.row_begin = row_chunk * L.rows_per_chunk;
  const int all_rows = p.q_len * p.num_q_heads;
  w.rows = L.rows_per_chunk < all_rows - w.row_begin ? L.rows_per_chunk : all_rows - w.row_begin;
  return w;
}

/// Whether the tensor-core kernel can run this call's dtypes.
inline bool mla_tensor_core_dtypes(const PagedDecodeParams& p) {
  return (p.kv_dtype == DType::kBFloat16 || p.kv_dtype == DType::kFloat16) && p.q_dtype == p.kv_dtype;
}

/// Query rows per block of a kernel.
inline int mla_rows_per_block(MlaDecodeKernel kernel) {
  return kernel == MlaDecodeKernel::kTensorCores ? kMlaTcRowsPerBlock : kMlaRowsPerBlock;
}

/// The GPU checks of an MLA decode call: the shape checks of the CPU op
/// (without reading the page table) plus the compiled case (one kv head of
/// 576, values 512 wide) and the cache dtypes the kernel reads: float16,
/// bfloat16, or float8_e4m3 meaning FlashMLA's 656-byte rows.
inline void validate_cuda_mla_decode_shapes(const PagedDecodeParams& p, const char* where) {
  ::kvkit::detail::reject_ragged_queries(p, where);
  if (p.kv_dtype == DType::kFloat8E4M3) {
    ::kvkit::detail::validate_mla_fp8_decode(p, where, false);
  } else {
    ::kvkit::detail::validate_decode_shapes(p, where);
    check_argument(p.layout.num_heads == 1 && p.layout.head_dim == kMlaKeyDim, where, "layout.head_dim",
                   p.layout.head_dim, "576 (kv_lora_rank 512 + rope 64) with one kv head on the GPU (got ",
                   p.layout.num_heads, " kv heads)");
    check_argument(p.v_head_dim == kMlaValueDim, where, "v_head_dim", p.v_head_dim,
                   "512 (the c_kv part of each row) on the GPU");
    check_argument(p.kv_dtype == DType::kBFloat16 || p.kv_dtype == DType::kFloat16, where, "kv_dtype",
                   p.kv_dtype, "bfloat16, float16 or float8_e4m3 (656-byte rows) on the GPU");
  }
  // The kernels read the values from the key rows (k_cache) and never look
  // at v_cache; the CPU op reads v_cache. Refuse params where they differ.
  check_argument(p.v_cache == p.k_cache, where, "v_cache", p.v_cache,
                 "equal to k_cache (the values are the first 512 columns of the latent rows)");
}

}  // namespace detail

/// Plans an absorbed MLA decode call (see plan_decode for the arguments and
/// the split heuristic, whose options it takes) and picks its kernel
/// (`kernel`, see MlaDecodeKernel; kAuto by default). The tensor-core kernel
/// keeps one block per SM resident (225 KiB of shared memory), so for it the
/// heuristic splits the keys only while the unsplit grid would leave at
/// least half of the SMs idle, into as many chunks as fit in one wave. Throws
/// kvkit::Error on invalid params, a shape or dtype the GPU kernel is not
/// built for (also: kTensorCores asked for a cache other than bf16/fp16 or a
/// q dtype other than the cache's), lengths < q_len or beyond the page
/// table, or bad options.
inline MlaDecodePlan plan_mla_decode(const PagedDecodeParams& p, const std::int32_t* host_seq_lens, int num_sms,
                                     const DecodePlanOptions& options = {},
                                     MlaDecodeKernel kernel = MlaDecodeKernel::kAuto) {
  constexpr const char* kWhere = "kvkit::cuda::plan_mla_decode";
  detail::validate_cuda_mla_decode_shapes(p, kWhere);
  detail::validate_plan_inputs(p, host_seq_lens, num_sms, options, kWhere);
  const PaddedPageTable& t = p.page_table;
  const std::int64_t rows = std::int64_t(p.q_len) * p.num_q_heads;
  check_argument(rows <= std::int64_t(1) << 24, kWhere, "q_len", p.q_len,
                 "small enough that q_len x num_q_heads (", rows, ") <= 2^24");

  MlaDecodePlan plan;
  plan.batch_size = t.batch_size;
  plan.q_len = p.q_len;
  plan.num_q_heads = p.num_q_heads;
  plan.q_dtype = p.q_dtype;
  plan.kv_dtype = p.kv_dtype;
  const bool tc_dtypes = detail::mla_tensor_core_dtypes(p);
  check_argument(kernel != MlaDecodeKernel::kTensorCores || tc_dtypes, kWhere, "kv_dtype", p.kv_dtype,
                 "bfloat16 or float16 with q_dtype the same (got ", p.q_dtype,
                 ") for the tensor-core kernel (MlaDecodeKernel::kTensorCores)");
  if (kernel == MlaDecodeKernel::kAuto) {
    kernel = tc_dtypes && rows >= 16 ? MlaDecodeKernel::kTensorCores : MlaDecodeKernel::kCudaCores;
  }
  plan.kernel = kernel;
  const bool tc = kernel == MlaDecodeKernel::kTensorCores;
  // Equal row chunks of at most the kernel's rows per block, none empty. The
  // chunks of one key range are neighbours in the grid, so they run at the
  // same time and all but the first read the latent rows from L2.
  detail::split_rows(rows, detail::mla_rows_per_block(kernel), plan.rows_per_chunk, plan.row_chunks);

  const std::int64_t base_blocks = t.batch_size * plan.row_chunks;
  const std::int64_t target = tc ? std::int64_t(num_sms) : std::int64_t(options.blocks_per_sm) * num_sms;
  const bool few_blocks = tc ? base_blocks * 2 <= target : base_blocks < target;
  std::int64_t chunk = options.chunk_keys;
  std::int64_t longest = 0;
  for (std::int64_t b = 0; b < t.batch_size; ++b) {
    const std::int64_t keys = attention_key_span(p, host_seq_lens[b]).size();
    longest = keys > longest ? keys : longest;
  }
  if (chunk == 0 && base_blocks > 0 && few_blocks && options.max_splits > 1) {
    std::int64_t keys = 0;
    for (std::int64_t b = 0; b < t.batch_size; ++b) keys += attention_key_span(p, host_seq_lens[b]).size();
    if (tc) {
      // As many chunks per sequence as keep the grid within one wave (one
      // resident block per SM): 16 x 2 row chunks on 132 SMs -> 4, not 5
      // (160 blocks would need a second, mostly idle wave).
      const std::int64_t n = target / base_blocks;
      chunk = (longest + n - 1) / n;
    } else {
      chunk = (keys * plan.row_chunks + target - 1) / target;
    }
    chunk = chunk < options.min_chunk_keys ? options.min_chunk_keys : chunk;
    // Even chunks for the longest sequence (4,096 keys in 2 chunks: 2 x 2,048,
    // not 4,032 + 64), in whole tiles.
    const int n = detail::decode_num_chunks(longest, chunk, options.max_splits);
    chunk = (longest + n - 1) / n;
    chunk = (chunk + 63) / 64 * 64;
  }
  if (chunk > 0) plan.num_splits = detail::decode_num_chunks(longest, chunk, options.max_splits);
  if (plan.num_splits > 1) {
    plan.chunk_keys = chunk;
    const std::int64_t rows_total = t.batch_size * rows;
    plan.workspace_bytes = std::size_t(plan.num_splits) * std::size_t(rows_total) *
                           std::size_t(detail::kMlaValueDim + 1) * sizeof(float);
  }
  check_argument(base_blocks * plan.num_splits <= 0x7fffffff, kWhere, "page_table.batch_size", t.batch_size,
                 "small enough for one grid (", base_blocks * plan.num_splits, " blocks needed, at most 2^31 - 1)");
  return plan;
}

}  // namespace kvkit::cuda
