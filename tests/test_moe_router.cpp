// MoE router: presets, random configurations, ties, negative bias, bad input.
// Every result is checked against the float64 reference in moe_reference.hpp.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kvkit/core/tensor_view.hpp"
#include "kvkit/ops/moe_router.hpp"
#include "moe_reference.hpp"

using Catch::Matchers::Contains;
using kvkit::DType;
using kvkit::MoeGroupScore;
using kvkit::MoeScoring;
using kvkit::RouterConfig;
using kvkit::TensorView;
using kvkit::testing::reference_route;

namespace {

struct RouteOutput {
  std::vector<std::int32_t> ids;
  std::vector<float> weights;
};

RouteOutput run_router(const RouterConfig& cfg, std::vector<float>& logits,
                       std::vector<float>* bias) {
  const std::int64_t tokens = std::int64_t(logits.size()) / cfg.n_experts;
  RouteOutput out{std::vector<std::int32_t>(std::size_t(tokens * cfg.top_k), -7),
                  std::vector<float>(std::size_t(tokens * cfg.top_k), -7.0f)};
  TensorView lv(logits.data(), DType::kFloat32, {tokens, cfg.n_experts});
  TensorView iv(out.ids.data(), DType::kInt32, {tokens, cfg.top_k});
  TensorView wv(out.weights.data(), DType::kFloat32, {tokens, cfg.top_k});
  if (bias != nullptr) {
    kvkit::moe_route(cfg, lv, TensorView(bias->data(), DType::kFloat32, {cfg.n_experts}), iv, wv);
  } else {
    kvkit::moe_route(cfg, lv, iv, wv);
  }
  return out;
}

// Checks every token against the float64 reference. Tokens whose reference
// decision is a near tie (gap < 1e-5) may legitimately differ in ids; they are
// counted and must stay rare. Returns the number of near ties.
int check_against_reference(const RouterConfig& cfg, const std::vector<float>& logits,
                            const std::vector<float>* bias, const RouteOutput& got) {
  const std::int64_t tokens = std::int64_t(logits.size()) / cfg.n_experts;
  std::vector<double> bias64;
  if (bias != nullptr) bias64.assign(bias->begin(), bias->end());
  int near_ties = 0;
  for (std::int64_t t = 0; t < tokens; ++t) {
    std::vector<double> row(logits.begin() + t * cfg.n_experts,
                            logits.begin() + (t + 1) * cfg.n_experts);
    const auto ref = reference_route(cfg, row.data(), bias ? bias64.data() : nullptr);
    INFO("token " << t << ", n_experts " << cfg.n_experts << ", top_k " << cfg.top_k
                  << ", n_group " << cfg.n_group << ", topk_group " << cfg.topk_group);
    bool same_ids = true;
    for (int j = 0; j < cfg.top_k; ++j) same_ids = same_ids && got.ids[t * cfg.top_k + j] == ref.ids[j];
    if (!same_ids && ref.margin < 1e-5) {
      ++near_ties;
      continue;
    }
    for (int j = 0; j < cfg.top_k; ++j) {
      INFO("slot " << j);
      REQUIRE(got.ids[t * cfg.top_k + j] == ref.ids[j]);
      const double w = got.weights[t * cfg.top_k + j];
      REQUIRE(std::fabs(w - ref.weights[j]) <= 2e-6 * std::fabs(ref.weights[j]) + 1e-7);
    }
  }
  return near_ties;
}

}  // namespace

TEST_CASE("every preset routes like the float64 reference of its model family") {
  struct Case {
    const char* name;
    RouterConfig cfg;
  };
  const std::vector<Case> cases = {{"mixtral", RouterConfig::mixtral()},
                                   {"qwen2_moe", RouterConfig::qwen2_moe()},
                                   {"qwen3_moe", RouterConfig::qwen3_moe()},
                                   {"deepseek_v2", RouterConfig::deepseek_v2()},
                                   {"deepseek_v3", RouterConfig::deepseek_v3()}};
  for (const auto& c : cases) {
    INFO("preset " << c.name);
    for (std::int64_t tokens : {1, 7, 33}) {
      auto logits = kvkit::testing::random_normal(std::size_t(tokens * c.cfg.n_experts), 17, 2.0f);
      std::vector<float> bias = kvkit::testing::random_normal(std::size_t(c.cfg.n_experts), 5, 0.05f);
      std::vector<float>* b = c.cfg.use_correction_bias ? &bias : nullptr;
      const auto got = run_router(c.cfg, logits, b);
      CHECK(check_against_reference(c.cfg, logits, b, got) == 0);
    }
  }
}

