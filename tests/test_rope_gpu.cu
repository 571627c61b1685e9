// The CUDA RoPE kernels equal the CPU ops: bit for bit with a cos/sin table,
// within float rounding with on-the-fly float64 angles. Skipped without a GPU.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/rope.cuh"
#include "kvkit/cuda/rope_shift_cache.cuh"

using kvkit::RopeConfig;
using kvkit::RopeParams;
using kvkit::RopeStyle;
using kvkit::cuda::DeviceBuffer;

namespace {

struct Inputs {
  std::vector<std::uint8_t> q, k;  // raw bytes of T
  std::vector<std::int64_t> positions;
  RopeParams params;               // host pointers into q, k, positions
};

template <class T>
Inputs make_inputs(const RopeConfig& cfg, int q_heads, int k_heads, std::int64_t tokens,
                   std::int64_t max_position, bool allow_negative, std::uint64_t seed) {
  Inputs in;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  const std::int64_t qs = q_heads * (cfg.head_dim + 2) + 3, ks = k_heads * cfg.head_dim;
  std::vector<T> q(std::size_t(tokens * qs)), k(std::size_t(tokens * ks));
  for (auto& x : q) x = kvkit::from_float<T>(normal(rng));
  for (auto& x : k) x = kvkit::from_float<T>(normal(rng));
  in.q.resize(q.size() * sizeof(T));
  in.k.resize(k.size() * sizeof(T));
  std::memcpy(in.q.data(), q.data(), in.q.size());
  std::memcpy(in.k.data(), k.data(), in.k.size());
  std::uniform_int_distribution<std::int64_t> pos(allow_negative ? -max_position + 1 : 0, max_position - 1);
  for (std::int64_t t = 0; t < tokens; ++t) in.positions.push_back(pos(rng));
  RopeParams& p = in.params;
  p.q = in.q.data(); p.q_token_stride = qs; p.q_head_stride = cfg.head_dim + 2; p.num_q_heads = q_heads;
  p.k = in.k.data(); p.k_token_stride = ks; p.k_head_stride = cfg.head_dim; p.num_k_heads = k_heads;
  p.positions = in.positions.data(); p.num_tokens = tokens;
  p.head_dim = cfg.head_dim; p.rotary_dim = cfg.rotary_dim; p.style = cfg.style;
  p.dtype = kvkit::dtype_of<T>;
  return in;
}

// Runs the op on the CPU and on the GPU from the same inputs; returns the
// largest difference (0 = bit-identical bytes) in units of float values.
template <class T>
double run_both(Inputs in, const kvkit::RopeCache& cache, bool on_the_fly, bool shift) {
  RopeParams cpu = in.params;
  cache.attach(cpu);
  if (on_the_fly) cpu.cos_sin_cache = nullptr;
  if (shift) cpu.q = nullptr;
  auto d_q = DeviceBuffer::from_host(in.q);
  auto d_k = DeviceBuffer::from_host(in.k);
  auto d_pos = DeviceBuffer::from_host(in.positions);
  auto d_table = DeviceBuffer::from_host(std::vector<float>(cache.data(), cache.data() + cache.max_positions() * cache.rotary_dim()));
  auto d_inv = DeviceBuffer::from_host(cache.inv_freq());
  RopeParams gpu = cpu;
  gpu.q = shift ? nullptr : d_q.data();
  gpu.k = d_k.data();
  gpu.positions = d_pos.as<std::int64_t>();
  gpu.cos_sin_cache = on_the_fly ? nullptr : d_table.as<float>();
  gpu.inv_freq = d_inv.as<double>();
  if (shift) {
    kvkit::rope_shift_keys(cpu);
    kvkit::cuda::rope_shift_keys(gpu);
  } else {
    kvkit::apply_rope(cpu);
    kvkit::cuda::apply_rope(gpu);
  }
  KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
  double worst = 0.0;
  for (auto [host, dev] : {std::pair{&in.q, &d_q}, std::pair{&in.k, &d_k}}) {
    const auto got = dev->to_host<T>();
    const T* want = reinterpret_cast<const T*>(host->data());
    for (std::size_t i = 0; i < got.size(); ++i) {
      if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
        worst = std::max(worst, std::fabs(double(kvkit::to_float(got[i])) - double(kvkit::to_float(want[i]))) + 1e-30);
      }
    }
  }
  return worst;
}

