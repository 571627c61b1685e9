// MoE load statistics, the auxiliary-loss-free bias update and the
// sequence-wise balance loss, against float64 loops in the test.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

#include "kvkit/core/tensor_view.hpp"
#include "kvkit/ops/moe_router.hpp"
#include "kvkit/ops/moe_stats.hpp"
#include "moe_reference.hpp"

using Catch::Matchers::Contains;
using kvkit::DType;
using kvkit::RouterConfig;
using kvkit::TensorView;

TEST_CASE("expert load counts every (token, k) pair and the stats summarize it") {
  std::vector<std::int32_t> ids = {0, 3, 3, 1, 3, 0, 2, 3, 1, 0};  // 5 tokens, top-2, 5 experts
  const auto load = kvkit::moe_expert_load(TensorView(ids.data(), DType::kInt32, {5, 2}), 5);
  CHECK(load == std::vector<std::int64_t>{3, 2, 1, 4, 0});
  const auto s = kvkit::moe_load_stats(load);
  CHECK(s.total == 10);
  CHECK(s.max == 4);
  CHECK(s.max_expert == 3);
  CHECK(s.min == 0);
  CHECK(s.mean == 2.0);
  CHECK(s.max_over_mean == 2.0);
  ids[4] = 5;
  CHECK_THROWS_WITH(kvkit::moe_expert_load(TensorView(ids.data(), DType::kInt32, {5, 2}), 5),
                    Contains("topk_ids[2, 0] = 5"));
  CHECK_THROWS_WITH(kvkit::moe_load_stats({}), Contains("load.size()"));
}

TEST_CASE("the bias update lowers overloaded experts, raises underloaded ones and keeps balanced ones") {
  std::vector<float> bias = {0.5f, -0.25f, 0.0f, 1.0f};
  const std::vector<std::int64_t> load = {5, 1, 3, 3};  // mean 3
  kvkit::moe_update_correction_bias(TensorView(bias.data(), DType::kFloat32, {4}), load, 0.125f);
  CHECK(bias == std::vector<float>{0.375f, -0.125f, 0.0f, 1.0f});
  // A mean that is not an integer: 7 / 3.
  std::vector<float> b3 = {0.0f, 0.0f, 0.0f};
  kvkit::moe_update_correction_bias(TensorView(b3.data(), DType::kFloat32, {3}), {3, 2, 2}, 0.001f);
  CHECK(b3 == std::vector<float>{-0.001f, 0.001f, 0.001f});
  CHECK_THROWS_WITH(kvkit::moe_update_correction_bias(TensorView(b3.data(), DType::kFloat32, {3}),
                                                      {1, 2}, 0.1f),
                    Contains("'bias' has shape [3]: expected shape [2]"));
  CHECK_THROWS_WITH(kvkit::moe_update_correction_bias(TensorView(b3.data(), DType::kFloat32, {3}),
                                                      {1, 2, 3}, -1.0f),
                    Contains("'gamma' = -1"));
}

TEST_CASE("bias updates steer a skewed router towards balance") {
  // Logits favour low expert ids; repeated updates must reduce the max/mean load.
  auto cfg = RouterConfig::deepseek_v3(32, 4, 4, 2);
  const std::int64_t tokens = 256;
  auto logits = kvkit::testing::random_normal(std::size_t(tokens * cfg.n_experts), 3);
  for (std::int64_t t = 0; t < tokens; ++t)
    for (int e = 0; e < cfg.n_experts; ++e) logits[t * cfg.n_experts + e] += 2.0f - 0.125f * float(e);
  std::vector<float> bias(std::size_t(cfg.n_experts), 0.0f);
  std::vector<std::int32_t> ids(std::size_t(tokens * cfg.top_k));
  std::vector<float> weights(ids.size());
  auto route = [&] {
    kvkit::moe_route(cfg, TensorView(logits.data(), DType::kFloat32, {tokens, cfg.n_experts}),
                     TensorView(bias.data(), DType::kFloat32, {cfg.n_experts}),
                     TensorView(ids.data(), DType::kInt32, {tokens, cfg.top_k}),
                     TensorView(weights.data(), DType::kFloat32, {tokens, cfg.top_k}));
    return kvkit::moe_expert_load(TensorView(ids.data(), DType::kInt32, {tokens, cfg.top_k}), cfg.n_experts);
  };
  const double before = kvkit::moe_load_stats(route()).max_over_mean;
  for (int step = 0; step < 200; ++step) {
    kvkit::moe_update_correction_bias(TensorView(bias.data(), DType::kFloat32, {cfg.n_experts}), route(), 0.01f);
  }
  const double after = kvkit::moe_load_stats(route()).max_over_mean;
  CHECK(before > 3.0);
  CHECK(after < 0.5 * before);
}

TEST_CASE("the sequence-wise balance loss equals its definition and is alpha under perfect balance") {
  for (auto cfg : {RouterConfig::deepseek_v3(16, 4, 4, 2), RouterConfig::qwen3_moe(12, 3)}) {
    const std::int64_t tokens = 33;
    auto logits = kvkit::testing::random_normal(std::size_t(tokens * cfg.n_experts), 5, 2.0f);
    std::vector<float> bias(std::size_t(cfg.n_experts), 0.0f);
    std::vector<std::int32_t> ids(std::size_t(tokens * cfg.top_k));
    std::vector<float> weights(ids.size());
    TensorView lv(logits.data(), DType::kFloat32, {tokens, cfg.n_experts});
    TensorView iv(ids.data(), DType::kInt32, {tokens, cfg.top_k});
    kvkit::moe_route(cfg, lv, cfg.use_correction_bias ? TensorView(bias.data(), DType::kFloat32, {cfg.n_experts}) : TensorView(),
                     iv, TensorView(weights.data(), DType::kFloat32, {tokens, cfg.top_k}));
    // Reference: f_e and P_e from the paper's formulas.
    double want = 0.0;
    const int n = cfg.n_experts, k = cfg.top_k;
    for (int e = 0; e < n; ++e) {
      double hits = 0.0, p = 0.0;
      for (std::int64_t t = 0; t < tokens; ++t) {
        for (int j = 0; j < k; ++j) hits += ids[t * k + j] == e ? 1.0 : 0.0;
        std::vector<double> row(logits.begin() + t * n, logits.begin() + (t + 1) * n);
        const auto ref = kvkit::testing::reference_route(cfg, row.data(), nullptr);
        double sum = 0.0;
        for (double s : ref.score) sum += s;
        p += ref.score[e] / sum;
      }
      want += (double(n) / (k * double(tokens)) * hits) * (p / double(tokens));
    }
    CHECK(kvkit::moe_sequence_aux_loss(cfg, lv, iv, 0.0001) == Approx(0.0001 * want).epsilon(1e-12));
    // Perfect balance: token t picks experts (t*k + j) mod n; tokens = n, so every expert is hit k times.
    std::vector<std::int32_t> balanced(std::size_t(n * k));
    for (int t = 0; t < n; ++t)
      for (int j = 0; j < k; ++j) balanced[t * k + j] = (t * k + j) % n;
    CHECK(kvkit::moe_sequence_aux_loss(cfg, TensorView(logits.data(), DType::kFloat32, {n, n}),
                                       TensorView(balanced.data(), DType::kInt32, {n, k}), 0.5) == Approx(0.5));
  }
}
