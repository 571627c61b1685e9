// The CUDA absorbed MLA decode (plan + run) against the CPU op
// (kvkit::mla_decode_attention) on the same inputs, both kernels (CUDA
// cores; tensor cores for bf16/fp16): DeepSeek-V2-Lite (16 heads) and V3
// (128 heads), bf16/fp16/fp8 caches, pages of 64, 16 and 1, lengths 1, 63,
// 64, 65, 1000, 5000 and 33000, q_len 1 and 2, split and unsplit, lse, masks.
// Skipped without a GPU.
//
// Tolerances, GPU vs CPU (both accumulate in float32, in different orders;
// both dequantize fp8 exactly): |o_gpu - o_cpu| <= 2e-5 * vmax + rel * |o_cpu|
// with vmax the largest |c_kv| in the cache and rel = 1e-4 for float32
// output, one unit in the last place otherwise (2^-10 fp16, 2^-7 bf16);
// |lse_gpu - lse_cpu| <= 2e-5 * max(1, |lse_cpu|). With q = 0 every score
// is 0 and lse = log(visible keys) exactly: one key too many or too few shows.
// The tensor-core kernel rounds P to the input dtype before P V (the scores
// and the sums stay float32), so its o gets an extra 1e-2 x max|o| (bf16) or
// 2e-3 x max|o| (fp16) on top; its lse has the same bound as above.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kvkit/cuda/attention_decode.cuh"
#include "kvkit/cuda/device_buffer.hpp"
#include "kvkit/cuda/mla_decode.cuh"
#include "kvkit/ops/mla_decode.hpp"
#include "kvkit/ops/mla_fp8.hpp"
#include "support/cuda_graph.hpp"

using Catch::Matchers::Contains;
using kvkit::MlaConfig;
using kvkit::PagedDecodeParams;
using kvkit::cuda::DecodePlanOptions;
using kvkit::cuda::DeviceBuffer;
using kvkit::cuda::MlaDecodeKernel;

