#pragma once
/// @file moe_combine.hpp
/// MoE combine on the CPU: weighted sum of each token's expert outputs, read
/// from the expert-sorted buffer through the dispatch plan's pair_rows.
///
///   out[t] = sum_{j = 0..k-1, pair kept} w[t, j] * y_sorted[pair_rows[t*k + j]]  (+ shared[t])
///
/// Summation order is fixed: float32 accumulator, j ascending, the shared-expert
/// output added last, one rounding to the output type at the end (no FMA on
/// the CPU, so every ISA and thread count gives the same bits). Dropped pairs
/// (pair_rows = -1) contribute nothing; the remaining weights are not rescaled.

#include <cstdint>
#include <vector>

#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/core/tensor_view.hpp"
#include "kvkit/core/x86_dispatch.hpp"
#include "kvkit/ops/token_chunks.hpp"

namespace kvkit {
namespace moe_detail {

/// Combines tokens [first, end) (see the file comment) with `acc` as the
/// float32 accumulator row [hidden]. Always inlined into one function per
/// ISA; no variant has FMA, so every ISA gives the same bits.
template <class T>
KVKIT_FORCEINLINE void combine_token_range(const TensorView& y_sorted, const std::int32_t* rows,
                                           const float* weights, const TensorView& shared,
                                           const TensorView& out, int top_k, std::int64_t first,
                                           std::int64_t end, float* __restrict__ acc) {
  const std::int64_t hidden = out.size(1);
  const T* y = static_cast<const T*>(y_sorted.data());
  const T* s = shared.empty() ? nullptr : static_cast<const T*>(shared.data());
  T* o = static_cast<T*>(out.data());
  for (std::int64_t t = first; t < end; ++t) {
    for (std::int64_t d = 0; d < hidden; ++d) acc[d] = 0.0f;
    for (int j = 0; j < top_k; ++j) {
      const std::int32_t r = rows[t * top_k + j];
      if (r < 0) continue;
      const float w = weights[t * top_k + j];
      const T* __restrict__ yr = y + r * y_sorted.stride(0);
      for (std::int64_t d = 0; d < hidden; ++d) acc[d] += w * to_float(yr[d]);
    }
    if (s != nullptr) {
      const T* __restrict__ sr = s + t * shared.stride(0);
      for (std::int64_t d = 0; d < hidden; ++d) acc[d] += to_float(sr[d]);
    }
    T* __restrict__ orow = o + t * out.stride(0);
    for (std::int64_t d = 0; d < hidden; ++d) orow[d] = from_float<T>(acc[d]);
  }
}

/// Combines every token: OpenMP threads share chunks of 16 tokens where the
/// program enables OpenMP (each token writes only its own output row, so
/// `out` may still alias `shared`), each chunk on the widest ISA the CPU has.
template <class T>
void combine_rows(const TensorView& y_sorted, const std::int32_t* rows, const float* weights,
                  const TensorView& shared, const TensorView& out, int top_k) {
  const std::int64_t hidden = out.size(1);
  detail::for_each_token_chunk(out.size(0), /*chunk=*/16, /*min_tokens_to_thread=*/17,
                       [&](std::int64_t first, std::int64_t end) {
                         std::vector<float> acc(static_cast<std::size_t>(hidden));
                         // AVX2 at the most: AVX-512F would contract acc += w * y into FMAs.
                         detail::run_loop_on_widest_isa<detail::X86Level::kAvx2, &combine_token_range<T>>(
                             y_sorted, rows, weights, shared, out, top_k, first, end, acc.data());
                       });
}

}  // namespace moe_detail

/// Combines expert outputs back into token order (see the file comment).
///
/// @param y_sorted     expert outputs in expert-sorted rows; float32, float16 or
///                     bfloat16, unit column stride              // [max_rows, hidden]
/// @param pair_rows    int32 from moe_dispatch_plan              // [num_tokens * top_k]
/// @param topk_weights float32 router weights, contiguous        // [num_tokens, top_k]
/// @param shared       shared-expert output with y's dtype, or an empty view  // [num_tokens, hidden]
/// @param out          output with y's dtype, unit column stride // [num_tokens, hidden]
/// Throws kvkit::Error on mismatched dtypes/shapes or a row index outside
/// [-1, max_rows); `out` is untouched then. `out` may alias `shared`.
inline void moe_combine(const TensorView& y_sorted, const TensorView& pair_rows,
                        const TensorView& topk_weights, const TensorView& shared,
                        const TensorView& out) {
  constexpr const char* kWhere = "kvkit::moe_combine";
  const DType dt = y_sorted.dtype();
  check_argument(dt == DType::kFloat32 || dt == DType::kFloat16 || dt == DType::kBFloat16, kWhere,
                 "y_sorted.dtype", dt, "float32, float16 or bfloat16");
  check_argument(y_sorted.rank() == 2, kWhere, "y_sorted.rank", y_sorted.rank(),
                 "2 ([max_rows, hidden])");
  const std::int64_t max_rows = y_sorted.size(0), hidden = y_sorted.size(1);
  check_argument(y_sorted.stride(1) == 1 || hidden <= 1, kWhere, "y_sorted.stride(1)",
                 y_sorted.stride(1), "1");
  expect_dtype(topk_weights, kWhere, "topk_weights", DType::kFloat32);
  check_argument(topk_weights.rank() == 2 && topk_weights.is_contiguous(), kWhere,
                 "topk_weights.shape", topk_weights.shape(), "a contiguous [num_tokens, top_k] matrix");
  const std::int64_t tokens = topk_weights.size(0);
  const int top_k = int(topk_weights.size(1));
  expect_dtype(pair_rows, kWhere, "pair_rows", DType::kInt32);
  expect_shape(pair_rows, kWhere, "pair_rows", {tokens * top_k});
  check(pair_rows.is_contiguous(), kWhere, "argument 'pair_rows' must be contiguous");
  expect_dtype(out, kWhere, "out", dt);
  expect_shape(out, kWhere, "out", {tokens, hidden});
  check_argument(out.stride(1) == 1 || hidden <= 1, kWhere, "out.stride(1)", out.stride(1), "1");
  if (!shared.empty()) {
    expect_dtype(shared, kWhere, "shared", dt);
    expect_shape(shared, kWhere, "shared", {tokens, hidden});
    check_argument(shared.stride(1) == 1 || hidden <= 1, kWhere, "shared.stride(1)",
                   shared.stride(1), "1");
  }
  const std::int32_t* rows = pair_rows.data_as<std::int32_t>();
  for (std::int64_t p = 0; p < tokens * top_k; ++p) {
    if (rows[p] < -1 || rows[p] >= max_rows) {
      fail(kWhere, "pair_rows[", p, "] = ", rows[p], ": expected -1 (dropped) or a row in [0, ",
           max_rows, ")");
    }
  }
  if (hidden == 0) return;
  const float* weights = topk_weights.data_as<float>();
  switch (dt) {
    case DType::kFloat32:
      moe_detail::combine_rows<float>(y_sorted, rows, weights, shared, out, top_k);
      break;
    case DType::kFloat16:
      moe_detail::combine_rows<half>(y_sorted, rows, weights, shared, out, top_k);
      break;
    default:
      moe_detail::combine_rows<bfloat16>(y_sorted, rows, weights, shared, out, top_k);
      break;
  }
}

/// moe_combine without a shared expert.
inline void moe_combine(const TensorView& y_sorted, const TensorView& pair_rows,
                        const TensorView& topk_weights, const TensorView& out) {
  moe_combine(y_sorted, pair_rows, topk_weights, TensorView(), out);
}

}  // namespace kvkit
