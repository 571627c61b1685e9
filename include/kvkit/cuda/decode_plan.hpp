#pragma once
/// @file decode_plan.hpp
/// The host half of the GPU decode attention (cuda/attention_decode.cuh):
/// DecodePlan and plan_decode, the argument checks that need no device
/// memory, and the shape constants the kernels are built with. Plain C++
/// (no CUDA headers), so that planning and its checks can be tested and used
/// by host code on machines without a GPU.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kvkit/core/config.hpp"
#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/ops/attention_checks.hpp"
#include "kvkit/ops/attention_params.hpp"

namespace kvkit::cuda {

/// Most key chunks (splits) per sequence that a plan may choose.
inline constexpr int kMaxDecodeSplits = 128;

/// Knobs of plan_decode. The defaults suit an H100-class GPU.
struct DecodePlanOptions {
  /// Thread blocks per SM the split heuristic aims for (two fit at once).
  int blocks_per_sm = 2;
  /// Smallest chunk the heuristic makes: shorter chunks cost more in the merge than they gain.
  std::int64_t min_chunk_keys = 256;
  /// Cap on chunks per sequence (1 disables split-KV); at most kMaxDecodeSplits.
  int max_splits = 64;
  /// > 0: use exactly this many keys per chunk instead of the heuristic
  /// (tests; engines that tune it). Still capped by max_splits.
  std::int64_t chunk_keys = 0;
};

/// What run_decode needs besides the params: grid shape, chunking and the
/// workspace size. Made on the host by plan_decode from host copies of the
/// sequence lengths; valid for any device lengths that respect the page
/// table (longer sequences get longer last chunks, never more chunks, so
/// the workspace stays large enough). Plain data: copy it freely.
struct DecodePlan {
  std::int64_t batch_size = 0;  ///< the shape the plan was made for; run_decode checks it
  int q_len = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  DType q_dtype = DType::kFloat32;
  DType kv_dtype = DType::kFloat32;
  int row_chunks = 1;           ///< blocks along one kv head's q_len x group query rows
  int rows_per_chunk = 1;       ///< query rows per block (the last chunk may have fewer)
  int num_splits = 1;           ///< most key chunks of any sequence (1: no split-KV)
  std::int64_t chunk_keys = 0;  ///< keys per chunk; 0 without split-KV
  std::size_t workspace_bytes = 0;  ///< partial o and lse; 0 without split-KV
};

namespace detail {

constexpr int next_pow2(int x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}
constexpr int floor_pow2(int x) {
  int p = 1;
  while (p * 2 <= x) p *= 2;
  return p;
}

inline constexpr int kDecodeThreads = 256;
/// Query rows a lane group keeps in registers (q fragment + accumulator each).
inline constexpr int kDecodeRowsPerGroup = 4;
inline constexpr int kDecodeStages = 3;
/// Bytes of one K tile (and one V tile) per pipeline stage.
inline constexpr int kDecodeTileBytes = 8192;

/// Cache elements one lane converts per step: 16 bytes of float32 / float16
/// / bfloat16, but 8 of a 1-byte (fp8 / int8) cache. A 16-byte unit of a
/// 1-byte cache would put 16 q and 16 accumulator floats per query row in a
/// lane's registers, twice the float caches' share, and spill at 4 rows; 8
/// keeps a lane's registers (and the lanes per row, and the rows per block)
/// the same as for a 16-bit cache of the same head_dim.
constexpr int decode_fragment_elems(int elem_bytes) { return elem_bytes == 1 ? 8 : 16 / elem_bytes; }

/// Lanes that share one K/V row: one fragment each, rounded up to a power of
/// two (head_dim 96 in bf16 = 12 fragments -> 16 lanes, 4 idle) and at most
/// a warp (wider rows give a lane several fragments).
constexpr int decode_lanes(int head_dim, int elem_bytes) {
  return head_dim / decode_fragment_elems(elem_bytes) >= 32 ? 32
                                                            : next_pow2(head_dim / decode_fragment_elems(elem_bytes));
}
/// Query rows one block serves: lane groups x rows per group.
constexpr int decode_max_rows(int head_dim, int elem_bytes) {
  return kDecodeThreads / decode_lanes(head_dim, elem_bytes) * kDecodeRowsPerGroup;
}
/// Keys per K (and V) tile: kDecodeTileBytes of rows, a power of two in
/// [8, 64] for 2- and 4-byte elements and in [8, 128] for 1-byte ones (so
/// that a 1-byte tile of head_dim 64 or 48 still moves 8 KiB per stage).
constexpr int decode_tile_keys(int head_dim, int elem_bytes) {
  const int raw = floor_pow2(kDecodeTileBytes / (head_dim * elem_bytes));
  const int cap = elem_bytes == 1 ? 128 : 64;
  return raw < 8 ? 8 : raw > cap ? cap : raw;
}

/// Chunks of `keys` keys of `chunk_keys` each, at least 1, at most max_chunks
/// (the last chunk takes the rest). Shared by the decode and merge kernels.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE int decode_num_chunks(std::int64_t keys, std::int64_t chunk_keys,
                                                          int max_chunks) {
  if (keys <= 0 || chunk_keys <= 0) return 1;
  const std::int64_t n = (keys + chunk_keys - 1) / chunk_keys;
  return n < max_chunks ? int(n) : max_chunks;
}

/// Calls f(std::integral_constant<int, head_dim>, TypeTag<QT>, TypeTag<KVT>)
/// for the combinations the GPU kernels are compiled for: head_dim 48, 64, 96,
/// 128, 256 and (q, kv) dtypes
///   - equal (float32, float16, bfloat16), or float32 q with a bfloat16 cache;
///   - any of float32 / float16 / bfloat16 q with a quantized cache
///     (float8_e4m3, float8_e5m2, int8): KVT is then std::uint8_t, one kernel
///     for the three 1-byte formats, which the kernel tells apart at run time
///     (DecodeLaunch::kv_format).
/// Throws kvkit::Error otherwise, naming the head_dim or the dtype pair.
template <class F>
void dispatch_decode(std::int64_t head_dim, DType q_dtype, DType kv_dtype, const char* where, F&& f) {
  const auto with_head_dim = [&](auto qtag, auto kvtag) {
    switch (head_dim) {
      case 48: f(std::integral_constant<int, 48>{}, qtag, kvtag); break;  // llama2.c small models
      case 64: f(std::integral_constant<int, 64>{}, qtag, kvtag); break;
      case 96: f(std::integral_constant<int, 96>{}, qtag, kvtag); break;
      case 128: f(std::integral_constant<int, 128>{}, qtag, kvtag); break;
      case 256: f(std::integral_constant<int, 256>{}, qtag, kvtag); break;
      default: fail_argument(where, "layout.head_dim", head_dim, "one of {48, 64, 96, 128, 256} on the GPU");
    }
  };
  dispatch_dtype<FloatTypes>(q_dtype, where, "q_dtype", [](auto) {});
  ::kvkit::detail::dispatch_kv_cache_dtype(kv_dtype, where, [](auto) {});
  if (is_quantized_cache_dtype(kv_dtype)) {
    dispatch_dtype<FloatTypes>(q_dtype, where, "q_dtype",
                               [&](auto qtag) { with_head_dim(qtag, TypeTag<std::uint8_t>{}); });
  } else if (q_dtype == kv_dtype) {
    dispatch_dtype<FloatTypes>(q_dtype, where, "q_dtype", [&](auto tag) { with_head_dim(tag, tag); });
  } else if (q_dtype == DType::kFloat32 && kv_dtype == DType::kBFloat16) {
    with_head_dim(TypeTag<float>{}, TypeTag<bfloat16>{});
  } else {
    fail(where, "q_dtype ", q_dtype, " with kv_dtype ", kv_dtype,
         ": expected equal dtypes, float32 q with a bfloat16 cache, or float32 / float16 / bfloat16 q with a "
         "float8_e4m3, float8_e5m2 or int8 cache, on the GPU");
  }
}

/// The 1-byte cache format a kernel instance for std::uint8_t reads.
enum class DecodeKVFormat : int { kFloat = 0, kE4M3 = 1, kE5M2 = 2, kInt8 = 3 };

inline DecodeKVFormat decode_kv_format(DType kv_dtype) {
  return kv_dtype == DType::kFloat8E4M3   ? DecodeKVFormat::kE4M3
         : kv_dtype == DType::kFloat8E5M2 ? DecodeKVFormat::kE5M2
         : kv_dtype == DType::kInt8       ? DecodeKVFormat::kInt8
                                          : DecodeKVFormat::kFloat;
}

/// Query rows per block for this head_dim and cache dtype (see DecodeTraits).
inline int decode_rows_per_block(std::int64_t head_dim, DType kv_dtype) {
  return decode_max_rows(int(head_dim), int(dtype_size(kv_dtype)));
}

/// The CPU op's checks that need no device memory, plus the head_dim / dtype
/// combinations the CUDA kernels are compiled for. The page table's arrays are
/// not read (device pointers): page ids and seq_lens >= q_len are the caller's
/// contract (plan_decode checks its host copy of the lengths).
inline void validate_cuda_decode_shapes(const PagedDecodeParams& p, const char* where) {
  ::kvkit::detail::reject_ragged_queries(p, where);
  ::kvkit::detail::validate_decode_shapes(p, where);
  check_argument(p.v_head_dim == 0 || p.v_head_dim == p.layout.head_dim, where, "v_head_dim",
                 p.v_head_dim, "0 or head_dim here (MLA's narrower values: cuda::run_mla_decode)");
  dispatch_decode(p.layout.head_dim, p.q_dtype, p.kv_dtype, where, [](auto, auto, auto) {});
}

/// The plan arguments plan_decode and plan_mla_decode share: the device's
/// SM count, the options, and the host copy of the lengths (each >= q_len
/// under causal attention and within the page table).
inline void validate_plan_inputs(const PagedDecodeParams& p, const std::int32_t* host_seq_lens, int num_sms,
                                 const DecodePlanOptions& options, const char* kWhere) {
  check_argument(num_sms > 0, kWhere, "num_sms", num_sms, "> 0");
  check_argument(options.blocks_per_sm > 0, kWhere, "options.blocks_per_sm", options.blocks_per_sm, "> 0");
  check_argument(options.min_chunk_keys > 0, kWhere, "options.min_chunk_keys", options.min_chunk_keys, "> 0");
  check_argument(options.max_splits >= 1 && options.max_splits <= kMaxDecodeSplits, kWhere,
                 "options.max_splits", options.max_splits, "in [1, ", kMaxDecodeSplits, "]");
  check_argument(options.chunk_keys >= 0, kWhere, "options.chunk_keys", options.chunk_keys,
                 ">= 0 (0: chosen by the plan)");
  const PaddedPageTable& t = p.page_table;
  check_argument(host_seq_lens != nullptr || t.batch_size == 0, kWhere, "host_seq_lens", host_seq_lens,
                 "a non-null pointer to batch_size (", t.batch_size, ") lengths in host memory");
  for (std::int64_t b = 0; b < t.batch_size; ++b) {
    const std::int64_t len = host_seq_lens[b];
    // The CPU op's validate_page_table rejects negative lengths; causal calls
    // catch them below (len < q_len), non-causal ones only here.
    if (len < 0) fail(kWhere, "host_seq_lens[", b, "] = ", len, ": expected >= 0");
    ::kvkit::detail::check_decode_seq_len(p, b, len, kWhere);
    if (len > t.max_blocks * p.layout.page_size) {
      fail(kWhere, "host_seq_lens[", b, "] = ", len, ": expected at most max_blocks x page_size (",
           t.max_blocks * p.layout.page_size, ")");
    }
  }
}

/// A run's split workspace: non-null, at least `needed` bytes, 4-byte aligned.
inline void check_workspace(const void* workspace, std::size_t workspace_bytes, std::size_t needed,
                            const char* where) {
  check_argument(workspace != nullptr, where, "workspace", workspace, "a non-null device pointer (", needed,
                 " bytes, plan.workspace_bytes)");
  check_argument(workspace_bytes >= needed, where, "workspace_bytes", workspace_bytes,
                 ">= plan.workspace_bytes (", needed, ")");
  check_argument(reinterpret_cast<std::uintptr_t>(workspace) % 4 == 0, where, "workspace", workspace,
                 "4-byte aligned");
}

/// Equal chunks of at most `capacity` query rows, none empty.
inline void split_rows(std::int64_t rows, std::int64_t capacity, int& rows_per_chunk, int& row_chunks) {
  const std::int64_t chunks_needed = (rows + capacity - 1) / capacity;
  rows_per_chunk = int((rows + chunks_needed - 1) / chunks_needed);
  row_chunks = int((rows + rows_per_chunk - 1) / rows_per_chunk);
}

}  // namespace detail

