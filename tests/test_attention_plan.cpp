// The host half of the GPU decode attention: the key span that split-KV
// divides (attention_key_span, shared with the kernels), chunk counting, and
// plan_decode's choices and checks. Plain C++: runs without a GPU.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kvkit/cuda/decode_plan.hpp"

using Catch::Matchers::Contains;
using kvkit::PagedDecodeParams;
using kvkit::cuda::DecodePlan;
using kvkit::cuda::DecodePlanOptions;

TEST_CASE("attention_key_span holds every key some query row sees, in order, and no key none sees") {
  std::mt19937 rng(3);
  int checked = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    PagedDecodeParams p;
    const std::int64_t seq_len = std::uniform_int_distribution<int>(0, 60)(rng);
    p.q_len = std::uniform_int_distribution<int>(1, 5)(rng);
    p.window = std::uniform_int_distribution<int>(0, 3)(rng) == 0 ? 0 : std::uniform_int_distribution<int>(1, 20)(rng);
    p.num_sinks = std::uniform_int_distribution<int>(0, 6)(rng);
    p.kv_begin = std::uniform_int_distribution<int>(0, 3)(rng) == 0 ? std::uniform_int_distribution<int>(0, 70)(rng) : 0;
    p.kv_end = std::uniform_int_distribution<int>(0, 3)(rng) == 0 ? std::uniform_int_distribution<int>(int(p.kv_begin), 80)(rng)
                                                                  : INT64_MAX;
    const kvkit::AttentionKeySpan span = kvkit::attention_key_span(p, seq_len);
    INFO("seq_len " << seq_len << " q_len " << p.q_len << " window " << p.window << " sinks " << p.num_sinks
                    << " keys [" << p.kv_begin << ", " << p.kv_end << ")");
    REQUIRE(span.begin <= span.first_end);
    REQUIRE(span.first_end <= span.second_begin);
    REQUIRE(span.second_begin <= span.end);
    std::vector<bool> in_span(std::size_t(seq_len) + 1, false);
    for (std::int64_t i = 0; i < span.size(); ++i) {
      const std::int64_t pos = span.position(i);
      REQUIRE(pos >= 0);
      REQUIRE(pos < seq_len);
      if (i > 0) REQUIRE(pos > span.position(i - 1));
      in_span[std::size_t(pos)] = true;
    }
    for (std::int64_t k = 0; k < seq_len; ++k) {
      bool seen = false;
      for (int i = 0; i < p.q_len; ++i) seen = seen || kvkit::attention_visible(p, seq_len - p.q_len + i, k);
      // Keys in the span may be hidden from every row only at the causal or
      // window edge of the q_len rows; with q_len = 1 the span is exact.
      if (seen) REQUIRE(in_span[std::size_t(k)]);
      if (p.q_len == 1 && seq_len >= 1) REQUIRE(seen == in_span[std::size_t(k)]);
      ++checked;
    }
  }
  CHECK(checked > 10000);
}

TEST_CASE("decode_num_chunks covers the keys with at most max chunks, at least one") {
  using kvkit::cuda::detail::decode_num_chunks;
  CHECK(decode_num_chunks(0, 64, 8) == 1);
  CHECK(decode_num_chunks(100, 0, 8) == 1);
  CHECK(decode_num_chunks(64, 64, 8) == 1);
  CHECK(decode_num_chunks(65, 64, 8) == 2);
  CHECK(decode_num_chunks(10000, 64, 8) == 8);  // the last chunk takes the rest
}

namespace {

// Params whose arrays the plan never reads beyond seq_lens: dummy buffers.
struct PlanInputs {
  std::vector<std::int32_t> table, lens;
  std::vector<float> dummy = std::vector<float>(16);
  PagedDecodeParams p;

  // q_dtype equals kv_dtype for float caches and is bfloat16 for quantized
  // ones, which then get per-tensor scales.
  PlanInputs(std::int64_t batch, int context, int q_heads, int kv_heads, int head_dim, kvkit::DType kv_dtype,
             int q_len = 1, int page = 16) {
    const std::int64_t pages_per_seq = (context + page - 1) / page;
    table.assign(std::size_t(batch * pages_per_seq), 0);
    lens.assign(std::size_t(batch), context);
    p.q = p.o = dummy.data();
    p.k_cache = p.v_cache = dummy.data();
    p.layout = kvkit::PagedKVLayout::nhd(batch * pages_per_seq, page, kv_heads, head_dim);
    p.page_table = {table.data(), lens.data(), batch, pages_per_seq, pages_per_seq};
    p.q_len = q_len;
    p.num_q_heads = q_heads;
    p.q_stride_head = p.o_stride_head = head_dim;
    p.q_stride_token = p.o_stride_token = std::int64_t(q_heads) * head_dim;
    p.sm_scale = 1.0f / std::sqrt(float(head_dim));
    p.q_dtype = kvkit::is_quantized_cache_dtype(kv_dtype) ? kvkit::DType::kBFloat16 : kv_dtype;
    p.kv_dtype = kv_dtype;
    if (kvkit::is_quantized_cache_dtype(kv_dtype)) {
      p.k_scale = dummy.data();
      p.v_scale = dummy.data() + 1;
    }
  }
  DecodePlan plan(int num_sms = 132, const DecodePlanOptions& options = {}) const {
    return kvkit::cuda::plan_decode(p, lens.data(), num_sms, options);
  }
};

}  // namespace

TEST_CASE("plan_decode splits the keys only when the sequences would not fill the GPU") {
  const auto bf16 = kvkit::DType::kBFloat16;
  SECTION("Llama-3-8B, batch 64 x 4096: 512 blocks, no split, no workspace") {
    const DecodePlan plan = PlanInputs(64, 4096, 32, 8, 128, bf16).plan();
    CHECK(plan.num_splits == 1);
    CHECK(plan.chunk_keys == 0);
    CHECK(plan.workspace_bytes == 0);
    CHECK(plan.row_chunks == 1);
    CHECK(plan.rows_per_chunk == 4);
  }
  SECTION("Llama-3-8B, batch 1 x 32768: 8 blocks become 256") {
    const DecodePlan plan = PlanInputs(1, 32768, 32, 8, 128, bf16).plan();
    // 32768 keys x 8 heads over 2 x 132 blocks: 993 -> 1024 keys per chunk.
    CHECK(plan.chunk_keys == 1024);
    CHECK(plan.num_splits == 32);
    CHECK(plan.workspace_bytes == std::size_t(32) * 32 * (128 + 1) * sizeof(float));
  }
  SECTION("chunks are whole tiles: 64 keys, 128 for 1-byte caches at head_dim 64") {
    // 10000 keys x 8 heads over 264 blocks: 304 keys per chunk before rounding.
    CHECK(PlanInputs(1, 10000, 32, 8, 64, bf16).plan().chunk_keys == 320);
    CHECK(PlanInputs(1, 10000, 32, 8, 64, kvkit::DType::kFloat8E4M3).plan().chunk_keys == 384);
    CHECK(PlanInputs(1, 10000, 32, 8, 128, kvkit::DType::kFloat8E4M3).plan().chunk_keys == 320);
  }
  SECTION("short contexts are not cut below min_chunk_keys") {
    const DecodePlan plan = PlanInputs(1, 300, 32, 8, 128, bf16).plan();
    CHECK(plan.chunk_keys == 256);
    CHECK(plan.num_splits == 2);
  }
  SECTION("max_splits caps the chunks; 1 turns split-KV off") {
    DecodePlanOptions options;
    options.max_splits = 4;
    CHECK(PlanInputs(1, 32768, 32, 8, 128, bf16).plan(132, options).num_splits == 4);
    options.max_splits = 1;
    const DecodePlan off = PlanInputs(1, 32768, 32, 8, 128, bf16).plan(132, options);
    CHECK(off.num_splits == 1);
    CHECK(off.workspace_bytes == 0);
  }
  SECTION("an explicit chunk size is used as given") {
    DecodePlanOptions options;
    options.chunk_keys = 1000;
    const DecodePlan plan = PlanInputs(64, 4096, 32, 8, 128, bf16).plan(132, options);
    CHECK(plan.chunk_keys == 1000);
    CHECK(plan.num_splits == 5);
  }
  SECTION("query rows beyond one block's capacity go to several blocks of equal rows") {
    // bf16, head_dim 128: 16 lanes per row, 16 lane groups x 4 rows = 64 rows per block.
    const DecodePlan mqa = PlanInputs(8, 1000, 128, 1, 128, bf16).plan();
    CHECK(mqa.row_chunks == 2);
    CHECK(mqa.rows_per_chunk == 64);
    const DecodePlan spec = PlanInputs(8, 1000, 48, 8, 128, bf16, 3).plan();  // 3 x 6 = 18 rows
    CHECK(spec.row_chunks == 1);
    CHECK(spec.rows_per_chunk == 18);
    const DecodePlan odd = PlanInputs(2, 1000, 65, 1, 256, kvkit::DType::kFloat32).plan();  // 32 rows per block
    CHECK(odd.row_chunks == 3);
    CHECK(odd.rows_per_chunk == 22);
  }
}

