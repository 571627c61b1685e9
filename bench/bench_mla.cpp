// MLA on the CPU: fused compress (RMSNorm c_kv + RoPE k_pe + latent append)
// of 8,192 tokens, DeepSeek shapes (512 + 64, bf16, page 64). Bytes read
// (kv_a) + written (cache rows), pct_of_memcpy.

#include <cstdint>
#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "harness/harness.hpp"
#include "kvkit/ops/mla_compress.hpp"
#include "kvkit/ops/mla_decode.hpp"
#include "kvkit/ops/mla_fp8.hpp"

namespace {

void BM_mla_compress(benchmark::State& state) {
  using T = kvkit::bfloat16;
  const std::int64_t tokens = kvkit::bench::full_or_smoke<std::int64_t>(8192, 64);
  const int rank = 512, rope_dim = 64, page = 64;
  const std::int64_t pages = 4 * tokens / page;  // a cache larger than the tokens written
  const auto layout = kvkit::LatentKVLayout::dense(pages, page, rank, rope_dim);
  std::vector<T> kv_a(std::size_t(tokens) * (rank + rope_dim)), cache(std::size_t(pages * layout.stride_page));
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (auto& x : kv_a) x = T(normal(rng));
  std::vector<float> weight(rank, 1.0f);
  std::vector<std::int64_t> positions(static_cast<std::size_t>(tokens)), slots(static_cast<std::size_t>(tokens));
  std::iota(positions.begin(), positions.end(), 0);
  for (std::int64_t t = 0; t < tokens; ++t) slots[t] = (t * 7919) % layout.num_slots();  // scattered rows
  const kvkit::RopeCache table(kvkit::RopeConfig::deepseek_yarn(), tokens);
  kvkit::MlaCompressArgs a;
  a.kv_a = kv_a.data();
  a.kv_a_stride_token = rank + rope_dim;
  a.norm_weight = weight.data();
  a.positions = positions.data();
  a.slot_mapping = slots.data();
  a.num_tokens = tokens;
  a.cache = cache.data();
  a.dtype = kvkit::DType::kBFloat16;
  a.cos_sin_cache = table.data();
  a.cache_positions = table.max_positions();
  a.cache_rotary_dim = table.rotary_dim();
  for (auto _ : state) {
    kvkit::mla_compress(layout, a);
    benchmark::ClobberMemory();
  }
  kvkit::bench::report_host_bandwidth(state, 2.0 * double(tokens) * (rank + rope_dim) * sizeof(T));
}
BENCHMARK(BM_mla_compress)->Name("mla/compress/deepseek_576/bf16/8192_tokens")->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

namespace {

// Absorbed MLA decode attention over the latent cache, DeepSeek-V3 shape (128
// heads, 576/512, bf16 cache, page 64), batch 1 x 8,192 on the CPU. Counts the
// latent bytes read once for all heads, plus Q and O.
void BM_mla_decode(benchmark::State& state) {
  using T = kvkit::bfloat16;
  const kvkit::MlaConfig cfg = kvkit::MlaConfig::deepseek_v3();
  const std::int64_t context = kvkit::bench::full_or_smoke<std::int64_t>(8192, 128);
  const int page = 64, lat = cfg.latent_dim(), rank = cfg.kv_lora_rank;
  const std::int64_t pages = context / page;
  const auto layout = kvkit::LatentKVLayout::dense(pages, page, rank, cfg.qk_rope_head_dim);
  std::vector<T> cache(std::size_t(pages * layout.stride_page));
  std::mt19937 rng(2);
  std::normal_distribution<float> normal;
  for (auto& x : cache) x = T(0.3f * normal(rng));
  std::vector<std::int32_t> table(static_cast<std::size_t>(pages));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  const std::int32_t len = std::int32_t(context);
  std::vector<float> q(std::size_t(cfg.n_heads) * lat), o(std::size_t(cfg.n_heads) * rank);
  for (auto& x : q) x = normal(rng);
  kvkit::PagedDecodeParams p = kvkit::mla_decode_params(cfg, layout, cache.data(), kvkit::DType::kBFloat16);
  p.q = q.data();
  p.q_stride_head = lat;
  p.q_stride_token = std::int64_t(cfg.n_heads) * lat;
  p.page_table = {table.data(), &len, 1, pages, pages};
  p.o = o.data();
  p.o_stride_head = rank;
  p.o_stride_token = std::int64_t(cfg.n_heads) * rank;
  p.q_dtype = kvkit::DType::kFloat32;
  for (auto _ : state) {
    kvkit::paged_decode_attention(p);
    benchmark::DoNotOptimize(o.data());
  }
  kvkit::bench::report_host_bandwidth(state, double(context) * lat * sizeof(T) + 4.0 * double(q.size() + o.size()));
  kvkit::bench::report_flops(state, 2.0 * double(context) * cfg.n_heads * (lat + rank));
}
BENCHMARK(BM_mla_decode)->Name("mla/absorbed_decode/deepseek_v3/bf16_page64/batch1_ctx8192")->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

namespace {

// The same decode over the fp8 latent cache (656-byte rows, dequantized on
// the fly): latent bytes read once + Q + O.
void BM_mla_decode_fp8(benchmark::State& state) {
  const kvkit::MlaConfig cfg = kvkit::MlaConfig::deepseek_v3();
  const std::int64_t context = kvkit::bench::full_or_smoke<std::int64_t>(8192, 128);
  const int page = 64;
  const std::int64_t pages = context / page;
  const auto layout = kvkit::LatentFp8Layout::dense(pages, page);
  std::vector<std::uint8_t> cache(static_cast<std::size_t>(layout.span_bytes()));
  std::mt19937 rng(2);
  std::normal_distribution<float> normal;
  std::vector<float> rows(std::size_t(context) * 576);
  for (auto& x : rows) x = 0.3f * normal(rng);
  std::vector<std::int64_t> slots(static_cast<std::size_t>(context));
  std::iota(slots.begin(), slots.end(), 0);
  kvkit::MlaFp8AppendArgs a;
  a.latent = rows.data();
  a.latent_stride_token = 576;
  a.dtype = kvkit::DType::kFloat32;
  a.slot_mapping = slots.data();
  a.num_tokens = context;
  a.cache = cache.data();
  kvkit::mla_fp8_append(layout, a);
  std::vector<std::int32_t> table(static_cast<std::size_t>(pages));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  const std::int32_t len = std::int32_t(context);
  std::vector<float> q(std::size_t(cfg.n_heads) * 576), o(std::size_t(cfg.n_heads) * 512);
  for (auto& x : q) x = normal(rng);
  kvkit::PagedDecodeParams p = kvkit::mla_decode_params_fp8(cfg, layout, cache.data());
  p.q = q.data();
  p.q_stride_head = 576;
  p.q_stride_token = std::int64_t(cfg.n_heads) * 576;
  p.page_table = {table.data(), &len, 1, pages, pages};
  p.o = o.data();
  p.o_stride_head = 512;
  p.o_stride_token = std::int64_t(cfg.n_heads) * 512;
  p.q_dtype = kvkit::DType::kFloat32;
  for (auto _ : state) {
    kvkit::mla_decode_attention(p);
    benchmark::DoNotOptimize(o.data());
  }
  kvkit::bench::report_host_bandwidth(state, double(context) * kvkit::MlaFp8Row::kBytes + 4.0 * double(q.size() + o.size()));
  kvkit::bench::report_flops(state, 2.0 * double(context) * cfg.n_heads * (576 + 512));
}
BENCHMARK(BM_mla_decode_fp8)->Name("mla/absorbed_decode/deepseek_v3/fp8_656B_page64/batch1_ctx8192")->Unit(benchmark::kMillisecond)->UseRealTime();

// Quantize-on-append of 32,768 latent rows (bf16 in, 656-byte rows out,
// scattered slots): 59 MB read + written, beyond the L3.
void BM_mla_fp8_append(benchmark::State& state) {
  const std::int64_t tokens = kvkit::bench::full_or_smoke<std::int64_t>(32768, 64);
  const auto layout = kvkit::LatentFp8Layout::dense(4 * tokens / 64, 64);
  std::vector<std::uint8_t> cache(static_cast<std::size_t>(layout.span_bytes()));
  std::vector<kvkit::bfloat16> rows(std::size_t(tokens) * 576);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (auto& x : rows) x = kvkit::bfloat16(normal(rng));
  std::vector<std::int64_t> slots(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) slots[t] = (t * 7919) % layout.num_slots();
  kvkit::MlaFp8AppendArgs a;
  a.latent = rows.data();
  a.latent_stride_token = 576;
  a.dtype = kvkit::DType::kBFloat16;
  a.slot_mapping = slots.data();
  a.num_tokens = tokens;
  a.cache = cache.data();
  for (auto _ : state) {
    kvkit::mla_fp8_append(layout, a);
    benchmark::ClobberMemory();
  }
  kvkit::bench::report_host_bandwidth(state, double(tokens) * (576 * 2 + kvkit::MlaFp8Row::kBytes));
}
BENCHMARK(BM_mla_fp8_append)->Name("mla/fp8_append/deepseek_576/bf16_to_656B/32768_tokens")->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
