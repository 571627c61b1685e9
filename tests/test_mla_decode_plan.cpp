// plan_mla_decode (host only): row chunks, split-KV choices, workspace size,
// and the errors for shapes and caches the GPU kernel is not built for.

#include <catch2/catch.hpp>

#include <cstdint>
#include <vector>

#include "kvkit/cuda/mla_decode_plan.hpp"

using Catch::Matchers::Contains;
using kvkit::MlaConfig;
using kvkit::PagedDecodeParams;
using kvkit::cuda::DecodePlanOptions;
using kvkit::cuda::MlaDecodeKernel;
using kvkit::cuda::plan_mla_decode;

namespace {

// Params over a fake (never read) bf16 or fp8 cache of `pages` pages of 64.
struct PlanCase {
  std::vector<std::int32_t> table, lens;
  std::int64_t max_blocks;
  PagedDecodeParams p;
  int dummy = 0;

  PlanCase(int heads, int q_len, std::vector<std::int32_t> seq_lens, bool fp8 = false)
      : lens(std::move(seq_lens)) {
    std::int32_t longest = 1;
    for (auto l : lens) longest = std::max(longest, l);
    max_blocks = (longest + 63) / 64;
    table.assign(lens.size() * std::size_t(max_blocks), 0);
    MlaConfig c = MlaConfig::deepseek_v3();
    c.n_heads = heads;
    const auto* cache = reinterpret_cast<const std::uint8_t*>(&dummy);
    p = fp8 ? kvkit::mla_decode_params_fp8(c, kvkit::LatentFp8Layout::dense(1, 64), cache)
            : kvkit::mla_decode_params(c, kvkit::LatentKVLayout::dense(1, 64, 512, 64), cache, kvkit::DType::kBFloat16);
    p.q = p.o = &dummy;
    p.q_len = q_len;
    p.q_stride_head = 576;
    p.q_stride_token = std::int64_t(heads) * 576;
    p.o_stride_head = 512;
    p.o_stride_token = std::int64_t(heads) * 512;
    p.q_dtype = kvkit::DType::kBFloat16;
    p.page_table = {table.data(), lens.data(), std::int64_t(lens.size()), max_blocks, max_blocks};
  }
};

}  // namespace

TEST_CASE("MLA plan on CUDA cores cuts the query rows into equal chunks of at most 32") {
  const auto cores = [](PlanCase c) {
    return plan_mla_decode(c.p, c.lens.data(), 132, {}, MlaDecodeKernel::kCudaCores);
  };
  auto plan = cores(PlanCase(128, 1, {100}));
  CHECK(plan.kernel == MlaDecodeKernel::kCudaCores);
  CHECK(plan.row_chunks == 4);
  CHECK(plan.rows_per_chunk == 32);
  plan = cores(PlanCase(16, 2, {100}));
  CHECK(plan.row_chunks == 1);
  CHECK(plan.rows_per_chunk == 32);
  plan = cores(PlanCase(33, 1, {100}));
  CHECK(plan.row_chunks == 2);
  CHECK(plan.rows_per_chunk == 17);
  plan = cores(PlanCase(1, 1, {1}));
  CHECK(plan.row_chunks == 1);
  CHECK(plan.rows_per_chunk == 1);
}

TEST_CASE("MLA plan on tensor cores cuts the query rows into equal chunks of at most 64") {
  const auto tensor = [](PlanCase c) {
    return plan_mla_decode(c.p, c.lens.data(), 132, {}, MlaDecodeKernel::kTensorCores);
  };
  auto plan = tensor(PlanCase(128, 1, {100}));
  CHECK(plan.kernel == MlaDecodeKernel::kTensorCores);
  CHECK(plan.row_chunks == 2);
  CHECK(plan.rows_per_chunk == 64);
  plan = tensor(PlanCase(128, 2, {100}));  // 256 rows: 4 x 64
  CHECK(plan.row_chunks == 4);
  CHECK(plan.rows_per_chunk == 64);
  plan = tensor(PlanCase(65, 1, {100}));
  CHECK(plan.row_chunks == 2);
  CHECK(plan.rows_per_chunk == 33);
  plan = tensor(PlanCase(20, 2, {100}));
  CHECK(plan.row_chunks == 1);
  CHECK(plan.rows_per_chunk == 40);
  plan = tensor(PlanCase(1, 1, {1}));  // forced: allowed, if wasteful
  CHECK(plan.rows_per_chunk == 1);
}

