// CPU cache-layout ops: append (decode 256 x 1 token, prefill 8,192 tokens)
// for Llama-3-8B (8 kv heads x 128, bf16) and DeepSeek latent (512 + 64,
// bf16), fp8 quantize-append, copy_blocks. Memory-bound: bytes read +
// written per second and pct_of_memcpy.
//
// So that the figures measure memory and not the 32 MiB L3, every benchmark
// rotates through `rounds` inputs (sources, slot mappings, page pairs) whose
// data together exceed kRotateBytes (128 MiB, four times the L3): decode
// appends write 256 random rows of a cache of several hundred MiB, and
// copy_blocks copies random pages of eight 32 MiB caches.
//
// The caches of the appends and quantize-appends are HostCacheBuffers, as
// an engine would allocate them (2 MiB pages where THP is `madvise`): with
// 4 KiB pages each random decode row also cost a TLB miss (Zen 2,
// 2026-12-07: append_kv decode 134-144 us with a std::vector cache, 113-120
// us with a HostCacheBuffer; quantize-append 1-2% faster).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "harness/harness.hpp"
#include "kvkit/layout/host_cache_buffer.hpp"
#include "kvkit/layout/latent_kv_layout.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"
#include "kvkit/ops/append.hpp"
#include "kvkit/ops/copy_blocks.hpp"
#include "kvkit/ops/gather.hpp"
#include "kvkit/ops/quantize.hpp"

namespace {

using kvkit::DType;
using kvkit::bench::full_or_smoke;

/// Bytes that one pass over all rounds touches, at least.
double rotate_bytes() { return full_or_smoke(128.0 * (1 << 20), 4.0 * (1 << 20)); }

/// Rounds needed so that `bytes_per_round` x rounds >= rotate_bytes() (>= 2).
int rounds_for(double bytes_per_round) {
  return std::max(2, int((rotate_bytes() + bytes_per_round - 1) / bytes_per_round));
}

/// Random bf16 patterns of values in [-2, 2) (a cheap generator: the
/// buffers are hundreds of MiB).
std::vector<std::uint16_t> random_bf16(std::size_t n, std::uint64_t seed) {
  std::vector<std::uint16_t> v(n);
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (auto& e : v) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    // sign, exponent 126 or 127 (|x| in [0.5, 2)), random mantissa.
    e = std::uint16_t((x & 0x8000u) | ((126u + ((x >> 20) & 1u)) << 7) | ((x >> 32) & 0x7fu));
  }
  return v;
}

/// Slot mappings for prefill rounds of `tokens` tokens: each round fills
/// fresh pages, in order, taken from a shuffled page list (as an allocator would).
std::vector<std::vector<std::int64_t>> prefill_slots(int rounds, std::int64_t tokens,
                                                     std::int64_t page_size,
                                                     std::int64_t num_pages) {
  std::vector<std::int64_t> pages(static_cast<std::size_t>(num_pages));
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(pages.begin(), pages.end(), std::mt19937(5));
  std::vector<std::vector<std::int64_t>> out(static_cast<std::size_t>(rounds));
  std::size_t next = 0;
  for (auto& s : out) {
    for (std::int64_t t = 0; t < tokens; ++t) {
      if (t % page_size == 0) ++next;
      s.push_back(pages[(next - 1) % pages.size()] * page_size + (t % page_size));
    }
  }
  return out;
}

/// Slot mappings for decode rounds: every token is the next token of its own
/// sequence, at a random slot of the cache; no slot repeats while
/// rounds * tokens <= num_slots.
std::vector<std::vector<std::int64_t>> decode_slots(int rounds, std::int64_t tokens,
                                                    std::int64_t num_slots) {
  std::vector<std::int64_t> all(static_cast<std::size_t>(num_slots));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), std::mt19937(7));
  std::vector<std::vector<std::int64_t>> out(static_cast<std::size_t>(rounds));
  std::size_t next = 0;
  for (auto& s : out) {
    for (std::int64_t t = 0; t < tokens; ++t) s.push_back(all[next++ % all.size()]);
  }
  return out;
}

