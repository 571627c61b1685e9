#pragma once
/// @file moe_stats.hpp
/// MoE load statistics and balancing helpers (host, for monitoring and for the
/// training-free bias update of DeepSeek-V3's auxiliary-loss-free balancing).

#include <cmath>
#include <cstdint>
#include <vector>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/core/tensor_view.hpp"
#include "kvkit/ops/moe_router_config.hpp"

namespace kvkit {

/// Summary of a per-expert load vector.
struct MoeLoadStats {
  std::int64_t total = 0;      ///< pairs routed in all
  std::int64_t max = 0;        ///< largest load
  std::int64_t min = 0;        ///< smallest load
  int max_expert = 0;          ///< expert with the largest load (the lower index on ties)
  double mean = 0.0;           ///< total / n_experts
  double max_over_mean = 0.0;  ///< max / mean (1 = perfectly balanced); 0 when total is 0
};

/// Pairs routed to each expert: load[e] = #{(t, j) : topk_ids[t, j] == e}.
/// @param topk_ids int32, contiguous  // [num_tokens, top_k]
/// Throws kvkit::Error on a wrong dtype/layout or an id outside [0, n_experts).
inline std::vector<std::int64_t> moe_expert_load(const TensorView& topk_ids, int n_experts) {
  constexpr const char* kWhere = "kvkit::moe_expert_load";
  check_argument(n_experts >= 1, kWhere, "n_experts", n_experts, ">= 1");
  expect_dtype(topk_ids, kWhere, "topk_ids", DType::kInt32);
  check_argument(topk_ids.rank() == 2 && topk_ids.is_contiguous(), kWhere, "topk_ids.shape",
                 topk_ids.shape(), "a contiguous [num_tokens, top_k] matrix");
  std::vector<std::int64_t> load(std::size_t(n_experts), 0);
  const std::int32_t* ids = topk_ids.data_as<std::int32_t>();
  for (std::int64_t p = 0; p < topk_ids.numel(); ++p) {
    if (ids[p] < 0 || ids[p] >= n_experts) {
      fail(kWhere, "topk_ids[", p / topk_ids.size(1), ", ", p % topk_ids.size(1), "] = ", ids[p],
           ": expected an expert id in [0, ", n_experts, ")");
    }
    ++load[std::size_t(ids[p])];
  }
  return load;
}

/// Max, min, mean and max/mean of a load vector. Throws if `load` is empty.
inline MoeLoadStats moe_load_stats(const std::vector<std::int64_t>& load) {
  check_argument(!load.empty(), "kvkit::moe_load_stats", "load.size()", load.size(), ">= 1");
  MoeLoadStats s;
  s.max = load[0];
  s.min = load[0];
  for (std::size_t e = 0; e < load.size(); ++e) {
    s.total += load[e];
    if (load[e] > s.max) {
      s.max = load[e];
      s.max_expert = int(e);
    }
    if (load[e] < s.min) s.min = load[e];
  }
  s.mean = double(s.total) / double(load.size());
  s.max_over_mean = s.total > 0 ? double(s.max) / s.mean : 0.0;
  return s;
}

/// Auxiliary-loss-free balancing step (DeepSeek-V3 paper, section 2.1.2):
/// b_e <- b_e + gamma * sign(mean load - load_e); overloaded experts go down,
/// underloaded ones up, balanced ones stay.
/// @param bias float32 correction bias, updated in place  // [n_experts]
/// @param load per-expert load (e.g. moe_expert_load over a batch)  // [n_experts]
/// @param gamma bias update speed (the paper uses 0.001), finite and >= 0
inline void moe_update_correction_bias(const TensorView& bias, const std::vector<std::int64_t>& load,
                                       float gamma) {
  constexpr const char* kWhere = "kvkit::moe_update_correction_bias";
  expect_dtype(bias, kWhere, "bias", DType::kFloat32);
  expect_shape(bias, kWhere, "bias", {std::int64_t(load.size())});
  check_argument(!load.empty(), kWhere, "load.size()", load.size(), ">= 1");
  check_argument(gamma >= 0.0f && gamma - gamma == 0.0f, kWhere, "gamma", gamma, "a finite value >= 0");
  std::int64_t total = 0;
  for (std::int64_t l : load) total += l;
  float* b = bias.data_as<float>();
  const std::int64_t n = std::int64_t(load.size());
  for (std::int64_t e = 0; e < n; ++e) {
    // Compare load_e * n with total rather than with a rounded mean.
    const std::int64_t scaled = load[std::size_t(e)] * n;
    const float sign = scaled < total ? 1.0f : (scaled > total ? -1.0f : 0.0f);
    b[e * bias.stride(0)] += gamma * sign;
  }
}

/// Sequence-wise balance loss of DeepSeek-V3 (paper eq. 17-20), for analysis:
///   L = alpha * sum_e f_e * P_e,
///   f_e = n_experts / (top_k * T) * #{t : e in topk_ids[t]},
///   P_e = 1/T * sum_t s'_{e,t},   s'_{e,t} = s_{e,t} / sum_i s_{i,t},
/// with s the unbiased scores of cfg.scoring over one sequence's T tokens.
/// Perfect balance gives alpha; routing everything to the same experts gives more.
/// Computed in float64.
/// @param logits   float32 or bfloat16 gate logits of one sequence, unit column stride  // [T, n_experts]
/// @param topk_ids int32 router output for those tokens, contiguous                  // [T, top_k]
/// Throws kvkit::Error on a bad config, mismatched shapes or ids out of range.
inline double moe_sequence_aux_loss(const RouterConfig& cfg, const TensorView& logits,
                                    const TensorView& topk_ids, double alpha) {
  constexpr const char* kWhere = "kvkit::moe_sequence_aux_loss";
  cfg.validate();
  check_argument(logits.dtype() == DType::kFloat32 || logits.dtype() == DType::kBFloat16, kWhere,
                 "logits.dtype", logits.dtype(), "float32 or bfloat16");
  expect_shape(logits, kWhere, "logits", {-1, cfg.n_experts});
  check_argument(logits.stride(1) == 1 || cfg.n_experts == 1, kWhere, "logits.stride(1)",
                 logits.stride(1), "1");
  const std::int64_t tokens = logits.size(0);
  check_argument(tokens >= 1, kWhere, "logits.size(0)", tokens, ">= 1 token");
  expect_shape(topk_ids, kWhere, "topk_ids", {tokens, cfg.top_k});
  const std::vector<std::int64_t> load = moe_expert_load(topk_ids, cfg.n_experts);
  const int n = cfg.n_experts;
  std::vector<double> p(static_cast<std::size_t>(n), 0.0), s(static_cast<std::size_t>(n));
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (int e = 0; e < n; ++e) {
      const std::int64_t off = t * logits.stride(0) + e;
      s[e] = logits.dtype() == DType::kFloat32 ? double(logits.data_as<float>()[off])
                                               : double(float(logits.data_as<bfloat16>()[off]));
    }
    double m = s[0];
    for (int e = 0; e < n; ++e) m = s[e] > m ? s[e] : m;
    double sum = 0.0;
    for (int e = 0; e < n; ++e) {
      s[e] = cfg.scoring == MoeScoring::kSoftmax ? std::exp(s[e] - m) : 1.0 / (1.0 + std::exp(-s[e]));
      sum += s[e];
    }
    for (int e = 0; e < n; ++e) p[e] += s[e] / sum;
  }
  double loss = 0.0;
  for (int e = 0; e < n; ++e) {
    const double f = double(n) / (double(cfg.top_k) * double(tokens)) * double(load[e]);
    loss += f * (p[e] / double(tokens));
  }
  return alpha * loss;
}

}  // namespace kvkit
