#pragma once
/// @file moe_router.hpp
/// CPU mixture-of-experts router: gate logits -> (topk_ids, topk_weights).
/// See moe_router_config.hpp for the pipeline and the presets, and
/// moe_scoring.hpp for why the CPU and CUDA routers agree bit for bit on ids.

#include <cstdint>
#include <vector>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/core/tensor_view.hpp"
#include "kvkit/ops/moe_router_config.hpp"
#include "kvkit/ops/moe_scoring.hpp"

namespace kvkit {
namespace moe_detail {

/// Routes one token. `score` and `select` are scratch of n_experts floats,
/// `best` scratch of top_k keys, `bias` null or [n_experts].
/// Writes ids[k] (best first) and weights[k].
inline void route_token(const RouterConfig& cfg, const float* logits, const float* bias,
                        float* score, float* select, std::uint64_t* best, std::int32_t* ids,
                        float* weights) {
  const int n = cfg.n_experts;
  if (cfg.scoring == MoeScoring::kSoftmax) {
    float m = logits[0];
    for (int e = 1; e < n; ++e) m = logits[e] > m ? logits[e] : m;
    for (int e = 0; e < n; ++e) score[e] = moe_exp(logits[e] - m);
    const float sum = moe_canonical_sum(score, n);
    for (int e = 0; e < n; ++e) score[e] = score[e] / sum;
  } else {
    for (int e = 0; e < n; ++e) score[e] = moe_sigmoid(logits[e]);
  }
  for (int e = 0; e < n; ++e) select[e] = bias != nullptr ? score[e] + bias[e] : score[e];

  if (cfg.n_group > 1) {
    const int per_group = cfg.experts_per_group();
    // Group keys, then keep the best topk_group groups (ties to the lower group).
    std::uint64_t group_keys[1024];
    std::vector<std::uint64_t> many_groups;
    std::uint64_t* keys = group_keys;
    if (cfg.n_group > 1024) {
      many_groups.resize(std::size_t(cfg.n_group));
      keys = many_groups.data();
    }
    for (int g = 0; g < cfg.n_group; ++g) {
      const float gs = moe_group_score(select + std::int64_t(g) * per_group, per_group,
                                       cfg.group_score == MoeGroupScore::kTopTwoSum);
      keys[g] = moe_rank_key(gs, g);
    }
    // Mark kept groups by zeroing their key; mask the experts of the rest.
    for (int round = 0; round < cfg.topk_group; ++round) {
      int best = 0;
      std::uint64_t best_key = 0;
      for (int g = 0; g < cfg.n_group; ++g) {
        if (keys[g] > best_key) {
          best_key = keys[g];
          best = g;
        }
      }
      keys[best] = 0;
    }
    const float neg_inf = bits_to_float(0xff800000u);
    for (int g = 0; g < cfg.n_group; ++g) {
      if (keys[g] == 0) continue;
      float* s = select + std::int64_t(g) * per_group;
      for (int i = 0; i < per_group; ++i) s[i] = neg_inf;
    }
  }

  // top-k in one pass: insertion into a list of the best keys so far. Keys are a
  // strict total order, so this picks exactly what the CUDA warp's k arg-max
  // rounds pick.
  const int k = cfg.top_k;
  int filled = 0;
  for (int e = 0; e < n; ++e) {
    const std::uint64_t key = moe_rank_key(select[e], e);
    if (filled == k && key <= best[k - 1]) continue;
    int pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && best[pos - 1] < key) {
      best[pos] = best[pos - 1];
      --pos;
    }
    best[pos] = key;
  }
  for (int j = 0; j < k; ++j) ids[j] = moe_rank_key_index(best[j]);

  float sum = 0.0f;
  for (int j = 0; j < cfg.top_k; ++j) {
    weights[j] = score[ids[j]];
    sum += weights[j];
  }
  for (int j = 0; j < cfg.top_k; ++j) {
    float w = weights[j];
    // A zero sum happens only when every chosen sigmoid underflowed: keep the zeros.
    if (cfg.renormalize && sum > 0.0f) w = w / sum;
    weights[j] = w * cfg.routed_scaling_factor;
  }
}

inline bool is_finite(float x) { return x - x == 0.0f; }

}  // namespace moe_detail

