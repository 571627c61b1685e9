// RoPE on the CPU: in-place apply for 8,192 tokens, Llama-3-8B (32 q + 8 kv
// heads x 128: bf16, fp32 and fp16) and DeepSeek MLA (128 q_pe heads x 64
// inside a 192-wide head, one shared k_pe of 64: bf16, and fp16 through the
// F16C kernel for interleaved pairs). Memory-bound: bytes read + written of
// the rotated dimensions, and pct_of_memcpy.

#include <cstdint>
#include <random>
#include <vector>

#include "harness/harness.hpp"
#include "kvkit/ops/rope.hpp"
#include "kvkit/ops/rope_append.hpp"

namespace {

using kvkit::bench::full_or_smoke;

struct Shape {
  kvkit::RopeConfig config;
  int q_heads, k_heads;
  int q_head_stride;  // elements between q heads (192 for DeepSeek: nope 128 + pe 64)
};

template <class T>
void BM_apply_rope(benchmark::State& state, Shape shape) {
  const std::int64_t tokens = full_or_smoke<std::int64_t>(8192, 64);
  const kvkit::RopeConfig& cfg = shape.config;
  std::vector<T> q(std::size_t(tokens * shape.q_heads * shape.q_head_stride));
  std::vector<T> k(std::size_t(tokens * shape.k_heads * cfg.head_dim));
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (auto& x : q) x = kvkit::from_float<T>(normal(rng));
  for (auto& x : k) x = kvkit::from_float<T>(normal(rng));
  std::vector<std::int64_t> positions(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) positions[t] = t;
  const kvkit::RopeCache cache(cfg, tokens);
  kvkit::RopeParams p;
  p.q = q.data(); p.q_head_stride = shape.q_head_stride; p.q_token_stride = shape.q_heads * shape.q_head_stride;
  p.num_q_heads = shape.q_heads;
  p.k = k.data(); p.k_head_stride = cfg.head_dim; p.k_token_stride = shape.k_heads * cfg.head_dim;
  p.num_k_heads = shape.k_heads;
  p.positions = positions.data(); p.num_tokens = tokens;
  p.head_dim = cfg.head_dim; p.rotary_dim = cfg.rotary_dim; p.style = cfg.style;
  p.dtype = kvkit::dtype_of<T>;
  cache.attach(p);
  for (auto _ : state) {
    kvkit::apply_rope(p);
    benchmark::ClobberMemory();
  }
  const double rotated = double(tokens) * (shape.q_heads + shape.k_heads) * cfg.rotary_dim;
  kvkit::bench::report_host_bandwidth(state, 2.0 * rotated * sizeof(T));
}

const Shape kLlama{kvkit::RopeConfig::llama3(), 32, 8, 128};
const Shape kDeepSeek{kvkit::RopeConfig::deepseek_yarn(), 128, 1, 192};
// q_pe in a tensor of its own ([tokens, 128, 64]): the kernel without the
// cache lines of q_nope between the rows. In the 192-wide heads the rotated
// bytes are a third of each head's lines, and the hardware prefetcher reads
// the rest anyway (docs/rope.md).
const Shape kDeepSeekPeOnly{kvkit::RopeConfig::deepseek_yarn(), 128, 1, 64};

void BM_llama_bf16(benchmark::State& s) { BM_apply_rope<kvkit::bfloat16>(s, kLlama); }
void BM_llama_fp32(benchmark::State& s) { BM_apply_rope<float>(s, kLlama); }
void BM_llama_fp16(benchmark::State& s) { BM_apply_rope<kvkit::half>(s, kLlama); }
void BM_deepseek_bf16(benchmark::State& s) { BM_apply_rope<kvkit::bfloat16>(s, kDeepSeek); }
void BM_deepseek_fp16(benchmark::State& s) { BM_apply_rope<kvkit::half>(s, kDeepSeek); }
void BM_deepseek_pe_only_bf16(benchmark::State& s) { BM_apply_rope<kvkit::bfloat16>(s, kDeepSeekPeOnly); }

BENCHMARK(BM_llama_bf16)->Name("rope/apply/llama3_8b/bf16/8192_tokens")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_llama_fp32)->Name("rope/apply/llama3_8b/fp32/8192_tokens")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_llama_fp16)->Name("rope/apply/llama3_8b/fp16/8192_tokens")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_deepseek_bf16)->Name("rope/apply/deepseek_mla/bf16/8192_tokens")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_deepseek_fp16)->Name("rope/apply/deepseek_mla/fp16/8192_tokens")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_deepseek_pe_only_bf16)
    ->Name("rope/apply/deepseek_mla/bf16_q_pe_contiguous/8192_tokens")->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

namespace {

// Fused RoPE + append for 8,192 tokens of Llama-3-8B (32 q heads rotated in
// place; 8 kv heads of K rotated into a paged bf16 cache, V copied), page 16,
// slots scattered over a cache 4x larger than the tokens. Bytes: q read +
// written, K and V read + written.
void BM_rope_append(benchmark::State& state) {
  using T = kvkit::bfloat16;
  const kvkit::RopeConfig cfg = kvkit::RopeConfig::llama3();
  const std::int64_t tokens = full_or_smoke<std::int64_t>(8192, 64);
  const int q_heads = 32, kv_heads = 8, hd = cfg.head_dim, page = 16;
  const std::int64_t pages = 4 * tokens / page;
  const auto layout = kvkit::PagedKVLayout::nhd(pages, page, kv_heads, hd);
  std::vector<T> q(std::size_t(tokens * q_heads * hd)), k(std::size_t(tokens * kv_heads * hd)), v(k.size());
  std::vector<T> kc(std::size_t(pages * layout.page_elements())), vc(kc.size());
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (auto* vec : {&q, &k, &v})
    for (auto& x : *vec) x = kvkit::from_float<T>(normal(rng));
  std::vector<std::int64_t> positions(static_cast<std::size_t>(tokens)), slots(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) {
    positions[t] = t;
    slots[t] = (t * 7919) % layout.num_slots();
  }
  const kvkit::RopeCache cache(cfg, tokens);
  kvkit::RopeParams p;
  p.q = q.data(); p.q_head_stride = hd; p.q_token_stride = q_heads * hd; p.num_q_heads = q_heads;
  p.positions = positions.data(); p.num_tokens = tokens;
  p.head_dim = hd; p.rotary_dim = cfg.rotary_dim; p.style = cfg.style; p.dtype = kvkit::DType::kBFloat16;
  cache.attach(p);
  const auto append = kvkit::AppendKVArgs::dense(k.data(), v.data(), slots.data(), tokens, kv_heads, hd, kc.data(),
                                                 vc.data(), kvkit::DType::kBFloat16);
  for (auto _ : state) {
    kvkit::rope_append_kv(p, layout, append);
    benchmark::ClobberMemory();
  }
  const double elems = double(tokens) * (q_heads + 2 * kv_heads) * hd;
  kvkit::bench::report_host_bandwidth(state, 2.0 * elems * sizeof(T));
}
BENCHMARK(BM_rope_append)->Name("rope/fused_append/llama3_8b/bf16/page16/8192_tokens")->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
