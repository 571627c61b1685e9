// Decode attention on the GPU (kvkit::cuda::plan_decode + run_decode) over a
// paged bf16 cache, page 16, bf16 q/o. Shapes: Llama-3-8B (32 q heads, 8 kv
// heads, head_dim 128) at batch 64 x 4096 (no split needed) and batch 1 x
// 32768 (split-KV, also shown unsplit), and MQA with 16 and 128 q heads on
// one kv head (DeepSeek-style head sharing), and the Llama-3-8B batch 64 x
// 4096 shape over an fp8 e4m3 cache with per-tensor scales (bf16 q/o; K/V
// bytes counted at 1 byte per element). Memory-bound: reports the bytes
// read (K + V of every attended token, plus Q, plus O written) as bytes/s and
// pct_of_memcpy against the device copy kernel of this binary. Every cache
// is larger than the H100's 50 MB L2 in the full run.
//
// Cascade (shared prefix), as in bench_attention.cpp: 32 sequences share a
// 4,096-token prefix (the same 256 pages) and each has its own 256-token
// suffix; float32 q and o (the merge works on float32 states). "plain" is one
// run_decode over prefix + suffix per sequence; "cascade" is one run_decode
// attending the 32 queries to the prefix (q_len = 32, causal = false, the
// prefix pages as one sequence), one run_decode over the suffixes
// (kv_begin = 4096) and cuda::merge_states. Both report bandwidth against the
// plain decode's bytes (see BM_shared_prefix_gpu). The plain variant reads the
// shared prefix 32 times, but the prefix (16.8 MB of K + V) fits the L2, so
// part of those reads are L2 hits: the speedup on the GPU is smaller than the
// ratio of the bytes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "harness/cuda_timer.cuh"
#include "harness/device_random.cuh"
#include "harness/harness.hpp"
#include "kvkit/cuda/attention_decode.cuh"
#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/merge_states.cuh"

namespace {

using kvkit::bench::full_or_smoke;
using kvkit::cuda::DeviceBuffer;

using kvkit::bench::random_device_bf16;
using kvkit::bench::random_device_e4m3;

void BM_decode_gpu(benchmark::State& state, std::int64_t batch, std::int64_t context, int q_heads, int kv_heads,
                   int max_splits, kvkit::DType kv_dtype = kvkit::DType::kBFloat16) {
  using T = kvkit::bfloat16;  // q and o
  const bool fp8 = kv_dtype == kvkit::DType::kFloat8E4M3;
  const std::size_t kv_elem_bytes = kvkit::dtype_size(kv_dtype);
  const int head_dim = 128, page = 16;
  batch = full_or_smoke<std::int64_t>(batch, 2);
  context = full_or_smoke<std::int64_t>(context, 300);
  const std::int64_t pages_per_seq = (context + page - 1) / page;
  const std::int64_t num_pages = batch * pages_per_seq;
  const auto layout = kvkit::PagedKVLayout::nhd(num_pages, page, kv_heads, head_dim);
  const std::int64_t cache_elements = num_pages * layout.page_elements();
  DeviceBuffer k = fp8 ? random_device_e4m3(cache_elements, 1) : random_device_bf16(cache_elements, 1);
  DeviceBuffer v = fp8 ? random_device_e4m3(cache_elements, 2) : random_device_bf16(cache_elements, 2);
  // Per-tensor scales that map e4m3's +-448 to +-2, like the bf16 data.
  DeviceBuffer scales = DeviceBuffer::from_host(std::vector<float>{2.0f / 448.0f, 2.0f / 448.0f});
  DeviceBuffer q = random_device_bf16(batch * q_heads * head_dim, 3);
  DeviceBuffer o(std::size_t(batch * q_heads * head_dim) * sizeof(T));
  std::vector<std::int32_t> table(static_cast<std::size_t>(num_pages));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(1));
  const std::vector<std::int32_t> seq_lens(static_cast<std::size_t>(batch), std::int32_t(context));
  DeviceBuffer d_table = DeviceBuffer::from_host(table);
  DeviceBuffer d_lens = DeviceBuffer::from_host(seq_lens);

  kvkit::PagedDecodeParams p;
  p.q = q.data();
  p.q_stride_head = head_dim;
  p.q_stride_token = std::int64_t(q_heads) * head_dim;
  p.k_cache = k.data();
  p.v_cache = v.data();
  p.layout = layout;
  p.page_table = {d_table.as<std::int32_t>(), d_lens.as<std::int32_t>(), batch, pages_per_seq, pages_per_seq};
  p.num_q_heads = q_heads;
  p.sm_scale = 1.0f / std::sqrt(float(head_dim));
  p.o = o.data();
  p.o_stride_head = head_dim;
  p.o_stride_token = std::int64_t(q_heads) * head_dim;
  p.q_dtype = kvkit::DType::kBFloat16;
  p.kv_dtype = kv_dtype;
  if (fp8) {
    p.kv_scale_granularity = kvkit::ScaleGranularity::kPerTensor;
    p.k_scale = scales.as<float>();
    p.v_scale = scales.as<float>() + 1;
  }

