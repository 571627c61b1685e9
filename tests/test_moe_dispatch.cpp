// MoE dispatch (plan + gather) and combine on the CPU: layout, padding,
// capacity, end-to-end with identity and SwiGLU experts, bad input.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kvkit/core/tensor_view.hpp"
#include "kvkit/ops/moe_combine.hpp"
#include "kvkit/ops/moe_dispatch.hpp"
#include "kvkit/ops/moe_router.hpp"
#include "moe_reference.hpp"

using Catch::Matchers::Contains;
using kvkit::DispatchConfig;
using kvkit::DType;
using kvkit::TensorView;

namespace {

constexpr std::int32_t kPoison = -12345;

struct Plan {
  DispatchConfig cfg;
  std::int64_t tokens = 0;
  std::vector<std::int32_t> counts, offsets, sorted, rows, tiles;
  kvkit::DispatchResult result;

  Plan(const DispatchConfig& c, std::vector<std::int32_t>& ids) : cfg(c) {
    tokens = std::int64_t(ids.size()) / c.top_k;
    const std::int64_t max_rows = kvkit::moe_dispatch_max_rows(c, tokens);
    counts.assign(std::size_t(c.n_experts), kPoison);
    offsets.assign(std::size_t(c.n_experts + 1), kPoison);
    sorted.assign(std::size_t(max_rows), kPoison);
    rows.assign(ids.size(), kPoison);
    tiles.assign(std::size_t(kvkit::moe_dispatch_max_tiles(c, tokens)), kPoison);
    result = kvkit::moe_dispatch_plan(c, TensorView(ids.data(), DType::kInt32, {tokens, c.top_k}),
                                      views());
  }
  kvkit::DispatchPlanViews views() {
    return {TensorView(counts.data(), DType::kInt32, {cfg.n_experts}),
            TensorView(offsets.data(), DType::kInt32, {cfg.n_experts + 1}),
            TensorView(sorted.data(), DType::kInt32, {std::int64_t(sorted.size())}),
            TensorView(rows.data(), DType::kInt32, {std::int64_t(rows.size())}),
            TensorView(tiles.data(), DType::kInt32, {std::int64_t(tiles.size())})};
  }
};

std::vector<std::int32_t> random_ids(std::int64_t tokens, int k, int n_experts, std::uint32_t seed,
                                     bool skewed = false) {
  std::mt19937 rng(seed);
  std::vector<std::int32_t> ids(std::size_t(tokens * k));
  for (std::int64_t t = 0; t < tokens; ++t) {
    // Distinct experts per token, as a router produces; skewed favours low ids.
    std::vector<int> chosen;
    while (int(chosen.size()) < k) {
      int e = int(rng() % std::uint32_t(n_experts));
      if (skewed && rng() % 2) e = int(rng() % std::uint32_t(std::min(n_experts, k + 2)));
      bool dup = false;
      for (int c : chosen) dup = dup || c == e;
      if (!dup) chosen.push_back(e);
    }
    for (int j = 0; j < k; ++j) ids[t * k + j] = chosen[j];
  }
  return ids;
}

// Checks a plan against a straightforward construction from its definition.
void check_plan(const Plan& p, const std::vector<std::int32_t>& ids) {
  const auto& c = p.cfg;
  const std::int64_t pairs = p.tokens * c.top_k;
  std::int64_t row = 0, dropped = 0;
  for (int e = 0; e < c.n_experts; ++e) {
    std::vector<std::int32_t> mine;
    for (std::int64_t q = 0; q < pairs; ++q)
      if (ids[q] == e) mine.push_back(std::int32_t(q));
    INFO("expert " << e);
    REQUIRE(p.counts[e] == std::int32_t(mine.size()));
    const std::size_t kept = c.capacity >= 0 ? std::min<std::size_t>(mine.size(), std::size_t(c.capacity)) : mine.size();
    dropped += std::int64_t(mine.size() - kept);
    const std::int64_t padded = (std::int64_t(kept) + c.tile - 1) / c.tile * c.tile;
    REQUIRE(p.offsets[e] == row);
    for (std::size_t i = 0; i < mine.size(); ++i) {
      if (i < kept) {
        REQUIRE(p.sorted[std::size_t(row) + i] == mine[i]);
        REQUIRE(p.rows[std::size_t(mine[i])] == row + std::int64_t(i));
      } else {
        REQUIRE(p.rows[std::size_t(mine[i])] == -1);
      }
    }
    for (std::int64_t r = row + std::int64_t(kept); r < row + padded; ++r) REQUIRE(p.sorted[r] == pairs);
    for (std::int64_t r = row; r < row + padded; r += c.tile) REQUIRE(p.tiles[r / c.tile] == e);
    row += padded;
  }
  REQUIRE(p.offsets[c.n_experts] == row);
  REQUIRE(p.result.rows_used == row);
  REQUIRE(p.result.num_dropped == dropped);
  REQUIRE(row % c.tile == 0);
  for (std::size_t r = std::size_t(row); r < p.sorted.size(); ++r) REQUIRE(p.sorted[r] == pairs);
  for (std::size_t b = std::size_t(row / c.tile); b < p.tiles.size(); ++b) REQUIRE(p.tiles[b] == -1);
}

}  // namespace

