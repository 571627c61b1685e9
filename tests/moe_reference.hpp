#pragma once
// Float64 references for the MoE tests, written as straightforward loops from
// the definitions in the model code (not from kvkit's implementation).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kvkit/ops/moe_router_config.hpp"

namespace kvkit::testing {

struct ReferenceRoute {
  std::vector<int> ids;         // [top_k], best first, ties to the lower index
  std::vector<double> weights;  // [top_k]
  std::vector<double> score;    // [n_experts] unbiased scores
  std::vector<bool> group_kept;  // [n_group]
  // Smallest gap between a chosen and a rejected candidate (expert or group):
  // below ~1e-5 a float32 router may legitimately decide the other way.
  double margin = std::numeric_limits<double>::infinity();
};

// Indices sorted by value descending, ties to the lower index.
inline std::vector<int> ranked(const std::vector<double>& v) {
  std::vector<int> order(v.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return v[a] > v[b]; });
  return order;
}

inline ReferenceRoute reference_route(const RouterConfig& cfg, const double* logits,
                                      const double* bias) {
  const int n = cfg.n_experts;
  ReferenceRoute out;
  out.score.resize(n);
  if (cfg.scoring == MoeScoring::kSoftmax) {
    double m = logits[0];
    for (int e = 0; e < n; ++e) m = std::max(m, logits[e]);
    double sum = 0.0;
    for (int e = 0; e < n; ++e) sum += std::exp(logits[e] - m);
    for (int e = 0; e < n; ++e) out.score[e] = std::exp(logits[e] - m) / sum;
  } else {
    for (int e = 0; e < n; ++e) out.score[e] = 1.0 / (1.0 + std::exp(-logits[e]));
  }
  std::vector<double> select(n);
  for (int e = 0; e < n; ++e) select[e] = out.score[e] + (bias ? bias[e] : 0.0);

  out.group_kept.assign(cfg.n_group, true);
  if (cfg.n_group > 1) {
    const int per = n / cfg.n_group;
    std::vector<double> group(cfg.n_group);
    for (int g = 0; g < cfg.n_group; ++g) {
      std::vector<double> members(select.begin() + g * per, select.begin() + (g + 1) * per);
      std::sort(members.begin(), members.end(), std::greater<double>());
      group[g] = cfg.group_score == MoeGroupScore::kMax ? members[0] : members[0] + members[1];
    }
    const std::vector<int> order = ranked(group);
    out.group_kept.assign(cfg.n_group, false);
    for (int i = 0; i < cfg.topk_group; ++i) out.group_kept[order[i]] = true;
    if (cfg.topk_group < cfg.n_group) {
      out.margin = std::min(out.margin, group[order[cfg.topk_group - 1]] - group[order[cfg.topk_group]]);
    }
    for (int e = 0; e < n; ++e) {
      if (!out.group_kept[e / per]) select[e] = -std::numeric_limits<double>::infinity();
    }
  }
  const std::vector<int> order = ranked(select);
  out.ids.assign(order.begin(), order.begin() + cfg.top_k);
  if (cfg.top_k < n && std::isfinite(select[order[cfg.top_k]])) {
    out.margin = std::min(out.margin, select[order[cfg.top_k - 1]] - select[order[cfg.top_k]]);
  }
  double sum = 0.0;
  for (int id : out.ids) sum += out.score[id];
  for (int id : out.ids) {
    double w = out.score[id];
    if (cfg.renormalize && sum > 0.0) w /= sum;
    out.weights.push_back(w * double(cfg.routed_scaling_factor));
  }
  return out;
}

inline std::vector<float> random_normal(std::size_t n, std::uint32_t seed, float stddev = 1.0f,
                                        float mean = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// SwiGLU expert FFN in float64: down(silu(gate(x)) * up(x)).
// w_gate, w_up: [inter, hidden]; w_down: [hidden, inter] (row-major).
inline void reference_swiglu(const double* x, int hidden, int inter, const float* w_gate,
                             const float* w_up, const float* w_down, double* y) {
  std::vector<double> h(inter);
  for (int i = 0; i < inter; ++i) {
    double g = 0.0, u = 0.0;
    for (int d = 0; d < hidden; ++d) {
      g += double(w_gate[std::size_t(i) * hidden + d]) * x[d];
      u += double(w_up[std::size_t(i) * hidden + d]) * x[d];
    }
    h[i] = g / (1.0 + std::exp(-g)) * u;
  }
  for (int d = 0; d < hidden; ++d) {
    double s = 0.0;
    for (int i = 0; i < inter; ++i) s += double(w_down[std::size_t(d) * inter + i]) * h[i];
    y[d] = s;
  }
}

}  // namespace kvkit::testing