  int device = 0, sms = 0;
  KVKIT_CUDA_CHECK(cudaGetDevice(&device));
  KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  kvkit::cuda::DecodePlanOptions options;
  options.max_splits = max_splits;
  const kvkit::cuda::DecodePlan plan = kvkit::cuda::plan_decode(p, seq_lens.data(), sms, options);
  DeviceBuffer workspace(plan.workspace_bytes);
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) {
    kvkit::cuda::run_decode(p, plan, workspace.data(), workspace.bytes(), s);
  });
  const double kv_bytes = 2.0 * double(batch * context) * kv_heads * head_dim * double(kv_elem_bytes);
  const double qo_bytes = 2.0 * double(batch) * q_heads * head_dim * sizeof(T);
  kvkit::bench::report_device_bandwidth(state, kv_bytes + qo_bytes);
  state.counters["splits"] = plan.num_splits;
}

BENCHMARK_CAPTURE(BM_decode_gpu, llama3_8b_b64, 64, 4096, 32, 8, 64)
    ->Name("attention_gpu/decode/llama3_8b/bf16/page16/batch64_ctx4096")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_decode_gpu, llama3_8b_b64_fp8, 64, 4096, 32, 8, 64, kvkit::DType::kFloat8E4M3)
    ->Name("attention_gpu/decode/llama3_8b/fp8_e4m3_per_tensor/page16/batch64_ctx4096")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_decode_gpu, llama3_8b_b1, 1, 32768, 32, 8, 64)
    ->Name("attention_gpu/decode/llama3_8b/bf16/page16/batch1_ctx32768")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_decode_gpu, llama3_8b_b1_unsplit, 1, 32768, 32, 8, 1)
    ->Name("attention_gpu/decode/llama3_8b/bf16/page16/batch1_ctx32768_unsplit")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_decode_gpu, mqa16, 64, 8192, 16, 1, 64)
    ->Name("attention_gpu/decode/mqa_16q_1kv/bf16/page16/batch64_ctx8192")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_decode_gpu, mqa128, 32, 8192, 128, 1, 64)
    ->Name("attention_gpu/decode/mqa_128q_1kv/bf16/page16/batch32_ctx8192")->UseManualTime()->Unit(benchmark::kMicrosecond);

