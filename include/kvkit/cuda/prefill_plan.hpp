#pragma once
/// @file prefill_plan.hpp
/// The host half of the GPU chunked-prefill attention
/// (cuda/attention_prefill.cuh): PrefillPlan and plan_prefill, the argument
/// checks that need no device memory, the tile shape the kernel is built
/// with, and the key span of a tile of query rows (host and device). Plain
/// C++ (no CUDA headers), so that planning and its checks run and are tested
/// on machines without a GPU.
///
/// Host and device copies of the ragged query offsets. The CUDA prefill takes
/// the same PagedDecodeParams as the CPU op, with one rule for every pointer
/// in it: for run_prefill they are all device pointers — q, the caches, o,
/// lse, the page table's block_table and seq_lens, and q_indptr too (int64,
/// [batch_size + 1]). The host copies of q_indptr and of the sequence lengths
/// go to plan_prefill as separate arguments, exactly as plan_decode takes a
/// host copy of the lengths. An engine thus fills one params struct per layer
/// and calls either the CPU op (host pointers) or plan_prefill + run_prefill
/// (device pointers), never a second struct.

#include <cstdint>
#include <type_traits>

#include "kvkit/core/config.hpp"
#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/ops/attention_checks.hpp"
#include "kvkit/ops/attention_params.hpp"