void BM_append_kv(benchmark::State& state, bool decode) {
  const std::int64_t heads = 8, hd = 128, ps = 16;
  const std::int64_t tokens = decode ? 256 : full_or_smoke<std::int64_t>(8192, 256);
  const double bytes = 2.0 * 2.0 * double(tokens * heads * hd) * 2.0;  // K+V, read+write, bf16
  const int rounds = rounds_for(bytes);
  // Decode: a 256 MiB K and a 256 MiB V cache (8,192 pages), written at random rows.
  const std::int64_t num_pages =
      decode ? full_or_smoke<std::int64_t>(8192, 256) : rounds * tokens / ps + 8;
  const auto layout = kvkit::PagedKVLayout::nhd(num_pages, ps, heads, hd);
  const auto slots = decode ? decode_slots(rounds, tokens, layout.num_slots())
                            : prefill_slots(rounds, tokens, ps, num_pages);
  std::vector<std::vector<std::uint16_t>> keys, values;
  for (int r = 0; r < rounds; ++r) {
    keys.push_back(random_bf16(std::size_t(tokens * heads * hd), 1 + 2 * r));
    values.push_back(random_bf16(std::size_t(tokens * heads * hd), 2 + 2 * r));
  }
  kvkit::HostCacheBuffer kc(layout.span_elements() * 2), vc(kc.bytes());
  int r = 0;
  for (auto _ : state) {
    kvkit::append_kv(layout, kvkit::AppendKVArgs::dense(keys[r].data(), values[r].data(),
                                                         slots[r].data(), tokens, heads, hd,
                                                         kc.data(), vc.data(), DType::kBFloat16));
    benchmark::ClobberMemory();
    r = (r + 1) % rounds;
  }
  kvkit::bench::report_host_bandwidth(state, bytes);
  state.counters["rounds"] = rounds;
}

void BM_append_latent(benchmark::State& state, bool decode) {
  const std::int64_t ps = 64;
  const std::int64_t tokens = decode ? 256 : full_or_smoke<std::int64_t>(8192, 256);
  const double bytes = 2.0 * double(tokens * 576) * 2.0;
  const int rounds = rounds_for(bytes);
  // Decode: a 288 MiB cache (4,096 pages of 64 x 576 bf16), written at random rows.
  const std::int64_t num_pages =
      decode ? full_or_smoke<std::int64_t>(4096, 64) : rounds * tokens / ps + 8;
  const auto layout = kvkit::LatentKVLayout::dense(num_pages, ps, 512, 64);
  const auto slots = decode ? decode_slots(rounds, tokens, layout.num_slots())
                            : prefill_slots(rounds, tokens, ps, num_pages);
  std::vector<std::vector<std::uint16_t>> c, r_;
  for (int r = 0; r < rounds; ++r) {
    c.push_back(random_bf16(std::size_t(tokens * 512), 1 + 2 * r));
    r_.push_back(random_bf16(std::size_t(tokens * 64), 2 + 2 * r));
  }
  kvkit::HostCacheBuffer cache(num_pages * ps * 576 * 2);
  int r = 0;
  for (auto _ : state) {
    kvkit::append_latent(layout, {c[r].data(), r_[r].data(), 512, 64, slots[r].data(), tokens,
                                  cache.data(), DType::kBFloat16, DType::kBFloat16});
    benchmark::ClobberMemory();
    r = (r + 1) % rounds;
  }
  kvkit::bench::report_host_bandwidth(state, bytes);
  state.counters["rounds"] = rounds;
}