template <class T>
void check_type() {
  RopeConfig partial = RopeConfig::llama3();
  partial.head_dim = 96;
  partial.rotary_dim = 32;
  const RopeConfig configs[] = {RopeConfig::llama3(), RopeConfig::llama3_1(), partial,
                                RopeConfig::deepseek_yarn(), RopeConfig{64, 64, 10000.0, RopeStyle::kGptJ, {}}};
  std::uint64_t seed = 1;
  for (const RopeConfig& cfg : configs) {
    const kvkit::RopeCache cache(cfg, 2048);
    for (std::int64_t tokens : {1, 7, 333}) {
      INFO("rotary_dim " << cfg.rotary_dim << " tokens " << tokens);
      CHECK(run_both<T>(make_inputs<T>(cfg, 7, 2, tokens, 2048, false, seed++), cache, false, false) == 0.0);
      CHECK(run_both<T>(make_inputs<T>(cfg, 7, 2, tokens, 2048, true, seed++), cache, false, true) == 0.0);
      // float64 angles: libm and CUDA's cos/sin may differ in the last double bit.
      CHECK(run_both<T>(make_inputs<T>(cfg, 3, 1, tokens, 3000000, false, seed++), cache, true, false) <= 1e-5);
    }
  }
}

}  // namespace

TEST_CASE("GPU apply_rope and rope_shift_keys equal the CPU ops") {
  SECTION("float32") { check_type<float>(); }
  SECTION("float16") { check_type<kvkit::half>(); }
  SECTION("bfloat16") { check_type<kvkit::bfloat16>(); }
}

TEST_CASE("GPU apply_rope marks tokens whose position is outside the table or negative with NaN") {
  const RopeConfig cfg = RopeConfig::llama3();
  const kvkit::RopeCache cache(cfg, 16);
  Inputs in = make_inputs<float>(cfg, 1, 1, 4, 16, false, 3);
  in.positions[1] = 16;
  in.positions[2] = -3;  // the CPU op throws; K-shift deltas may be negative, positions not
  in.positions[3] = INT64_MIN;
  auto d_k = DeviceBuffer::from_host(in.k);
  auto d_pos = DeviceBuffer::from_host(in.positions);
  auto d_table = DeviceBuffer::from_host(std::vector<float>(cache.data(), cache.data() + 16 * 128));
  RopeParams p = in.params;
  p.q = nullptr;
  p.k = d_k.data();
  p.positions = d_pos.as<std::int64_t>();
  p.cos_sin_cache = d_table.as<float>();
  p.cache_positions = 16;
  kvkit::cuda::apply_rope(p);
  const auto got = d_k.to_host<float>();
  CHECK_FALSE(std::isnan(got[0]));
  for (int t = 1; t < 4; ++t) {
    INFO("token " << t << " at position " << in.positions[std::size_t(t)]);
    CHECK(std::isnan(got[std::size_t(t) * 128]));
    CHECK(std::isnan(got[std::size_t(t) * 128 + 127]));
  }
}

TEST_CASE("GPU fused rope + append equals the CPU fused op bit for bit") {
  for (bool hnd : {false, true}) {
    for (int page_size : {1, 16}) {
      const RopeConfig cfg = RopeConfig::llama3_1();
      const int q_heads = 8, kv_heads = 2, hd = cfg.head_dim, n = 37;
      const kvkit::RopeCache cache(cfg, 4096);
      const std::int64_t pages = 128 / page_size + 8;
      const auto layout = hnd ? kvkit::PagedKVLayout::hnd(pages, page_size, kv_heads, hd)
                              : kvkit::PagedKVLayout::nhd(pages, page_size, kv_heads, hd);
      std::mt19937 rng(23);
      std::normal_distribution<float> normal;
      std::vector<kvkit::bfloat16> q(std::size_t(n * q_heads * hd)), key(std::size_t(n * kv_heads * hd)), value(key.size());
      for (auto* vec : {&q, &key, &value})
        for (auto& x : *vec) x = kvkit::bfloat16(normal(rng));
      std::vector<std::int64_t> positions(n), slots(n);
      for (int t = 0; t < n; ++t) {
        positions[t] = std::int64_t(rng() % 4096);
        slots[t] = t % 5 == 3 ? -1 : std::int64_t(t * 2 + 1);
      }
      const std::vector<kvkit::bfloat16> poison(std::size_t(pages * layout.page_elements()), kvkit::bfloat16::from_bits(0x7fc1));
      std::vector<kvkit::bfloat16> kc = poison, vc = poison;
      auto d_q = DeviceBuffer::from_host(q);
      auto d_key = DeviceBuffer::from_host(key);
      auto d_value = DeviceBuffer::from_host(value);
      auto d_pos = DeviceBuffer::from_host(positions);
      auto d_slots = DeviceBuffer::from_host(slots);
      auto d_kc = DeviceBuffer::from_host(poison);
      auto d_vc = DeviceBuffer::from_host(poison);
      auto d_table = DeviceBuffer::from_host(std::vector<float>(cache.data(), cache.data() + 4096 * cfg.rotary_dim));

      RopeParams rope;
      rope.q = q.data(); rope.q_token_stride = q_heads * hd; rope.q_head_stride = hd; rope.num_q_heads = q_heads;
      rope.positions = positions.data(); rope.num_tokens = n;
      rope.head_dim = hd; rope.rotary_dim = cfg.rotary_dim; rope.style = cfg.style;
      rope.dtype = kvkit::DType::kBFloat16;
      cache.attach(rope);
      kvkit::rope_append_kv(rope, layout, kvkit::AppendKVArgs::dense(key.data(), value.data(), slots.data(), n, kv_heads, hd, kc.data(), vc.data(), kvkit::DType::kBFloat16));

      RopeParams gpu = rope;
      gpu.q = d_q.data();
      gpu.positions = d_pos.as<std::int64_t>();
      gpu.cos_sin_cache = d_table.as<float>();
      kvkit::cuda::rope_append_kv(gpu, layout, kvkit::AppendKVArgs::dense(d_key.data(), d_value.data(), d_slots.as<std::int64_t>(), n, kv_heads, hd, d_kc.data(), d_vc.data(), kvkit::DType::kBFloat16));
      KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
      const auto same = [](const std::vector<kvkit::bfloat16>& a, const std::vector<kvkit::bfloat16>& b) {
        return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 2) == 0;
      };
      CHECK(same(d_q.to_host<kvkit::bfloat16>(), q));
      CHECK(same(d_kc.to_host<kvkit::bfloat16>(), kc));
      CHECK(same(d_vc.to_host<kvkit::bfloat16>(), vc));
    }
  }
}