TEST_CASE("a dispatch plan groups pairs by expert in (token, k) order, pads to tiles and marks padding") {
  // 4 tokens, top-2, 3 experts; tile 4.
  std::vector<std::int32_t> ids = {2, 0, 0, 2, 1, 2, 2, 0};
  Plan p({3, 2, 4, -1}, ids);
  CHECK(p.counts == std::vector<std::int32_t>{3, 1, 4});
  CHECK(p.offsets == std::vector<std::int32_t>{0, 4, 8, 12});
  const std::int32_t S = 8;  // sentinel = num_tokens * top_k
  // max rows = 8 + 3 * 3 = 17
  CHECK(p.sorted == std::vector<std::int32_t>{1, 2, 7, S, 4, S, S, S, 0, 3, 5, 6, S, S, S, S, S});
  CHECK(p.rows == std::vector<std::int32_t>{8, 0, 1, 9, 4, 10, 11, 2});
  CHECK(p.tiles == std::vector<std::int32_t>{0, 1, 2, -1, -1});
  CHECK(p.result.rows_used == 12);
  CHECK(p.result.num_dropped == 0);
}

TEST_CASE("a capacity keeps each expert's first pairs and reports the dropped ones") {
  std::vector<std::int32_t> ids = {2, 0, 0, 2, 1, 2, 2, 0};
  Plan p({3, 2, 1, 2}, ids);
  CHECK(p.counts == std::vector<std::int32_t>{3, 1, 4});  // before capacity
  CHECK(p.offsets == std::vector<std::int32_t>{0, 2, 3, 5});
  CHECK(p.result.num_dropped == 3);
  // Expert 0 keeps pairs 1, 2 (drops 7); expert 2 keeps 0, 3 (drops 5, 6).
  CHECK(p.rows == std::vector<std::int32_t>{3, 0, 1, 4, 2, -1, -1, -1});
  CHECK(kvkit::moe_capacity_from_factor(1.25, 4096, 8, 256) == 160);
  CHECK(kvkit::moe_capacity_from_factor(1.0, 7, 2, 4) == 4);
}

TEST_CASE("dispatch plans for random routings match their definition") {
  std::uint32_t seed = 1;
  for (int n_experts : {1, 8, 60, 256}) {
    for (int k : {1, 2, 8}) {
      if (k > n_experts) continue;
      for (std::int64_t tokens : {1, 7, 33, 300}) {
        for (int tile : {1, 16, 63, 65}) {
          for (int capacity : {-1, 0, 3, 40}) {
            INFO("E " << n_experts << " k " << k << " T " << tokens << " tile " << tile << " cap " << capacity);
            ++seed;
            auto ids = random_ids(tokens, k, n_experts, seed, seed % 3 == 0);
            Plan p({n_experts, k, tile, capacity}, ids);
            check_plan(p, ids);
          }
        }
      }
    }
  }
}

TEST_CASE("gather copies each pair's token row and zeroes padding rows") {
  const std::int64_t tokens = 33, hidden = 7;
  const int k = 3, n_experts = 5;
  auto ids = random_ids(tokens, k, n_experts, 9);
  Plan p({n_experts, k, 4, -1}, ids);
  auto x = kvkit::testing::random_normal(std::size_t(tokens * hidden), 3);
  std::vector<float> xs(p.sorted.size() * hidden, -99.0f);
  kvkit::moe_gather(TensorView(x.data(), DType::kFloat32, {tokens, hidden}),
                    TensorView(p.sorted.data(), DType::kInt32, {std::int64_t(p.sorted.size())}), k,
                    TensorView(xs.data(), DType::kFloat32, {std::int64_t(p.sorted.size()), hidden}));
  for (std::size_t r = 0; r < p.sorted.size(); ++r) {
    const std::int32_t q = p.sorted[r];
    for (std::int64_t d = 0; d < hidden; ++d) {
      const float want = q == tokens * k ? 0.0f : x[std::size_t((q / k) * hidden + d)];
      REQUIRE(xs[r * hidden + d] == want);
    }
  }
}