namespace {

int num_sms() {
  int device = 0, sms = 0;
  KVKIT_CUDA_CHECK(cudaGetDevice(&device));
  KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

template <class T> double rel_tolerance();
template <> double rel_tolerance<float>() { return 1e-4; }
template <> double rel_tolerance<kvkit::half>() { return 1.0 / 1024 * 1.01; }
template <> double rel_tolerance<kvkit::bfloat16>() { return 1.0 / 128 * 1.01; }

struct MlaCase {
  int heads = 16;
  int page_size = 64;
  std::vector<int> seq_lens{1};
  int q_len = 1;
  kvkit::DType cache = kvkit::DType::kBFloat16;  // bf16, fp16, or fp8 (656-byte rows)
  int window = 0;
  int sinks = 0;
  float softcap = 0.0f;
  std::int64_t kv_begin = 0;
  std::int64_t kv_end = INT64_MAX;
  bool zero_q = false;
};

// A latent cache (16-bit rows or fp8 rows) with the sequences' pages
// scattered over a shuffled pool; slots no sequence owns hold NaN.
template <class QT>
struct MlaProblem {
  MlaCase c;
  MlaConfig config = MlaConfig::deepseek_v3();
  std::int64_t pages = 0, max_blocks = 0;
  std::vector<unsigned char> cache;  // bytes of either format
  std::vector<std::int32_t> table, lens;
  std::vector<QT> q, o_cpu, o_gpu;
  std::vector<float> lse_cpu, lse_gpu;
  float vmax = 0.0f;
  static constexpr int kPad = 8;  // o rows are padded; the padding must stay untouched
  const QT poison = kvkit::from_float<QT>(-777.0f);

  MlaProblem(const MlaCase& cs, std::uint64_t seed) : c(cs) {
    config.n_heads = c.heads;
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal;
    pages = 3;
    for (int len : c.seq_lens) {
      max_blocks = std::max<std::int64_t>(max_blocks, (len + c.page_size - 1) / c.page_size);
      pages += (len + c.page_size - 1) / c.page_size;
    }
    const bool fp8 = c.cache == kvkit::DType::kFloat8E4M3;
    const auto l16 = kvkit::LatentKVLayout::dense(pages, c.page_size, 512, 64);
    const auto l8 = kvkit::LatentFp8Layout::dense(pages, c.page_size);
    cache.assign(fp8 ? std::size_t(l8.span_bytes()) : std::size_t(pages * l16.stride_page * 2), 0xFF);  // NaN
    std::vector<std::int32_t> pool(static_cast<std::size_t>(pages));
    std::iota(pool.begin(), pool.end(), 0);
    std::shuffle(pool.begin(), pool.end(), rng);
    table.assign(std::size_t(std::max<std::int64_t>(1, std::int64_t(c.seq_lens.size()) * max_blocks)), -1);
    std::size_t next = 0;
    float row[576];
    for (std::size_t b = 0; b < c.seq_lens.size(); ++b) {
      lens.push_back(c.seq_lens[b]);
      for (int t = 0; t < c.seq_lens[b]; ++t) {
        if (t % c.page_size == 0) table[b * max_blocks + t / c.page_size] = pool[next++];
        const std::int64_t slot = std::int64_t(table[b * max_blocks + t / c.page_size]) * c.page_size + t % c.page_size;
        for (float& x : row) x = 0.5f * normal(rng);
        for (int d = 0; d < 512; ++d) vmax = std::max(vmax, std::fabs(row[d]));
        if (fp8) {
          kvkit::mla_fp8_quantize_row(row, cache.data() + l8.slot_offset(slot));
        } else {
          for (int d = 0; d < 576; ++d) {
            const std::uint16_t bits = c.cache == kvkit::DType::kFloat16 ? kvkit::half(row[d]).bits
                                                                          : kvkit::bfloat16(row[d]).bits;
            std::memcpy(cache.data() + 2 * (l16.slot_offset(slot) + d), &bits, 2);
          }
        }
      }
    }
    const std::size_t rows = c.seq_lens.size() * std::size_t(c.q_len) * c.heads;
    q.resize(rows * 576);
    for (auto& x : q) x = kvkit::from_float<QT>(c.zero_q ? 0.0f : 0.5f * normal(rng));
    o_cpu.assign(rows * (512 + kPad), poison);
    o_gpu = o_cpu;
    lse_cpu.assign(rows, -777.0f);
    lse_gpu = lse_cpu;
  }

  // Params with host pointers (the CPU op's).
  PagedDecodeParams params() {
    const bool fp8 = c.cache == kvkit::DType::kFloat8E4M3;
    PagedDecodeParams p =
        fp8 ? kvkit::mla_decode_params_fp8(config, kvkit::LatentFp8Layout::dense(pages, c.page_size), cache.data())
            : kvkit::mla_decode_params(config, kvkit::LatentKVLayout::dense(pages, c.page_size, 512, 64),
                                       cache.data(), c.cache);
    p.q = q.data();
    p.q_stride_head = 576;
    p.q_stride_token = std::int64_t(c.heads) * 576;
    p.q_len = c.q_len;
    p.page_table = {table.data(), lens.data(), std::int64_t(c.seq_lens.size()), max_blocks, max_blocks};
    p.o = o_cpu.data();
    p.o_stride_head = 512 + kPad;
    p.o_stride_token = std::int64_t(c.heads) * (512 + kPad);
    p.lse = lse_cpu.data();
    p.q_dtype = kvkit::dtype_of<QT>;
    p.window = c.window;
    p.num_sinks = c.sinks;
    p.logit_softcap = c.softcap;
    p.kv_begin = c.kv_begin;
    p.kv_end = c.kv_end;
    return p;
  }

  MlaDecodeKernel kernel = MlaDecodeKernel::kCudaCores;  // the one the last run used
  bool in_graph = false;  // run the GPU op captured in a CUDA graph (replayed twice)

  // Runs the CPU op and the GPU op; returns the plan's split count.
  int run(const DecodePlanOptions& options, MlaDecodeKernel choice = MlaDecodeKernel::kCudaCores) {
    PagedDecodeParams p = params();
    kvkit::mla_decode_attention(p);
    auto d_q = DeviceBuffer::from_host(q);
    auto d_cache = DeviceBuffer::from_host(cache);
    auto d_table = DeviceBuffer::from_host(table);
    auto d_lens = DeviceBuffer::from_host(lens);
    auto d_o = DeviceBuffer::from_host(o_gpu);
    auto d_lse = DeviceBuffer::from_host(lse_gpu);
    PagedDecodeParams g = p;
    g.q = d_q.data();
    g.k_cache = g.v_cache = d_cache.data();
    g.page_table.block_table = d_table.as<std::int32_t>();
    g.page_table.seq_lens = d_lens.as<std::int32_t>();
    g.o = d_o.data();
    g.lse = d_lse.as<float>();
    const auto plan = kvkit::cuda::plan_mla_decode(g, lens.data(), num_sms(), options, choice);
    kernel = plan.kernel;
    DeviceBuffer workspace(std::max<std::size_t>(plan.workspace_bytes, 4));
    if (in_graph) {
      kvkit::testing::capture_and_replay([&](cudaStream_t stream) {
        kvkit::cuda::run_mla_decode(g, plan, workspace.data(), plan.workspace_bytes, stream);
      });
    } else {
      kvkit::cuda::run_mla_decode(g, plan, workspace.data(), plan.workspace_bytes);
    }
    KVKIT_CUDA_CHECK(cudaDeviceSynchronize());
    o_gpu = d_o.template to_host<QT>();
    lse_gpu = d_lse.template to_host<float>();
    return plan.num_splits;
  }

  void compare() const {
    const double rel = rel_tolerance<QT>();
    double omax = 0.0;
    for (const QT& x : o_cpu) omax = std::max(omax, std::fabs(double(kvkit::to_float(x))));
    const double p_rounding = kernel != MlaDecodeKernel::kTensorCores              ? 0.0
                              : std::is_same<QT, kvkit::bfloat16>::value ? 1e-2 * omax
                                                                          : 2e-3 * omax;
    for (std::size_t i = 0; i < o_cpu.size(); ++i) {
      if (i % (512 + kPad) >= 512) {
        REQUIRE(std::memcmp(&o_gpu[i], &poison, sizeof(QT)) == 0);
        continue;
      }
      const double want = kvkit::to_float(o_cpu[i]), got = kvkit::to_float(o_gpu[i]);
      if (!(std::fabs(got - want) <= 2e-5 * vmax + rel * std::fabs(want) + p_rounding)) {
        FAIL("o[" << i << "] (row " << i / (512 + kPad) << ", column " << i % (512 + kPad) << "): GPU " << got
                  << ", CPU " << want);
      }
    }
    for (std::size_t r = 0; r < lse_cpu.size(); ++r) {
      if (lse_cpu[r] == -INFINITY) {
        REQUIRE(lse_gpu[r] == -INFINITY);
      } else {
        REQUIRE(std::fabs(double(lse_gpu[r]) - lse_cpu[r]) <= 2e-5 * std::max(1.0, std::fabs(double(lse_cpu[r]))));
      }
    }
  }
};

DecodePlanOptions unsplit() {
  DecodePlanOptions o;
  o.max_splits = 1;
  return o;
}
DecodePlanOptions chunks_of(std::int64_t keys) {
  DecodePlanOptions o;
  o.chunk_keys = keys;
  return o;
}

template <class QT>
void check(const MlaCase& c, const DecodePlanOptions& options, std::uint64_t seed, int min_splits = 1,
           MlaDecodeKernel kernel = MlaDecodeKernel::kCudaCores) {
  MlaProblem<QT> pr(c, seed);
  const int splits = pr.run(options, kernel);
  CHECK(splits >= min_splits);
  CHECK((kernel == MlaDecodeKernel::kAuto || pr.kernel == kernel));
  pr.compare();
}

// The same checks on the tensor-core kernel.
template <class QT>
void check_tc(const MlaCase& c, const DecodePlanOptions& options, std::uint64_t seed, int min_splits = 1) {
  check<QT>(c, options, seed, min_splits, MlaDecodeKernel::kTensorCores);
}

}  // namespace

TEST_CASE("GPU MLA decode equals the CPU op: V2-Lite 16 heads, bf16 cache, page 64 and 1") {
  MlaCase c;
  c.heads = 16;
  c.seq_lens = {1, 63, 64, 65, 1000};
  for (int page : {64, 1}) {
    c.page_size = page;
    check<float>(c, unsplit(), 1);
    check<float>(c, chunks_of(64), 2, 2);
    check<kvkit::bfloat16>(c, {}, 3);
  }
}

TEST_CASE("GPU MLA decode equals the CPU op: V3 128 heads, long contexts, split and unsplit") {
  MlaCase c;
  c.heads = 128;
  c.seq_lens = {1, 65, 1000, 33000};
  check<kvkit::bfloat16>(c, {}, 4, 2);  // the heuristic splits the 33,000 keys
  check<kvkit::bfloat16>(c, unsplit(), 5);
  c.seq_lens = {33000};
  check<float>(c, chunks_of(1024), 6, 32);
}

TEST_CASE("a plan with mla_decode_kernel_for_current_device() runs on this GPU and equals the CPU op") {
  MlaCase c;
  c.heads = 128;
  c.seq_lens = {1, 700};
  const MlaDecodeKernel k = kvkit::cuda::mla_decode_kernel_for_current_device();
  int device = 0, major = 0;
  KVKIT_CUDA_CHECK(cudaGetDevice(&device));
  KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major == 9) CHECK(k == MlaDecodeKernel::kAuto);  // Hopper holds the tensor-core kernel
  check<kvkit::bfloat16>(c, {}, 41, 1, k);
}