TEST_CASE("plan_decode rejects what the GPU kernels cannot run, naming the argument") {
  PlanInputs in(2, 100, 8, 2, 128, kvkit::DType::kBFloat16, 2);
  SECTION("head_dim without a kernel") {
    in.p.layout = kvkit::PagedKVLayout::nhd(in.p.layout.num_pages, 16, 2, 80);
    CHECK_THROWS_WITH(in.plan(), Contains("'layout.head_dim' = 80: expected one of {48, 64, 96, 128, 256} on the GPU"));
  }
  SECTION("ragged queries (CPU op only)") {
    const std::int64_t indptr[3] = {0, 1, 2};
    in.p.q_indptr = indptr;
    CHECK_THROWS_WITH(in.plan(), Contains("'q_indptr' =") && Contains("one call per sequence"));
  }
  SECTION("dtype pair without a kernel") {
    in.p.q_dtype = kvkit::DType::kFloat16;
    CHECK_THROWS_WITH(in.plan(), Contains("q_dtype float16 with kv_dtype bfloat16: expected equal dtypes, "
                                          "float32 q with a bfloat16 cache, or float32 / float16 / bfloat16 q "
                                          "with a float8_e4m3, float8_e5m2 or int8 cache, on the GPU"));
  }
  SECTION("a host length shorter than q_len") {
    in.lens[1] = 1;
    CHECK_THROWS_WITH(in.plan(), Contains("sequence 1 has seq_len 1 < q_len (2)"));
  }
  SECTION("a negative host length, caught without the causal check") {
    in.p.causal = false;
    in.lens[1] = -1;
    CHECK_THROWS_WITH(in.plan(), Contains("host_seq_lens[1] = -1: expected >= 0"));
  }
  SECTION("a host length beyond the page table") {
    in.lens[0] = 113;  // 7 pages of 16 hold 112
    CHECK_THROWS_WITH(in.plan(), Contains("host_seq_lens[0] = 113: expected at most max_blocks x page_size (112)"));
  }
  SECTION("no host lengths") {
    CHECK_THROWS_WITH(kvkit::cuda::plan_decode(in.p, nullptr, 132), Contains("'host_seq_lens' = nullptr"));
  }
  SECTION("bad device facts and options") {
    CHECK_THROWS_WITH(in.plan(0), Contains("'num_sms' = 0: expected > 0"));
    DecodePlanOptions options;
    options.max_splits = 500;
    CHECK_THROWS_WITH(in.plan(132, options), Contains("'options.max_splits' = 500: expected in [1, 128]"));
  }
  SECTION("the CPU op's checks apply too") {
    in.p.num_q_heads = 7;
    CHECK_THROWS_WITH(in.plan(), Contains("'num_q_heads' = 7: expected a positive multiple of the kv heads (2)"));
    in.p.num_q_heads = 8;
    in.p.sm_scale = 0.0f;
    CHECK_THROWS_WITH(in.plan(), Contains("'sm_scale' = 0"));
  }
}

TEST_CASE("1-byte caches keep a 16-bit cache's lanes and rows per block, with tiles of twice the keys") {
  using namespace kvkit::cuda::detail;
  // A lane converts 8 elements of a 1-byte row (8 bytes), as many as of a bf16 row (16 bytes).
  CHECK(decode_fragment_elems(1) == 8);
  CHECK(decode_fragment_elems(2) == 8);
  CHECK(decode_fragment_elems(4) == 4);
  for (int head_dim : {48, 64, 96, 128, 256}) {
    INFO("head_dim " << head_dim);
    CHECK(decode_lanes(head_dim, 1) == decode_lanes(head_dim, 2));
    CHECK(decode_max_rows(head_dim, 1) == decode_max_rows(head_dim, 2));
    // 8 KiB tiles: twice the keys of bf16, at most 128.
    CHECK(decode_tile_keys(head_dim, 1) == std::min(128, 2 * decode_tile_keys(head_dim, 2)));
    CHECK(decode_tile_keys(head_dim, 1) * head_dim <= 8192);
  }
  CHECK(decode_tile_keys(128, 1) == 64);
  CHECK(decode_tile_keys(64, 1) == 128);
  CHECK(decode_tile_keys(256, 1) == 32);
  CHECK(decode_tile_keys(128, 2) == 32);
  CHECK(decode_tile_keys(128, 4) == 16);
  CHECK(decode_lanes(128, 1) == 16);
  CHECK(decode_lanes(256, 1) == 32);
  CHECK(decode_lanes(96, 1) == 16);  // 12 fragments, rounded up
}