void BM_quantize_append_fp8(benchmark::State& state, kvkit::ScaleGranularity g) {
  const std::int64_t heads = 8, hd = 128, ps = 16;
  const std::int64_t tokens = full_or_smoke<std::int64_t>(8192, 256);
  const double bytes = 2.0 * double(tokens * heads * hd) * (2.0 + 1.0);  // read bf16, write fp8
  const int rounds = rounds_for(bytes);
  const std::int64_t num_pages = rounds * tokens / ps + 8;
  const auto layout = kvkit::PagedKVLayout::nhd(num_pages, ps, heads, hd);
  const auto slots = prefill_slots(rounds, tokens, ps, num_pages);
  std::vector<std::vector<std::uint16_t>> keys, values;
  for (int r = 0; r < rounds; ++r) {
    keys.push_back(random_bf16(std::size_t(tokens * heads * hd), 1 + 2 * r));
    values.push_back(random_bf16(std::size_t(tokens * heads * hd), 2 + 2 * r));
  }
  kvkit::HostCacheBuffer kc(layout.span_elements()), vc(kc.bytes());
  // Static scales: 2 / 448 (the inputs lie in [-2, 2)); the dynamic ones are written here.
  std::vector<float> ks(std::size_t(layout.num_slots() * heads), 2.0f / 448.0f), vs(ks);
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
    r = (r + 1) % rounds;
  }
  kvkit::bench::report_host_bandwidth(state, bytes);
  state.counters["rounds"] = rounds;
}

void BM_copy_blocks(benchmark::State& state) {
  // Eight caches (four layers' K and V) of 1,024 pages of 32 KiB: 256 MiB.
  // Each round copies 32 random pages onto 32 other random pages in every
  // cache: 8 MiB read + 8 MiB written.
  const std::int64_t heads = 8, hd = 128, ps = 16;
  const std::int64_t num_pages = full_or_smoke<std::int64_t>(1024, 64);
  const std::int64_t num_caches = 8, k = full_or_smoke<std::int64_t>(32, 8);
  const auto layout = kvkit::PagedKVLayout::nhd(num_pages, ps, heads, hd);
  const double bytes = 2.0 * double(num_caches * k * layout.page_elements()) * 2.0;
  const int rounds = rounds_for(bytes);
  std::vector<std::vector<std::uint16_t>> caches;
  std::vector<void*> ptrs;
  for (int c = 0; c < num_caches; ++c) caches.push_back(random_bf16(std::size_t(layout.span_elements()), std::uint64_t(c)));
  for (auto& c : caches) ptrs.push_back(c.data());
  // Round r: the first k pages of a fresh shuffle are sources, the next k destinations.
  std::vector<std::vector<std::int64_t>> pairs(static_cast<std::size_t>(rounds));
  std::vector<std::int64_t> pages(static_cast<std::size_t>(num_pages));
  std::iota(pages.begin(), pages.end(), 0);
  std::mt19937 rng(3);
  for (auto& p : pairs) {
    std::shuffle(pages.begin(), pages.end(), rng);
    for (std::int64_t i = 0; i < k; ++i) {
      p.push_back(pages[std::size_t(i)]);
      p.push_back(pages[std::size_t(k + i)]);
    }
  }
  int r = 0;
  for (auto _ : state) {
    kvkit::copy_blocks(layout, {ptrs.data(), num_caches, pairs[r].data(), k, DType::kBFloat16});
    benchmark::ClobberMemory();
    r = (r + 1) % rounds;
  }
  kvkit::bench::report_host_bandwidth(state, bytes);
  state.counters["rounds"] = rounds;
}

void BM_gather_kv(benchmark::State& state) {
  // One 32,768-token sequence of a Llama-3-8B layer (bf16, page 16, random
  // pages of a cache twice its size) into dense K and V: 128 MiB read +
  // 128 MiB written per call, so no round rotation is needed.
  const std::int64_t heads = 8, hd = 128, ps = 16;
  const std::int64_t tokens = full_or_smoke<std::int64_t>(32768, 256);
  const auto layout = kvkit::PagedKVLayout::nhd(2 * tokens / ps, ps, heads, hd);
  kvkit::HostCacheBuffer kc(layout.span_elements() * 2), vc(kc.bytes());
  std::memset(kc.data(), 0x3c, std::size_t(kc.bytes()));
  std::memset(vc.data(), 0x3d, std::size_t(vc.bytes()));
  const std::vector<std::int32_t> pages = kvkit::bench::random_page_list(tokens / ps, layout.num_pages, 7);
  std::vector<std::uint16_t> k_out(std::size_t(tokens * heads * hd)), v_out(k_out.size());
  const kvkit::GatherKVArgs a{kc.data(),    vc.data(),    pages.data(), tokens,
                              k_out.data(), v_out.data(), heads * hd,   hd, DType::kBFloat16};
  for (auto _ : state) {
    kvkit::gather_kv(layout, a);
    benchmark::ClobberMemory();
  }
  kvkit::bench::report_host_bandwidth(state, 2.0 * double(tokens * heads * hd) * 2.0 * 2.0);
}

