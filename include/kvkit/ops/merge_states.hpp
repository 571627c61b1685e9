#pragma once
/// @file merge_states.hpp
/// Merging partial attention states on the CPU (see attention_state.hpp for
/// the rule). Public because engines compose it themselves: split-KV,
/// chunked prefill against a cached prefix, cascade over a shared prefix.

#include <cstdint>

#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/ops/attention_state.hpp"

namespace kvkit {

/// Merges two states elementwise over [num_rows, head_dim] rows (one row per
/// (token, head)): out_o/out_lse may alias either input. o arrays are float32,
/// contiguous rows; lse arrays are [num_rows] natural-log values.
inline void merge_states(const float* o_a, const float* lse_a, const float* o_b,
                         const float* lse_b, float* out_o, float* out_lse, std::int64_t num_rows,
                         int head_dim) {
  constexpr const char* kWhere = "kvkit::merge_states";
  check_argument(num_rows >= 0, kWhere, "num_rows", num_rows, ">= 0");
  check_argument(head_dim > 0, kWhere, "head_dim", head_dim, "> 0");
  if (num_rows == 0) return;
  check(o_a && lse_a && o_b && lse_b && out_o && out_lse, kWhere,
        "a null pointer among o_a, lse_a, o_b, lse_b, out_o, out_lse; expected all non-null");
  for (std::int64_t r = 0; r < num_rows; ++r) {
    const MergeWeights w = merge_weights(lse_a[r], lse_b[r]);
    const float* a = o_a + r * head_dim;
    const float* b = o_b + r * head_dim;
    float* o = out_o + r * head_dim;
    for (int d = 0; d < head_dim; ++d) o[d] = w.weight_a * a[d] + w.weight_b * b[d];
    out_lse[r] = w.lse;
  }
}

/// Merges a variable number of states per row: row r's states are
/// states [indptr[r], indptr[r+1]) of `o` ([num_states, head_dim]) and `lse`
/// ([num_states]); a row with no states gets o = 0, lse = −inf. Summation is
/// in a fixed order, with the weights computed from the row's max lse.
inline void merge_states_varlen(const float* o, const float* lse, const std::int64_t* indptr,
                                std::int64_t num_rows, int head_dim, float* out_o,
                                float* out_lse) {
  constexpr const char* kWhere = "kvkit::merge_states_varlen";
  check_argument(num_rows >= 0, kWhere, "num_rows", num_rows, ">= 0");
  check_argument(head_dim > 0, kWhere, "head_dim", head_dim, "> 0");
  if (num_rows == 0) return;
  check(indptr && out_o && out_lse, kWhere, "a null pointer among indptr, out_o, out_lse");
  check_argument(indptr[0] == 0, kWhere, "indptr[0]", indptr[0], "0");
  for (std::int64_t r = 0; r < num_rows; ++r) {
    if (indptr[r + 1] < indptr[r]) {
      fail(kWhere, "argument 'indptr[", r + 1, "]' = ", indptr[r + 1], ": expected >= indptr[", r,
           "] (", indptr[r], ")");
    }
  }
  check(indptr[num_rows] == 0 || (o && lse), kWhere, "o or lse is null but there are ",
        indptr[num_rows], " states");
  for (std::int64_t r = 0; r < num_rows; ++r) {
    float m = -INFINITY;
    for (std::int64_t s = indptr[r]; s < indptr[r + 1]; ++s) m = lse[s] > m ? lse[s] : m;
    float* out = out_o + r * head_dim;
    for (int d = 0; d < head_dim; ++d) out[d] = 0.0f;
    if (m == -INFINITY) {
      out_lse[r] = -INFINITY;
      continue;
    }
    float sum = 0.0f;
    for (std::int64_t s = indptr[r]; s < indptr[r + 1]; ++s) sum += expf(lse[s] - m);
    for (std::int64_t s = indptr[r]; s < indptr[r + 1]; ++s) {
      const float w = expf(lse[s] - m) / sum;
      const float* src = o + s * head_dim;
      for (int d = 0; d < head_dim; ++d) out[d] += w * src[d];
    }
    out_lse[r] = m + logf(sum);
  }
}

}  // namespace kvkit
