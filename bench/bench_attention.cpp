// Decode attention on the CPU over a paged cache, Llama-3-8B shape (32 q
// heads, 8 kv heads, head_dim 128, page 16). A bf16 cache with q and o in
// fp32 and, as a bf16 model has them, in bf16 (the scores then use
// AVX512-BF16's pair dot products where the CPU has them); fp16, fp8 (e4m3,
// e5m2) and int8 caches (per-tensor scale) with fp32 q, converted in registers with F16C
// (float tiles on CPUs without AVX2).
// Memory-bound: reports the bytes read (K + V of every attended token, plus
// Q and O) as bytes/s and pct_of_memcpy.
//
// Cascade (shared prefix): 32 sequences share a 4,096-token prefix (the same
// 256 pages in every page table) and each has its own 256-token suffix.
// "plain" decodes each sequence over prefix + suffix through its own page
// table; "cascade" attends all 32 queries to the prefix in one non-causal call
// (the 32 query rows as one sequence's q_len = 32), attends each query to its
// own suffix (one batched call with kv_begin = 4096), and merges the two
// states with merge_states.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

#include "harness/harness.hpp"
#include "kvkit/layout/host_cache_buffer.hpp"
#include "kvkit/ops/attention_decode.hpp"
#include "kvkit/ops/merge_states.hpp"

namespace {

using kvkit::bench::full_or_smoke;

template <class QT, class KV>
void BM_decode(benchmark::State& state, std::int64_t batch, std::int64_t context) {
  const int q_heads = 32, kv_heads = 8, head_dim = 128, page = 16;
  batch = full_or_smoke<std::int64_t>(batch, 2);
  context = full_or_smoke<std::int64_t>(context, 100);
  const std::int64_t pages_per_seq = (context + page - 1) / page;
  const std::int64_t num_pages = batch * pages_per_seq;
  const auto layout = kvkit::PagedKVLayout::nhd(num_pages, page, kv_heads, head_dim);
  // The cache as an engine would allocate it: HostCacheBuffer (2 MiB pages).
  const std::int64_t elements = num_pages * layout.page_elements();
  kvkit::HostCacheBuffer k_buffer(elements * std::int64_t(sizeof(KV))), v_buffer(k_buffer.bytes());
  KV* k = k_buffer.as<KV>();
  KV* v = v_buffer.as<KV>();
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  // int8 caches hold integers: spread the values over the range.
  const auto draw = [&] {
    if constexpr (std::is_same_v<KV, std::int8_t>) return KV(std::clamp(normal(rng) * 30.0f, -127.0f, 127.0f));
    return KV(normal(rng));
  };
  for (std::int64_t i = 0; i < elements; ++i) k[i] = draw();
  for (std::int64_t i = 0; i < elements; ++i) v[i] = draw();
  std::vector<std::int32_t> table(static_cast<std::size_t>(num_pages));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  std::vector<std::int32_t> seq_lens(static_cast<std::size_t>(batch), std::int32_t(context));
  std::vector<QT> q(std::size_t(batch * q_heads * head_dim)), o(q.size());
  for (auto& x : q) x = kvkit::from_float<QT>(normal(rng));

  kvkit::PagedDecodeParams p;
  p.q = q.data();
  p.q_stride_head = head_dim;
  p.q_stride_token = q_heads * head_dim;
  p.k_cache = k;
  p.v_cache = v;
  p.layout = layout;
  p.page_table = {table.data(), seq_lens.data(), batch, pages_per_seq, pages_per_seq};
  p.num_q_heads = q_heads;
  p.sm_scale = 1.0f / std::sqrt(float(head_dim));
  p.o = o.data();
  p.o_stride_head = head_dim;
  p.o_stride_token = q_heads * head_dim;
  p.q_dtype = kvkit::dtype_of<QT>;
  p.kv_dtype = kvkit::dtype_of<KV>;
  const float kv_scale = 0.5f;  // a quantized cache's per-tensor scale (random values, any scale reads the same)
  if (kvkit::dtype_size(p.kv_dtype) == 1) p.k_scale = p.v_scale = &kv_scale;
  for (auto _ : state) {
    kvkit::paged_decode_attention(p);
    benchmark::DoNotOptimize(o.data());
  }
  const double kv_bytes = 2.0 * double(batch * context) * kv_heads * head_dim * sizeof(KV);
  const double qo_bytes = 2.0 * double(q.size()) * sizeof(QT);
  kvkit::bench::report_host_bandwidth(state, kv_bytes + qo_bytes);
}

// (BENCHMARK_CAPTURE pastes the function's name into an identifier: no template arguments.)
void BM_decode_fp32_q(benchmark::State& s, std::int64_t batch, std::int64_t context) {
  BM_decode<float, kvkit::bfloat16>(s, batch, context);
}
void BM_decode_bf16_q(benchmark::State& s, std::int64_t batch, std::int64_t context) {
  BM_decode<kvkit::bfloat16, kvkit::bfloat16>(s, batch, context);
}
void BM_decode_fp16_kv(benchmark::State& s, std::int64_t batch, std::int64_t context) {
  BM_decode<float, kvkit::half>(s, batch, context);
}
void BM_decode_fp8_kv(benchmark::State& s, std::int64_t batch, std::int64_t context) {
  BM_decode<float, kvkit::float8_e4m3>(s, batch, context);
}
void BM_decode_e5m2_kv(benchmark::State& s, std::int64_t batch, std::int64_t context) {
  BM_decode<float, kvkit::float8_e5m2>(s, batch, context);
}
void BM_decode_int8_kv(benchmark::State& s, std::int64_t batch, std::int64_t context) {
  BM_decode<float, std::int8_t>(s, batch, context);
}

BENCHMARK_CAPTURE(BM_decode_fp32_q, batch16_ctx4096, 16, 4096)
    ->Name("attention/decode/llama3_8b/bf16_kv/page16/batch16_ctx4096")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_decode_fp32_q, batch1_ctx32768, 1, 32768)
    ->Name("attention/decode/llama3_8b/bf16_kv/page16/batch1_ctx32768")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_decode_bf16_q, batch16_ctx4096, 16, 4096)
    ->Name("attention/decode/llama3_8b/bf16_kv_bf16_q/page16/batch16_ctx4096")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_decode_bf16_q, batch1_ctx32768, 1, 32768)
    ->Name("attention/decode/llama3_8b/bf16_kv_bf16_q/page16/batch1_ctx32768")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_decode_fp16_kv, batch16_ctx4096, 16, 4096)
    ->Name("attention/decode/llama3_8b/fp16_kv/page16/batch16_ctx4096")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_decode_fp8_kv, batch16_ctx4096, 16, 4096)
    ->Name("attention/decode/llama3_8b/fp8_e4m3_kv/page16/batch16_ctx4096")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_decode_e5m2_kv, batch16_ctx4096, 16, 4096)
    ->Name("attention/decode/llama3_8b/fp8_e5m2_kv/page16/batch16_ctx4096")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_decode_int8_kv, batch16_ctx4096, 16, 4096)
    ->Name("attention/decode/llama3_8b/int8_kv/page16/batch16_ctx4096")->Unit(benchmark::kMillisecond)->UseRealTime();