TEST_CASE("GPU K-shift inside a cache equals the CPU op (float and quantized caches)") {
  RopeConfig cfg = RopeConfig::llama3();
  cfg.head_dim = 96;
  cfg.rotary_dim = 64;
  const int heads = 3, n = 45;
  const kvkit::RopeCache table(cfg, 8192);
  const auto layout = kvkit::PagedKVLayout::hnd(8, 16, heads, cfg.head_dim);
  std::mt19937 rng(47);
  std::vector<std::int64_t> delta(n), slots(n);
  for (int t = 0; t < n; ++t) {
    delta[t] = std::int64_t(rng() % 6000) - 3000;
    slots[t] = t == 4 ? -1 : std::int64_t((t * 37) % layout.num_slots());
  }
  auto d_delta = DeviceBuffer::from_host(delta);
  auto d_slots = DeviceBuffer::from_host(slots);
  auto d_table = DeviceBuffer::from_host(std::vector<float>(table.data(), table.data() + 8192 * cfg.rotary_dim));
  RopeParams cpu;
  cpu.positions = delta.data(); cpu.num_tokens = n;
  cpu.head_dim = cfg.head_dim; cpu.rotary_dim = cfg.rotary_dim; cpu.style = cfg.style;
  table.attach(cpu);
  RopeParams gpu = cpu;
  gpu.positions = d_delta.as<std::int64_t>();
  gpu.cos_sin_cache = d_table.as<float>();
  for (kvkit::DType dt : {kvkit::DType::kBFloat16, kvkit::DType::kFloat8E4M3, kvkit::DType::kInt8}) {
    for (auto g : {kvkit::ScaleGranularity::kPerTensor, kvkit::ScaleGranularity::kPerTokenHead}) {
      const std::size_t bytes = std::size_t(8 * layout.page_elements()) * kvkit::dtype_size(dt);
      std::vector<std::uint8_t> kc(bytes);
      for (auto& b : kc) b = std::uint8_t(rng());
      if (dt == kvkit::DType::kBFloat16) {  // keep bf16 values finite and moderate
        auto* v = reinterpret_cast<kvkit::bfloat16*>(kc.data());
        for (std::size_t i = 0; i < bytes / 2; ++i) v[i] = kvkit::bfloat16(float(int(rng() % 2001) - 1000) / 300.0f);
      }
      std::vector<float> scales(std::size_t(layout.num_slots() * heads));
      for (auto& s : scales) s = 0.01f + float(rng() % 100) / 1000.0f;
      const float static_scale = 0.05f;
      auto d_kc = DeviceBuffer::from_host(kc);
      auto d_scales = DeviceBuffer::from_host(scales);
      auto d_static = DeviceBuffer::from_host(std::vector<float>{static_scale});
      kvkit::RopeShiftCacheArgs a;
      a.k_cache = kc.data(); a.cache_dtype = dt; a.slots = slots.data(); a.granularity = g;
      a.k_scale = &static_scale; a.k_scale_cache = scales.data();
      kvkit::rope_shift_cache_keys(cpu, layout, a);
      kvkit::RopeShiftCacheArgs ga = a;
      ga.k_cache = d_kc.data(); ga.slots = d_slots.as<std::int64_t>();
      ga.k_scale = d_static.as<float>(); ga.k_scale_cache = d_scales.as<float>();
      kvkit::cuda::rope_shift_cache_keys(gpu, layout, ga);
      INFO("dtype " << kvkit::dtype_name(dt) << " granularity " << int(g));
      const auto got = d_kc.to_host<std::uint8_t>();
      std::size_t diffs = 0;
      for (std::size_t i = 0; i < got.size(); ++i) diffs += got[i] != kc[i];
      CHECK(diffs == 0);
      if (dt != kvkit::DType::kBFloat16 && g == kvkit::ScaleGranularity::kPerTokenHead) {
        CHECK(d_scales.to_host<float>() == scales);
      }
    }
  }
}