void BM_dequantize_gather_kv(benchmark::State& state) {
  // One 8,192-token sequence of an fp8 e4m3 Llama-3-8B layer (per-tensor
  // scale, page 16, random pages) into float32 K and V: 16 MiB read + 64 MiB
  // written per call.
  const std::int64_t heads = 8, hd = 128, ps = 16;
  const std::int64_t tokens = full_or_smoke<std::int64_t>(8192, 256);
  const auto layout = kvkit::PagedKVLayout::nhd(2 * tokens / ps, ps, heads, hd);
  kvkit::HostCacheBuffer kc(layout.span_elements()), vc(kc.bytes());
  // Codes of finite values (0x7f / 0xff are e4m3's NaN).
  auto* kb = static_cast<std::uint8_t*>(kc.data());
  auto* vb = static_cast<std::uint8_t*>(vc.data());
  for (std::int64_t i = 0; i < kc.bytes(); ++i) {
    kb[i] = std::uint8_t((i * 37) % 127 + ((i >> 7) & 1) * 128);
    vb[i] = std::uint8_t((i * 53) % 127 + ((i >> 8) & 1) * 128);
  }
  const std::vector<std::int32_t> pages = kvkit::bench::random_page_list(tokens / ps, layout.num_pages, 8);
  std::vector<float> k_out(std::size_t(tokens * heads * hd)), v_out(k_out.size());
  const float k_scale = 0.02f, v_scale = 0.03f;
  const kvkit::DequantizeGatherArgs a{kc.data(),    vc.data(),        pages.data(),
                                      tokens,       k_out.data(),     v_out.data(),
                                      heads * hd,   hd,               DType::kFloat8E4M3,
                                      kvkit::ScaleGranularity::kPerTensor, &k_scale, &v_scale};
  for (auto _ : state) {
    kvkit::dequantize_gather_kv(layout, a);
    benchmark::ClobberMemory();
  }
  kvkit::bench::report_host_bandwidth(state, 2.0 * double(tokens * heads * hd) * (1.0 + 4.0));
}

BENCHMARK_CAPTURE(BM_append_kv, llama3_8b_prefill_8192, false)->Name("append_kv/llama3_8b_bf16/prefill_8192")->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_append_kv, llama3_8b_decode_256, true)->Name("append_kv/llama3_8b_bf16/decode_256x1")->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_append_latent, prefill, false)->Name("append_latent/deepseek_576_bf16/prefill_8192")->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_append_latent, decode, true)->Name("append_latent/deepseek_576_bf16/decode_256x1")->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_quantize_append_fp8, per_tensor, kvkit::ScaleGranularity::kPerTensor)->Name("quantize_append/bf16_to_e4m3_per_tensor/prefill_8192")->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_quantize_append_fp8, per_token_head, kvkit::ScaleGranularity::kPerTokenHead)->Name("quantize_append/bf16_to_e4m3_per_token_head/prefill_8192")->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_copy_blocks)->Name("copy_blocks/llama3_8b_bf16/8_caches_32_random_pairs")->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_gather_kv)->Name("gather_kv/llama3_8b_bf16/page16/seq_32768")->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_dequantize_gather_kv)->Name("dequantize_gather_kv/llama3_8b_e4m3_to_f32/page16/seq_8192")->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace
