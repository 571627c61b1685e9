// GPU cache-layout ops: append (decode 256 x 1 token, prefill 8,192 tokens)
// for Llama-3-8B (8 kv heads x 128, bf16) and DeepSeek latent (576, bf16),
// fp8 quantize-append, copy_blocks, gather and dequantize-gather of one
// sequence (as bench_layout's CPU cases). bytes read + written per second and
// pct_of_memcpy against the device copy kernel measured in this binary.
// Each timed iteration launches on rounds(decode) different buffers so that
// the bytes touched exceed the H100's 50 MB L2: 4 for prefill-sized calls,
// 128 for decode (1-2 MB per call: a decode step's appends, one per layer,
// launch gaps included).

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "harness/cuda_timer.cuh"
#include "harness/harness.hpp"
#include "kvkit/cuda/append.cuh"
#include "kvkit/cuda/copy_blocks.cuh"
#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/gather.cuh"
#include "kvkit/cuda/quantize.cuh"

namespace {

using kvkit::DType;
using kvkit::bench::full_or_smoke;
using kvkit::cuda::DeviceBuffer;

constexpr int kRounds = 4;

int rounds(bool decode) { return decode ? 128 : kRounds; }

DeviceBuffer random_bf16(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<std::uint16_t> v(n);
  for (auto& x : v) x = kvkit::bfloat16(dist(rng)).bits;
  return DeviceBuffer::from_host(v);
}

/// rounds(decode) slot mappings (device) of `tokens` tokens on shuffled pages.
std::vector<DeviceBuffer> make_slots(std::int64_t tokens, std::int64_t ps, std::int64_t num_pages,
                                     bool decode) {
  std::vector<std::int64_t> pages(static_cast<std::size_t>(num_pages));
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(pages.begin(), pages.end(), std::mt19937(5));
  std::vector<DeviceBuffer> out;
  std::size_t next = 0;
  for (int r = 0; r < rounds(decode); ++r) {
    std::vector<std::int64_t> s;
    for (std::int64_t t = 0; t < tokens; ++t) {
      if (decode) {
        s.push_back(pages[next++ % pages.size()] * ps + (t % ps));
      } else {
        if (t % ps == 0) ++next;
        s.push_back(pages[(next - 1) % pages.size()] * ps + (t % ps));
      }
    }
    out.push_back(DeviceBuffer::from_host(s));
  }
  return out;
}

void BM_append_kv_gpu(benchmark::State& state, bool decode) {
  const std::int64_t heads = 8, hd = 128, ps = 16;
  const std::int64_t tokens = decode ? 256 : full_or_smoke<std::int64_t>(8192, 256);
  const int R = rounds(decode);
  const std::int64_t num_pages = decode ? R * tokens + 8 : R * tokens / ps + 8;
  const auto layout = kvkit::PagedKVLayout::nhd(num_pages, ps, heads, hd);
  const auto slots = make_slots(tokens, ps, num_pages, decode);
  std::vector<DeviceBuffer> k, v;
  for (int r = 0; r < R; ++r) {
    k.push_back(random_bf16(std::size_t(tokens * heads * hd), 1 + r));
    v.push_back(random_bf16(std::size_t(tokens * heads * hd), 9 + r));
  }
  DeviceBuffer kc(std::size_t(layout.span_elements()) * 2), vc(kc.bytes());
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) {
    for (int r = 0; r < R; ++r) {
      kvkit::cuda::append_kv(layout, kvkit::AppendKVArgs::dense(k[r].data(), v[r].data(),
                                                                 slots[r].as<std::int64_t>(), tokens,
                                                                 heads, hd, kc.data(), vc.data(),
                                                                 DType::kBFloat16), s);
    }
  });
  kvkit::bench::report_device_bandwidth(state, R * 2.0 * 2.0 * double(tokens * heads * hd) * 2.0);
}