namespace {

// dispatch -> per-expert function on the sorted rows -> combine, in dtype T.
template <class T, class Expert>
std::vector<float> run_moe(const std::vector<float>& x, std::int64_t tokens, std::int64_t hidden,
                           std::vector<std::int32_t>& ids, std::vector<float>& weights,
                           const DispatchConfig& cfg, Expert&& expert, const std::vector<float>* shared,
                           kvkit::DispatchResult* result = nullptr) {
  Plan p(cfg, ids);
  if (result) *result = p.result;
  const DType dt = kvkit::dtype_of<T>;
  std::vector<T> xt(x.size()), st;
  for (std::size_t i = 0; i < x.size(); ++i) xt[i] = kvkit::from_float<T>(x[i]);
  const std::int64_t rows = std::int64_t(p.sorted.size());
  std::vector<T> xs(std::size_t(rows * hidden)), ys(std::size_t(rows * hidden), kvkit::from_float<T>(1e30f));
  kvkit::moe_gather(TensorView(xt.data(), dt, {tokens, hidden}),
                    TensorView(p.sorted.data(), DType::kInt32, {rows}), cfg.top_k,
                    TensorView(xs.data(), dt, {rows, hidden}));
  // The "grouped GEMM": each expert processes its own segment of rows.
  for (int e = 0; e < cfg.n_experts; ++e) {
    for (std::int64_t r = p.offsets[e]; r < p.offsets[e + 1]; ++r) {
      std::vector<double> in(static_cast<std::size_t>(hidden)), out(static_cast<std::size_t>(hidden));
      for (std::int64_t d = 0; d < hidden; ++d) in[d] = kvkit::to_float(xs[r * hidden + d]);
      expert(e, in.data(), out.data());
      for (std::int64_t d = 0; d < hidden; ++d) ys[r * hidden + d] = kvkit::from_float<T>(float(out[d]));
    }
  }
  std::vector<T> out(std::size_t(tokens * hidden), kvkit::from_float<T>(-7.0f));
  TensorView shared_view;
  if (shared != nullptr) {
    st.resize(shared->size());
    for (std::size_t i = 0; i < st.size(); ++i) st[i] = kvkit::from_float<T>((*shared)[i]);
    shared_view = TensorView(st.data(), dt, {tokens, hidden});
  }
  kvkit::moe_combine(TensorView(ys.data(), dt, {rows, hidden}),
                     TensorView(p.rows.data(), DType::kInt32, {std::int64_t(p.rows.size())}),
                     TensorView(weights.data(), DType::kFloat32, {tokens, cfg.top_k}), shared_view,
                     TensorView(out.data(), dt, {tokens, hidden}));
  std::vector<float> result_f(out.size());
  for (std::size_t i = 0; i < out.size(); ++i) result_f[i] = kvkit::to_float(out[i]);
  return result_f;
}

}  // namespace

TEST_CASE("dispatch, identity experts and combine give the input times the summed weights") {
  const auto rcfg = kvkit::RouterConfig::qwen2_moe();  // not renormalized: sums differ per token
  for (std::int64_t tokens : {1, 7, 33}) {
    const std::int64_t hidden = 65;
    auto logits = kvkit::testing::random_normal(std::size_t(tokens * rcfg.n_experts), 4, 2.0f);
    std::vector<std::int32_t> ids(std::size_t(tokens * rcfg.top_k));
    std::vector<float> weights(ids.size());
    kvkit::moe_route(rcfg, TensorView(logits.data(), DType::kFloat32, {tokens, rcfg.n_experts}),
                     TensorView(ids.data(), DType::kInt32, {tokens, rcfg.top_k}),
                     TensorView(weights.data(), DType::kFloat32, {tokens, rcfg.top_k}));
    auto x = kvkit::testing::random_normal(std::size_t(tokens * hidden), 5);
    auto identity = [&](int, const double* in, double* out) {
      for (std::int64_t d = 0; d < hidden; ++d) out[d] = in[d];
    };
    for (int tile : {1, 16}) {
      const DispatchConfig cfg{rcfg.n_experts, rcfg.top_k, tile, -1};
      const auto f32 = run_moe<float>(x, tokens, hidden, ids, weights, cfg, identity, nullptr);
      const auto b16 = run_moe<kvkit::bfloat16>(x, tokens, hidden, ids, weights, cfg, identity, nullptr);
      for (std::int64_t t = 0; t < tokens; ++t) {
        double wsum = 0.0;
        for (int j = 0; j < rcfg.top_k; ++j) wsum += weights[t * rcfg.top_k + j];
        for (std::int64_t d = 0; d < hidden; ++d) {
          const double want = double(x[t * hidden + d]) * wsum;
          REQUIRE(std::fabs(f32[t * hidden + d] - want) <= 1e-6 * std::fabs(want) + 1e-7);
          // bf16: input and result each rounded once (relative 2^-8 each); the identity is exact.
          REQUIRE(std::fabs(b16[t * hidden + d] - want) <= 0.008 * std::fabs(x[t * hidden + d]) * wsum + 1e-6);
        }
      }
    }
  }
}