TEST_CASE("GPU MLA decode captured in a CUDA graph and replayed equals the CPU op (split)") {
  MlaCase c;
  c.heads = 128;
  c.seq_lens = {65, 5000};
  MlaProblem<kvkit::bfloat16> pr(c, 43);
  pr.in_graph = true;
  CHECK(pr.run(chunks_of(1024), kvkit::cuda::mla_decode_kernel_for_current_device()) > 1);
  pr.compare();
}

TEST_CASE("GPU MLA decode over the fp8 cache (656-byte rows) equals the CPU op") {
  MlaCase c;
  c.cache = kvkit::DType::kFloat8E4M3;
  c.heads = 16;
  c.seq_lens = {1, 63, 64, 65, 1000};
  check<float>(c, unsplit(), 7);
  check<kvkit::bfloat16>(c, chunks_of(128), 8, 2);
  c.page_size = 1;
  check<float>(c, {}, 9);
  c.page_size = 64;
  c.heads = 128;
  c.seq_lens = {65, 33000};
  check<kvkit::bfloat16>(c, {}, 10, 2);
}

TEST_CASE("GPU MLA decode: fp16 cache, q_len 2, window with sinks, soft-cap and key ranges") {
  MlaCase c;
  c.cache = kvkit::DType::kFloat16;
  c.heads = 20;  // 40 rows: two row chunks of 20
  c.q_len = 2;
  c.page_size = 16;
  c.seq_lens = {2, 64, 700};
  c.window = 100;
  c.sinks = 4;
  c.softcap = 30.0f;
  check<kvkit::half>(c, unsplit(), 11);
  check<kvkit::half>(c, chunks_of(64), 12, 2);
  c.window = 0;
  c.sinks = 0;
  c.kv_begin = 60;
  c.kv_end = 500;  // sequences 0 and 1 see nothing or part: o = 0, lse = -inf where empty
  check<float>(c, chunks_of(64), 13, 2);
}