TEST_CASE("MLA plan picks tensor cores for bf16/fp16 with q of the cache's dtype and >= 16 rows per sequence") {
  const auto pick = [](PlanCase c) { return plan_mla_decode(c.p, c.lens.data(), 132).kernel; };
  CHECK(pick(PlanCase(128, 1, {100})) == MlaDecodeKernel::kTensorCores);
  CHECK(pick(PlanCase(16, 1, {100})) == MlaDecodeKernel::kTensorCores);
  CHECK(pick(PlanCase(8, 2, {100})) == MlaDecodeKernel::kTensorCores);
  CHECK(pick(PlanCase(15, 1, {100})) == MlaDecodeKernel::kCudaCores);  // too few rows to fill a 16-row mma
  PlanCase fp16(16, 1, {100});
  fp16.p.q_dtype = fp16.p.kv_dtype = kvkit::DType::kFloat16;
  CHECK(pick(fp16) == MlaDecodeKernel::kTensorCores);
  PlanCase float_q(128, 1, {100});
  float_q.p.q_dtype = kvkit::DType::kFloat32;  // not an mma operand: CUDA cores
  CHECK(pick(float_q) == MlaDecodeKernel::kCudaCores);
  CHECK(pick(PlanCase(128, 1, {100}, true)) == MlaDecodeKernel::kCudaCores);  // fp8 rows
  SECTION("asking for tensor cores where they do not apply is an error") {
    CHECK_THROWS_WITH(plan_mla_decode(float_q.p, float_q.lens.data(), 132, {}, MlaDecodeKernel::kTensorCores),
                      Contains("'kv_dtype' = bfloat16: expected bfloat16 or float16 with q_dtype the same (got "
                               "float32) for the tensor-core kernel"));
    PlanCase fp8(128, 1, {100}, true);
    CHECK_THROWS_WITH(plan_mla_decode(fp8.p, fp8.lens.data(), 132, {}, MlaDecodeKernel::kTensorCores),
                      Contains("'kv_dtype' = float8_e4m3"));
  }
}

TEST_CASE("MLA plan splits long contexts evenly and sizes the workspace") {
  PlanCase single(128, 1, {32768});
  for (const auto kernel : {MlaDecodeKernel::kCudaCores, MlaDecodeKernel::kTensorCores}) {
    const auto plan = plan_mla_decode(single.p, single.lens.data(), 132, {}, kernel);
    CHECK(plan.num_splits > 1);
    CHECK(plan.chunk_keys % 64 == 0);
    CHECK(plan.num_splits == (32768 + plan.chunk_keys - 1) / plan.chunk_keys);
    CHECK(plan.workspace_bytes == std::size_t(plan.num_splits) * 128 * 513 * 4);
  }
  // CUDA cores, 64 x 4,096 with 4 row chunks is 256 blocks, just under 2 x 132: two even halves.
  PlanCase batch(128, 1, std::vector<std::int32_t>(64, 4096));
  auto plan = plan_mla_decode(batch.p, batch.lens.data(), 132, {}, MlaDecodeKernel::kCudaCores);
  CHECK(plan.num_splits == 2);
  CHECK(plan.chunk_keys == 2048);
  // Tensor cores (one block per SM): 64 x 2 row chunks = 128 blocks fill 132 SMs unsplit.
  plan = plan_mla_decode(batch.p, batch.lens.data(), 132);
  CHECK(plan.kernel == MlaDecodeKernel::kTensorCores);
  CHECK(plan.num_splits == 1);
  CHECK(plan.workspace_bytes == 0);
  // ... but 16 sequences (32 blocks) leave most SMs idle: split to about one block per SM.
  PlanCase few(128, 1, std::vector<std::int32_t>(16, 4096));
  plan = plan_mla_decode(few.p, few.lens.data(), 132);
  CHECK(plan.num_splits == 4);
  CHECK(plan.chunk_keys == 1024);
  // Enough blocks without splitting: no workspace.
  plan = plan_mla_decode(batch.p, batch.lens.data(), 100, {}, MlaDecodeKernel::kCudaCores);
  CHECK(plan.num_splits == 1);
  CHECK(plan.workspace_bytes == 0);
  DecodePlanOptions off;
  off.max_splits = 1;
  plan = plan_mla_decode(single.p, single.lens.data(), 132, off);
  CHECK(plan.num_splits == 1);
  CHECK(plan.workspace_bytes == 0);
  DecodePlanOptions fixed;
  fixed.chunk_keys = 1000;
  plan = plan_mla_decode(single.p, single.lens.data(), 132, fixed);
  CHECK(plan.num_splits == 33);
  CHECK(plan.chunk_keys == 1000);
}