/// Plans a decode call on the host: rows per block, whether and how to split
/// the keys (more chunks for few sequences x long contexts, so that about
/// options.blocks_per_sm x num_sms blocks run), and the workspace size.
/// `host_seq_lens` ([batch_size], host memory) are the lengths the plan is
/// made for (a host copy of params.page_table.seq_lens; for a captured graph
/// replayed at growing lengths, plan for the longest). `num_sms`: the
/// device's multiprocessor count (cudaDevAttrMultiProcessorCount). Reads no
/// device memory. Throws kvkit::Error on invalid params, head_dim or dtype
/// combinations the GPU does not support, lengths < q_len or beyond the page
/// table, or bad options.
inline DecodePlan plan_decode(const PagedDecodeParams& p, const std::int32_t* host_seq_lens, int num_sms,
                              const DecodePlanOptions& options = {}) {
  constexpr const char* kWhere = "kvkit::cuda::plan_decode";
  detail::validate_cuda_decode_shapes(p, kWhere);
  detail::validate_plan_inputs(p, host_seq_lens, num_sms, options, kWhere);
  const PaddedPageTable& t = p.page_table;

  DecodePlan plan;
  plan.batch_size = t.batch_size;
  plan.q_len = p.q_len;
  plan.num_q_heads = p.num_q_heads;
  plan.num_kv_heads = int(p.layout.num_heads);
  plan.head_dim = int(p.layout.head_dim);
  plan.q_dtype = p.q_dtype;
  plan.kv_dtype = p.kv_dtype;
  const int group = p.num_q_heads / plan.num_kv_heads;
  const std::int64_t rows = std::int64_t(p.q_len) * group;
  const std::int64_t capacity = detail::decode_rows_per_block(p.layout.head_dim, p.kv_dtype);
  check_argument(rows <= std::int64_t(1) << 24, kWhere, "q_len", p.q_len,
                 "small enough that q_len x group (", rows, ") <= 2^24");
  detail::split_rows(rows, capacity, plan.rows_per_chunk, plan.row_chunks);

  const std::int64_t base_blocks = t.batch_size * plan.num_kv_heads * plan.row_chunks;
  const std::int64_t target = std::int64_t(options.blocks_per_sm) * num_sms;
  std::int64_t chunk = options.chunk_keys;
  if (chunk == 0 && base_blocks > 0 && base_blocks < target && options.max_splits > 1) {
    // Spread the keys of all sequences over about `target` blocks.
    std::int64_t keys = 0;
    for (std::int64_t b = 0; b < t.batch_size; ++b) keys += attention_key_span(p, host_seq_lens[b]).size();
    chunk = (keys * plan.num_kv_heads * plan.row_chunks + target - 1) / target;
    chunk = chunk < options.min_chunk_keys ? options.min_chunk_keys : chunk;
    // Whole tiles (64 keys, or 128 for 1-byte caches at head_dim <= 64), so
    // that no chunk ends in a part-filled tile.
    const std::int64_t tile = detail::decode_tile_keys(int(p.layout.head_dim), int(dtype_size(p.kv_dtype)));
    chunk = (chunk + tile - 1) / tile * tile;
  }
  if (chunk > 0) {
    for (std::int64_t b = 0; b < t.batch_size; ++b) {
      const int n = detail::decode_num_chunks(attention_key_span(p, host_seq_lens[b]).size(), chunk,
                                              options.max_splits);
      plan.num_splits = n > plan.num_splits ? n : plan.num_splits;
    }
  }
  if (plan.num_splits > 1) {
    plan.chunk_keys = chunk;
    const std::int64_t rows_total = t.batch_size * p.q_len * p.num_q_heads;
    plan.workspace_bytes =
        std::size_t(plan.num_splits) * std::size_t(rows_total) * std::size_t(plan.head_dim + 1) * sizeof(float);
  }
  check_argument(base_blocks * plan.num_splits <= 0x7fffffff, kWhere, "page_table.batch_size",
                 t.batch_size, "small enough for one grid (", base_blocks * plan.num_splits,
                 " blocks needed, at most 2^31 - 1)");
  return plan;
}

}  // namespace kvkit::cuda
