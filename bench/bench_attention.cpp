// Decode attention on the CPU over a paged bf16 cache, Llama-3-8B shape
// (32 q heads, 8 kv heads, head_dim 128, page 16). Memory-bound: reports the
// bytes read (K + V of every attended token, plus Q and O) as bytes/s and
// pct_of_memcpy.

#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "harness/harness.hpp"
#include "kvkit/ops/attention_decode.hpp"

namespace {

using kvkit::bench::full_or_smoke;

void BM_decode(benchmark::State& state, std::int64_t batch, std::int64_t context) {
  using KV = kvkit::bfloat16;
  const int q_heads = 32, kv_heads = 8, head_dim = 128, page = 16;
  batch = full_or_smoke<std::int64_t>(batch, 2);
  context = full_or_smoke<std::int64_t>(context, 100);
  const std::int64_t pages_per_seq = (context + page - 1) / page;
  const std::int64_t num_pages = batch * pages_per_seq;
  const auto layout = kvkit::PagedKVLayout::nhd(num_pages, page, kv_heads, head_dim);
  std::vector<KV> k(std::size_t(num_pages * layout.page_elements())), v(k.size());
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (auto& x : k) x = KV(normal(rng));
  for (auto& x : v) x = KV(normal(rng));
  std::vector<std::int32_t> table(static_cast<std::size_t>(num_pages));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  std::vector<std::int32_t> seq_lens(static_cast<std::size_t>(batch), std::int32_t(context));
  std::vector<float> q(std::size_t(batch * q_heads * head_dim)), o(q.size());
  for (auto& x : q) x = normal(rng);

  kvkit::PagedDecodeParams p;
  p.q = q.data();
  p.q_stride_head = head_dim;
  p.q_stride_token = q_heads * head_dim;
  p.k_cache = k.data();
  p.v_cache = v.data();
  p.layout = layout;
  p.page_table = {table.data(), seq_lens.data(), batch, pages_per_seq, pages_per_seq};
  p.num_q_heads = q_heads;
  p.sm_scale = 1.0f / std::sqrt(float(head_dim));
  p.o = o.data();
  p.o_stride_head = head_dim;
  p.o_stride_token = q_heads * head_dim;
  p.q_dtype = kvkit::DType::kFloat32;
  p.kv_dtype = kvkit::DType::kBFloat16;
  for (auto _ : state) {
    kvkit::paged_decode_attention(p);
    benchmark::DoNotOptimize(o.data());
  }
  const double kv_bytes = 2.0 * double(batch * context) * kv_heads * head_dim * sizeof(KV);
  const double qo_bytes = 2.0 * double(q.size()) * sizeof(float);
  kvkit::bench::report_host_bandwidth(state, kv_bytes + qo_bytes);
}

BENCHMARK_CAPTURE(BM_decode, batch16_ctx4096, 16, 4096)
    ->Name("attention/decode/llama3_8b/bf16_kv/page16/batch16_ctx4096")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_decode, batch1_ctx32768, 1, 32768)
    ->Name("attention/decode/llama3_8b/bf16_kv/page16/batch1_ctx32768")->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
