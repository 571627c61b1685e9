// CUDA MoE router, dispatch plan, gather and combine against the CPU ops on the
// same inputs: ids, plans, gathered and combined rows exactly, weights within
// tolerance. Skipped (exit code 77) where no GPU is present.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kvkit/core/tensor_view.hpp"
#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/moe_dispatch.cuh"
#include "kvkit/cuda/moe_router.cuh"
#include "kvkit/ops/moe_combine.hpp"
#include "kvkit/ops/moe_dispatch.hpp"
#include "kvkit/ops/moe_router.hpp"
#include "support/cuda_graph.hpp"
#include "moe_reference.hpp"

using Catch::Matchers::Contains;
using kvkit::DType;
using kvkit::RouterConfig;
using kvkit::TensorView;
using kvkit::cuda::DeviceBuffer;

namespace {

// Routes on the CPU and on the GPU and compares: ids exactly, weights to 1e-6 relative.
template <class T>
void check_router(const RouterConfig& cfg, std::int64_t tokens, std::uint32_t seed) {
  const auto f = kvkit::testing::random_normal(std::size_t(tokens * cfg.n_experts), seed, 2.5f);
  std::vector<T> logits(f.size());
  for (std::size_t i = 0; i < f.size(); ++i) logits[i] = kvkit::from_float<T>(f[i]);
  auto bias = kvkit::testing::random_normal(std::size_t(cfg.n_experts), seed + 1, 0.1f);
  std::vector<std::int32_t> ids(std::size_t(tokens * cfg.top_k), -5);
  std::vector<float> weights(ids.size(), -5.0f);
  const TensorView bias_view = cfg.use_correction_bias ? TensorView(bias.data(), DType::kFloat32, {cfg.n_experts}) : TensorView();
  kvkit::moe_route(cfg, TensorView(logits.data(), kvkit::dtype_of<T>, {tokens, cfg.n_experts}), bias_view,
                   TensorView(ids.data(), DType::kInt32, {tokens, cfg.top_k}),
                   TensorView(weights.data(), DType::kFloat32, {tokens, cfg.top_k}));

  auto d_logits = DeviceBuffer::from_host(logits);
  auto d_bias = DeviceBuffer::from_host(bias);
  DeviceBuffer d_ids(ids.size() * 4), d_weights(ids.size() * 4);
  KVKIT_CUDA_CHECK(cudaMemset(d_ids.data(), 0xff, d_ids.bytes()));
  kvkit::cuda::RouterParams p;
  p.logits = d_logits.data();
  p.logits_dtype = kvkit::dtype_of<T>;
  p.num_tokens = tokens;
  p.logits_row_stride = cfg.n_experts;
  p.correction_bias = cfg.use_correction_bias ? d_bias.as<float>() : nullptr;
  p.topk_ids = d_ids.as<std::int32_t>();
  p.topk_weights = d_weights.as<float>();
  kvkit::cuda::moe_route(cfg, p, nullptr);
  KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
  const auto gpu_ids = d_ids.to_host<std::int32_t>();
  const auto gpu_w = d_weights.to_host<float>();
  for (std::size_t i = 0; i < ids.size(); ++i) {
    INFO("token " << i / cfg.top_k << " slot " << i % cfg.top_k << " n_experts " << cfg.n_experts
                  << " top_k " << cfg.top_k << " n_group " << cfg.n_group);
    REQUIRE(gpu_ids[i] == ids[i]);
    REQUIRE(std::fabs(gpu_w[i] - weights[i]) <= 1e-6f * std::fabs(weights[i]) + 1e-9f);
  }
}

}  // namespace

TEST_CASE("GPU router equals the CPU router for every preset, float32 and bfloat16 logits") {
  for (auto cfg : {RouterConfig::mixtral(), RouterConfig::qwen2_moe(), RouterConfig::qwen3_moe(),
                   RouterConfig::deepseek_v2(), RouterConfig::deepseek_v3()}) {
    for (std::int64_t tokens : {1, 7, 33, 4096}) {
      check_router<float>(cfg, tokens, 10 + std::uint32_t(tokens));
      check_router<kvkit::bfloat16>(cfg, tokens, 20 + std::uint32_t(tokens));
    }
  }
}