TEST_CASE("GPU MLA decode attends to exactly the visible keys (q = 0: lse = log count)") {
  for (auto dtype : {kvkit::DType::kBFloat16, kvkit::DType::kFloat8E4M3}) {
    MlaCase c;
    c.cache = dtype;
    c.heads = 16;
    c.q_len = 2;
    c.seq_lens = {2, 65, 1000, 4097};
    c.window = 300;
    c.sinks = 2;
    c.zero_q = true;
    MlaProblem<float> pr(c, 14);
    pr.run(chunks_of(128));
    pr.compare();
    for (std::size_t b = 0; b < c.seq_lens.size(); ++b) {
      for (int i = 0; i < 2; ++i) {
        const std::int64_t pos = c.seq_lens[b] - 2 + i;
        std::int64_t count = 0;
        for (std::int64_t k = 0; k <= pos; ++k) count += (k > pos - 300 || k < 2) ? 1 : 0;
        const std::size_t r = (b * 2 + std::size_t(i)) * 16;
        REQUIRE(pr.lse_gpu[r] == Approx(std::log(double(count))).epsilon(1e-6));
      }
    }
  }
}

TEST_CASE("GPU MLA decode rejects what it is not built for, launching nothing") {
  MlaProblem<float> pr(MlaCase{}, 15);
  PagedDecodeParams p = pr.params();
  const auto plan = kvkit::cuda::plan_mla_decode(p, pr.lens.data(), 132);
  SECTION("a float32 cache") {
    p.kv_dtype = kvkit::DType::kFloat32;
    CHECK_THROWS_WITH(kvkit::cuda::run_mla_decode(p, plan, nullptr, 0), Contains("'kv_dtype' = float32"));
  }
  SECTION("a latent width other than 512 + 64") {
    p.layout.head_dim = 320;
    p.v_head_dim = 256;
    CHECK_THROWS_WITH(kvkit::cuda::run_mla_decode(p, plan, nullptr, 0), Contains("'layout.head_dim' = 320"));
  }
  SECTION("values from another buffer than the keys (the kernels read them from k_cache)") {
    p.v_cache = pr.q.data();
    CHECK_THROWS_WITH(kvkit::cuda::run_mla_decode(p, plan, nullptr, 0), Contains("equal to k_cache"));
  }
  SECTION("a plan for another shape") {
    p.q_len = 2;
    CHECK_THROWS_WITH(kvkit::cuda::run_mla_decode(p, plan, nullptr, 0), Contains("plan_mla_decode again"));
  }
  SECTION("the generic decode keeps rejecting narrower values") {
    CHECK_THROWS_WITH(kvkit::cuda::plan_decode(p, pr.lens.data(), 132), Contains("v_head_dim"));
  }
}

