// RoPE on the GPU: in-place apply for 8,192 tokens, Llama-3-8B (32 q + 8 kv
// heads x 128) and DeepSeek MLA (128 q_pe heads x 64 in 192-wide heads, one
// k_pe), bf16. Bytes read + written of the rotated dimensions, pct_of_memcpy
// against the device copy kernel of this binary.

#include <cstdint>
#include <vector>

#include "harness/cuda_timer.cuh"
#include "harness/harness.hpp"
#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/rope.cuh"

namespace {

using kvkit::bench::full_or_smoke;
using kvkit::cuda::DeviceBuffer;

void BM_apply_rope_gpu(benchmark::State& state, kvkit::RopeConfig cfg, int q_heads, int k_heads,
                       int q_head_stride) {
  using T = kvkit::bfloat16;
  const std::int64_t tokens = full_or_smoke<std::int64_t>(8192, 64);
  std::vector<T> q(std::size_t(tokens * q_heads * q_head_stride), T(0.5f));
  std::vector<T> k(std::size_t(tokens * k_heads * cfg.head_dim), T(0.25f));
  std::vector<std::int64_t> positions(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) positions[t] = t;
  const kvkit::RopeCache cache(cfg, tokens);
  auto d_q = DeviceBuffer::from_host(q);
  auto d_k = DeviceBuffer::from_host(k);
  auto d_pos = DeviceBuffer::from_host(positions);
  auto d_table = DeviceBuffer::from_host(
      std::vector<float>(cache.data(), cache.data() + tokens * cfg.rotary_dim));
  kvkit::RopeParams p;
  p.q = d_q.data(); p.q_head_stride = q_head_stride; p.q_token_stride = q_heads * q_head_stride;
  p.num_q_heads = q_heads;
  p.k = d_k.data(); p.k_head_stride = cfg.head_dim; p.k_token_stride = k_heads * cfg.head_dim;
  p.num_k_heads = k_heads;
  p.positions = d_pos.as<std::int64_t>(); p.num_tokens = tokens;
  p.head_dim = cfg.head_dim; p.rotary_dim = cfg.rotary_dim; p.style = cfg.style;
  p.dtype = kvkit::DType::kBFloat16;
  p.cos_sin_cache = d_table.as<float>();
  p.cache_positions = tokens;
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) { kvkit::cuda::apply_rope(p, s); });
  const double rotated = double(tokens) * (q_heads + k_heads) * cfg.rotary_dim;
  kvkit::bench::report_device_bandwidth(state, 2.0 * rotated * sizeof(T));
}

BENCHMARK_CAPTURE(BM_apply_rope_gpu, llama3_8b, kvkit::RopeConfig::llama3(), 32, 8, 128)
    ->Name("rope_gpu/apply/llama3_8b/bf16/8192_tokens")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_apply_rope_gpu, deepseek, kvkit::RopeConfig::deepseek_yarn(), 128, 1, 192)
    ->Name("rope_gpu/apply/deepseek_mla/bf16/8192_tokens")->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace

namespace {

// Fused RoPE + append on the GPU, Llama-3-8B shape, 8,192 tokens, bf16, page 16.
void BM_rope_append_gpu(benchmark::State& state) {
  using T = kvkit::bfloat16;
  const kvkit::RopeConfig cfg = kvkit::RopeConfig::llama3();
  const std::int64_t tokens = full_or_smoke<std::int64_t>(8192, 64);
  const int q_heads = 32, kv_heads = 8, hd = cfg.head_dim, page = 16;
  const std::int64_t pages = 4 * tokens / page;
  const auto layout = kvkit::PagedKVLayout::nhd(pages, page, kv_heads, hd);
  std::vector<std::int64_t> positions(static_cast<std::size_t>(tokens)), slots(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) {
    positions[t] = t;
    slots[t] = (t * 7919) % layout.num_slots();
  }
  const kvkit::RopeCache cache(cfg, tokens);
  auto d_q = DeviceBuffer::from_host(std::vector<T>(std::size_t(tokens * q_heads * hd), T(0.5f)));
  auto d_k = DeviceBuffer::from_host(std::vector<T>(std::size_t(tokens * kv_heads * hd), T(0.25f)));
  auto d_v = DeviceBuffer::from_host(std::vector<T>(std::size_t(tokens * kv_heads * hd), T(0.125f)));
  DeviceBuffer d_kc(std::size_t(pages * layout.page_elements()) * sizeof(T)), d_vc(d_kc.bytes());
  auto d_pos = DeviceBuffer::from_host(positions);
  auto d_slots = DeviceBuffer::from_host(slots);
  auto d_table = DeviceBuffer::from_host(std::vector<float>(cache.data(), cache.data() + tokens * cfg.rotary_dim));
  kvkit::RopeParams p;
  p.q = d_q.data(); p.q_head_stride = hd; p.q_token_stride = q_heads * hd; p.num_q_heads = q_heads;
  p.positions = d_pos.as<std::int64_t>(); p.num_tokens = tokens;
  p.head_dim = hd; p.rotary_dim = cfg.rotary_dim; p.style = cfg.style; p.dtype = kvkit::DType::kBFloat16;
  p.cos_sin_cache = d_table.as<float>(); p.cache_positions = tokens;
  const auto append = kvkit::AppendKVArgs::dense(d_k.data(), d_v.data(), d_slots.as<std::int64_t>(), tokens, kv_heads, hd,
                                                 d_kc.data(), d_vc.data(), kvkit::DType::kBFloat16);
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) { kvkit::cuda::rope_append_kv(p, layout, append, s); });
  const double elems = double(tokens) * (q_heads + 2 * kv_heads) * hd;
  kvkit::bench::report_device_bandwidth(state, 2.0 * elems * sizeof(T));
}
BENCHMARK(BM_rope_append_gpu)->Name("rope_gpu/fused_append/llama3_8b/bf16/page16/8192_tokens")->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