TEST_CASE("dispatch, SwiGLU experts and combine equal a dense per-token loop, shared expert included") {
  const auto rcfg = kvkit::RouterConfig::deepseek_v3(16, 4, 4, 2);
  const std::int64_t tokens = 33, hidden = 24;
  const int inter = 10;
  auto logits = kvkit::testing::random_normal(std::size_t(tokens * rcfg.n_experts), 6, 2.0f);
  auto bias = kvkit::testing::random_normal(std::size_t(rcfg.n_experts), 7, 0.1f);
  std::vector<std::int32_t> ids(std::size_t(tokens * rcfg.top_k));
  std::vector<float> weights(ids.size());
  kvkit::moe_route(rcfg, TensorView(logits.data(), DType::kFloat32, {tokens, rcfg.n_experts}),
                   TensorView(bias.data(), DType::kFloat32, {rcfg.n_experts}),
                   TensorView(ids.data(), DType::kInt32, {tokens, rcfg.top_k}),
                   TensorView(weights.data(), DType::kFloat32, {tokens, rcfg.top_k}));
  const std::size_t wsize = std::size_t(inter) * hidden;
  std::vector<std::vector<float>> w_gate, w_up, w_down;
  for (int e = 0; e < rcfg.n_experts; ++e) {
    w_gate.push_back(kvkit::testing::random_normal(wsize, 100 + e, 0.3f));
    w_up.push_back(kvkit::testing::random_normal(wsize, 200 + e, 0.3f));
    w_down.push_back(kvkit::testing::random_normal(wsize, 300 + e, 0.3f));
  }
  auto expert = [&](int e, const double* in, double* out) {
    kvkit::testing::reference_swiglu(in, int(hidden), inter, w_gate[e].data(), w_up[e].data(),
                                     w_down[e].data(), out);
  };
  auto x = kvkit::testing::random_normal(std::size_t(tokens * hidden), 8);
  auto shared = kvkit::testing::random_normal(std::size_t(tokens * hidden), 9);
  for (int tile : {1, 7, 64}) {
    const DispatchConfig cfg{rcfg.n_experts, rcfg.top_k, tile, -1};
    const auto got = run_moe<float>(x, tokens, hidden, ids, weights, cfg, expert, &shared);
    for (std::int64_t t = 0; t < tokens; ++t) {
      std::vector<double> want(static_cast<std::size_t>(hidden)), y(static_cast<std::size_t>(hidden)), xin(static_cast<std::size_t>(hidden));
      for (std::int64_t d = 0; d < hidden; ++d) {
        want[d] = shared[t * hidden + d];
        xin[d] = x[t * hidden + d];
      }
      for (int j = 0; j < rcfg.top_k; ++j) {
        expert(ids[t * rcfg.top_k + j], xin.data(), y.data());
        for (std::int64_t d = 0; d < hidden; ++d) want[d] += double(weights[t * rcfg.top_k + j]) * y[d];
      }
      for (std::int64_t d = 0; d < hidden; ++d) {
        REQUIRE(got[t * hidden + d] == Approx(want[d]).epsilon(1e-5).margin(1e-5));
      }
    }
  }
}