TEST_CASE("plan_decode accepts fp8 and int8 caches with any float q dtype") {
  using kvkit::DType;
  for (DType kv : {DType::kFloat8E4M3, DType::kFloat8E5M2, DType::kInt8}) {
    for (DType q : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
      INFO(kvkit::dtype_name(q) << " q, " << kvkit::dtype_name(kv) << " cache");
      PlanInputs in(64, 4096, 32, 8, 128, kv);
      in.p.q_dtype = q;
      const DecodePlan plan = in.plan();
      CHECK(plan.q_dtype == q);
      CHECK(plan.kv_dtype == kv);
      CHECK(plan.num_splits == 1);
      CHECK(plan.row_chunks == 1);
      CHECK(plan.rows_per_chunk == 4);
      CHECK(plan.workspace_bytes == 0);
    }
  }
  SECTION("the workspace holds float partial states whatever the cache dtype") {
    const DecodePlan plan = PlanInputs(1, 32768, 32, 8, 128, DType::kFloat8E4M3).plan();
    CHECK(plan.chunk_keys == 1024);
    CHECK(plan.num_splits == 32);
    CHECK(plan.workspace_bytes == std::size_t(32) * 32 * (128 + 1) * sizeof(float));
  }
  SECTION("row capacity for 1-byte caches: 64 rows at head_dim 128, 32 at 256") {
    const DecodePlan mqa = PlanInputs(8, 1000, 128, 1, 128, DType::kInt8).plan();
    CHECK(mqa.row_chunks == 2);
    CHECK(mqa.rows_per_chunk == 64);
    const DecodePlan wide = PlanInputs(2, 1000, 65, 1, 256, DType::kFloat8E5M2).plan();
    CHECK(wide.row_chunks == 3);
    CHECK(wide.rows_per_chunk == 22);
  }
  SECTION("every scale granularity") {
    for (kvkit::ScaleGranularity g : {kvkit::ScaleGranularity::kPerTensor, kvkit::ScaleGranularity::kPerHead,
                                      kvkit::ScaleGranularity::kPerTokenHead}) {
      PlanInputs in(4, 500, 8, 2, 64, DType::kFloat8E4M3);
      in.p.kv_scale_granularity = g;
      CHECK(in.plan().kv_dtype == DType::kFloat8E4M3);
    }
  }
}

TEST_CASE("plan_decode asks for scales with quantized caches and refuses them with float ones") {
  using kvkit::DType;
  SECTION("fp8 without k scales") {
    PlanInputs in(2, 100, 8, 2, 128, DType::kFloat8E4M3);
    in.p.k_scale = nullptr;
    CHECK_THROWS_WITH(in.plan(), Contains("'k_scale' = nullptr: expected a non-null pointer for a float8_e4m3 cache"));
  }
  SECTION("int8 without v scales") {
    PlanInputs in(2, 100, 8, 2, 128, DType::kInt8);
    in.p.v_scale = nullptr;
    CHECK_THROWS_WITH(in.plan(), Contains("'v_scale' = nullptr: expected a non-null pointer for a int8 cache"));
  }
  SECTION("scales with a bf16 cache") {
    PlanInputs in(2, 100, 8, 2, 128, DType::kBFloat16);
    in.p.k_scale = in.dummy.data();
    CHECK_THROWS_WITH(in.plan(), Contains("nullptr for a bfloat16 cache (scales belong to float8 / int8 caches)"));
  }
  SECTION("a cache dtype no op reads") {
    PlanInputs in(2, 100, 8, 2, 128, DType::kBFloat16);
    in.p.kv_dtype = DType::kInt32;
    CHECK_THROWS_WITH(in.plan(), Contains("'kv_dtype' = int32"));
  }
}
