#pragma once
/// @file moe_dispatch.hpp
/// MoE dispatch on the CPU: group the (token, k) pairs chosen by the router by
/// expert, so that each expert's rows are contiguous for its GEMMs.
///
/// Terms: a *pair* p = t * top_k + j is token t's j-th choice (topk_ids[t, j]);
/// a *row* is a position in the expert-sorted buffer. Expert e owns rows
/// [expert_offsets[e], expert_offsets[e + 1]); inside it, its kept pairs come
/// first in increasing pair order (stable: by token, then by j), followed by
/// padding rows up to a multiple of `tile`. Padding and unused rows hold the
/// sentinel pair index num_tokens * top_k in sorted_pairs, as in vLLM's
/// moe_align_block_size (its sorted_token_ids / expert_ids / num_tokens_post_pad
/// are our sorted_pairs / tile_experts / expert_offsets[n_experts]).
/// With a capacity, an expert keeps its first `capacity` pairs in that order;
/// the others are dropped: pair_rows[p] = -1 and combine leaves them out.
///
/// The same layout is produced by the CUDA dispatch in kvkit/cuda/moe_dispatch.cuh.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kvkit/core/error.hpp"
#include "kvkit/core/tensor_view.hpp"

namespace kvkit {

/// Dispatch parameters (a small value type).
struct DispatchConfig {
  int n_experts = 0;  ///< experts on this rank (all routed experts without expert parallelism)
  int top_k = 0;      ///< choices per token (columns of topk_ids)
  int tile = 1;       ///< pad each expert's segment to a multiple of this many rows; 1 = no padding
  int capacity = -1;  ///< most pairs an expert keeps, before padding; -1 = unlimited