namespace kvkit::cuda {

/// Query rows one thread block of the prefill kernel owns: 8 warps of 16
/// rows (one mma.sync m16 row block each). Rows of a (sequence, kv head) are
/// its query tokens times the group's q heads, token-major (GQA packing: one
/// K/V tile serves every q head of the group).
inline constexpr int kPrefillRowsPerBlock = 128;

/// What run_prefill needs besides the params: the grid. Made on the host by
/// plan_prefill from host copies of q_indptr and the sequence lengths. Valid
/// for device values that give no sequence more query rows than the host
/// copy did (a graph replayed with smaller chunks stays correct; plan for
/// the largest). No workspace: every block writes its rows of o directly.
/// Plain data: copy it freely.
struct PrefillPlan {
  std::int64_t batch_size = 0;   ///< the shape the plan was made for; run_prefill checks it
  bool ragged = false;           ///< params.q_indptr was set (else q_len tokens per sequence)
  int q_len = 0;                 ///< tokens per sequence when not ragged
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  DType q_dtype = DType::kFloat32;
  DType kv_dtype = DType::kFloat32;
  std::int64_t total_q_tokens = 0;  ///< q_indptr[batch] (or batch x q_len): rows of q and o
  int max_q_tiles = 0;           ///< row tiles of the longest chunk (grid x); 0: nothing to do
  std::int64_t num_blocks = 0;   ///< blocks launched: max_q_tiles x batch x kv heads
  std::int64_t busy_blocks = 0;  ///< blocks with rows to compute (the others return at once)
};

namespace detail {

/// Calls f(std::integral_constant<int, head_dim>, TypeTag<T>) for the
/// combinations the prefill kernel is compiled for: head_dim 64, 96, 128 and
/// q = kv dtype in {float16, bfloat16} (the mma.sync operand types). Throws
/// kvkit::Error otherwise.
template <class F>
void dispatch_prefill(std::int64_t head_dim, DType q_dtype, DType kv_dtype, const char* where, F&& f) {
  using TensorCoreTypes = TypeList<half, bfloat16>;
  dispatch_dtype<TensorCoreTypes>(q_dtype, where, "q_dtype", [](auto) {});
  dispatch_dtype<TensorCoreTypes>(kv_dtype, where, "kv_dtype", [](auto) {});
  if (q_dtype != kv_dtype) {
    fail(where, "q_dtype ", q_dtype, " with kv_dtype ", kv_dtype,
         ": expected equal dtypes on the GPU prefill path (the tensor-core operands share one type)");
  }
  dispatch_dtype<TensorCoreTypes>(q_dtype, where, "q_dtype", [&](auto tag) {
    switch (head_dim) {
      case 64: f(std::integral_constant<int, 64>{}, tag); break;
      case 96: f(std::integral_constant<int, 96>{}, tag); break;
      case 128: f(std::integral_constant<int, 128>{}, tag); break;
      default: fail_argument(where, "layout.head_dim", head_dim, "one of {64, 96, 128} on the GPU prefill path");
    }
  });
}

/// The CPU op's checks that need no device memory (q_indptr and the page
/// table are device pointers here, so they are not read), plus what the
/// kernel supports: head_dim, dtypes, values as wide as keys.
inline void validate_cuda_prefill_shapes(const PagedDecodeParams& p, const char* where) {
  ::kvkit::detail::validate_decode_shapes(p, where);
  check_argument(p.v_head_dim == 0 || p.v_head_dim == p.layout.head_dim, where, "v_head_dim", p.v_head_dim,
                 "0 or head_dim on the GPU prefill path");
  dispatch_prefill(p.layout.head_dim, p.q_dtype, p.kv_dtype, where, [](auto, auto) {});
}

/// Which shared-memory row start (row, column in elements) each lane gives
/// ldmatrix.x4 in the prefill kernel, relative to the 16 x 16 block being
/// loaded (rows of the stored matrix: query rows for Q, keys for K and V).
/// Lanes 8i..8i+7 address 8x8 matrix i, which lands in register i. Shared
/// with the host test that emulates ldmatrix and mma.sync on these offsets.
///   Q (A of S = Q Kᵀ): matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15),
///     (8-15, 8-15) = registers a0..a3.
///   K (B of S, 16 keys x 16 dims): (keys 0-7, dims 0-7), (0-7, 8-15),
///     (8-15, 0-7), (8-15, 8-15) = (b0, b1) of key block 0, then of key block 1.
///   V (B of O = P V via .trans, 16 keys x 16 dims): (keys 0-7, dims 0-7),
///     (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) = (b0, b1) of dim block 0, then 1.
struct PrefillLdmatrixLanes {
  KVKIT_HOST_DEVICE static constexpr int q_row(int lane) { return lane % 16; }
  KVKIT_HOST_DEVICE static constexpr int q_col(int lane) { return (lane / 16) * 8; }
  KVKIT_HOST_DEVICE static constexpr int k_row(int lane) { return lane % 8 + (lane / 16) * 8; }
  KVKIT_HOST_DEVICE static constexpr int k_col(int lane) { return (lane / 8) % 2 * 8; }
  KVKIT_HOST_DEVICE static constexpr int v_row(int lane) { return lane % 16; }
  KVKIT_HOST_DEVICE static constexpr int v_col(int lane) { return (lane / 16) * 8; }
};

/// Row tiles of a sequence with `q_count` query tokens and `group` q heads per kv head.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t prefill_q_tiles(std::int64_t q_count, int group) {
  return (q_count * group + kPrefillRowsPerBlock - 1) / kPrefillRowsPerBlock;
}

/// Key tiles of `tile_keys` consecutive positions covering a span, none
/// straddling its two ranges: the first range's tiles, then the second's.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t prefill_num_key_tiles(const AttentionKeySpan& s, int tile_keys) {
  return (s.first_end - s.begin + tile_keys - 1) / tile_keys + (s.end - s.second_begin + tile_keys - 1) / tile_keys;
}

/// First position and key count (1..tile_keys) of key tile `t` of a span.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE void prefill_key_tile(const AttentionKeySpan& s, int tile_keys, std::int64_t t,
                                                          std::int64_t& first, int& count) {
  const std::int64_t first_tiles = (s.first_end - s.begin + tile_keys - 1) / tile_keys;
  const std::int64_t range_end = t < first_tiles ? s.first_end : s.end;
  first = t < first_tiles ? s.begin + t * tile_keys : s.second_begin + (t - first_tiles) * tile_keys;
  count = range_end - first < tile_keys ? int(range_end - first) : tile_keys;
}

}  // namespace detail