// The cascade problem: Llama-3-8B shape, bf16 cache, page 16, float32 q and o
// (merge_states works on float32 states).
struct SharedPrefixProblem {
  using KV = kvkit::bfloat16;
  static constexpr int kQHeads = 32, kKVHeads = 8, kHeadDim = 128, kPage = 16;
  std::int64_t batch, prefix, suffix, prefix_pages, suffix_pages, max_blocks;
  kvkit::PagedKVLayout layout;
  std::vector<KV> k, v;
  std::vector<std::int32_t> table, seq_lens;
  std::vector<float> q, o;

  SharedPrefixProblem()
      : batch(full_or_smoke<std::int64_t>(32, 2)),
        prefix(full_or_smoke<std::int64_t>(4096, 64)),
        suffix(full_or_smoke<std::int64_t>(256, 16)),
        prefix_pages(prefix / kPage),
        suffix_pages(suffix / kPage),
        max_blocks(prefix_pages + suffix_pages) {
    const std::int64_t num_pages = prefix_pages + batch * suffix_pages;
    layout = kvkit::PagedKVLayout::nhd(num_pages, kPage, kKVHeads, kHeadDim);
    k.resize(std::size_t(num_pages * layout.page_elements()));
    v.resize(k.size());
    std::mt19937 rng(7);
    std::normal_distribution<float> normal;
    for (auto& x : k) x = KV(normal(rng));
    for (auto& x : v) x = KV(normal(rng));
    // Pages in shuffled order: the prefix's pages, then each sequence's own.
    std::vector<std::int32_t> pool(static_cast<std::size_t>(num_pages));
    std::iota(pool.begin(), pool.end(), 0);
    std::shuffle(pool.begin(), pool.end(), rng);
    table.resize(std::size_t(batch * max_blocks));
    for (std::int64_t b = 0; b < batch; ++b) {
      for (std::int64_t i = 0; i < prefix_pages; ++i) table[std::size_t(b * max_blocks + i)] = pool[std::size_t(i)];
      for (std::int64_t i = 0; i < suffix_pages; ++i) {
        table[std::size_t(b * max_blocks + prefix_pages + i)] = pool[std::size_t(prefix_pages + b * suffix_pages + i)];
      }
    }
    seq_lens.assign(static_cast<std::size_t>(batch), std::int32_t(prefix + suffix));
    q.resize(std::size_t(batch * kQHeads * kHeadDim));
    o.resize(q.size());
    for (auto& x : q) x = normal(rng);
  }