  /// Throws kvkit::Error unless n_experts >= 1, top_k >= 1, tile >= 1 and
  /// capacity is -1 or >= 0.
  void validate() const {
    constexpr const char* kWhere = "kvkit::DispatchConfig::validate";
    check_argument(n_experts >= 1, kWhere, "n_experts", n_experts, ">= 1");
    check_argument(top_k >= 1, kWhere, "top_k", top_k, ">= 1");
    check_argument(tile >= 1, kWhere, "tile", tile, ">= 1");
    check_argument(capacity >= -1, kWhere, "capacity", capacity, "-1 (unlimited) or >= 0");
  }
};

/// Rows to allocate for the expert-sorted buffers of `num_tokens` tokens: an
/// upper bound on expert_offsets[n_experts] that depends only on the sizes, so
/// buffers can be allocated once (and a CUDA graph captured) for a batch size.
/// = min(T*k, E*capacity) + E*(tile-1). Throws on an invalid config or num_tokens < 0.
inline std::int64_t moe_dispatch_max_rows(const DispatchConfig& cfg, std::int64_t num_tokens) {
  cfg.validate();
  check_argument(num_tokens >= 0, "kvkit::moe_dispatch_max_rows", "num_tokens", num_tokens, ">= 0");
  std::int64_t kept = num_tokens * cfg.top_k;
  if (cfg.capacity >= 0 && std::int64_t(cfg.n_experts) * cfg.capacity < kept) {
    kept = std::int64_t(cfg.n_experts) * cfg.capacity;
  }
  return kept + std::int64_t(cfg.n_experts) * (cfg.tile - 1);
}

/// Tiles covering moe_dispatch_max_rows rows: the length of tile_experts.
inline std::int64_t moe_dispatch_max_tiles(const DispatchConfig& cfg, std::int64_t num_tokens) {
  return (moe_dispatch_max_rows(cfg, num_tokens) + cfg.tile - 1) / cfg.tile;
}

/// Per-expert capacity from a capacity factor (GShard/Switch convention):
/// ceil(factor * num_tokens * top_k / n_experts). Throws unless factor > 0 and finite.
inline int moe_capacity_from_factor(double factor, std::int64_t num_tokens, int top_k,
                                    int n_experts) {
  constexpr const char* kWhere = "kvkit::moe_capacity_from_factor";
  check_argument(factor > 0.0 && std::isfinite(factor), kWhere, "factor", factor, "a finite value > 0");
  check_argument(num_tokens >= 0, kWhere, "num_tokens", num_tokens, ">= 0");
  check_argument(top_k >= 1, kWhere, "top_k", top_k, ">= 1");
  check_argument(n_experts >= 1, kWhere, "n_experts", n_experts, ">= 1");
  return int(std::ceil(factor * double(num_tokens) * double(top_k) / double(n_experts)));
}

/// Output arrays of a dispatch plan (all int32, contiguous, caller-owned).
struct DispatchPlanViews {
  TensorView expert_counts;   ///< [n_experts] pairs routed to each expert, before capacity
  TensorView expert_offsets;  ///< [n_experts + 1] first row of each segment; [n_experts] = rows used
  TensorView sorted_pairs;    ///< [max_rows] pair of each row; T*k for padding and unused rows
  TensorView pair_rows;       ///< [T * top_k] row of each pair; -1 for a dropped pair
  TensorView tile_experts;    ///< [max_tiles] expert of each tile, -1 past the rows used; may be empty
};

/// Sizes of a finished plan.
struct DispatchResult {
  std::int64_t rows_used = 0;    ///< expert_offsets[n_experts]: rows holding pairs or padding
  std::int64_t num_dropped = 0;  ///< pairs dropped by the capacity limit
};

namespace moe_detail {

inline void expect_int32_vector(const TensorView& v, const char* where, const char* arg,
                                std::int64_t length) {
  expect_dtype(v, where, arg, DType::kInt32);
  expect_shape(v, where, arg, {length});
  check(v.is_contiguous(), where, "argument '", arg, "' must be contiguous; strides ", v.strides());
}

}  // namespace moe_detail

/// Builds the dispatch plan for `topk_ids` (see the file comment for the layout).
///
/// @param topk_ids int32 expert ids, each in [0, n_experts), contiguous  // [num_tokens, top_k]
/// @param plan     output arrays, sized as documented in DispatchPlanViews with
///                 max_rows = moe_dispatch_max_rows(cfg, num_tokens)
/// Throws kvkit::Error on a bad config, wrong shapes/dtypes or an out-of-range id
/// (naming its position); outputs are untouched when it throws.
inline DispatchResult moe_dispatch_plan(const DispatchConfig& cfg, const TensorView& topk_ids,
                                        const DispatchPlanViews& plan) {
  constexpr const char* kWhere = "kvkit::moe_dispatch_plan";
  cfg.validate();
  expect_dtype(topk_ids, kWhere, "topk_ids", DType::kInt32);
  expect_shape(topk_ids, kWhere, "topk_ids", {-1, cfg.top_k});
  check(topk_ids.is_contiguous(), kWhere, "argument 'topk_ids' must be contiguous; strides ",
        topk_ids.strides());
  const std::int64_t tokens = topk_ids.size(0);
  const std::int64_t pairs = tokens * cfg.top_k;
  const std::int64_t max_rows = moe_dispatch_max_rows(cfg, tokens);
  const int n = cfg.n_experts;
  moe_detail::expect_int32_vector(plan.expert_counts, kWhere, "expert_counts", n);
  moe_detail::expect_int32_vector(plan.expert_offsets, kWhere, "expert_offsets", n + 1);
  moe_detail::expect_int32_vector(plan.sorted_pairs, kWhere, "sorted_pairs", max_rows);
  moe_detail::expect_int32_vector(plan.pair_rows, kWhere, "pair_rows", pairs);
  const bool want_tiles = !plan.tile_experts.empty();
  if (want_tiles) {
    moe_detail::expect_int32_vector(plan.tile_experts, kWhere, "tile_experts",
                                    moe_dispatch_max_tiles(cfg, tokens));
  }
  check_argument(max_rows <= std::int64_t(INT32_MAX), kWhere, "num_tokens", tokens,
                 "at most 2^31 - 1 rows after padding (int32 indices)");
  // Pair indices (and the sentinel) are int32 too; with a capacity max_rows
  // does not bound them.
  check_argument(pairs <= std::int64_t(INT32_MAX), kWhere, "num_tokens", tokens,
                 "at most 2^31 - 1 (token, k) pairs (int32 pair indices)");
  const std::int32_t* ids = topk_ids.data_as<std::int32_t>();
  for (std::int64_t p = 0; p < pairs; ++p) {
    if (ids[p] < 0 || ids[p] >= n) {
      fail(kWhere, "topk_ids[", p / cfg.top_k, ", ", p % cfg.top_k, "] = ", ids[p],
           ": expected an expert id in [0, ", n, ")");
    }
  }

  std::int32_t* counts = plan.expert_counts.data_as<std::int32_t>();
  std::int32_t* offsets = plan.expert_offsets.data_as<std::int32_t>();
  std::int32_t* sorted = plan.sorted_pairs.data_as<std::int32_t>();
  std::int32_t* rows = plan.pair_rows.data_as<std::int32_t>();
  for (int e = 0; e < n; ++e) counts[e] = 0;
  for (std::int64_t p = 0; p < pairs; ++p) ++counts[ids[p]];
  std::vector<std::int32_t> kept(std::size_t(n), 0);
  std::int64_t row = 0;
  DispatchResult result;
  for (int e = 0; e < n; ++e) {
    kept[e] = cfg.capacity >= 0 && counts[e] > cfg.capacity ? cfg.capacity : counts[e];
    result.num_dropped += counts[e] - kept[e];
    offsets[e] = std::int32_t(row);
    row += (std::int64_t(kept[e]) + cfg.tile - 1) / cfg.tile * cfg.tile;
  }
  offsets[n] = std::int32_t(row);
  result.rows_used = row;

  const std::int32_t sentinel = std::int32_t(pairs);
  for (std::int64_t r = 0; r < max_rows; ++r) sorted[r] = sentinel;
  std::vector<std::int32_t> next(std::size_t(n), 0);
  for (std::int64_t p = 0; p < pairs; ++p) {
    const int e = ids[p];
    if (next[e] < kept[e]) {
      const std::int32_t r = offsets[e] + next[e]++;
      sorted[r] = std::int32_t(p);
      rows[p] = r;
    } else {
      rows[p] = -1;
    }
  }
  if (want_tiles) {
    std::int32_t* tiles = plan.tile_experts.data_as<std::int32_t>();
    const std::int64_t num_tiles = plan.tile_experts.size(0);
    int e = 0;
    for (std::int64_t b = 0; b < num_tiles; ++b) {
      const std::int64_t first = b * cfg.tile;
      if (first >= result.rows_used) {
        tiles[b] = -1;
        continue;
      }
      while (offsets[e + 1] <= first) ++e;  // skips empty segments
      tiles[b] = e;
    }
  }
  return result;
}

/// Copies input rows into expert-sorted order: x_sorted[r] = x[sorted_pairs[r] / top_k];
/// rows holding the sentinel (padding, unused) are set to zero, so an expert FFN
/// without bias maps them to zero.
///
/// @param x            float32, float16 or bfloat16, unit column stride  // [num_tokens, hidden]
/// @param sorted_pairs int32 from moe_dispatch_plan                       // [max_rows]
/// @param top_k        the plan's top_k
/// @param x_sorted     output, same dtype as x, unit column stride        // [max_rows, hidden]
/// Throws kvkit::Error on mismatched dtypes/shapes or a pair index outside
/// [0, num_tokens * top_k] (the sentinel included); x_sorted is untouched then.
inline void moe_gather(const TensorView& x, const TensorView& sorted_pairs, int top_k,
                       const TensorView& x_sorted) {
  constexpr const char* kWhere = "kvkit::moe_gather";
  check_argument(top_k >= 1, kWhere, "top_k", top_k, ">= 1");
  check_argument(x.rank() == 2, kWhere, "x.rank", x.rank(), "2 ([num_tokens, hidden])");
  check_argument(x.stride(1) == 1 || x.size(1) <= 1, kWhere, "x.stride(1)", x.stride(1), "1");
  const std::int64_t tokens = x.size(0), hidden = x.size(1);
  expect_dtype(sorted_pairs, kWhere, "sorted_pairs", DType::kInt32);
  check_argument(sorted_pairs.rank() == 1 && sorted_pairs.is_contiguous(), kWhere,
                 "sorted_pairs.shape", sorted_pairs.shape(), "a contiguous vector");
  const std::int64_t max_rows = sorted_pairs.size(0);
  expect_dtype(x_sorted, kWhere, "x_sorted", x.dtype());
  expect_shape(x_sorted, kWhere, "x_sorted", {max_rows, hidden});
  check_argument(x_sorted.stride(1) == 1 || hidden <= 1, kWhere, "x_sorted.stride(1)",
                 x_sorted.stride(1), "1");
  const std::int32_t* sorted = sorted_pairs.data_as<std::int32_t>();
  const std::int64_t sentinel = tokens * top_k;
  for (std::int64_t r = 0; r < max_rows; ++r) {
    if (sorted[r] < 0 || sorted[r] > sentinel) {
      fail(kWhere, "sorted_pairs[", r, "] = ", sorted[r], ": expected a pair index in [0, ",
           sentinel, "] (", sentinel, " marks padding)");
    }
  }
  if (hidden == 0) return;
  const std::size_t elem = dtype_size(x.dtype());
  const auto* src = static_cast<const unsigned char*>(x.data());
  auto* dst = static_cast<unsigned char*>(x_sorted.data());
  const std::size_t row_bytes = std::size_t(hidden) * elem;
  for (std::int64_t r = 0; r < max_rows; ++r) {
    unsigned char* out = dst + std::size_t(r * x_sorted.stride(0)) * elem;
    if (sorted[r] == sentinel) {
      std::memset(out, 0, row_bytes);  // all-zero bits are +0 in every float type
    } else {
      std::memcpy(out, src + std::size_t((sorted[r] / top_k) * x.stride(0)) * elem, row_bytes);
    }
  }
}

}  // namespace kvkit
