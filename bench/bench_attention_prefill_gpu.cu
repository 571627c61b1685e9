// Chunked prefill on the GPU (kvkit::cuda::plan_prefill + run_prefill,
// mma.sync tensor cores) over a paged bf16 cache, page 16, Llama-3-8B heads
// (32 q heads, 8 kv heads, head_dim 128): a batch of 4 chunks of 2,048
// tokens on 2,048-token cached prefixes, and one 8,192-token chunk with no
// prefix. Compute-bound: reports FLOP/s (4 x head_dim per visible (query
// row, key) pair: Q·K and P·V, multiply and add, masked pairs not counted)
// and pct_of_cublas_gemm, the ratio to a cuBLAS bf16 GEMM (fp32 compute) of
// about the same FLOPs measured once in this binary.

#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "harness/cuda_timer.cuh"
#include "harness/device_random.cuh"
#include "harness/harness.hpp"
#include "kvkit/cuda/attention_prefill.cuh"
#include "kvkit/cuda/device_buffer.hpp"

namespace {

using kvkit::bench::full_or_smoke;
using kvkit::cuda::DeviceBuffer;

using kvkit::bench::random_device_bf16;

void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("cuBLAS ") + what + " failed with status " + std::to_string(int(status)));
  }
}

// FLOP/s of a cuBLAS bf16 GEMM (fp32 accumulation, bf16 output) of M = N =
// 8192 (smoke: 512) and K chosen so that 2 M N K is about `flops`; measured
// once per K with CUDA events (mean of 10 runs after a warm-up).
double cublas_gemm_flops_per_second(double flops) {
  static std::map<std::int64_t, double> measured;
  const std::int64_t mn = full_or_smoke<std::int64_t>(8192, 512);
  std::int64_t k = std::int64_t(std::llround(flops / (2.0 * double(mn) * double(mn)) / 256.0)) * 256;
  k = std::max<std::int64_t>(k, 256);
  const auto it = measured.find(k);
  if (it != measured.end()) return it->second;
  DeviceBuffer a = random_device_bf16(mn * k, 11);
  DeviceBuffer b = random_device_bf16(k * mn, 12);
  DeviceBuffer c(std::size_t(mn * mn) * sizeof(kvkit::bfloat16));
  cublasHandle_t handle;
  check_cublas(cublasCreate(&handle), "cublasCreate");
  const float alpha = 1.0f, beta = 0.0f;
  const auto gemm = [&]() {
    check_cublas(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, int(mn), int(mn), int(k), &alpha, a.data(),
                              CUDA_R_16BF, int(mn), b.data(), CUDA_R_16BF, int(k), &beta, c.data(), CUDA_R_16BF,
                              int(mn), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx");
  };
  gemm();
  KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t start, stop;
  KVKIT_CUDA_CHECK(cudaEventCreate(&start));
  KVKIT_CUDA_CHECK(cudaEventCreate(&stop));
  constexpr int kRuns = 10;
  KVKIT_CUDA_CHECK(cudaEventRecord(start));
  for (int i = 0; i < kRuns; ++i) gemm();
  KVKIT_CUDA_CHECK(cudaEventRecord(stop));
  KVKIT_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0.0f;
  KVKIT_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  KVKIT_CUDA_CHECK(cudaEventDestroy(start));
  KVKIT_CUDA_CHECK(cudaEventDestroy(stop));
  check_cublas(cublasDestroy(handle), "cublasDestroy");
  const double rate = 2.0 * double(mn) * double(mn) * double(k) * kRuns / (double(ms) * 1e-3);
  measured[k] = rate;
  return rate;
}

void BM_prefill_gpu(benchmark::State& state, std::int64_t batch, std::int64_t chunk, std::int64_t prefix) {
  using T = kvkit::bfloat16;
  const int q_heads = 32, kv_heads = 8, head_dim = 128, page = 16;
  batch = full_or_smoke<std::int64_t>(batch, 2);
  chunk = full_or_smoke<std::int64_t>(chunk, 100);
  prefix = full_or_smoke<std::int64_t>(prefix, std::min<std::int64_t>(prefix, 60));
  const std::int64_t seq_len = prefix + chunk;
  const std::int64_t pages_per_seq = (seq_len + page - 1) / page;
  const std::int64_t num_pages = batch * pages_per_seq;
  const std::int64_t tokens = batch * chunk;
  const auto layout = kvkit::PagedKVLayout::nhd(num_pages, page, kv_heads, head_dim);
  DeviceBuffer k = random_device_bf16(num_pages * layout.page_elements(), 1);
  DeviceBuffer v = random_device_bf16(num_pages * layout.page_elements(), 2);
  DeviceBuffer q = random_device_bf16(tokens * q_heads * head_dim, 3);
  DeviceBuffer o(std::size_t(tokens * q_heads * head_dim) * sizeof(T));
  std::vector<std::int32_t> table(static_cast<std::size_t>(num_pages));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(1));
  const std::vector<std::int32_t> seq_lens(static_cast<std::size_t>(batch), std::int32_t(seq_len));
  std::vector<std::int64_t> q_indptr(static_cast<std::size_t>(batch) + 1);
  for (std::int64_t b = 0; b <= batch; ++b) q_indptr[std::size_t(b)] = b * chunk;
  DeviceBuffer d_table = DeviceBuffer::from_host(table);
  DeviceBuffer d_lens = DeviceBuffer::from_host(seq_lens);
  DeviceBuffer d_indptr = DeviceBuffer::from_host(q_indptr);

  kvkit::PagedDecodeParams p;
  p.q = q.data();
  p.q_stride_head = head_dim;
  p.q_stride_token = std::int64_t(q_heads) * head_dim;
  p.k_cache = k.data();
  p.v_cache = v.data();
  p.layout = layout;
  p.page_table = {d_table.as<std::int32_t>(), d_lens.as<std::int32_t>(), batch, pages_per_seq, pages_per_seq};
  p.q_indptr = d_indptr.as<std::int64_t>();
  p.num_q_heads = q_heads;
  p.sm_scale = 1.0f / std::sqrt(float(head_dim));
  p.o = o.data();
  p.o_stride_head = head_dim;
  p.o_stride_token = std::int64_t(q_heads) * head_dim;
  p.q_dtype = kvkit::DType::kBFloat16;
  p.kv_dtype = kvkit::DType::kBFloat16;

  const kvkit::cuda::PrefillPlan plan = kvkit::cuda::plan_prefill(p, q_indptr.data(), seq_lens.data());
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) { kvkit::cuda::run_prefill(p, plan, s); });

  // Token i of a chunk sees prefix + i + 1 keys (causal).
  const double visible_pairs = double(batch) * q_heads * (double(chunk) * double(prefix) + double(chunk) * double(chunk + 1) / 2);
  const double flops = 4.0 * head_dim * visible_pairs;
  kvkit::bench::report_flops(state, flops);
  const double gemm_rate = cublas_gemm_flops_per_second(flops);
  state.counters["cublas_gemm_flop_per_second"] = benchmark::Counter(gemm_rate, benchmark::Counter::kDefaults,
                                                                      benchmark::Counter::kIs1000);
  state.counters["pct_of_cublas_gemm"] =
      benchmark::Counter(100.0 * flops * double(state.iterations()) / gemm_rate, benchmark::Counter::kIsRate);
  state.counters["blocks"] = double(plan.num_blocks);
}

BENCHMARK_CAPTURE(BM_prefill_gpu, llama3_8b_b4, 4, 2048, 2048)
    ->Name("attention_gpu/prefill/llama3_8b/bf16/page16/batch4_chunk2048_prefix2048")
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_prefill_gpu, llama3_8b_b1, 1, 8192, 0)
    ->Name("attention_gpu/prefill/llama3_8b/bf16/page16/batch1_chunk8192_prefix0")
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