  /// Plain decode of every sequence over prefix + suffix, writing `out` (and `lse`).
  kvkit::PagedDecodeParams params(float* out, float* lse) const {
    kvkit::PagedDecodeParams p;
    p.q = q.data();
    p.q_stride_head = kHeadDim;
    p.q_stride_token = kQHeads * kHeadDim;
    p.k_cache = k.data();
    p.v_cache = v.data();
    p.layout = layout;
    p.page_table = {table.data(), seq_lens.data(), batch, max_blocks, max_blocks};
    p.num_q_heads = kQHeads;
    p.sm_scale = 1.0f / std::sqrt(float(kHeadDim));
    p.o = out;
    p.o_stride_head = kHeadDim;
    p.o_stride_token = kQHeads * kHeadDim;
    p.lse = lse;
    p.q_dtype = kvkit::DType::kFloat32;
    p.kv_dtype = kvkit::DType::kBFloat16;
    return p;
  }

  /// K + V bytes of `tokens` cache rows (all kv heads).
  static double kv_bytes(std::int64_t tokens) { return 2.0 * double(tokens) * kKVHeads * kHeadDim * sizeof(KV); }
  /// What plain decode reads: every sequence's prefix + suffix, plus q and o.
  double plain_bytes() const { return kv_bytes(batch * (prefix + suffix)) + 2.0 * double(q.size()) * sizeof(float); }
  /// What the cascade reads: the prefix once and each suffix, plus q (twice),
  /// the two partial states (written, then read by the merge) and o.
  double cascade_bytes() const {
    const double state = double(q.size() + std::size_t(batch) * kQHeads) * sizeof(float);
    return kv_bytes(prefix + batch * suffix) + 2.0 * double(q.size()) * sizeof(float) + 4.0 * state + state;
  }
};

void BM_shared_prefix_plain(benchmark::State& state) {
  SharedPrefixProblem prob;
  const kvkit::PagedDecodeParams p = prob.params(prob.o.data(), nullptr);
  for (auto _ : state) {
    kvkit::paged_decode_attention(p);
    benchmark::DoNotOptimize(prob.o.data());
  }
  state.counters["bytes_read_per_step"] = prob.plain_bytes();
  kvkit::bench::report_host_bandwidth(state, prob.plain_bytes());
}

void BM_shared_prefix_cascade(benchmark::State& state) {
  SharedPrefixProblem prob;
  const std::int64_t rows = prob.batch * prob.kQHeads;
  std::vector<float> o_prefix(prob.q.size()), o_suffix(prob.q.size()), lse_prefix(static_cast<std::size_t>(rows)),
      lse_suffix(static_cast<std::size_t>(rows));
  // Level 1: the prefix's pages as one sequence whose q_len query rows are the
  // batch's queries; non-causal, since every query follows the whole prefix.
  const std::int32_t prefix_len = std::int32_t(prob.prefix);
  kvkit::PagedDecodeParams shared = prob.params(o_prefix.data(), lse_prefix.data());
  shared.page_table = {prob.table.data(), &prefix_len, 1, prob.prefix_pages, prob.max_blocks};
  shared.q_len = int(prob.batch);
  shared.causal = false;
  // Level 2: each sequence's own keys after the prefix, in one batched call.
  kvkit::PagedDecodeParams own = prob.params(o_suffix.data(), lse_suffix.data());
  own.kv_begin = prob.prefix;
  for (auto _ : state) {
    kvkit::paged_decode_attention(shared);
    kvkit::paged_decode_attention(own);
    kvkit::merge_states(o_prefix.data(), lse_prefix.data(), o_suffix.data(), lse_suffix.data(), prob.o.data(),
                        lse_prefix.data(), rows, prob.kHeadDim);
    benchmark::DoNotOptimize(prob.o.data());
  }
  state.counters["bytes_read_per_step"] = prob.cascade_bytes();
  // Bandwidth against the *plain* decode's bytes (the attention both variants
  // compute), not the bytes the cascade reads: bytes_per_second and
  // pct_of_memcpy then compare directly with the plain row, and their ratio is
  // the speedup.
  kvkit::bench::report_host_bandwidth(state, prob.plain_bytes());
}

BENCHMARK(BM_shared_prefix_plain)
    ->Name("attention/cascade/llama3_8b/bf16_kv/page16/batch32_prefix4096_suffix256/plain")
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_shared_prefix_cascade)
    ->Name("attention/cascade/llama3_8b/bf16_kv/page16/batch32_prefix4096_suffix256/cascade")
    ->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