namespace {

/// moe_combine over many tokens (several chunks, shared among threads where
/// OpenMP is on, each on the ISA picked at run time) equals the rule of the
/// file comment evaluated token by token here: float32 accumulator, pairs in
/// order, dropped pairs skipped, shared output last, one rounding. Bit for bit.
template <class T>
void check_combine_bits(bool alias_shared) {
  const std::int64_t tokens = 301, hidden = 203, rows = 900;
  const int k = 8;
  std::mt19937 rng(17);
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<std::int32_t> row_dist(-1, std::int32_t(rows - 1));  // -1: dropped
  std::vector<T> y(std::size_t(rows * hidden)), shared(std::size_t(tokens * hidden));
  for (auto& v : y) v = kvkit::from_float<T>(normal(rng));
  for (auto& v : shared) v = kvkit::from_float<T>(normal(rng));
  std::vector<std::int32_t> pair_rows(std::size_t(tokens * k));
  std::vector<float> weights(pair_rows.size());
  for (auto& r : pair_rows) r = row_dist(rng);
  for (auto& w : weights) w = std::fabs(normal(rng));
  std::vector<T> want(shared.size());
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (std::int64_t d = 0; d < hidden; ++d) {
      float acc = 0.0f;
      for (int j = 0; j < k; ++j) {
        const std::int32_t r = pair_rows[std::size_t(t * k + j)];
        if (r < 0) continue;
        const float product = weights[std::size_t(t * k + j)] * kvkit::to_float(y[std::size_t(r * hidden + d)]);
        acc += product;
      }
      acc += kvkit::to_float(shared[std::size_t(t * hidden + d)]);
      want[std::size_t(t * hidden + d)] = kvkit::from_float<T>(acc);
    }
  }
  std::vector<T> out(shared.size(), kvkit::from_float<T>(-7.0f));
  const DType dt = kvkit::dtype_of<T>;
  T* out_data = alias_shared ? shared.data() : out.data();  // out may alias shared
  kvkit::moe_combine(TensorView(y.data(), dt, {rows, hidden}),
                     TensorView(pair_rows.data(), DType::kInt32, {tokens * k}),
                     TensorView(weights.data(), DType::kFloat32, {tokens, k}),
                     TensorView(shared.data(), dt, {tokens, hidden}), TensorView(out_data, dt, {tokens, hidden}));
  for (std::size_t i = 0; i < want.size(); ++i) {
    REQUIRE(kvkit::to_float(out_data[i]) == kvkit::to_float(want[i]));
  }
}

}  // namespace

TEST_CASE("moe_combine over many tokens equals the per-token rule bit for bit (threads, every ISA)") {
  SECTION("float32") { check_combine_bits<float>(false); }
  SECTION("bfloat16") { check_combine_bits<kvkit::bfloat16>(false); }
  SECTION("float16, out aliasing shared") { check_combine_bits<kvkit::half>(true); }
}

TEST_CASE("pairs dropped by the capacity are left out of the combined output") {
  const std::int64_t tokens = 33, hidden = 9;
  const int k = 2, n_experts = 4;
  auto ids = random_ids(tokens, k, n_experts, 11, true);
  auto weights = kvkit::testing::random_normal(ids.size(), 12, 0.5f, 1.0f);
  auto x = kvkit::testing::random_normal(std::size_t(tokens * hidden), 13);
  auto scale_by_expert = [&](int e, const double* in, double* out) {
    for (std::int64_t d = 0; d < hidden; ++d) out[d] = in[d] * (e + 1);
  };
  const int capacity = 10;
  kvkit::DispatchResult result;
  const auto got = run_moe<float>(x, tokens, hidden, ids, weights, {n_experts, k, 8, capacity},
                                  scale_by_expert, nullptr, &result);
  std::vector<int> seen(n_experts, 0);
  std::int64_t dropped = 0;
  for (std::int64_t t = 0; t < tokens; ++t) {
    double factor = 0.0;
    for (int j = 0; j < k; ++j) {
      const int e = ids[t * k + j];
      if (seen[e]++ < capacity) {
        factor += double(weights[t * k + j]) * (e + 1);
      } else {
        ++dropped;
      }
    }
    for (std::int64_t d = 0; d < hidden; ++d) {
      REQUIRE(got[t * hidden + d] == Approx(x[t * hidden + d] * factor).epsilon(1e-6).margin(1e-6));
    }
  }
  CHECK(dropped > 0);
  CHECK(result.num_dropped == dropped);
}