/// Plans a chunked-prefill call on the host. `host_q_indptr` ([batch_size +
/// 1], host memory) is a copy of the device params.q_indptr, or nullptr when
/// params.q_indptr is nullptr (then every sequence has q_len tokens);
/// `host_seq_lens` ([batch_size], host memory) a copy of
/// params.page_table.seq_lens. Checks everything it can without device
/// memory: the CPU op's shape checks, head_dim and dtypes the kernel is
/// built for, q_indptr starting at 0 and non-decreasing, lengths holding
/// their chunk (causal) and fitting the page table. Throws kvkit::Error
/// otherwise; reads no device memory.
inline PrefillPlan plan_prefill(const PagedDecodeParams& p, const std::int64_t* host_q_indptr,
                                const std::int32_t* host_seq_lens) {
  constexpr const char* kWhere = "kvkit::cuda::plan_prefill";
  detail::validate_cuda_prefill_shapes(p, kWhere);
  const PaddedPageTable& t = p.page_table;
  const bool ragged = p.q_indptr != nullptr;
  if (ragged) {
    check_argument(host_q_indptr != nullptr, kWhere, "host_q_indptr", host_q_indptr,
                   "a host copy of params.q_indptr (batch_size + 1 = ", t.batch_size + 1, " offsets)");
    check_argument(host_q_indptr[0] == 0, kWhere, "host_q_indptr[0]", host_q_indptr[0], "0");
    for (std::int64_t b = 0; b < t.batch_size; ++b) {
      if (host_q_indptr[b + 1] < host_q_indptr[b]) {
        fail(kWhere, "argument 'host_q_indptr[", b + 1, "]' = ", host_q_indptr[b + 1], ": expected >= host_q_indptr[",
             b, "] (", host_q_indptr[b], ")");
      }
    }
  } else {
    check_argument(host_q_indptr == nullptr, kWhere, "host_q_indptr", host_q_indptr,
                   "nullptr when params.q_indptr is nullptr (q_len tokens per sequence)");
  }
  check_argument(host_seq_lens != nullptr || t.batch_size == 0, kWhere, "host_seq_lens", host_seq_lens,
                 "a non-null pointer to batch_size (", t.batch_size, ") lengths in host memory");

  PrefillPlan plan;
  plan.batch_size = t.batch_size;
  plan.ragged = ragged;
  plan.q_len = ragged ? 0 : p.q_len;
  plan.num_q_heads = p.num_q_heads;
  plan.num_kv_heads = int(p.layout.num_heads);
  plan.head_dim = int(p.layout.head_dim);
  plan.q_dtype = p.q_dtype;
  plan.kv_dtype = p.kv_dtype;
  const int group = p.num_q_heads / plan.num_kv_heads;
  std::int64_t max_tiles = 0, busy_tiles = 0;
  for (std::int64_t b = 0; b < t.batch_size; ++b) {
    const std::int64_t count = ragged ? host_q_indptr[b + 1] - host_q_indptr[b] : p.q_len;
    const std::int64_t len = host_seq_lens[b];
    check_argument(len >= 0, kWhere, "host_seq_lens[b]", len, ">= 0 (sequence ", b, ")");
    ::kvkit::detail::check_decode_seq_len(p, b, len, kWhere, count);
    if (len > t.max_blocks * p.layout.page_size) {
      fail(kWhere, "host_seq_lens[", b, "] = ", len, ": expected at most max_blocks x page_size (",
           t.max_blocks * p.layout.page_size, ")");
    }
    check_argument(count <= (std::int64_t(1) << 40) / group, kWhere, "q_indptr", count,
                   "chunks small enough for 64-bit row numbers");
    const std::int64_t tiles = detail::prefill_q_tiles(count, group);
    max_tiles = tiles > max_tiles ? tiles : max_tiles;
    busy_tiles += tiles;
  }
  plan.total_q_tokens = ragged ? (t.batch_size > 0 ? host_q_indptr[t.batch_size] : 0) : t.batch_size * p.q_len;
  // Grid: x = row tiles (up to 2^31 - 1), y = (sequence, kv head) (up to 65535).
  check_argument(t.batch_size * plan.num_kv_heads <= 65535, kWhere, "page_table.batch_size", t.batch_size,
                 "at most 65535 / kv heads (", 65535 / plan.num_kv_heads, ") sequences per call");
  check_argument(max_tiles <= 0x7fffffff, kWhere, "q_indptr", max_tiles,
                 "chunks of at most 2^31 - 1 row tiles");
  plan.max_q_tiles = int(max_tiles);
  plan.num_blocks = max_tiles * t.batch_size * plan.num_kv_heads;
  plan.busy_blocks = busy_tiles * plan.num_kv_heads;
  return plan;
}

}  // namespace kvkit::cuda