TEST_CASE("GPU router equals the CPU router for random configurations and exact ties") {
  std::mt19937 rng(99);
  for (int trial = 0; trial < 60; ++trial) {
    RouterConfig cfg;
    const int groups[] = {1, 2, 4, 8, 16, 32};
    cfg.n_group = groups[rng() % 6];
    const int per_group = 2 + int(rng() % std::max(1, 256 / cfg.n_group - 1));
    cfg.n_experts = cfg.n_group * per_group;
    cfg.topk_group = 1 + int(rng() % cfg.n_group);
    cfg.group_score = (rng() % 2) ? kvkit::MoeGroupScore::kMax : kvkit::MoeGroupScore::kTopTwoSum;
    cfg.top_k = 1 + int(rng() % std::min(8, cfg.topk_group * per_group));
    cfg.scoring = (rng() % 2) ? kvkit::MoeScoring::kSoftmax : kvkit::MoeScoring::kSigmoid;
    cfg.use_correction_bias = rng() % 2;
    cfg.renormalize = rng() % 2;
    cfg.routed_scaling_factor = (rng() % 2) ? 1.0f : 2.5f;
    check_router<float>(cfg, 1 + std::int64_t(rng() % 100), rng());
  }
  // bfloat16 logits of small magnitude collide often: exact ties on both sides.
  auto cfg = RouterConfig::deepseek_v3();
  std::vector<kvkit::bfloat16> logits(std::size_t(64 * cfg.n_experts));
  for (std::size_t i = 0; i < logits.size(); ++i) logits[i] = kvkit::bfloat16(float(int(i * 7919 % 5)) * 0.5f);
  std::vector<float> bias(std::size_t(cfg.n_experts), 0.0f);
  std::vector<std::int32_t> ids(std::size_t(64 * cfg.top_k));
  std::vector<float> weights(ids.size());
  kvkit::moe_route(cfg, TensorView(logits.data(), DType::kBFloat16, {64, cfg.n_experts}),
                   TensorView(bias.data(), DType::kFloat32, {cfg.n_experts}),
                   TensorView(ids.data(), DType::kInt32, {64, cfg.top_k}),
                   TensorView(weights.data(), DType::kFloat32, {64, cfg.top_k}));
  auto d_logits = DeviceBuffer::from_host(logits);
  auto d_bias = DeviceBuffer::from_host(bias);
  DeviceBuffer d_ids(ids.size() * 4), d_weights(ids.size() * 4);
  kvkit::cuda::RouterParams p;
  p.logits = d_logits.data();
  p.logits_dtype = DType::kBFloat16;
  p.num_tokens = 64;
  p.logits_row_stride = cfg.n_experts;
  p.correction_bias = d_bias.as<float>();
  p.topk_ids = d_ids.as<std::int32_t>();
  p.topk_weights = d_weights.as<float>();
  kvkit::cuda::moe_route(cfg, p, nullptr);
  CHECK(d_ids.to_host<std::int32_t>() == ids);
}

TEST_CASE("GPU router launcher rejects bad parameters") {
  auto cfg = RouterConfig::deepseek_v3();
  kvkit::cuda::RouterParams p;
  DeviceBuffer buf(1 << 20);
  p.logits = buf.data();
  p.num_tokens = 4;
  p.logits_row_stride = 256;
  p.topk_ids = buf.as<std::int32_t>();
  p.topk_weights = buf.as<float>();
  CHECK_THROWS_WITH(kvkit::cuda::moe_route(cfg, p, nullptr), Contains("'correction_bias' = nullptr"));
  p.correction_bias = buf.as<float>();
  p.logits_row_stride = 100;
  CHECK_THROWS_WITH(kvkit::cuda::moe_route(cfg, p, nullptr), Contains("'logits_row_stride' = 100"));
  cfg = RouterConfig::deepseek_v3(128, 8, 64, 4);
  CHECK_THROWS_WITH(kvkit::cuda::moe_route(cfg, p, nullptr), Contains("'cfg.n_group' = 64"));
}