TEST_CASE("preset parameters match the published model configurations") {
  const auto v3 = RouterConfig::deepseek_v3();
  CHECK(v3.n_experts == 256);
  CHECK(v3.top_k == 8);
  CHECK(v3.n_group == 8);
  CHECK(v3.topk_group == 4);
  CHECK(v3.scoring == MoeScoring::kSigmoid);
  CHECK(v3.group_score == MoeGroupScore::kTopTwoSum);
  CHECK(v3.use_correction_bias);
  CHECK(v3.renormalize);
  CHECK(v3.routed_scaling_factor == 2.5f);
  const auto v2 = RouterConfig::deepseek_v2();
  CHECK((v2.n_experts == 160 && v2.top_k == 6 && v2.n_group == 8 && v2.topk_group == 3));
  CHECK((v2.scoring == MoeScoring::kSoftmax && v2.group_score == MoeGroupScore::kMax));
  CHECK((!v2.renormalize && v2.routed_scaling_factor == 16.0f && !v2.use_correction_bias));
  const auto mx = RouterConfig::mixtral();
  CHECK((mx.n_experts == 8 && mx.top_k == 2 && mx.renormalize && mx.n_group == 1));
  CHECK((RouterConfig::qwen2_moe().n_experts == 60 && RouterConfig::qwen2_moe().top_k == 4 &&
         !RouterConfig::qwen2_moe().renormalize));
  CHECK((RouterConfig::qwen3_moe().n_experts == 128 && RouterConfig::qwen3_moe().top_k == 8 &&
         RouterConfig::qwen3_moe().renormalize));
  // Mixtral's renormalized top-2 weights sum to one.
  std::vector<float> logits = kvkit::testing::random_normal(8 * 5, 3);
  const auto got = run_router(mx, logits, nullptr);
  for (int t = 0; t < 5; ++t) CHECK(got.weights[t * 2] + got.weights[t * 2 + 1] == Approx(1.0f));
}

TEST_CASE("random router configurations up to 256 experts, top-8 and 16 groups match the reference") {
  std::mt19937 rng(2024);
  int near_ties = 0;
  int routed_tokens = 0;
  for (int trial = 0; trial < 120; ++trial) {
    RouterConfig cfg;
    const int groups_options[] = {1, 1, 2, 4, 8, 16};
    cfg.n_group = groups_options[rng() % 6];
    const int per_group = 1 + int(rng() % (256 / cfg.n_group));
    cfg.n_experts = cfg.n_group * per_group;
    cfg.topk_group = 1 + int(rng() % cfg.n_group);
    cfg.group_score = (rng() % 2) ? MoeGroupScore::kMax : MoeGroupScore::kTopTwoSum;
    if (per_group < 2) cfg.group_score = MoeGroupScore::kMax;
    cfg.top_k = 1 + int(rng() % std::min(8, cfg.topk_group * per_group));
    cfg.scoring = (rng() % 2) ? MoeScoring::kSoftmax : MoeScoring::kSigmoid;
    cfg.use_correction_bias = rng() % 2;
    cfg.renormalize = rng() % 2;
    cfg.routed_scaling_factor = (rng() % 2) ? 1.0f : 0.5f + float(rng() % 100) / 10.0f;
    REQUIRE_NOTHROW(cfg.validate());
    const int tokens = 1 + int(rng() % 9);
    auto logits = kvkit::testing::random_normal(std::size_t(tokens * cfg.n_experts), rng(), 3.0f);
    auto bias = kvkit::testing::random_normal(std::size_t(cfg.n_experts), rng(), 0.3f);
    auto* b = cfg.use_correction_bias ? &bias : nullptr;
    const auto got = run_router(cfg, logits, b);
    near_ties += check_against_reference(cfg, logits, b, got);
    routed_tokens += tokens;
  }
  CHECK(near_ties <= routed_tokens / 100);
}

TEST_CASE("bfloat16 logits route exactly like their float32 values") {
  const auto cfg = RouterConfig::deepseek_v3();
  const std::int64_t tokens = 7;
  auto logits = kvkit::testing::random_normal(std::size_t(tokens * cfg.n_experts), 9, 2.0f);
  std::vector<kvkit::bfloat16> logits16(logits.size());
  for (std::size_t i = 0; i < logits.size(); ++i) {
    logits16[i] = kvkit::bfloat16(logits[i]);
    logits[i] = float(logits16[i]);
  }
  auto bias = kvkit::testing::random_normal(std::size_t(cfg.n_experts), 4, 0.1f);
  const auto want = run_router(cfg, logits, &bias);
  std::vector<std::int32_t> ids(std::size_t(tokens * cfg.top_k), -1);
  std::vector<float> weights(ids.size(), -1.0f);
  kvkit::moe_route(cfg, TensorView(logits16.data(), DType::kBFloat16, {tokens, cfg.n_experts}),
                   TensorView(bias.data(), DType::kFloat32, {cfg.n_experts}),
                   TensorView(ids.data(), DType::kInt32, {tokens, cfg.top_k}),
                   TensorView(weights.data(), DType::kFloat32, {tokens, cfg.top_k}));
  CHECK(ids == want.ids);
  CHECK(weights == want.weights);
}

