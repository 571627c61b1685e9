// MLA on the GPU: fused compress of 8,192 tokens, DeepSeek shapes (512 + 64,
// bf16, page 64). Bytes read + written, pct_of_memcpy against the device copy.

#include <cstdint>
#include <numeric>
#include <vector>

#include "harness/cuda_timer.cuh"
#include "harness/harness.hpp"
#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/mla_compress.cuh"

namespace {

using kvkit::cuda::DeviceBuffer;

void BM_mla_compress_gpu(benchmark::State& state) {
  using T = kvkit::bfloat16;
  const std::int64_t tokens = kvkit::bench::full_or_smoke<std::int64_t>(8192, 64);
  const int rank = 512, rope_dim = 64, page = 64;
  const std::int64_t pages = 4 * tokens / page;
  const auto layout = kvkit::LatentKVLayout::dense(pages, page, rank, rope_dim);
  std::vector<std::int64_t> positions(static_cast<std::size_t>(tokens)), slots(static_cast<std::size_t>(tokens));
  std::iota(positions.begin(), positions.end(), 0);
  for (std::int64_t t = 0; t < tokens; ++t) slots[t] = (t * 7919) % layout.num_slots();
  const kvkit::RopeCache table(kvkit::RopeConfig::deepseek_yarn(), tokens);
  auto d_kv_a = DeviceBuffer::from_host(std::vector<T>(std::size_t(tokens) * (rank + rope_dim), T(0.5f)));
  auto d_cache = DeviceBuffer(std::size_t(pages * layout.stride_page) * sizeof(T));
  auto d_weight = DeviceBuffer::from_host(std::vector<float>(rank, 1.0f));
  auto d_pos = DeviceBuffer::from_host(positions);
  auto d_slots = DeviceBuffer::from_host(slots);
  auto d_table = DeviceBuffer::from_host(std::vector<float>(table.data(), table.data() + tokens * rope_dim));
  kvkit::MlaCompressArgs a;
  a.kv_a = d_kv_a.data();
  a.kv_a_stride_token = rank + rope_dim;
  a.norm_weight = d_weight.as<float>();
  a.positions = d_pos.as<std::int64_t>();
  a.slot_mapping = d_slots.as<std::int64_t>();
  a.num_tokens = tokens;
  a.cache = d_cache.data();
  a.dtype = kvkit::DType::kBFloat16;
  a.cos_sin_cache = d_table.as<float>();
  a.cache_positions = tokens;
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) { kvkit::cuda::mla_compress(layout, a, s); });
  kvkit::bench::report_device_bandwidth(state, 2.0 * double(tokens) * (rank + rope_dim) * sizeof(T));
}
BENCHMARK(BM_mla_compress_gpu)->Name("mla_gpu/compress/deepseek_576/bf16/8192_tokens")->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
