// MLA on the GPU: fused compress of 8,192 tokens, DeepSeek shapes (512 + 64,
// bf16, page 64), and quantize-on-append of 65,536 bf16 latent rows into the
// fp8 cache (656-byte rows, scattered slots: 119 MB read + written, beyond
// the 50 MB L2). Bytes read + written, pct_of_memcpy against the device copy.
// Absorbed decode (run_mla_decode), DeepSeek-V3 shape (128 heads, 576/512,
// page 64), bf16 and fp8 (656-byte rows) caches, batch 64 x 4,096, 128 x
// 4,096 and 1 x 32,768; bf16 on both kernels (CUDA cores, tensor cores)
// side by side, fp8 on CUDA cores: bytes = latent rows read once + Q + O
// (pct_of_memcpy), and FLOP/s = 2 x rows x keys x (576 + 512).

#include <cstdint>
#include <numeric>
#include <vector>

#include "harness/cuda_timer.cuh"
#include "harness/harness.hpp"
#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/mla_compress.cuh"
#include "kvkit/cuda/mla_decode.cuh"
#include "kvkit/cuda/mla_fp8.cuh"
#include "kvkit/ops/mla_decode.hpp"

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

void BM_mla_fp8_append_gpu(benchmark::State& state) {
  using T = kvkit::bfloat16;
  const std::int64_t tokens = kvkit::bench::full_or_smoke<std::int64_t>(65536, 64);
  const auto layout = kvkit::LatentFp8Layout::dense(4 * tokens / 64, 64);
  std::vector<T> rows(std::size_t(tokens) * 576);
  for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = T(float(int(i % 977) - 488) * 0.01f);
  std::vector<std::int64_t> slots(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) slots[t] = (t * 7919) % layout.num_slots();
  auto d_rows = DeviceBuffer::from_host(rows);
  auto d_slots = DeviceBuffer::from_host(slots);
  DeviceBuffer d_cache(static_cast<std::size_t>(layout.span_bytes()));
  kvkit::MlaFp8AppendArgs a;
  a.latent = d_rows.data();
  a.latent_stride_token = 576;
  a.dtype = kvkit::DType::kBFloat16;
  a.slot_mapping = d_slots.as<std::int64_t>();
  a.num_tokens = tokens;
  a.cache = d_cache.as<std::uint8_t>();
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) { kvkit::cuda::mla_fp8_append(layout, a, s); });
  kvkit::bench::report_device_bandwidth(state, double(tokens) * (576 * sizeof(T) + kvkit::MlaFp8Row::kBytes + 8));
}
BENCHMARK(BM_mla_fp8_append_gpu)->Name("mla_gpu/fp8_append/deepseek_576/bf16_to_656B/65536_tokens")->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace

namespace {

using kvkit::cuda::DeviceBuffer;

int device_sms() {
  int device = 0, sms = 0;
  KVKIT_CUDA_CHECK(cudaGetDevice(&device));
  KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Caches smaller than 4 x the H100's 50 MB L2 are kept in several copies
// (disjoint pages, one page table each) and the iterations rotate among them.
void BM_mla_decode_gpu(benchmark::State& state, std::int64_t batch, std::int64_t context, bool fp8,
                       kvkit::cuda::MlaDecodeKernel kernel) {
  const kvkit::MlaConfig cfg = kvkit::MlaConfig::deepseek_v3();
  const std::int64_t ctx = kvkit::bench::full_or_smoke<std::int64_t>(context, 256);
  const std::int64_t seqs = kvkit::bench::full_or_smoke<std::int64_t>(batch, 2);
  const int page = 64;
  const std::int64_t pages_per_copy = seqs * ctx / page;
  const std::int64_t row_bytes = fp8 ? kvkit::MlaFp8Row::kBytes : 2 * cfg.latent_dim();
  const double cache_bytes = double(seqs * ctx) * double(row_bytes);
  const int copies = cache_bytes < 200e6 ? 4 : 1;
  const std::int64_t pages = pages_per_copy * copies;
  DeviceBuffer d_cache(std::size_t(pages * page * row_bytes));
  KVKIT_CUDA_CHECK(cudaMemset(d_cache.data(), 0, d_cache.bytes()));
  std::vector<std::int32_t> table(static_cast<std::size_t>(pages));
  std::iota(table.begin(), table.end(), 0);  // copy k: pages [k * pages_per_copy, ...)
  auto d_table = DeviceBuffer::from_host(table);
  const std::vector<std::int32_t> lens(static_cast<std::size_t>(seqs), std::int32_t(ctx));
  auto d_lens = DeviceBuffer::from_host(lens);
  const std::int64_t rows = seqs * cfg.n_heads;
  auto d_q = DeviceBuffer::from_host(std::vector<kvkit::bfloat16>(std::size_t(rows) * 576, kvkit::bfloat16(0.1f)));
  DeviceBuffer d_o(std::size_t(rows) * 512 * sizeof(kvkit::bfloat16));
  const std::uint8_t* cache = d_cache.as<std::uint8_t>();
  kvkit::PagedDecodeParams p =
      fp8 ? kvkit::mla_decode_params_fp8(cfg, kvkit::LatentFp8Layout::dense(pages, page), cache)
          : kvkit::mla_decode_params(cfg, kvkit::LatentKVLayout::dense(pages, page, 512, 64), cache,
                                     kvkit::DType::kBFloat16);
  p.q = d_q.data();
  p.q_stride_head = 576;
  p.q_stride_token = std::int64_t(cfg.n_heads) * 576;
  p.o = d_o.data();
  p.o_stride_head = 512;
  p.o_stride_token = std::int64_t(cfg.n_heads) * 512;
  p.q_dtype = kvkit::DType::kBFloat16;
  p.page_table = {d_table.as<std::int32_t>(), d_lens.as<std::int32_t>(), seqs, ctx / page, ctx / page};
  const auto plan = kvkit::cuda::plan_mla_decode(p, lens.data(), device_sms(), {}, kernel);
  DeviceBuffer workspace(std::max<std::size_t>(plan.workspace_bytes, 4));
  int next = 0;
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) {
    kvkit::PagedDecodeParams q = p;
    q.page_table.block_table = d_table.as<std::int32_t>() + std::int64_t(next) * pages_per_copy;
    next = (next + 1) % copies;
    kvkit::cuda::run_mla_decode(q, plan, workspace.data(), plan.workspace_bytes, s);
  });
  kvkit::bench::report_device_bandwidth(state, cache_bytes + double(rows) * (576 + 512) * 2.0);
  kvkit::bench::report_flops(state, 2.0 * double(rows) * double(ctx) * (576 + 512));
  state.counters["splits"] = plan.num_splits;
  state.counters["tensor_cores"] = plan.kernel == kvkit::cuda::MlaDecodeKernel::kTensorCores ? 1 : 0;
}

constexpr auto kCores = kvkit::cuda::MlaDecodeKernel::kCudaCores;
constexpr auto kTensor = kvkit::cuda::MlaDecodeKernel::kTensorCores;
BENCHMARK_CAPTURE(BM_mla_decode_gpu, v3_bf16_b64x4096_cores, 64, 4096, false, kCores)
    ->Name("mla_gpu/absorbed_decode/deepseek_v3/bf16_page64/batch64_ctx4096/cuda_cores")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_mla_decode_gpu, v3_bf16_b64x4096_tc, 64, 4096, false, kTensor)
    ->Name("mla_gpu/absorbed_decode/deepseek_v3/bf16_page64/batch64_ctx4096/tensor_cores")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_mla_decode_gpu, v3_bf16_b128x4096_cores, 128, 4096, false, kCores)
    ->Name("mla_gpu/absorbed_decode/deepseek_v3/bf16_page64/batch128_ctx4096/cuda_cores")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_mla_decode_gpu, v3_bf16_b128x4096_tc, 128, 4096, false, kTensor)
    ->Name("mla_gpu/absorbed_decode/deepseek_v3/bf16_page64/batch128_ctx4096/tensor_cores")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_mla_decode_gpu, v3_bf16_b1x32768_cores, 1, 32768, false, kCores)
    ->Name("mla_gpu/absorbed_decode/deepseek_v3/bf16_page64/batch1_ctx32768/cuda_cores")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_mla_decode_gpu, v3_bf16_b1x32768_tc, 1, 32768, false, kTensor)
    ->Name("mla_gpu/absorbed_decode/deepseek_v3/bf16_page64/batch1_ctx32768/tensor_cores")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_mla_decode_gpu, v3_fp8_b64x4096, 64, 4096, true, kCores)
    ->Name("mla_gpu/absorbed_decode/deepseek_v3/fp8_656B_page64/batch64_ctx4096/cuda_cores")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_mla_decode_gpu, v3_fp8_b1x32768, 1, 32768, true, kCores)
    ->Name("mla_gpu/absorbed_decode/deepseek_v3/fp8_656B_page64/batch1_ctx32768/cuda_cores")->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