namespace {

struct HostPlan {
  std::vector<std::int32_t> counts, offsets, sorted, rows, tiles;
  kvkit::DispatchResult result;
};

HostPlan cpu_plan(const kvkit::DispatchConfig& cfg, std::vector<std::int32_t>& ids, std::int64_t tokens) {
  HostPlan h;
  h.counts.resize(std::size_t(cfg.n_experts));
  h.offsets.resize(std::size_t(cfg.n_experts + 1));
  h.sorted.resize(std::size_t(kvkit::moe_dispatch_max_rows(cfg, tokens)));
  h.rows.resize(ids.size());
  h.tiles.resize(std::size_t(kvkit::moe_dispatch_max_tiles(cfg, tokens)));
  h.result = kvkit::moe_dispatch_plan(
      cfg, TensorView(ids.data(), DType::kInt32, {tokens, cfg.top_k}),
      {TensorView(h.counts.data(), DType::kInt32, {cfg.n_experts}),
       TensorView(h.offsets.data(), DType::kInt32, {cfg.n_experts + 1}),
       TensorView(h.sorted.data(), DType::kInt32, {std::int64_t(h.sorted.size())}),
       TensorView(h.rows.data(), DType::kInt32, {std::int64_t(h.rows.size())}),
       TensorView(h.tiles.data(), DType::kInt32, {std::int64_t(h.tiles.size())})});
  return h;
}

struct DevicePlan {
  DeviceBuffer counts, offsets, sorted, rows, tiles, dropped, workspace;
  kvkit::cuda::DispatchParams params;
};

void poison(DevicePlan& d) {
  for (auto* b : {&d.counts, &d.offsets, &d.sorted, &d.rows, &d.tiles, &d.dropped}) {
    KVKIT_CUDA_CHECK(cudaMemset(b->data(), 0x7b, b->bytes()));
  }
}

void gpu_plan(const kvkit::DispatchConfig& cfg, const DeviceBuffer& d_ids, std::int64_t tokens, DevicePlan& d) {
  d.counts = DeviceBuffer(std::size_t(cfg.n_experts) * 4);
  d.offsets = DeviceBuffer(std::size_t(cfg.n_experts + 1) * 4);
  d.sorted = DeviceBuffer(std::size_t(kvkit::moe_dispatch_max_rows(cfg, tokens)) * 4 + 4);
  d.rows = DeviceBuffer(std::size_t(tokens * cfg.top_k) * 4 + 4);
  d.tiles = DeviceBuffer(std::size_t(kvkit::moe_dispatch_max_tiles(cfg, tokens)) * 4 + 4);
  d.dropped = DeviceBuffer(4);
  d.workspace = DeviceBuffer(kvkit::cuda::moe_dispatch_workspace_bytes(cfg, tokens));
  poison(d);
  auto& p = d.params;
  p.topk_ids = d_ids.as<std::int32_t>();
  p.num_tokens = tokens;
  p.expert_counts = d.counts.as<std::int32_t>();
  p.expert_offsets = d.offsets.as<std::int32_t>();
  p.sorted_pairs = d.sorted.as<std::int32_t>();
  p.pair_rows = d.rows.as<std::int32_t>();
  p.tile_experts = d.tiles.as<std::int32_t>();
  p.num_dropped = d.dropped.as<std::int32_t>();
  p.workspace = d.workspace.data();
  p.workspace_bytes = d.workspace.bytes();
  kvkit::cuda::moe_dispatch_plan(cfg, p, nullptr);
  KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
}

std::vector<std::int32_t> head(const DeviceBuffer& b, std::size_t n) {
  auto v = b.to_host<std::int32_t>();
  v.resize(n);
  return v;
}

// Every array of the GPU plan against the CPU plan.
void check_plan(const DevicePlan& d, const HostPlan& want) {
  CHECK(head(d.counts, want.counts.size()) == want.counts);
  CHECK(head(d.offsets, want.offsets.size()) == want.offsets);
  CHECK(head(d.sorted, want.sorted.size()) == want.sorted);
  CHECK(head(d.rows, want.rows.size()) == want.rows);
  CHECK(head(d.tiles, want.tiles.size()) == want.tiles);
  CHECK(head(d.dropped, 1)[0] == want.result.num_dropped);
}

}  // namespace

TEST_CASE("GPU dispatch plan equals the CPU plan exactly, with padding and capacity") {
  std::mt19937 rng(3);
  for (int n_experts : {1, 8, 256, 1500}) {
    for (int k : {1, 8}) {
      if (k > n_experts) continue;
      for (std::int64_t tokens : {1, 33, 4096}) {
        for (int tile : {1, 64}) {
          for (int capacity : {-1, 5}) {
            INFO("E " << n_experts << " k " << k << " T " << tokens << " tile " << tile << " cap " << capacity);
            const kvkit::DispatchConfig cfg{n_experts, k, tile, capacity};
            std::vector<std::int32_t> ids(std::size_t(tokens * k));
            for (auto& id : ids) id = int(rng() % std::uint32_t(n_experts)) / ((rng() % 3 == 0) ? 2 : 1);
            const auto want = cpu_plan(cfg, ids, tokens);
            auto d_ids = DeviceBuffer::from_host(ids);
            DevicePlan d;
            gpu_plan(cfg, d_ids, tokens, d);
            check_plan(d, want);
          }
        }
      }
    }
  }
}

