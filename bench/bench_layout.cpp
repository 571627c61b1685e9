// CPU cache-layout ops: append (decode 256 x 1 token, prefill 8,192 tokens)
// for Llama-3-8B (8 kv heads x 128, bf16) and DeepSeek latent (512 + 64,
// bf16), fp8 quantize-append, copy_blocks. Memory-bound: bytes read +
// written per second and pct_of_memcpy. Each iteration works on one of
// several source buffers and cache regions in turn, so that the data touched
// exceeds the 32 MiB L3.

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "harness/harness.hpp"
#include "kvkit/layout/latent_kv_layout.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"
#include "kvkit/ops/append.hpp"
#include "kvkit/ops/copy_blocks.hpp"
#include "kvkit/ops/quantize.hpp"

namespace {

using kvkit::DType;
using kvkit::bench::full_or_smoke;

constexpr int kRounds = 4;

std::vector<std::uint16_t> random_bf16(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<std::uint16_t> v(n);
  for (auto& x : v) x = kvkit::bfloat16(dist(rng)).bits;
  return v;
}

/// Slot mappings for `rounds` batches of `tokens` tokens: each token of a
/// batch gets a fresh page-ordered slot on a shuffled page (as an allocator would).
std::vector<std::vector<std::int64_t>> make_slots(std::int64_t tokens, std::int64_t page_size,
                                                  std::int64_t num_pages, bool one_per_seq) {
  std::vector<std::int64_t> pages(static_cast<std::size_t>(num_pages));
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(pages.begin(), pages.end(), std::mt19937(5));
  std::vector<std::vector<std::int64_t>> out(kRounds);
  std::size_t next = 0;
  for (auto& s : out) {
    for (std::int64_t t = 0; t < tokens; ++t) {
      if (one_per_seq) {  // decode: every token is the last of its own sequence
        s.push_back(pages[next++ % pages.size()] * page_size + (t % page_size));
      } else {
        if (t % page_size == 0) ++next;
        s.push_back(pages[(next - 1) % pages.size()] * page_size + (t % page_size));
      }
    }
  }
  return out;
}

void BM_append_kv(benchmark::State& state, bool decode) {
  const std::int64_t heads = 8, hd = 128, ps = 16;
  const std::int64_t tokens = decode ? 256 : full_or_smoke<std::int64_t>(8192, 256);
  const std::int64_t num_pages = decode ? 4096 : kRounds * tokens / ps + 8;
  const auto layout = kvkit::PagedKVLayout::nhd(num_pages, ps, heads, hd);
  const auto slots = make_slots(tokens, ps, num_pages, decode);
  std::vector<std::vector<std::uint16_t>> keys, values;
  for (int r = 0; r < kRounds; ++r) {
    keys.push_back(random_bf16(std::size_t(tokens * heads * hd), 1 + r));
    values.push_back(random_bf16(std::size_t(tokens * heads * hd), 9 + r));
  }
  std::vector<std::uint16_t> kc(std::size_t(layout.span_elements()), 0), vc(kc.size(), 0);
  int r = 0;
  for (auto _ : state) {
    kvkit::append_kv(layout, kvkit::AppendKVArgs::dense(keys[r].data(), values[r].data(),
                                                         slots[r].data(), tokens, heads, hd,
                                                         kc.data(), vc.data(), DType::kBFloat16));
    benchmark::ClobberMemory();
    r = (r + 1) % kRounds;
  }
  kvkit::bench::report_host_bandwidth(state, 2.0 * 2.0 * double(tokens * heads * hd) * 2.0);
}

void BM_append_latent(benchmark::State& state, bool decode) {
  const std::int64_t ps = 64;
  const std::int64_t tokens = decode ? 256 : full_or_smoke<std::int64_t>(8192, 256);
  const std::int64_t num_pages = decode ? 4096 : kRounds * tokens / ps + 8;
  const auto layout = kvkit::LatentKVLayout::dense(num_pages, ps, 512, 64);
  const auto slots = make_slots(tokens, ps, num_pages, decode);
  std::vector<std::vector<std::uint16_t>> c, r_;
  for (int r = 0; r < kRounds; ++r) {
    c.push_back(random_bf16(std::size_t(tokens * 512), 1 + r));
    r_.push_back(random_bf16(std::size_t(tokens * 64), 9 + r));
  }
  std::vector<std::uint16_t> cache(std::size_t(num_pages * ps * 576), 0);
  int r = 0;
  for (auto _ : state) {
    kvkit::append_latent(layout, {c[r].data(), r_[r].data(), 512, 64, slots[r].data(), tokens,
                                  cache.data(), DType::kBFloat16, DType::kBFloat16});
    benchmark::ClobberMemory();
    r = (r + 1) % kRounds;
  }
  kvkit::bench::report_host_bandwidth(state, 2.0 * double(tokens * 576) * 2.0);
}

void BM_quantize_append_fp8(benchmark::State& state, kvkit::ScaleGranularity g) {
  const std::int64_t heads = 8, hd = 128, ps = 16;
  const std::int64_t tokens = full_or_smoke<std::int64_t>(8192, 256);
  const std::int64_t num_pages = kRounds * tokens / ps + 8;
  const auto layout = kvkit::PagedKVLayout::nhd(num_pages, ps, heads, hd);
  const auto slots = make_slots(tokens, ps, num_pages, false);
  std::vector<std::vector<std::uint16_t>> keys, values;
  for (int r = 0; r < kRounds; ++r) {
    keys.push_back(random_bf16(std::size_t(tokens * heads * hd), 1 + r));
    values.push_back(random_bf16(std::size_t(tokens * heads * hd), 9 + r));
  }
  std::vector<std::uint8_t> kc(std::size_t(layout.span_elements()), 0), vc(kc.size(), 0);
  std::vector<float> ks(std::size_t(layout.num_slots() * heads), 1.0f), vs(ks.size(), 1.0f);
  kvkit::QuantizeAppendArgs a;
  a.key_stride_token = a.value_stride_token = heads * hd;
  a.key_stride_head = a.value_stride_head = hd;
  a.num_tokens = tokens;
  a.k_cache = kc.data();
  a.v_cache = vc.data();
  a.src_dtype = DType::kBFloat16;
  a.cache_dtype = DType::kFloat8E4M3;
  a.granularity = g;
  a.k_scale = ks.data();
  a.v_scale = vs.data();
  a.k_scale_cache = ks.data();
  a.v_scale_cache = vs.data();
  int r = 0;
  for (auto _ : state) {
    a.key = keys[r].data();
    a.value = values[r].data();
    a.slot_mapping = slots[r].data();
    kvkit::quantize_append_kv(layout, a);
    benchmark::ClobberMemory();
    r = (r + 1) % kRounds;
  }
  kvkit::bench::report_host_bandwidth(state, 2.0 * double(tokens * heads * hd) * (2.0 + 1.0));
}

void BM_copy_blocks(benchmark::State& state) {
  const std::int64_t heads = 8, hd = 128, ps = 16;
  const std::int64_t num_pages = full_or_smoke<std::int64_t>(512, 32);
  const std::int64_t num_caches = 8, pairs_per_round = num_pages / 8;
  const auto layout = kvkit::PagedKVLayout::nhd(num_pages, ps, heads, hd);
  std::vector<std::vector<std::uint16_t>> caches;
  std::vector<void*> ptrs;
  for (int c = 0; c < num_caches; ++c) caches.push_back(random_bf16(std::size_t(layout.span_elements()), c));
  for (auto& c : caches) ptrs.push_back(c.data());
  // Round r copies pages [r*2k, r*2k + k) onto [r*2k + k, (r + 1)*2k).
  std::vector<std::vector<std::int64_t>> pairs(kRounds);
  const std::int64_t k = pairs_per_round / 2;
  for (int r = 0; r < kRounds; ++r) {
    for (std::int64_t i = 0; i < k; ++i) {
      pairs[r].push_back(r * 2 * k + i);
      pairs[r].push_back(r * 2 * k + k + i);
    }
  }
  int r = 0;
  for (auto _ : state) {
    kvkit::copy_blocks(layout, {ptrs.data(), num_caches, pairs[r].data(), k, DType::kBFloat16});
    benchmark::ClobberMemory();
    r = (r + 1) % kRounds;
  }
  kvkit::bench::report_host_bandwidth(
      state, 2.0 * double(num_caches * k * layout.page_elements()) * 2.0);
}

BENCHMARK_CAPTURE(BM_append_kv, llama3_8b_prefill_8192, false)->Name("append_kv/llama3_8b_bf16/prefill_8192")->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_append_kv, llama3_8b_decode_256, true)->Name("append_kv/llama3_8b_bf16/decode_256x1")->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_append_latent, prefill, false)->Name("append_latent/deepseek_576_bf16/prefill_8192")->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_append_latent, decode, true)->Name("append_latent/deepseek_576_bf16/decode_256x1")->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_quantize_append_fp8, per_tensor, kvkit::ScaleGranularity::kPerTensor)->Name("quantize_append/bf16_to_e4m3_per_tensor/prefill_8192")->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_quantize_append_fp8, per_token_head, kvkit::ScaleGranularity::kPerTokenHead)->Name("quantize_append/bf16_to_e4m3_per_token_head/prefill_8192")->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_copy_blocks)->Name("copy_blocks/llama3_8b_bf16/8_caches_32_pairs")->Unit(benchmark::kMicrosecond);

}  // namespace