void BM_append_latent_gpu(benchmark::State& state, bool decode) {
  const std::int64_t ps = 64;
  const std::int64_t tokens = decode ? 256 : full_or_smoke<std::int64_t>(8192, 256);
  const int R = rounds(decode);
  const std::int64_t num_pages = decode ? R * tokens + 8 : R * tokens / ps + 8;
  const auto layout = kvkit::LatentKVLayout::dense(num_pages, ps, 512, 64);
  const auto slots = make_slots(tokens, ps, num_pages, decode);
  std::vector<DeviceBuffer> c, rp;
  for (int r = 0; r < R; ++r) {
    c.push_back(random_bf16(std::size_t(tokens * 512), 1 + r));
    rp.push_back(random_bf16(std::size_t(tokens * 64), 9 + r));
  }
  DeviceBuffer cache(std::size_t(num_pages * ps * 576) * 2);
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) {
    for (int r = 0; r < R; ++r) {
      kvkit::cuda::append_latent(layout, {c[r].data(), rp[r].data(), 512, 64, slots[r].as<std::int64_t>(),
                                          tokens, cache.data(), DType::kBFloat16, DType::kBFloat16}, s);
    }
  });
  kvkit::bench::report_device_bandwidth(state, R * 2.0 * double(tokens * 576) * 2.0);
}

void BM_quantize_append_fp8_gpu(benchmark::State& state, kvkit::ScaleGranularity g) {
  const std::int64_t heads = 8, hd = 128, ps = 16;
  const std::int64_t tokens = full_or_smoke<std::int64_t>(8192, 256);
  const std::int64_t num_pages = kRounds * tokens / ps + 8;
  const auto layout = kvkit::PagedKVLayout::nhd(num_pages, ps, heads, hd);
  const auto slots = make_slots(tokens, ps, num_pages, false);
  std::vector<DeviceBuffer> k, v;
  for (int r = 0; r < kRounds; ++r) {
    k.push_back(random_bf16(std::size_t(tokens * heads * hd), 1 + r));
    v.push_back(random_bf16(std::size_t(tokens * heads * hd), 9 + r));
  }
  DeviceBuffer kc(std::size_t(layout.span_elements())), vc(kc.bytes());
  auto scales = DeviceBuffer::from_host(std::vector<float>(std::size_t(layout.num_slots() * heads), 1.0f));
  auto scales_v = DeviceBuffer::from_host(std::vector<float>(std::size_t(layout.num_slots() * heads), 1.0f));
  kvkit::QuantizeAppendArgs a;
  a.key_stride_token = a.value_stride_token = heads * hd;
  a.key_stride_head = a.value_stride_head = hd;
  a.num_tokens = tokens;
  a.k_cache = kc.data();
  a.v_cache = vc.data();
  a.src_dtype = DType::kBFloat16;
  a.cache_dtype = DType::kFloat8E4M3;
  a.granularity = g;
  a.k_scale = a.k_scale_cache = scales.as<float>();
  a.v_scale = a.v_scale_cache = scales_v.as<float>();
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) {
    for (int r = 0; r < kRounds; ++r) {
      a.key = k[r].data();
      a.value = v[r].data();
      a.slot_mapping = slots[r].as<std::int64_t>();
      kvkit::cuda::quantize_append_kv(layout, a, s);
    }
  });
  kvkit::bench::report_device_bandwidth(state, kRounds * 2.0 * double(tokens * heads * hd) * 3.0);
}

void BM_copy_blocks_gpu(benchmark::State& state) {
  const std::int64_t heads = 8, hd = 128, ps = 16;
  const std::int64_t num_pages = full_or_smoke<std::int64_t>(2048, 64);
  const std::int64_t num_caches = 8, k = num_pages / 4;
  const auto layout = kvkit::PagedKVLayout::nhd(num_pages, ps, heads, hd);
  std::vector<DeviceBuffer> caches;
  std::vector<void*> ptrs;
  for (int c = 0; c < num_caches; ++c) {
    caches.emplace_back(std::size_t(layout.span_elements()) * 2);
    ptrs.push_back(caches.back().data());
  }
  auto dptrs = DeviceBuffer::from_host(ptrs);
  std::vector<std::int64_t> pairs;
  for (std::int64_t i = 0; i < k; ++i) {
    pairs.push_back(2 * i);
    pairs.push_back(2 * i + 1);
  }
  auto dpairs = DeviceBuffer::from_host(pairs);
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) {
    kvkit::cuda::copy_blocks(layout, {dptrs.as<void*>(), num_caches, dpairs.as<std::int64_t>(), k,
                                      DType::kBFloat16}, 256, s);
  });
  kvkit::bench::report_device_bandwidth(state, 2.0 * double(num_caches * k * layout.page_elements()) * 2.0);
}

