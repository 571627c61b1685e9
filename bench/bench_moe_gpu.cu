// MoE on the GPU: the DeepSeek-V3 router (4,096 tokens x 256 experts; target
// <= 20 us on H100), the dispatch plan alone, and plan + gather + combine for
// 4,096 tokens x 7,168 hidden x top-8 in bfloat16 (memory-bound: bytes/s and
// pct_of_memcpy; target >= 70%). Bytes counted: gather reads and writes T*k
// rows, combine reads T*k rows and writes T rows (rows of hidden * 2 bytes).

#include <cstdint>
#include <random>
#include <vector>

#include "harness/cuda_timer.cuh"
#include "harness/harness.hpp"
#include "kvkit/core/tensor_view.hpp"
#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/moe_dispatch.cuh"
#include "kvkit/cuda/moe_router.cuh"
#include "kvkit/ops/moe_router.hpp"

namespace {

using kvkit::DType;
using kvkit::TensorView;
using kvkit::bench::full_or_smoke;
using kvkit::cuda::DeviceBuffer;

std::vector<float> random_floats(std::size_t n, std::uint32_t seed, float stddev) {
  std::vector<float> v(n);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  for (auto& x : v) x = dist(rng);
  return v;
}

template <class T>
void BM_router_gpu(benchmark::State& state) {
  const auto cfg = kvkit::RouterConfig::deepseek_v3();
  const std::int64_t tokens = full_or_smoke<std::int64_t>(4096, 64);
  const auto f = random_floats(std::size_t(tokens * cfg.n_experts), 1, 2.0f);
  std::vector<T> logits(f.size());
  for (std::size_t i = 0; i < f.size(); ++i) logits[i] = T(f[i]);
  auto d_logits = DeviceBuffer::from_host(logits);
  auto d_bias = DeviceBuffer::from_host(random_floats(std::size_t(cfg.n_experts), 2, 0.05f));
  DeviceBuffer d_ids(std::size_t(tokens * cfg.top_k) * 4), d_w(std::size_t(tokens * cfg.top_k) * 4);
  kvkit::cuda::RouterParams p;
  p.logits = d_logits.data();
  p.logits_dtype = kvkit::dtype_of<T>;
  p.num_tokens = tokens;
  p.logits_row_stride = cfg.n_experts;
  p.correction_bias = d_bias.as<float>();
  p.topk_ids = d_ids.as<std::int32_t>();
  p.topk_weights = d_w.as<float>();
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) { kvkit::cuda::moe_route(cfg, p, s); });
  kvkit::bench::report_ops(state, double(tokens));
}

struct MoeBuffers {
  kvkit::DispatchConfig cfg;
  std::int64_t tokens, hidden, max_rows;
  DeviceBuffer ids, weights, counts, offsets, sorted, rows, workspace, x, xs, out;
  kvkit::cuda::DispatchParams plan;
  kvkit::cuda::GatherParams gather;
  kvkit::cuda::CombineParams combine;

