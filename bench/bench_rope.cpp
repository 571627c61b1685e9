// RoPE on the CPU: in-place apply for 8,192 tokens, Llama-3-8B (32 q + 8 kv
// heads x 128) and DeepSeek MLA (128 q_pe heads x 64 inside a 192-wide head,
// one shared k_pe of 64), bf16 and fp32. Memory-bound: bytes read + written of
// the rotated dimensions, and pct_of_memcpy.

#include <cstdint>
#include <random>
#include <vector>

#include "harness/harness.hpp"
#include "kvkit/ops/rope.hpp"

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

void BM_llama_bf16(benchmark::State& s) { BM_apply_rope<kvkit::bfloat16>(s, kLlama); }
void BM_llama_fp32(benchmark::State& s) { BM_apply_rope<float>(s, kLlama); }
void BM_deepseek_bf16(benchmark::State& s) { BM_apply_rope<kvkit::bfloat16>(s, kDeepSeek); }

BENCHMARK(BM_llama_bf16)->Name("rope/apply/llama3_8b/bf16/8192_tokens")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_llama_fp32)->Name("rope/apply/llama3_8b/fp32/8192_tokens")->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_deepseek_bf16)->Name("rope/apply/deepseek_mla/bf16/8192_tokens")->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