void BM_gather_kv_gpu(benchmark::State& state) {
  // One 32,768-token Llama-3-8B bf16 sequence (random 16-token pages of a
  // cache twice its size) into dense K and V: 128 MiB read + 128 MiB written.
  const std::int64_t heads = 8, hd = 128, ps = 16;
  const std::int64_t tokens = full_or_smoke<std::int64_t>(32768, 256);
  const auto layout = kvkit::PagedKVLayout::nhd(2 * tokens / ps, ps, heads, hd);
  // The bytes do not matter to a copy: a memset is quicker than 128 Mi random values.
  DeviceBuffer kc(std::size_t(layout.span_elements()) * 2), vc(kc.bytes());
  KVKIT_CUDA_CHECK(cudaMemset(kc.data(), 0x3c, kc.bytes()));
  KVKIT_CUDA_CHECK(cudaMemset(vc.data(), 0x3d, vc.bytes()));
  auto pages = DeviceBuffer::from_host(kvkit::bench::random_page_list(tokens / ps, layout.num_pages, 7));
  DeviceBuffer k_out(std::size_t(tokens * heads * hd) * 2), v_out(std::size_t(tokens * heads * hd) * 2);
  const kvkit::GatherKVArgs a{kc.data(), vc.data(), pages.as<std::int32_t>(), tokens, k_out.data(), v_out.data(),
                              heads * hd, hd, DType::kBFloat16};
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) { kvkit::cuda::gather_kv(layout, a, s); });
  kvkit::bench::report_device_bandwidth(state, 2.0 * double(tokens * heads * hd) * 2.0 * 2.0);
}

void BM_dequantize_gather_kv_gpu(benchmark::State& state) {
  // One 8,192-token fp8 e4m3 Llama-3-8B sequence (per-tensor scale) into
  // float32 K and V: 16 MiB read + 64 MiB written.
  const std::int64_t heads = 8, hd = 128, ps = 16;
  const std::int64_t tokens = full_or_smoke<std::int64_t>(8192, 256);
  const auto layout = kvkit::PagedKVLayout::nhd(2 * tokens / ps, ps, heads, hd);
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(layout.span_elements()));
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = std::uint8_t((i * 37) % 127 + ((i >> 7) & 1) * 128);
  auto kc = DeviceBuffer::from_host(bytes), vc = DeviceBuffer::from_host(bytes);
  auto pages = DeviceBuffer::from_host(kvkit::bench::random_page_list(tokens / ps, layout.num_pages, 8));
  auto scales = DeviceBuffer::from_host(std::vector<float>{0.02f, 0.03f});
  DeviceBuffer k_out(std::size_t(tokens * heads * hd) * 4), v_out(std::size_t(tokens * heads * hd) * 4);
  const kvkit::DequantizeGatherArgs a{kc.data(),      vc.data(),          pages.as<std::int32_t>(),
                                      tokens,         k_out.as<float>(),  v_out.as<float>(),
                                      heads * hd,     hd,                 DType::kFloat8E4M3,
                                      kvkit::ScaleGranularity::kPerTensor, scales.as<float>(), scales.as<float>() + 1};
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) { kvkit::cuda::dequantize_gather_kv(layout, a, s); });
  kvkit::bench::report_device_bandwidth(state, 2.0 * double(tokens * heads * hd) * (1.0 + 4.0));
}

BENCHMARK_CAPTURE(BM_append_kv_gpu, prefill, false)->Name("append_kv_gpu/llama3_8b_bf16/prefill_8192")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_append_kv_gpu, decode, true)->Name("append_kv_gpu/llama3_8b_bf16/decode_256x1")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_append_latent_gpu, prefill, false)->Name("append_latent_gpu/deepseek_576_bf16/prefill_8192")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_append_latent_gpu, decode, true)->Name("append_latent_gpu/deepseek_576_bf16/decode_256x1")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_quantize_append_fp8_gpu, per_tensor, kvkit::ScaleGranularity::kPerTensor)->Name("quantize_append_gpu/bf16_to_e4m3_per_tensor/prefill_8192")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_quantize_append_fp8_gpu, per_token_head, kvkit::ScaleGranularity::kPerTokenHead)->Name("quantize_append_gpu/bf16_to_e4m3_per_token_head/prefill_8192")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_copy_blocks_gpu)->Name("copy_blocks_gpu/llama3_8b_bf16/8_caches_512_pairs")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_gather_kv_gpu)->Name("gather_kv_gpu/llama3_8b_bf16/page16/seq_32768")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_dequantize_gather_kv_gpu)->Name("dequantize_gather_kv_gpu/llama3_8b_e4m3_to_f32/page16/seq_8192")->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
