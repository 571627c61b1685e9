// MoE on the CPU: the DeepSeek-V3 router (4,096 tokens x 256 experts), and
// dispatch (plan + gather) + combine for 4,096 tokens x 7,168 hidden x top-8 in
// bfloat16. Dispatch + combine is memory-bound: bytes/s and pct_of_memcpy count
// gather's reads and writes of T*k rows plus combine's reads of T*k rows and
// writes of T rows (the plan's int32 arrays are negligible).

#include <cstdint>
#include <random>
#include <vector>

#include "harness/harness.hpp"
#include "kvkit/core/tensor_view.hpp"
#include "kvkit/ops/moe_combine.hpp"
#include "kvkit/ops/moe_dispatch.hpp"
#include "kvkit/ops/moe_router.hpp"

namespace {

using kvkit::DType;
using kvkit::TensorView;
using kvkit::bench::full_or_smoke;

std::vector<float> random_floats(std::size_t n, std::uint32_t seed, float stddev) {
  std::vector<float> v(n);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  for (auto& x : v) x = dist(rng);
  return v;
}

void BM_router_deepseek_v3(benchmark::State& state) {
  const auto cfg = kvkit::RouterConfig::deepseek_v3();
  const std::int64_t tokens = full_or_smoke<std::int64_t>(4096, 64);
  auto logits = random_floats(std::size_t(tokens * cfg.n_experts), 1, 2.0f);
  auto bias = random_floats(std::size_t(cfg.n_experts), 2, 0.05f);
  std::vector<std::int32_t> ids(std::size_t(tokens * cfg.top_k));
  std::vector<float> weights(ids.size());
  for (auto _ : state) {
    kvkit::moe_route(cfg, TensorView(logits.data(), DType::kFloat32, {tokens, cfg.n_experts}),
                     TensorView(bias.data(), DType::kFloat32, {cfg.n_experts}),
                     TensorView(ids.data(), DType::kInt32, {tokens, cfg.top_k}),
                     TensorView(weights.data(), DType::kFloat32, {tokens, cfg.top_k}));
    benchmark::DoNotOptimize(ids.data());
    benchmark::ClobberMemory();
  }
  kvkit::bench::report_ops(state, double(tokens));  // ns_per_op = ns per token
}

void BM_dispatch_combine(benchmark::State& state) {
  const bool gather_only = state.range(0) == 1;
  const auto rcfg = kvkit::RouterConfig::deepseek_v3();
  const std::int64_t tokens = full_or_smoke<std::int64_t>(4096, 64);
  const std::int64_t hidden = full_or_smoke<std::int64_t>(7168, 512);
  const int k = rcfg.top_k;
  auto logits = random_floats(std::size_t(tokens * rcfg.n_experts), 3, 2.0f);
  std::vector<float> bias(std::size_t(rcfg.n_experts), 0.0f);
  std::vector<std::int32_t> ids(std::size_t(tokens * k));
  std::vector<float> weights(ids.size());
  kvkit::moe_route(rcfg, TensorView(logits.data(), DType::kFloat32, {tokens, rcfg.n_experts}),
                   TensorView(bias.data(), DType::kFloat32, {rcfg.n_experts}),
                   TensorView(ids.data(), DType::kInt32, {tokens, k}),
                   TensorView(weights.data(), DType::kFloat32, {tokens, k}));
  const kvkit::DispatchConfig cfg{rcfg.n_experts, k, 1, -1};
  const std::int64_t max_rows = kvkit::moe_dispatch_max_rows(cfg, tokens);
  std::vector<std::int32_t> counts(std::size_t(cfg.n_experts)), offsets(std::size_t(cfg.n_experts + 1)),
      sorted(static_cast<std::size_t>(max_rows)), rows(ids.size());
  const kvkit::DispatchPlanViews plan{TensorView(counts.data(), DType::kInt32, {cfg.n_experts}),
                                      TensorView(offsets.data(), DType::kInt32, {cfg.n_experts + 1}),
                                      TensorView(sorted.data(), DType::kInt32, {max_rows}),
                                      TensorView(rows.data(), DType::kInt32, {tokens * k}), TensorView()};
  std::vector<kvkit::bfloat16> x(std::size_t(tokens * hidden), kvkit::bfloat16(0.5f));
  std::vector<kvkit::bfloat16> xs(std::size_t(max_rows * hidden));
  std::vector<kvkit::bfloat16> out(std::size_t(tokens * hidden));
  const TensorView xv(x.data(), DType::kBFloat16, {tokens, hidden});
  const TensorView xsv(xs.data(), DType::kBFloat16, {max_rows, hidden});
  const TensorView outv(out.data(), DType::kBFloat16, {tokens, hidden});
  for (auto _ : state) {
    kvkit::moe_dispatch_plan(cfg, TensorView(ids.data(), DType::kInt32, {tokens, k}), plan);
    kvkit::moe_gather(xv, plan.sorted_pairs, k, xsv);
    // The experts would run here; combine reads the gathered rows as their output.
    if (!gather_only) kvkit::moe_combine(xsv, plan.pair_rows, TensorView(weights.data(), DType::kFloat32, {tokens, k}), outv);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double row_bytes = double(hidden) * 2.0;
  const double pairs = double(tokens * k);
  const double bytes = gather_only ? 2.0 * pairs * row_bytes : (3.0 * pairs + double(tokens)) * row_bytes;
  kvkit::bench::report_host_bandwidth(state, bytes);
}

BENCHMARK(BM_router_deepseek_v3)->Name("moe/router_deepseek_v3_4096x256")->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_dispatch_combine)->Name("moe/dispatch_combine_bf16_4096x7168_top8")->Arg(0)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_dispatch_combine)->Name("moe/dispatch_only_bf16_4096x7168_top8")->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
