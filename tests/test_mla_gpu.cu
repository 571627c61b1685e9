// The CUDA MLA compress equals the CPU op: k_pe bit for bit (same rotation
// math), c_kv within float rounding of the sum of squares. Skipped without a GPU.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/mla_compress.cuh"

using kvkit::cuda::DeviceBuffer;

namespace {

template <class T>
void check_compress(int rank, int rope_dim, int page_size, int tokens) {
  const auto layout = kvkit::LatentKVLayout::dense(tokens / page_size + 2, page_size, rank, rope_dim);
  kvkit::RopeConfig rope = kvkit::RopeConfig::deepseek_yarn();
  rope.head_dim = rope.rotary_dim = rope_dim;
  const kvkit::RopeCache table(rope, 4096);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<T> kv_a(std::size_t(tokens) * (rank + rope_dim));
  for (auto& x : kv_a) x = kvkit::from_float<T>(normal(rng));
  std::vector<float> weight(static_cast<std::size_t>(rank));
  for (auto& x : weight) x = 1.0f + 0.1f * normal(rng);
  std::vector<std::int64_t> positions, slots;
  for (int t = 0; t < tokens; ++t) {
    positions.push_back(std::int64_t(rng() % 4096));
    slots.push_back(t % 9 == 4 ? -1 : std::int64_t(t));
  }
  const std::vector<T> poison(std::size_t(layout.num_pages * layout.stride_page), kvkit::from_float<T>(-999.0f));
  std::vector<T> cpu_cache = poison;
  kvkit::MlaCompressArgs a;
  a.kv_a = kv_a.data();
  a.kv_a_stride_token = rank + rope_dim;
  a.norm_weight = weight.data();
  a.positions = positions.data();
  a.slot_mapping = slots.data();
  a.num_tokens = tokens;
  a.cache = cpu_cache.data();
  a.dtype = kvkit::dtype_of<T>;
  a.cos_sin_cache = table.data();
  a.cache_positions = table.max_positions();
  kvkit::mla_compress(layout, a);

  auto d_kv_a = DeviceBuffer::from_host(kv_a);
  auto d_weight = DeviceBuffer::from_host(weight);
  auto d_pos = DeviceBuffer::from_host(positions);
  auto d_slots = DeviceBuffer::from_host(slots);
  auto d_cache = DeviceBuffer::from_host(poison);
  auto d_table = DeviceBuffer::from_host(std::vector<float>(table.data(), table.data() + 4096 * rope_dim));
  kvkit::MlaCompressArgs g = a;
  g.kv_a = d_kv_a.data();
  g.norm_weight = d_weight.as<float>();
  g.positions = d_pos.as<std::int64_t>();
  g.slot_mapping = d_slots.as<std::int64_t>();
  g.cache = d_cache.data();
  g.cos_sin_cache = d_table.as<float>();
  kvkit::cuda::mla_compress(layout, g);
  const auto gpu_cache = d_cache.template to_host<T>();
  const double tol = sizeof(T) == 4 ? 1e-5 : 1e-2;
  for (std::size_t i = 0; i < gpu_cache.size(); ++i) {
    const std::int64_t col = std::int64_t(i) % layout.stride_slot;
    const float g_val = kvkit::to_float(gpu_cache[i]), c_val = kvkit::to_float(cpu_cache[i]);
    if (col >= rank) {
      REQUIRE(std::memcmp(&gpu_cache[i], &cpu_cache[i], sizeof(T)) == 0);
    } else {
      REQUIRE(std::fabs(g_val - c_val) <= tol * std::max(1.0f, std::fabs(c_val)));
    }
  }
}

}  // namespace

TEST_CASE("GPU mla_compress equals the CPU op") {
  check_compress<float>(512, 64, 64, 300);
  check_compress<kvkit::bfloat16>(512, 64, 64, 300);
  check_compress<kvkit::half>(512, 64, 1, 33);
  check_compress<float>(96, 32, 16, 17);
}
