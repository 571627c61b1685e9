#pragma once
/// @file attention_state.hpp
/// Partial attention results and how to combine them.
///
/// Attending to a subset S of the keys gives a *state* (o, lse): o is the
/// softmax-weighted average of the values in S, and lse = log Σ_{j∈S} exp(s_j)
/// (natural log) of the scores. Two states over disjoint key sets merge exactly:
///   lse = log(exp(lse_a) + exp(lse_b)),
///   o   = o_a · exp(lse_a − lse) + o_b · exp(lse_b − lse).
/// This one rule serves split-KV (flash-decoding), chunked prefill and shared
/// prefixes (cascade). An empty state has lse = −inf and contributes nothing.

#include <cmath>
#include <cstdint>

#include "kvkit/core/config.hpp"

namespace kvkit {

/// Weights (w_a, w_b) that merge two states and the merged lse; handles empty
/// states (lse = −inf) without producing NaN.
struct MergeWeights {
  float weight_a;
  float weight_b;
  float lse;
};

KVKIT_HOST_DEVICE KVKIT_FORCEINLINE MergeWeights merge_weights(float lse_a, float lse_b) {
  const float m = lse_a > lse_b ? lse_a : lse_b;
  if (m == -INFINITY) return {0.0f, 0.0f, -INFINITY};
  const float ea = expf(lse_a - m);
  const float eb = expf(lse_b - m);
  const float sum = ea + eb;
  return {ea / sum, eb / sum, m + logf(sum)};
}

/// Online softmax over a stream of scores for one query (Milkov & Gimelshein,
/// as in FlashAttention): running max m and running sum d of exp(s − m).
struct OnlineSoftmax {
  float max = -INFINITY;
  float sum = 0.0f;

  /// Folds in a block whose largest score is `block_max`; returns the factor
  /// by which the accumulated output must be rescaled.
  KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float rescale_for(float block_max) {
    const float new_max = block_max > max ? block_max : max;
    const float factor = max == -INFINITY ? 0.0f : expf(max - new_max);
    sum *= factor;
    max = new_max;
    return factor;
  }
  /// log Σ exp(s) of everything folded in; −inf when nothing was.
  KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float lse() const {
    return sum > 0.0f ? max + logf(sum) : -INFINITY;
  }
};

}  // namespace kvkit