TEST_CASE("strided logits rows are read at their row stride") {
  const auto cfg = RouterConfig::qwen3_moe();
  const std::int64_t tokens = 5, pitch = cfg.n_experts + 3;
  auto padded = kvkit::testing::random_normal(std::size_t(tokens * pitch), 21, 2.0f);
  std::vector<float> dense(std::size_t(tokens * cfg.n_experts));
  for (std::int64_t t = 0; t < tokens; ++t)
    for (int e = 0; e < cfg.n_experts; ++e) dense[t * cfg.n_experts + e] = padded[t * pitch + e];
  const auto want = run_router(cfg, dense, nullptr);
  std::vector<std::int32_t> ids(want.ids.size());
  std::vector<float> weights(want.weights.size());
  kvkit::moe_route(cfg, TensorView(padded.data(), DType::kFloat32, {tokens, cfg.n_experts}, {pitch, 1}),
                   TensorView(ids.data(), DType::kInt32, {tokens, cfg.top_k}),
                   TensorView(weights.data(), DType::kFloat32, {tokens, cfg.top_k}));
  CHECK(ids == want.ids);
  CHECK(weights == want.weights);
}

TEST_CASE("ties between equal scores go to the lower expert and the lower group") {
  SECTION("all logits equal: experts 0..k-1, groups 0..topk_group-1") {
    for (auto cfg : {RouterConfig::mixtral(), RouterConfig::deepseek_v2(), RouterConfig::deepseek_v3()}) {
      std::vector<float> logits(std::size_t(3 * cfg.n_experts), 0.25f);
      std::vector<float> bias(std::size_t(cfg.n_experts), 0.0f);
      const auto got = run_router(cfg, logits, cfg.use_correction_bias ? &bias : nullptr);
      for (int t = 0; t < 3; ++t)
        for (int j = 0; j < cfg.top_k; ++j) CHECK(got.ids[t * cfg.top_k + j] == j);
    }
  }
  SECTION("logits and bias from a few values: many exact ties, ids equal the reference") {
    std::mt19937 rng(77);
    const float values[] = {-1.0f, 0.0f, 0.5f, 1.0f};
    const float bias_values[] = {-0.25f, 0.0f, 0.125f};
    for (auto cfg : {RouterConfig::qwen3_moe(), RouterConfig::deepseek_v2(), RouterConfig::deepseek_v3()}) {
      const int tokens = 33;
      std::vector<float> logits(std::size_t(tokens * cfg.n_experts));
      for (auto& x : logits) x = values[rng() % 4];
      std::vector<float> bias(std::size_t(cfg.n_experts));
      for (auto& x : bias) x = bias_values[rng() % 3];
      auto* b = cfg.use_correction_bias ? &bias : nullptr;
      const auto got = run_router(cfg, logits, b);
      std::vector<double> bias64(bias.begin(), bias.end());
      for (int t = 0; t < tokens; ++t) {
        std::vector<double> row(logits.begin() + t * cfg.n_experts, logits.begin() + (t + 1) * cfg.n_experts);
        const auto ref = reference_route(cfg, row.data(), b ? bias64.data() : nullptr);
        for (int j = 0; j < cfg.top_k; ++j) REQUIRE(got.ids[t * cfg.top_k + j] == ref.ids[j]);
      }
    }
  }
}