TEST_CASE("GPU dispatch plan captured in a CUDA graph and replayed equals the CPU plan") {
  // CUB's sort and scan with caller-provided temp storage, no host sync: capturable.
  std::mt19937 rng(11);
  const kvkit::DispatchConfig cfg{256, 8, 64, -1};
  const std::int64_t tokens = 333;
  std::vector<std::int32_t> ids(std::size_t(tokens * cfg.top_k));
  for (auto& id : ids) id = int(rng() % 256u);
  const auto want = cpu_plan(cfg, ids, tokens);
  auto d_ids = DeviceBuffer::from_host(ids);
  DevicePlan d;
  gpu_plan(cfg, d_ids, tokens, d);  // allocates the buffers (and runs once, uncaptured)
  poison(d);
  kvkit::testing::capture_and_replay(
      [&](cudaStream_t stream) { kvkit::cuda::moe_dispatch_plan(cfg, d.params, stream); });
  check_plan(d, want);
}

TEST_CASE("GPU dispatch plan of zero tokens with tile padding: sentinel rows, zero offsets") {
  // max_rows = E * (tile - 1) > 0 even without pairs: sorted_pairs is still written.
  const kvkit::DispatchConfig cfg{8, 2, 64, -1};
  std::vector<std::int32_t> ids;
  const auto want = cpu_plan(cfg, ids, 0);
  DeviceBuffer d_ids(4);
  DevicePlan d;
  gpu_plan(cfg, d_ids, 0, d);
  CHECK(head(d.counts, want.counts.size()) == want.counts);
  CHECK(head(d.offsets, want.offsets.size()) == want.offsets);
  CHECK(head(d.sorted, want.sorted.size()) == want.sorted);
  CHECK(head(d.tiles, want.tiles.size()) == want.tiles);
  CHECK(head(d.dropped, 1)[0] == 0);
}

TEST_CASE("GPU dispatch rejects a workspace smaller than the queried size") {
  const kvkit::DispatchConfig cfg{8, 2, 1, -1};
  DeviceBuffer buf(1 << 16);
  kvkit::cuda::DispatchParams p;
  p.topk_ids = buf.as<std::int32_t>();
  p.num_tokens = 16;
  p.expert_counts = p.expert_offsets = p.sorted_pairs = p.pair_rows = buf.as<std::int32_t>();
  p.workspace = buf.data();
  p.workspace_bytes = 16;
  CHECK_THROWS_WITH(kvkit::cuda::moe_dispatch_plan(cfg, p, nullptr),
                    Contains("'workspace_bytes' = 16") && Contains("moe_dispatch_workspace_bytes"));
}

namespace {

template <class T>
void check_gather_combine(std::int64_t tokens, std::int64_t hidden, int tile, bool with_shared) {
  const auto rcfg = RouterConfig::deepseek_v3();
  const int k = rcfg.top_k;
  auto logits = kvkit::testing::random_normal(std::size_t(tokens * rcfg.n_experts), 41, 2.0f);
  auto bias = kvkit::testing::random_normal(std::size_t(rcfg.n_experts), 42, 0.05f);
  std::vector<std::int32_t> ids(std::size_t(tokens * k));
  std::vector<float> weights(ids.size());
  kvkit::moe_route(rcfg, TensorView(logits.data(), DType::kFloat32, {tokens, rcfg.n_experts}),
                   TensorView(bias.data(), DType::kFloat32, {rcfg.n_experts}),
                   TensorView(ids.data(), DType::kInt32, {tokens, k}),
                   TensorView(weights.data(), DType::kFloat32, {tokens, k}));
  const kvkit::DispatchConfig cfg{rcfg.n_experts, k, tile, -1};
  const auto plan = cpu_plan(cfg, ids, tokens);
  const std::int64_t rows = std::int64_t(plan.sorted.size());
  const DType dt = kvkit::dtype_of<T>;
  const auto xf = kvkit::testing::random_normal(std::size_t(tokens * hidden), 43);
  std::vector<T> x(xf.size()), shared(xf.size());
  for (std::size_t i = 0; i < xf.size(); ++i) {
    x[i] = kvkit::from_float<T>(xf[i]);
    shared[i] = kvkit::from_float<T>(0.25f * xf[xf.size() - 1 - i]);
  }
  // CPU: gather, then "experts" y = x_sorted * (1 + row % 3) so that rows differ, then combine.
  std::vector<T> xs(std::size_t(rows * hidden));
  kvkit::moe_gather(TensorView(x.data(), dt, {tokens, hidden}),
                    TensorView(const_cast<std::int32_t*>(plan.sorted.data()), DType::kInt32, {rows}), k,
                    TensorView(xs.data(), dt, {rows, hidden}));
  std::vector<T> ys(xs.size());
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t d = 0; d < hidden; ++d)
      ys[r * hidden + d] = kvkit::from_float<T>(kvkit::to_float(xs[r * hidden + d]) * float(1 + r % 3));
  std::vector<T> out(std::size_t(tokens * hidden));
  kvkit::moe_combine(TensorView(ys.data(), dt, {rows, hidden}),
                     TensorView(const_cast<std::int32_t*>(plan.rows.data()), DType::kInt32, {tokens * k}),
                     TensorView(weights.data(), DType::kFloat32, {tokens, k}),
                     with_shared ? TensorView(shared.data(), dt, {tokens, hidden}) : TensorView(),
                     TensorView(out.data(), dt, {tokens, hidden}));