TEST_CASE("GPU MLA decode on tensor cores equals the CPU op: V2-Lite 16 heads, q_len 1 and 2, pages 64 and 16") {
  MlaCase c;
  c.heads = 16;
  c.seq_lens = {1, 63, 64, 65, 1000, 5000};
  std::uint64_t seed = 100;
  for (int q_len : {1, 2}) {
    for (int page : {64, 16}) {
      c.q_len = q_len;
      c.page_size = page;
      c.cache = kvkit::DType::kBFloat16;
      check_tc<kvkit::bfloat16>(c, unsplit(), seed++);
      check_tc<kvkit::bfloat16>(c, chunks_of(128), seed++, 2);
      c.cache = kvkit::DType::kFloat16;
      check_tc<kvkit::half>(c, unsplit(), seed++);
      check_tc<kvkit::half>(c, chunks_of(192), seed++, 2);
    }
  }
}

TEST_CASE("GPU MLA decode on tensor cores equals the CPU op: V3 128 heads (2 and 4 row chunks), split and unsplit") {
  MlaCase c;
  c.heads = 128;
  c.seq_lens = {1, 63, 64, 65, 1000, 5000};
  std::uint64_t seed = 200;
  for (int q_len : {1, 2}) {
    c.q_len = q_len;
    c.page_size = q_len == 1 ? 64 : 16;
    c.cache = kvkit::DType::kBFloat16;
    check_tc<kvkit::bfloat16>(c, unsplit(), seed++);
    check_tc<kvkit::bfloat16>(c, {}, seed++);  // the plan's own split choice
    check_tc<kvkit::bfloat16>(c, chunks_of(1024), seed++, 2);
    c.cache = kvkit::DType::kFloat16;
    check_tc<kvkit::half>(c, chunks_of(320), seed++, 2);
  }
}

TEST_CASE("GPU MLA decode on tensor cores: rows that do not fill the 64-row tile, and idle row groups") {
  MlaCase c;
  c.seq_lens = {7, 64, 129};
  std::uint64_t seed = 300;
  for (int heads : {1, 5, 20, 33}) {  // 1, 5: 3 idle row groups; 33 x 2 = 66 rows: 2 chunks of 33
    c.heads = heads;
    c.q_len = heads == 33 ? 2 : 1;
    check_tc<kvkit::bfloat16>(c, unsplit(), seed++);
    check_tc<kvkit::bfloat16>(c, chunks_of(64), seed++, 2);
  }
}

TEST_CASE("GPU MLA decode on tensor cores: fp16, q_len 2, window with sinks, soft-cap and key ranges") {
  MlaCase c;
  c.cache = kvkit::DType::kFloat16;
  c.heads = 20;
  c.q_len = 2;
  c.page_size = 16;
  c.seq_lens = {2, 64, 700};
  c.window = 100;
  c.sinks = 4;
  c.softcap = 30.0f;
  check_tc<kvkit::half>(c, unsplit(), 301);
  check_tc<kvkit::half>(c, chunks_of(64), 302, 2);
  c.window = 0;
  c.sinks = 0;
  c.kv_begin = 60;
  c.kv_end = 500;  // sequences 0 and 1 see nothing or part: o = 0, lse = -inf where empty
  check_tc<kvkit::half>(c, chunks_of(64), 303, 2);
  check_tc<kvkit::half>(c, unsplit(), 304);
}

TEST_CASE("GPU MLA decode on tensor cores attends to exactly the visible keys (q = 0: lse = log count)") {
  MlaCase c;
  c.heads = 16;
  c.q_len = 2;
  c.seq_lens = {2, 65, 1000, 4097};
  c.window = 300;
  c.sinks = 2;
  c.zero_q = true;
  for (const auto& options : {unsplit(), chunks_of(128)}) {
    MlaProblem<kvkit::bfloat16> pr(c, 305);
    pr.run(options, MlaDecodeKernel::kTensorCores);
    pr.compare();
    for (std::size_t b = 0; b < c.seq_lens.size(); ++b) {
      for (int i = 0; i < 2; ++i) {
        const std::int64_t pos = c.seq_lens[b] - 2 + i;
        std::int64_t count = 0;
        for (std::int64_t k = 0; k <= pos; ++k) count += (k > pos - 300 || k < 2) ? 1 : 0;
        for (int head = 0; head < 16; ++head) {
          const std::size_t r = (b * 2 + std::size_t(i)) * 16 + std::size_t(head);
          REQUIRE(pr.lse_gpu[r] == Approx(std::log(double(count))).epsilon(1e-6));
        }
      }
    }
  }
}

TEST_CASE("GPU MLA decode picks tensor cores by default for bf16 with 16+ heads, and they agree with CUDA cores") {
  MlaCase c;
  c.heads = 16;
  c.seq_lens = {65, 1000};
  MlaProblem<kvkit::bfloat16> tc(c, 306), cores(c, 306);
  tc.run({}, MlaDecodeKernel::kAuto);
  CHECK(tc.kernel == MlaDecodeKernel::kTensorCores);
  tc.compare();
  cores.run({}, MlaDecodeKernel::kCudaCores);
  cores.compare();
  double omax = 0.0;
  for (const auto& x : cores.o_gpu) omax = std::max(omax, std::fabs(double(kvkit::to_float(x))));
  for (std::size_t i = 0; i < tc.o_gpu.size(); ++i) {
    REQUIRE(std::fabs(kvkit::to_float(tc.o_gpu[i]) - kvkit::to_float(cores.o_gpu[i])) <= 2e-2 * omax + 1e-6);
  }
}