TEST_CASE("excluded groups are masked with -inf, so a negative bias cannot pull their experts in") {
  // With every biased score negative, masking the excluded groups with 0.0 (as HF
  // transformers' DeepSeek-V3 code does) would make the excluded experts win.
  RouterConfig cfg = RouterConfig::deepseek_v3(16, 4, 4, 2);
  const int tokens = 33;
  auto logits = kvkit::testing::random_normal(std::size_t(tokens * cfg.n_experts), 8, 2.0f);
  auto bias = kvkit::testing::random_normal(std::size_t(cfg.n_experts), 12, 0.2f, -3.0f);
  const auto got = run_router(cfg, logits, &bias);
  std::vector<double> bias64(bias.begin(), bias.end());
  for (int t = 0; t < tokens; ++t) {
    std::vector<double> row(logits.begin() + t * cfg.n_experts, logits.begin() + (t + 1) * cfg.n_experts);
    const auto ref = reference_route(cfg, row.data(), bias64.data());
    for (int j = 0; j < cfg.top_k; ++j) {
      const int id = got.ids[t * cfg.top_k + j];
      INFO("token " << t << " slot " << j << " expert " << id);
      REQUIRE(ref.group_kept[id / cfg.experts_per_group()]);
      REQUIRE(id == ref.ids[j]);
    }
  }
}

TEST_CASE("chosen experts are distinct and every output slot is written") {
  auto cfg = RouterConfig::deepseek_v3();
  const int tokens = 33;
  auto logits = kvkit::testing::random_normal(std::size_t(tokens * cfg.n_experts), 31, 1.0f);
  auto bias = kvkit::testing::random_normal(std::size_t(cfg.n_experts), 32, 0.1f);
  const auto got = run_router(cfg, logits, &bias);  // outputs were poisoned with -7
  for (int t = 0; t < tokens; ++t) {
    for (int j = 0; j < cfg.top_k; ++j) {
      const int id = got.ids[t * cfg.top_k + j];
      REQUIRE((id >= 0 && id < cfg.n_experts));
      REQUIRE(got.weights[t * cfg.top_k + j] > 0.0f);
      for (int i = 0; i < j; ++i) REQUIRE(got.ids[t * cfg.top_k + i] != id);
    }
  }
}

TEST_CASE("a batch routed at once (threaded where OpenMP is on) equals each token routed alone") {
  for (auto cfg : {RouterConfig::deepseek_v3(), RouterConfig::mixtral()}) {
    const int tokens = 1000;  // far above the threading threshold; not a multiple of any thread count
    auto logits = kvkit::testing::random_normal(std::size_t(tokens * cfg.n_experts), 41, 1.5f);
    auto bias = kvkit::testing::random_normal(std::size_t(cfg.n_experts), 42, 0.1f);
    std::vector<float>* bias_arg = cfg.use_correction_bias ? &bias : nullptr;
    const auto batch = run_router(cfg, logits, bias_arg);
    for (int t = 0; t < tokens; ++t) {
      std::vector<float> row(logits.begin() + t * cfg.n_experts, logits.begin() + (t + 1) * cfg.n_experts);
      const auto alone = run_router(cfg, row, bias_arg);
      for (int j = 0; j < cfg.top_k; ++j) {
        REQUIRE(batch.ids[std::size_t(t * cfg.top_k + j)] == alone.ids[std::size_t(j)]);
        REQUIRE(batch.weights[std::size_t(t * cfg.top_k + j)] == alone.weights[std::size_t(j)]);
      }
    }
  }
}