  auto d_x = DeviceBuffer::from_host(x);
  auto d_sorted = DeviceBuffer::from_host(plan.sorted);
  DeviceBuffer d_xs(xs.size() * sizeof(T));
  KVKIT_CUDA_CHECK(cudaMemset(d_xs.data(), 0x55, d_xs.bytes()));
  kvkit::cuda::GatherParams g;
  g.x = d_x.data();
  g.x_row_stride = hidden;
  g.x_sorted = d_xs.data();
  g.x_sorted_row_stride = hidden;
  g.dtype = dt;
  g.num_tokens = tokens;
  g.hidden = hidden;
  g.sorted_pairs = d_sorted.as<std::int32_t>();
  g.max_rows = rows;
  g.top_k = k;
  kvkit::cuda::moe_gather(g, nullptr);
  const auto gxs = d_xs.to_host<T>();
  // One assertion for the whole buffer (one per element is slow at 10^8 elements).
  std::size_t gather_bad = 0, first_bad = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    if (kvkit::to_float(gxs[i]) != kvkit::to_float(xs[i]) && gather_bad++ == 0) first_bad = i;
  }
  INFO("gather: first mismatch at row " << first_bad / std::size_t(hidden) << " column " << first_bad % std::size_t(hidden));
  REQUIRE(gather_bad == 0);

  auto d_ys = DeviceBuffer::from_host(ys);
  auto d_rows = DeviceBuffer::from_host(plan.rows);
  auto d_w = DeviceBuffer::from_host(weights);
  auto d_shared = DeviceBuffer::from_host(shared);
  DeviceBuffer d_out(out.size() * sizeof(T));
  KVKIT_CUDA_CHECK(cudaMemset(d_out.data(), 0x55, d_out.bytes()));  // poison
  kvkit::cuda::CombineParams c;
  c.y_sorted = d_ys.data();
  c.y_row_stride = hidden;
  c.pair_rows = d_rows.as<std::int32_t>();
  c.topk_weights = d_w.as<float>();
  c.shared = with_shared ? d_shared.data() : nullptr;
  c.shared_row_stride = hidden;
  c.out = d_out.data();
  c.out_row_stride = hidden;
  c.dtype = dt;
  c.num_tokens = tokens;
  c.hidden = hidden;
  c.top_k = k;
  kvkit::cuda::moe_combine(c, nullptr);
  const auto gout = d_out.to_host<T>();
  // Same order of accumulation and no FMA on either side (the kernel uses
  // __fmul_rn): the GPU's bits equal the CPU's.
  std::size_t combine_bad = 0, first_diff = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (kvkit::to_float(gout[i]) != kvkit::to_float(out[i]) && combine_bad++ == 0) first_diff = i;
  }
  INFO("combine: first difference at token " << first_diff / std::size_t(hidden) << " column "
       << first_diff % std::size_t(hidden) << ": GPU " << kvkit::to_float(gout[first_diff]) << ", CPU "
       << kvkit::to_float(out[first_diff]));
  REQUIRE(combine_bad == 0);
}

}  // namespace

TEST_CASE("GPU gather and combine equal the CPU ops, vectorized and odd hidden sizes") {
  check_gather_combine<kvkit::bfloat16>(33, 7168, 1, true);
  check_gather_combine<kvkit::bfloat16>(257, 7168, 64, false);
  check_gather_combine<kvkit::bfloat16>(7, 33, 16, true);  // 66-byte rows: element path
  check_gather_combine<float>(33, 100, 1, true);
  check_gather_combine<kvkit::half>(9, 64, 8, true);
}