/// Routes every token of `logits` to cfg.top_k experts.
///
/// @param cfg             router configuration (validated here)
/// @param logits          gate logits, float32 or bfloat16   // [num_tokens, n_experts], unit column stride
/// @param correction_bias float32 selection bias, required iff cfg.use_correction_bias,
///                        else an empty view                  // [n_experts]
/// @param topk_ids        output, int32, contiguous; chosen experts, best selection score
///                        first, ties to the lower expert index  // [num_tokens, top_k]
/// @param topk_weights    output, float32, contiguous; weights of topk_ids  // [num_tokens, top_k]
///
/// Non-finite logits or bias values are rejected (the GPU router does not check:
/// see docs/moe.md). Throws kvkit::Error on an invalid config, wrong dtypes,
/// shapes or strides, or a NaN/inf input; outputs are untouched when it throws.
inline void moe_route(const RouterConfig& cfg, const TensorView& logits,
                      const TensorView& correction_bias, const TensorView& topk_ids,
                      const TensorView& topk_weights) {
  constexpr const char* kWhere = "kvkit::moe_route";
  cfg.validate();
  check_argument(logits.dtype() == DType::kFloat32 || logits.dtype() == DType::kBFloat16, kWhere,
                 "logits.dtype", logits.dtype(), "float32 or bfloat16");
  expect_shape(logits, kWhere, "logits", {-1, cfg.n_experts});
  const std::int64_t tokens = logits.size(0);
  check_argument(logits.stride(1) == 1 || cfg.n_experts == 1, kWhere, "logits.stride(1)",
                 logits.stride(1), "1");
  expect_dtype(topk_ids, kWhere, "topk_ids", DType::kInt32);
  expect_shape(topk_ids, kWhere, "topk_ids", {tokens, cfg.top_k});
  check_argument(topk_ids.is_contiguous(), kWhere, "topk_ids.strides", topk_ids.strides(),
                 "contiguous");
  expect_dtype(topk_weights, kWhere, "topk_weights", DType::kFloat32);
  expect_shape(topk_weights, kWhere, "topk_weights", {tokens, cfg.top_k});
  check_argument(topk_weights.is_contiguous(), kWhere, "topk_weights.strides",
                 topk_weights.strides(), "contiguous");
  const float* bias = nullptr;
  if (cfg.use_correction_bias) {
    expect_dtype(correction_bias, kWhere, "correction_bias", DType::kFloat32);
    expect_shape(correction_bias, kWhere, "correction_bias", {cfg.n_experts});
    check_argument(correction_bias.stride(0) == 1 || cfg.n_experts == 1, kWhere,
                   "correction_bias.stride(0)", correction_bias.stride(0), "1");
    bias = correction_bias.data_as<float>();
    for (int e = 0; e < cfg.n_experts; ++e) {
      if (!moe_detail::is_finite(bias[e])) {
        fail(kWhere, "correction_bias[", e, "] = ", bias[e], ": expected finite values");
      }
    }
  } else {
    check_argument(correction_bias.empty(), kWhere, "correction_bias", correction_bias.shape(),
                   "an empty view (cfg.use_correction_bias is false)");
  }

  // Convert (and check) everything before writing anything.
  std::vector<float> rows(std::size_t(tokens) * std::size_t(cfg.n_experts));
  for (std::int64_t t = 0; t < tokens; ++t) {
    float* row = rows.data() + t * cfg.n_experts;
    if (logits.dtype() == DType::kFloat32) {
      const float* src = logits.data_as<float>() + t * logits.stride(0);
      for (int e = 0; e < cfg.n_experts; ++e) row[e] = src[e];
    } else {
      const bfloat16* src = logits.data_as<bfloat16>() + t * logits.stride(0);
      for (int e = 0; e < cfg.n_experts; ++e) row[e] = float(src[e]);
    }
    for (int e = 0; e < cfg.n_experts; ++e) {
      if (!moe_detail::is_finite(row[e])) {
        fail(kWhere, "logits[", t, ", ", e, "] = ", row[e],
             ": expected finite logits (NaN/inf are rejected on the CPU path)");
      }
    }
  }

  std::int32_t* ids = topk_ids.data_as<std::int32_t>();
  float* weights = topk_weights.data_as<float>();
  // Tokens are independent (and each one's result does not depend on the
  // thread that routes it): OpenMP threads share them where the program
  // enables OpenMP.
#if defined(_OPENMP)
#pragma omp parallel if (tokens >= 64)
#endif
  {
    std::vector<float> score(static_cast<std::size_t>(cfg.n_experts));
    std::vector<float> select(static_cast<std::size_t>(cfg.n_experts));
    std::vector<std::uint64_t> best(static_cast<std::size_t>(cfg.top_k));
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
    for (std::int64_t t = 0; t < tokens; ++t) {
      moe_detail::route_token(cfg, rows.data() + t * cfg.n_experts, bias, score.data(), select.data(),
                              best.data(), ids + t * cfg.top_k, weights + t * cfg.top_k);
    }
  }
}

/// moe_route without a correction bias (cfg.use_correction_bias must be false).
inline void moe_route(const RouterConfig& cfg, const TensorView& logits,
                      const TensorView& topk_ids, const TensorView& topk_weights) {
  moe_route(cfg, logits, TensorView(), topk_ids, topk_weights);
}

}  // namespace kvkit