  MoeBuffers() {
    const auto rcfg = kvkit::RouterConfig::deepseek_v3();
    tokens = full_or_smoke<std::int64_t>(4096, 64);
    hidden = full_or_smoke<std::int64_t>(7168, 512);
    cfg = {rcfg.n_experts, rcfg.top_k, 1, -1};
    const int k = rcfg.top_k;
    auto logits = random_floats(std::size_t(tokens * rcfg.n_experts), 3, 2.0f);
    std::vector<float> bias(std::size_t(rcfg.n_experts), 0.0f);
    std::vector<std::int32_t> h_ids(std::size_t(tokens * k));
    std::vector<float> h_w(h_ids.size());
    kvkit::moe_route(rcfg, TensorView(logits.data(), DType::kFloat32, {tokens, rcfg.n_experts}),
                     TensorView(bias.data(), DType::kFloat32, {rcfg.n_experts}),
                     TensorView(h_ids.data(), DType::kInt32, {tokens, k}),
                     TensorView(h_w.data(), DType::kFloat32, {tokens, k}));
    max_rows = kvkit::moe_dispatch_max_rows(cfg, tokens);
    ids = DeviceBuffer::from_host(h_ids);
    weights = DeviceBuffer::from_host(h_w);
    counts = DeviceBuffer(std::size_t(cfg.n_experts) * 4);
    offsets = DeviceBuffer(std::size_t(cfg.n_experts + 1) * 4);
    sorted = DeviceBuffer(std::size_t(max_rows) * 4);
    rows = DeviceBuffer(std::size_t(tokens * k) * 4);
    workspace = DeviceBuffer(kvkit::cuda::moe_dispatch_workspace_bytes(cfg, tokens));
    x = DeviceBuffer::from_host(std::vector<kvkit::bfloat16>(std::size_t(tokens * hidden), kvkit::bfloat16(0.5f)));
    xs = DeviceBuffer(std::size_t(max_rows * hidden) * 2);
    out = DeviceBuffer(std::size_t(tokens * hidden) * 2);
    plan.topk_ids = ids.as<std::int32_t>();
    plan.num_tokens = tokens;
    plan.expert_counts = counts.as<std::int32_t>();
    plan.expert_offsets = offsets.as<std::int32_t>();
    plan.sorted_pairs = sorted.as<std::int32_t>();
    plan.pair_rows = rows.as<std::int32_t>();
    plan.workspace = workspace.data();
    plan.workspace_bytes = workspace.bytes();
    gather = {x.data(), hidden, xs.data(), hidden, DType::kBFloat16, tokens, hidden,
              sorted.as<std::int32_t>(), max_rows, k};
    combine.y_sorted = xs.data();  // the experts would write y here; combine reads the gathered rows
    combine.y_row_stride = hidden;
    combine.pair_rows = rows.as<std::int32_t>();
    combine.topk_weights = weights.as<float>();
    combine.out = out.data();
    combine.out_row_stride = hidden;
    combine.dtype = DType::kBFloat16;
    combine.num_tokens = tokens;
    combine.hidden = hidden;
    combine.top_k = k;
  }
  double row_bytes() const { return double(hidden) * 2.0; }
  double pairs() const { return double(tokens * cfg.top_k); }
};

void BM_plan_gpu(benchmark::State& state) {
  MoeBuffers b;
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) { kvkit::cuda::moe_dispatch_plan(b.cfg, b.plan, s); });
  kvkit::bench::report_ops(state, b.pairs());
}

void BM_dispatch_combine_gpu(benchmark::State& state) {
  MoeBuffers b;
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) {
    kvkit::cuda::moe_dispatch_plan(b.cfg, b.plan, s);
    kvkit::cuda::moe_gather(b.gather, s);
    kvkit::cuda::moe_combine(b.combine, s);
  });
  kvkit::bench::report_device_bandwidth(state, (3.0 * b.pairs() + double(b.tokens)) * b.row_bytes());
}

void BM_gather_gpu(benchmark::State& state) {
  MoeBuffers b;
  kvkit::cuda::moe_dispatch_plan(b.cfg, b.plan, nullptr);
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) { kvkit::cuda::moe_gather(b.gather, s); });
  kvkit::bench::report_device_bandwidth(state, 2.0 * b.pairs() * b.row_bytes());
}

void BM_combine_gpu(benchmark::State& state) {
  MoeBuffers b;
  kvkit::cuda::moe_dispatch_plan(b.cfg, b.plan, nullptr);
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) { kvkit::cuda::moe_combine(b.combine, s); });
  kvkit::bench::report_device_bandwidth(state, (b.pairs() + double(b.tokens)) * b.row_bytes());
}

BENCHMARK_TEMPLATE(BM_router_gpu, float)->Name("moe_gpu/router_deepseek_v3_4096x256_f32")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_router_gpu, kvkit::bfloat16)->Name("moe_gpu/router_deepseek_v3_4096x256_bf16")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_plan_gpu)->Name("moe_gpu/dispatch_plan_4096_top8_256e")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_dispatch_combine_gpu)->Name("moe_gpu/dispatch_combine_bf16_4096x7168_top8")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_gather_gpu)->Name("moe_gpu/gather_bf16_4096x7168_top8")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_combine_gpu)->Name("moe_gpu/combine_bf16_4096x7168_top8")->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