TEST_CASE("MLA plan accepts the fp8 cache and rejects what the kernel is not built for") {
  PlanCase fp8(16, 1, {300}, true);
  CHECK(plan_mla_decode(fp8.p, fp8.lens.data(), 132).kv_dtype == kvkit::DType::kFloat8E4M3);
  PlanCase c(16, 1, {300});
  SECTION("float32 cache") {
    c.p.kv_dtype = kvkit::DType::kFloat32;
    CHECK_THROWS_WITH(plan_mla_decode(c.p, c.lens.data(), 132), Contains("'kv_dtype' = float32"));
  }
  SECTION("another latent width") {
    c.p.layout.head_dim = 320;
    c.p.layout.stride_head = 320;
    c.p.v_head_dim = 256;
    CHECK_THROWS_WITH(plan_mla_decode(c.p, c.lens.data(), 132), Contains("'layout.head_dim' = 320"));
  }
  SECTION("values other than the 512 c_kv columns") {
    c.p.v_head_dim = 0;
    c.p.o_stride_head = 576;
    c.p.o_stride_token = 16 * 576;
    CHECK_THROWS_WITH(plan_mla_decode(c.p, c.lens.data(), 132), Contains("'v_head_dim' = 0"));
  }
  SECTION("fp8 rows narrower than 656 bytes") {
    fp8.p.layout.stride_slot = 640;
    fp8.p.layout.stride_page = 64 * 640;
    CHECK_THROWS_WITH(plan_mla_decode(fp8.p, fp8.lens.data(), 132), Contains("'layout.stride_slot' = 640"));
  }
  SECTION("a length beyond the page table") {
    const std::int32_t longer = 1000;
    CHECK_THROWS_WITH(plan_mla_decode(c.p, &longer, 132), Contains("host_seq_lens[0] = 1000"));
  }
  SECTION("no SMs") {
    CHECK_THROWS_WITH(plan_mla_decode(c.p, c.lens.data(), 0), Contains("'num_sms' = 0"));
  }
}

TEST_CASE("MLA blocks cover every (sequence, query row, key of the span) exactly once") {
  // The kernels' block -> work mapping (mla_block_work) over a plan's grid,
  // for both kernels, split and unsplit, ragged lengths.
  PlanCase c(40, 2, {2, 63, 64, 65, 5000, 777});
  for (const auto kernel : {MlaDecodeKernel::kCudaCores, MlaDecodeKernel::kTensorCores}) {
    for (const std::int64_t chunk : {std::int64_t(0), std::int64_t(64), std::int64_t(1024)}) {
      DecodePlanOptions options;
      options.chunk_keys = chunk;
      options.max_splits = chunk > 0 ? 128 : 1;
      const auto plan = plan_mla_decode(c.p, c.lens.data(), 132, options, kernel);
      kvkit::cuda::detail::MlaLaunch L;
      L.chunk_keys = plan.num_splits > 1 ? plan.chunk_keys : 0;
      L.num_splits = plan.num_splits;
      L.row_chunks = plan.row_chunks;
      L.rows_per_chunk = plan.rows_per_chunk;
      const int rows = c.p.q_len * c.p.num_q_heads;
      std::vector<std::vector<int>> seen(c.lens.size());
      for (std::size_t b = 0; b < c.lens.size(); ++b) seen[b].assign(std::size_t(rows) * std::size_t(c.lens[b]), 0);
      const std::int64_t blocks = std::int64_t(c.lens.size()) * plan.num_splits * plan.row_chunks;
      for (std::int64_t block = 0; block < blocks; ++block) {
        const auto w = kvkit::cuda::detail::mla_block_work(c.p, L, block);
        if (!w.active) continue;
        REQUIRE(w.rows > 0);
        REQUIRE(w.row_begin + w.rows <= rows);
        REQUIRE(w.key_begin < w.key_end);
        REQUIRE(w.key_end <= w.span.size());
        for (int r = w.row_begin; r < w.row_begin + w.rows; ++r) {
          for (std::int64_t k = w.key_begin; k < w.key_end; ++k) {
            ++seen[std::size_t(w.b)][std::size_t(r) * std::size_t(c.lens[std::size_t(w.b)]) + std::size_t(w.span.position(k))];
          }
        }
      }
      for (std::size_t b = 0; b < c.lens.size(); ++b) {
        INFO("kernel " << int(kernel) << " chunk " << chunk << " sequence " << b);
        for (int x : seen[b]) REQUIRE(x == 1);
      }
    }
  }
}