TEST_CASE("NaN and inf logits are rejected on the CPU path and outputs stay untouched") {
  auto cfg = RouterConfig::mixtral();
  std::vector<float> logits = kvkit::testing::random_normal(8 * 3, 1);
  std::vector<std::int32_t> ids(6, -7);
  std::vector<float> weights(6, -7.0f);
  auto route = [&] {
    kvkit::moe_route(cfg, TensorView(logits.data(), DType::kFloat32, {3, 8}),
                     TensorView(ids.data(), DType::kInt32, {3, 2}),
                     TensorView(weights.data(), DType::kFloat32, {3, 2}));
  };
  logits[1 * 8 + 3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(route(), Contains("logits[1, 3] = nan") && Contains("expected finite"));
  logits[1 * 8 + 3] = 0.0f;
  logits[2 * 8 + 7] = -std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(route(), Contains("logits[2, 7] = -inf"));
  CHECK(ids == std::vector<std::int32_t>(6, -7));
  CHECK(weights == std::vector<float>(6, -7.0f));

  auto v3 = RouterConfig::deepseek_v3(16, 2, 4, 2);
  std::vector<float> l3 = kvkit::testing::random_normal(16, 2);
  std::vector<float> bias(16, 0.0f);
  bias[5] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(kvkit::moe_route(v3, TensorView(l3.data(), DType::kFloat32, {1, 16}),
                                     TensorView(bias.data(), DType::kFloat32, {16}),
                                     TensorView(ids.data(), DType::kInt32, {1, 2}),
                                     TensorView(weights.data(), DType::kFloat32, {1, 2})),
                    Contains("correction_bias[5] = inf"));
}

TEST_CASE("invalid router configurations are rejected with the field and the expectation") {
  auto cfg = RouterConfig::mixtral();
  cfg.top_k = 9;
  CHECK_THROWS_WITH(cfg.validate(), Contains("'top_k' = 9") && Contains("n_experts (8)"));
  cfg = RouterConfig::deepseek_v3();
  cfg.topk_group = 9;
  CHECK_THROWS_WITH(cfg.validate(), Contains("'topk_group' = 9") && Contains("n_group (8)"));
  cfg = RouterConfig::deepseek_v3();
  cfg.n_experts = 250;
  CHECK_THROWS_WITH(cfg.validate(), Contains("'n_group' = 8") && Contains("divisor of n_experts (250)"));
  cfg = RouterConfig::deepseek_v3(16, 8, 8, 1);  // one group of 2 experts cannot supply 8
  CHECK_THROWS_WITH(cfg.validate(), Contains("'top_k' = 8") && Contains("topk_group * experts per group"));
  cfg = RouterConfig::deepseek_v3(8, 2, 8, 4);
  CHECK_THROWS_WITH(cfg.validate(), Contains("at least 2 experts per group"));
  cfg = RouterConfig::mixtral();
  cfg.routed_scaling_factor = 0.0f;
  CHECK_THROWS_WITH(cfg.validate(), Contains("routed_scaling_factor"));
  cfg = RouterConfig::mixtral(0, 1);
  CHECK_THROWS_WITH(cfg.validate(), Contains("'n_experts' = 0"));
}

TEST_CASE("the router rejects mismatched tensors before writing anything") {
  auto cfg = RouterConfig::mixtral();
  std::vector<float> logits = kvkit::testing::random_normal(8 * 3, 1);
  std::vector<std::int32_t> ids(6, -7);
  std::vector<float> weights(6, -7.0f);
  TensorView lv(logits.data(), DType::kFloat32, {3, 8});
  TensorView iv(ids.data(), DType::kInt32, {3, 2});
  TensorView wv(weights.data(), DType::kFloat32, {3, 2});
  CHECK_THROWS_WITH(kvkit::moe_route(cfg, TensorView(logits.data(), DType::kFloat32, {4, 6}), iv, wv),
                    Contains("'logits' has shape [4, 6]: expected shape [*, 8]"));
  CHECK_THROWS_WITH(kvkit::moe_route(cfg, lv, TensorView(ids.data(), DType::kInt32, {2, 2}), wv),
                    Contains("'topk_ids' has shape [2, 2]"));
  CHECK_THROWS_WITH(kvkit::moe_route(cfg, lv, TensorView(weights.data(), DType::kFloat32, {3, 2}), wv),
                    Contains("'topk_ids' = float32: expected int32"));
  CHECK_THROWS_WITH(kvkit::moe_route(cfg, TensorView(ids.data(), DType::kInt32, {3, 2}), iv, wv),
                    Contains("logits.dtype") && Contains("float32 or bfloat16"));
  auto v3 = RouterConfig::deepseek_v3(16, 2, 4, 2);
  std::vector<float> l3(16, 0.5f);
  CHECK_THROWS_WITH(kvkit::moe_route(v3, TensorView(l3.data(), DType::kFloat32, {1, 16}),
                                     TensorView(ids.data(), DType::kInt32, {1, 2}),
                                     TensorView(weights.data(), DType::kFloat32, {1, 2})),
                    Contains("'correction_bias'"));
  CHECK(ids == std::vector<std::int32_t>(6, -7));
}

TEST_CASE("moe_exp is within 2 ulp of exp over the range routers use") {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> dist(-103.0f, 88.7f);
  for (int i = 0; i < 200000; ++i) {
    const float x = i < 1000 ? -20.0f + 0.04f * float(i) : dist(rng);
    const double want = std::exp(double(x));
    const float got = kvkit::moe_exp(x);
    if (want < 1.2e-38) {
      REQUIRE(std::fabs(got - want) <= 3e-7 * want + 3e-45);  // subnormal: a couple of subnormal ulps
    } else {
      REQUIRE(std::fabs(got - want) <= 2.5 * std::ldexp(1.0, std::ilogb(want) - 23));
    }
  }
  CHECK(std::isinf(kvkit::moe_exp(89.0f)));
  CHECK(kvkit::moe_exp(-104.0f) == 0.0f);
  CHECK(std::isnan(kvkit::moe_exp(std::numeric_limits<float>::quiet_NaN())));
  CHECK(kvkit::moe_exp(0.0f) == 1.0f);
}