void BM_shared_prefix_gpu(benchmark::State& state, bool cascade) {
  const int q_heads = 32, kv_heads = 8, head_dim = 128, page = 16;
  const std::int64_t batch = full_or_smoke<std::int64_t>(32, 2);
  const std::int64_t prefix = full_or_smoke<std::int64_t>(4096, 64);
  const std::int64_t suffix = full_or_smoke<std::int64_t>(256, 16);
  const std::int64_t prefix_pages = prefix / page, suffix_pages = suffix / page;
  const std::int64_t max_blocks = prefix_pages + suffix_pages;
  const std::int64_t num_pages = prefix_pages + batch * suffix_pages;
  const auto layout = kvkit::PagedKVLayout::nhd(num_pages, page, kv_heads, head_dim);
  DeviceBuffer k = random_device_bf16(num_pages * layout.page_elements(), 11);
  DeviceBuffer v = random_device_bf16(num_pages * layout.page_elements(), 12);
  // Shuffled pages: the prefix's pages in every row, then each sequence's own.
  std::vector<std::int32_t> pool(static_cast<std::size_t>(num_pages));
  std::iota(pool.begin(), pool.end(), 0);
  std::mt19937 rng(5);
  std::shuffle(pool.begin(), pool.end(), rng);
  std::vector<std::int32_t> table(static_cast<std::size_t>(batch * max_blocks));
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t i = 0; i < prefix_pages; ++i) table[std::size_t(b * max_blocks + i)] = pool[std::size_t(i)];
    for (std::int64_t i = 0; i < suffix_pages; ++i) {
      table[std::size_t(b * max_blocks + prefix_pages + i)] = pool[std::size_t(prefix_pages + b * suffix_pages + i)];
    }
  }
  const std::vector<std::int32_t> seq_lens(static_cast<std::size_t>(batch), std::int32_t(prefix + suffix));
  const std::vector<std::int32_t> prefix_len{std::int32_t(prefix)};
  const std::int64_t rows = batch * q_heads;
  std::vector<float> host_q(static_cast<std::size_t>(rows * head_dim));
  std::normal_distribution<float> normal;
  for (auto& x : host_q) x = normal(rng);
  DeviceBuffer q = DeviceBuffer::from_host(host_q);
  DeviceBuffer o(host_q.size() * sizeof(float)), o_prefix(o.bytes()), o_suffix(o.bytes());
  DeviceBuffer lse_prefix(std::size_t(rows) * sizeof(float)), lse_suffix(lse_prefix.bytes());
  DeviceBuffer d_table = DeviceBuffer::from_host(table);
  DeviceBuffer d_lens = DeviceBuffer::from_host(seq_lens);
  DeviceBuffer d_prefix_len = DeviceBuffer::from_host(prefix_len);

  kvkit::PagedDecodeParams p;
  p.q = q.data();
  p.q_stride_head = head_dim;
  p.q_stride_token = std::int64_t(q_heads) * head_dim;
  p.k_cache = k.data();
  p.v_cache = v.data();
  p.layout = layout;
  p.page_table = {d_table.as<std::int32_t>(), d_lens.as<std::int32_t>(), batch, max_blocks, max_blocks};
  p.num_q_heads = q_heads;
  p.sm_scale = 1.0f / std::sqrt(float(head_dim));
  p.o = o.data();
  p.o_stride_head = head_dim;
  p.o_stride_token = std::int64_t(q_heads) * head_dim;
  p.q_dtype = kvkit::DType::kFloat32;
  p.kv_dtype = kvkit::DType::kBFloat16;
  // Level 1: the prefix pages as one sequence whose q_len rows are the
  // batch's queries, non-causal (every query follows the whole prefix).
  kvkit::PagedDecodeParams shared = p;
  shared.page_table = {d_table.as<std::int32_t>(), d_prefix_len.as<std::int32_t>(), 1, prefix_pages, max_blocks};
  shared.q_len = int(batch);
  shared.causal = false;
  shared.o = o_prefix.data();
  shared.lse = lse_prefix.as<float>();
  // Level 2: each sequence's keys after the prefix.
  kvkit::PagedDecodeParams own = p;
  own.kv_begin = prefix;
  own.o = o_suffix.data();
  own.lse = lse_suffix.as<float>();

  int device = 0, sms = 0;
  KVKIT_CUDA_CHECK(cudaGetDevice(&device));
  KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const auto plan_plain = kvkit::cuda::plan_decode(p, seq_lens.data(), sms);
  const auto plan_shared = kvkit::cuda::plan_decode(shared, prefix_len.data(), sms);
  const auto plan_own = kvkit::cuda::plan_decode(own, seq_lens.data(), sms);
  DeviceBuffer workspace(std::max({plan_plain.workspace_bytes, plan_shared.workspace_bytes, plan_own.workspace_bytes}));
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) {
    if (!cascade) {
      kvkit::cuda::run_decode(p, plan_plain, workspace.data(), workspace.bytes(), s);
      return;
    }
    kvkit::cuda::run_decode(shared, plan_shared, workspace.data(), workspace.bytes(), s);
    kvkit::cuda::run_decode(own, plan_own, workspace.data(), workspace.bytes(), s);
    kvkit::cuda::merge_states(o_prefix.as<float>(), lse_prefix.as<float>(), o_suffix.as<float>(),
                              lse_suffix.as<float>(), o.as<float>(), lse_prefix.as<float>(), rows, head_dim, s);
  });
  const double kv_row = 2.0 * kv_heads * head_dim * sizeof(kvkit::bfloat16);  // K + V of one token
  const double q_o = 2.0 * double(rows) * head_dim * sizeof(float);
  const double state_bytes = double(rows) * (head_dim + 1) * sizeof(float);  // one partial (o, lse)
  const double plain_bytes = kv_row * double(batch * (prefix + suffix)) + q_o;
  // The cascade reads the prefix once and each suffix, q twice, writes two
  // partial states and reads them back in the merge, then writes o.
  const double cascade_bytes = kv_row * double(prefix + batch * suffix) + q_o + double(rows) * head_dim * sizeof(float) +
                               4.0 * state_bytes;
  state.counters["bytes_read_per_step"] = cascade ? cascade_bytes : plain_bytes;
  // Against the plain decode's bytes for both variants (the attention both
  // compute), so that bytes_per_second compares directly and the ratio is the speedup.
  kvkit::bench::report_device_bandwidth(state, plain_bytes);
  state.counters["splits_level1"] = cascade ? plan_shared.num_splits : plan_plain.num_splits;
}

BENCHMARK_CAPTURE(BM_shared_prefix_gpu, plain, false)
    ->Name("attention_gpu/cascade/llama3_8b/bf16/page16/batch32_prefix4096_suffix256/plain")
    ->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_shared_prefix_gpu, cascade, true)
    ->Name("attention_gpu/cascade/llama3_8b/bf16/page16/batch32_prefix4096_suffix256/cascade")
    ->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