TEST_CASE("dispatch and combine reject bad input with a clear message and leave outputs untouched") {
  std::vector<std::int32_t> ids = {2, 0, 0, 3};
  const DispatchConfig cfg{3, 2, 1, -1};
  std::vector<std::int32_t> counts(3, kPoison), offsets(4, kPoison), sorted(4, kPoison), rows(4, kPoison);
  kvkit::DispatchPlanViews views{TensorView(counts.data(), DType::kInt32, {3}),
                                 TensorView(offsets.data(), DType::kInt32, {4}),
                                 TensorView(sorted.data(), DType::kInt32, {4}),
                                 TensorView(rows.data(), DType::kInt32, {4}), TensorView()};
  TensorView idv(ids.data(), DType::kInt32, {2, 2});
  CHECK_THROWS_WITH(kvkit::moe_dispatch_plan(cfg, idv, views),
                    Contains("topk_ids[1, 1] = 3") && Contains("[0, 3)"));
  CHECK(counts == std::vector<std::int32_t>(3, kPoison));
  CHECK(rows == std::vector<std::int32_t>(4, kPoison));
  ids[3] = 1;
  CHECK_THROWS_WITH(kvkit::moe_dispatch_plan({3, 2, 2, -1}, idv, views),
                    Contains("'sorted_pairs' has shape [4]: expected shape [7]"));
  CHECK_THROWS_WITH(kvkit::moe_dispatch_plan({3, 2, 0, -1}, idv, views), Contains("'tile' = 0"));
  CHECK_THROWS_WITH(kvkit::moe_dispatch_plan({3, 2, 1, -2}, idv, views), Contains("'capacity' = -2"));
  CHECK_THROWS_WITH(kvkit::moe_dispatch_plan({3, 3, 1, -1}, idv, views),
                    Contains("'topk_ids' has shape [2, 2]: expected shape [*, 3]"));
  CHECK_NOTHROW(kvkit::moe_dispatch_plan(cfg, idv, views));
  {
    // With a capacity, few rows but more than 2^31 - 1 pairs: the int32 pair
    // indices would overflow. The views are never read (the check comes first).
    const std::int64_t tokens = (std::int64_t(1) << 28) + 1;
    const std::int64_t pairs = tokens * 8;
    std::vector<std::int32_t> sorted3(3, kPoison);
    kvkit::DispatchPlanViews big{TensorView(counts.data(), DType::kInt32, {3}),
                                 TensorView(offsets.data(), DType::kInt32, {4}),
                                 TensorView(sorted3.data(), DType::kInt32, {3}),
                                 TensorView(rows.data(), DType::kInt32, {pairs}), TensorView()};
    CHECK_THROWS_WITH(kvkit::moe_dispatch_plan({3, 8, 1, 1}, TensorView(ids.data(), DType::kInt32, {tokens, 8}), big),
                      Contains("'num_tokens' = 268435457") && Contains("(token, k) pairs"));
    CHECK(sorted3 == std::vector<std::int32_t>(3, kPoison));
  }

  std::vector<float> y(4 * 5, 1.0f), w(4, 0.5f), out(2 * 5, -7.0f);
  rows[2] = 4;
  CHECK_THROWS_WITH(kvkit::moe_combine(TensorView(y.data(), DType::kFloat32, {4, 5}),
                                       TensorView(rows.data(), DType::kInt32, {4}),
                                       TensorView(w.data(), DType::kFloat32, {2, 2}),
                                       TensorView(out.data(), DType::kFloat32, {2, 5})),
                    Contains("pair_rows[2] = 4") && Contains("[0, 4)"));
  CHECK(out == std::vector<float>(10, -7.0f));
  rows[2] = 1;
  std::vector<std::uint16_t> out16(10);
  CHECK_THROWS_WITH(kvkit::moe_combine(TensorView(y.data(), DType::kFloat32, {4, 5}),
                                       TensorView(rows.data(), DType::kInt32, {4}),
                                       TensorView(w.data(), DType::kFloat32, {2, 2}),
                                       TensorView(out16.data(), DType::kBFloat16, {2, 5})),
                    Contains("'out' = bfloat16: expected float32"));
  std::vector<float> x(2 * 5, 1.0f), xs(4 * 5, -7.0f);
  sorted[1] = 5;
  CHECK_THROWS_WITH(kvkit::moe_gather(TensorView(x.data(), DType::kFloat32, {2, 5}),
                                      TensorView(sorted.data(), DType::kInt32, {4}), 2,
                                      TensorView(xs.data(), DType::kFloat32, {4, 5})),
                    Contains("sorted_pairs[1] = 5") && Contains("4 marks padding"));
  CHECK(xs == std::vector<float>(20, -7.0f));
}
