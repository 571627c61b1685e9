// The host half of the GPU chunked prefill: the key span of a tile of query
// rows and its key tiles (shared with the kernel), plan_prefill's grid and
// its checks. Plain C++: runs without a GPU. The params' pointers stand for
// device memory here and are fake addresses: plan_prefill must not read them
// (under ASan a read would crash).

#include <catch2/catch.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "support/ptx_fragment_emulation.hpp"
#include "kvkit/cuda/prefill_plan.hpp"

using Catch::Matchers::Contains;
using kvkit::PagedDecodeParams;
using kvkit::cuda::PrefillPlan;
using kvkit::cuda::kPrefillRowsPerBlock;

namespace {

template <class T>
T* fake_device(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// A ragged bf16 call: `kv_heads` kv heads, `group` q heads each, head_dim
// 128, page 16, room for `max_blocks` pages per sequence; every pointer fake.
PagedDecodeParams ragged_params(std::int64_t batch, int kv_heads, int group, std::int64_t max_blocks) {
  PagedDecodeParams p;
  p.layout = kvkit::PagedKVLayout::nhd(batch * max_blocks, 16, kv_heads, 128);
  p.num_q_heads = kv_heads * group;
  p.q = fake_device<const void>(0x1000);
  p.q_stride_head = 128;
  p.q_stride_token = std::int64_t(p.num_q_heads) * 128;
  p.k_cache = fake_device<const void>(0x2000);
  p.v_cache = fake_device<const void>(0x3000);
  p.o = fake_device<void>(0x4000);
  p.o_stride_head = 128;
  p.o_stride_token = std::int64_t(p.num_q_heads) * 128;
  p.page_table.block_table = fake_device<const std::int32_t>(0x5000);
  p.page_table.seq_lens = fake_device<const std::int32_t>(0x6000);
  p.page_table.batch_size = batch;
  p.page_table.max_blocks = max_blocks;
  p.page_table.stride_batch = max_blocks;
  p.q_indptr = fake_device<const std::int64_t>(0x7000);
  p.sm_scale = 0.088f;
  p.q_dtype = kvkit::DType::kBFloat16;
  p.kv_dtype = kvkit::DType::kBFloat16;
  return p;
}

}  // namespace

TEST_CASE("attention_key_span of a row range holds every key some row of the tile sees, and exactly those for one row") {
  std::mt19937 rng(11);
  const auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int visible_keys = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    PagedDecodeParams p;
    const std::int64_t seq_len = uniform(0, 70);
    const std::int64_t chunk = seq_len == 0 ? 0 : uniform(1, int(seq_len));
    p.causal = uniform(0, 5) != 0;
    p.window = p.causal && uniform(0, 2) != 0 ? uniform(1, 25) : 0;
    p.num_sinks = uniform(0, 6);
    p.kv_begin = uniform(0, 3) == 0 ? uniform(0, 70) : 0;
    p.kv_end = uniform(0, 3) == 0 ? uniform(int(p.kv_begin), 80) : INT64_MAX;
    // A tile: rows at positions [lo, hi] among the chunk's (seq_len - chunk ..).
    const std::int64_t first_pos = seq_len - chunk;
    const std::int64_t lo = first_pos + (chunk > 0 ? uniform(0, int(chunk) - 1) : 0);
    const std::int64_t hi = chunk > 0 ? uniform(int(lo), int(seq_len) - 1) : lo;
    const kvkit::AttentionKeySpan span = kvkit::attention_key_span(p, seq_len, lo, hi);
    INFO("seq_len " << seq_len << " rows at [" << lo << ", " << hi << "] causal " << p.causal << " window "
                    << p.window << " sinks " << p.num_sinks << " keys [" << p.kv_begin << ", " << p.kv_end << ")");
    REQUIRE(span.begin <= span.first_end);
    REQUIRE(span.first_end <= span.second_begin);
    REQUIRE(span.second_begin <= span.end);
    if (span.size() > 0) {
      REQUIRE(span.begin >= 0);
      REQUIRE(span.end <= seq_len);
    }
    for (std::int64_t k = 0; k < seq_len; ++k) {
      const bool in_span = (k >= span.begin && k < span.first_end) || (k >= span.second_begin && k < span.end);
      bool seen = false;
      for (std::int64_t q = lo; q <= hi; ++q) seen = seen || kvkit::attention_visible(p, q, k);
      if (seen) {
        REQUIRE(in_span);
        ++visible_keys;
      }
      if (lo == hi || !p.causal) REQUIRE(seen == in_span);
    }
  }
  CHECK(visible_keys > 20000);
}

TEST_CASE("prefill key tiles cover the span once, in order, without straddling its two ranges") {
  using kvkit::cuda::detail::prefill_key_tile;
  using kvkit::cuda::detail::prefill_num_key_tiles;
  for (const kvkit::AttentionKeySpan span :
       {kvkit::AttentionKeySpan{0, 0, 0, 0}, kvkit::AttentionKeySpan{0, 200, 200, 200},
        kvkit::AttentionKeySpan{3, 7, 150, 333}, kvkit::AttentionKeySpan{0, 4, 4, 64},
        kvkit::AttentionKeySpan{10, 10, 70, 71}, kvkit::AttentionKeySpan{5, 69, 1000, 1000}}) {
    for (int tile_keys : {1, 16, 64}) {
      INFO("span [" << span.begin << ", " << span.first_end << ") + [" << span.second_begin << ", " << span.end
                    << "), tiles of " << tile_keys);
      std::vector<std::int64_t> covered;
      const std::int64_t tiles = prefill_num_key_tiles(span, tile_keys);
      for (std::int64_t t = 0; t < tiles; ++t) {
        std::int64_t first = 0;
        int count = 0;
        prefill_key_tile(span, tile_keys, t, first, count);
        REQUIRE(count >= 1);
        REQUIRE(count <= tile_keys);
        const bool in_first = first >= span.begin && first + count <= span.first_end;
        const bool in_second = first >= span.second_begin && first + count <= span.end;
        REQUIRE((in_first || in_second));
        for (int j = 0; j < count; ++j) covered.push_back(first + j);
      }
      std::vector<std::int64_t> want;
      for (std::int64_t i = 0; i < span.size(); ++i) want.push_back(span.position(i));
      CHECK(covered == want);
    }
  }
}

TEST_CASE("plan_prefill launches one block per (sequence, kv head, 128-row tile) of the longest chunk") {
  SECTION("ragged chunks, GQA 4: rows are tokens x 4 q heads") {
    const std::vector<std::int64_t> indptr = {0, 1, 16, 32, 49, 149, 406, 406};  // 1, 15, 16, 17, 100, 257, 0
    const std::vector<std::int32_t> lens = {1, 16, 79, 1017, 100, 1257, 5};
    PagedDecodeParams p = ragged_params(7, 2, 4, 80);
    const PrefillPlan plan = kvkit::cuda::plan_prefill(p, indptr.data(), lens.data());
    CHECK(plan.ragged);
    CHECK(plan.batch_size == 7);
    CHECK(plan.total_q_tokens == 406);
    // 257 tokens x 4 heads = 1028 rows -> 9 tiles; 100 x 4 = 400 -> 4; the others 1, and 0 for the empty chunk.
    CHECK(plan.max_q_tiles == 9);
    CHECK(plan.num_blocks == 9 * 7 * 2);
    CHECK(plan.busy_blocks == (1 + 1 + 1 + 1 + 4 + 9 + 0) * 2);
    CHECK(kPrefillRowsPerBlock == 128);
  }
  SECTION("uniform q_len without q_indptr") {
    PagedDecodeParams p = ragged_params(3, 8, 4, 300);
    p.q_indptr = nullptr;
    p.q_len = 2048;
    const std::vector<std::int32_t> lens = {4096, 2048, 4000};
    const PrefillPlan plan = kvkit::cuda::plan_prefill(p, nullptr, lens.data());
    CHECK_FALSE(plan.ragged);
    CHECK(plan.q_len == 2048);
    CHECK(plan.total_q_tokens == 3 * 2048);
    CHECK(plan.max_q_tiles == 2048 * 4 / 128);
    CHECK(plan.num_blocks == 64 * 3 * 8);
    CHECK(plan.busy_blocks == plan.num_blocks);
  }
  SECTION("MHA, head_dim 64, fp16: one q head per row") {
    PagedDecodeParams p = ragged_params(2, 4, 1, 20);
    p.layout = kvkit::PagedKVLayout::hnd(40, 16, 4, 64);
    p.q_stride_head = p.o_stride_head = 64;
    p.q_stride_token = p.o_stride_token = 4 * 64;
    p.q_dtype = p.kv_dtype = kvkit::DType::kFloat16;
    const std::vector<std::int64_t> indptr = {0, 129, 300};
    const std::vector<std::int32_t> lens = {129, 300};
    const PrefillPlan plan = kvkit::cuda::plan_prefill(p, indptr.data(), lens.data());
    CHECK(plan.head_dim == 64);
    CHECK(plan.max_q_tiles == 2);  // 129 rows -> 2 tiles, 171 rows -> 2 tiles
    CHECK(plan.busy_blocks == 4 * 4);
  }
  SECTION("an empty batch plans nothing") {
    PagedDecodeParams p = ragged_params(0, 2, 2, 4);
    const std::vector<std::int64_t> indptr = {0};
    const PrefillPlan plan = kvkit::cuda::plan_prefill(p, indptr.data(), nullptr);
    CHECK(plan.max_q_tiles == 0);
    CHECK(plan.num_blocks == 0);
  }
}

TEST_CASE("plan_prefill rejects what the GPU prefill cannot run, with clear messages") {
  const std::vector<std::int64_t> indptr = {0, 10, 30};
  const std::vector<std::int32_t> lens = {100, 20};
  PagedDecodeParams p = ragged_params(2, 2, 4, 10);
  const auto plan = [&]() { return kvkit::cuda::plan_prefill(p, indptr.data(), lens.data()); };
  REQUIRE_NOTHROW(plan());
  SECTION("head_dim without a kernel") {
    p.layout = kvkit::PagedKVLayout::nhd(20, 16, 2, 256);
    p.q_stride_head = p.o_stride_head = 256;
    p.q_stride_token = p.o_stride_token = 8 * 256;
    CHECK_THROWS_WITH(plan(), Contains("'layout.head_dim' = 256: expected one of {64, 96, 128} on the GPU prefill path"));
  }
  SECTION("float32 is not a tensor-core operand type") {
    p.q_dtype = p.kv_dtype = kvkit::DType::kFloat32;
    CHECK_THROWS_WITH(plan(), Contains("'q_dtype' = float32: expected one of {float16, bfloat16}"));
  }
  SECTION("q and cache dtypes differ") {
    p.q_dtype = kvkit::DType::kFloat16;
    CHECK_THROWS_WITH(plan(), Contains("q_dtype float16 with kv_dtype bfloat16: expected equal dtypes"));
  }
  SECTION("narrower values (MLA) are not served here") {
    p.v_head_dim = 64;
    CHECK_THROWS_WITH(plan(), Contains("'v_head_dim' = 64: expected 0 or head_dim on the GPU prefill path"));
  }
  SECTION("kv heads do not divide q heads") {
    p.num_q_heads = 7;
    CHECK_THROWS_WITH(plan(), Contains("'num_q_heads' = 7: expected a positive multiple of the kv heads (2)"));
  }
  SECTION("device q_indptr without its host copy, and the reverse") {
    CHECK_THROWS_WITH(kvkit::cuda::plan_prefill(p, nullptr, lens.data()),
                      Contains("'host_q_indptr' = nullptr: expected a host copy of params.q_indptr"));
    p.q_indptr = nullptr;
    CHECK_THROWS_WITH(plan(), Contains("expected nullptr when params.q_indptr is nullptr"));
  }
  SECTION("q_indptr not starting at 0 or decreasing") {
    const std::vector<std::int64_t> shifted = {1, 10, 30};
    CHECK_THROWS_WITH(kvkit::cuda::plan_prefill(p, shifted.data(), lens.data()),
                      Contains("'host_q_indptr[0]' = 1: expected 0"));
    const std::vector<std::int64_t> decreasing = {0, 10, 9};
    CHECK_THROWS_WITH(kvkit::cuda::plan_prefill(p, decreasing.data(), lens.data()),
                      Contains("'host_q_indptr[2]' = 9: expected >= host_q_indptr[1] (10)"));
  }
  SECTION("a sequence shorter than its chunk, or longer than its page row") {
    const std::vector<std::int32_t> short_lens = {100, 19};
    CHECK_THROWS_WITH(kvkit::cuda::plan_prefill(p, indptr.data(), short_lens.data()),
                      Contains("sequence 1 has seq_len 19 < q_len (20)"));
    const std::vector<std::int32_t> long_lens = {161, 20};
    CHECK_THROWS_WITH(kvkit::cuda::plan_prefill(p, indptr.data(), long_lens.data()),
                      Contains("host_seq_lens[0] = 161: expected at most max_blocks x page_size (160)"));
    CHECK_THROWS_WITH(kvkit::cuda::plan_prefill(p, indptr.data(), nullptr),
                      Contains("'host_seq_lens' = nullptr"));
  }
  SECTION("without causal order a chunk may be longer than its sequence (cascade prefix level)") {
    p.causal = false;
    const std::vector<std::int32_t> short_lens = {5, 1};
    CHECK_NOTHROW(kvkit::cuda::plan_prefill(p, indptr.data(), short_lens.data()));
  }
  SECTION("more (sequence, kv head) pairs than one grid dimension holds") {
    PagedDecodeParams big = ragged_params(40000, 2, 1, 1);
    const std::vector<std::int64_t> big_indptr(40001, 0);
    const std::vector<std::int32_t> big_lens(40000, 0);
    CHECK_THROWS_WITH(kvkit::cuda::plan_prefill(big, big_indptr.data(), big_lens.data()),
                      Contains("'page_table.batch_size' = 40000: expected at most 65535 / kv heads (32767)"));
  }
  SECTION("null output") {
    p.o = nullptr;
    CHECK_THROWS_WITH(plan(), Contains("'o' = nullptr"));
  }
}

using kvkit_test::b_pair;
using kvkit_test::ldmatrix_x4;
using kvkit_test::mma_16816;
using kvkit_test::Pair;

TEST_CASE("the prefill kernel's ldmatrix lane offsets and fragment reuse compute S = Q K^T and O = P V") {
  // One warp's work on one key tile, as the kernel does it (16 rows, 64 keys,
  // head_dim 64), with ldmatrix and mma.sync emulated per the PTX ISA.
  using Lanes = kvkit::cuda::detail::PrefillLdmatrixLanes;
  constexpr int kRows = 16, kKeys = 64, kDim = 64;
  std::mt19937 rng(5);
  std::normal_distribution<double> normal;
  // Row-major [rows, kDim] matrices, addressed like the kernel's shared memory.
  const auto random_matrix = [&](int rows) {
    std::vector<double> m(static_cast<std::size_t>(rows * kDim));
    for (auto& x : m) x = normal(rng);
    return m;
  };
  const auto q = random_matrix(kRows), k = random_matrix(kKeys), v = random_matrix(kKeys);
  const auto at = [](int row, int col) { return std::size_t(row * kDim + col); };

  // S: k steps kk over dims, key-block pairs jp.
  std::vector<std::vector<std::array<double, 4>>> s(kKeys / 8, std::vector<std::array<double, 4>>(32, {0, 0, 0, 0}));
  for (int kk = 0; kk < kDim / 16; ++kk) {
    const auto a = ldmatrix_x4(q, [&](int l) { return at(Lanes::q_row(l), kk * 16 + Lanes::q_col(l)); }, false);
    for (int jp = 0; jp < kKeys / 16; ++jp) {
      const auto bk = ldmatrix_x4(
          k, [&](int l) { return at(jp * 16 + Lanes::k_row(l), kk * 16 + Lanes::k_col(l)); }, false);
      mma_16816(s[std::size_t(2 * jp)], a, b_pair(bk, 0));
      mma_16816(s[std::size_t(2 * jp + 1)], a, b_pair(bk, 2));
    }
  }
  // C fragment (nb, lane, i) holds S(g + 8 (i / 2), nb * 8 + 2c + i % 2).
  const auto s_at = [&](int nb, int l, int i) { return s[std::size_t(nb)][std::size_t(l)][std::size_t(i)]; };
  for (int nb = 0; nb < kKeys / 8; ++nb) {
    for (int l = 0; l < 32; ++l) {
      for (int i = 0; i < 4; ++i) {
        const int row = l / 4 + 8 * (i / 2), key = nb * 8 + 2 * (l % 4) + i % 2;
        double want = 0.0;
        for (int d = 0; d < kDim; ++d) want += q[at(row, d)] * k[at(key, d)];
        REQUIRE(std::fabs(s_at(nb, l, i) - want) < 1e-9);
      }
    }
  }

  // O = P V with P = S's C fragments reused as A fragments (P = S here).
  std::vector<std::vector<std::array<double, 4>>> o(kDim / 8, std::vector<std::array<double, 4>>(32, {0, 0, 0, 0}));
  for (int kk = 0; kk < kKeys / 16; ++kk) {
    kvkit_test::Regs4 a(32);
    for (int l = 0; l < 32; ++l) {
      a[std::size_t(l)] = {Pair{s_at(2 * kk, l, 0), s_at(2 * kk, l, 1)}, Pair{s_at(2 * kk, l, 2), s_at(2 * kk, l, 3)},
                           Pair{s_at(2 * kk + 1, l, 0), s_at(2 * kk + 1, l, 1)},
                           Pair{s_at(2 * kk + 1, l, 2), s_at(2 * kk + 1, l, 3)}};
    }
    for (int dp = 0; dp < kDim / 16; ++dp) {
      const auto bv = ldmatrix_x4(
          v, [&](int l) { return at(kk * 16 + Lanes::v_row(l), dp * 16 + Lanes::v_col(l)); }, true);
      mma_16816(o[std::size_t(2 * dp)], a, b_pair(bv, 0));
      mma_16816(o[std::size_t(2 * dp + 1)], a, b_pair(bv, 2));
    }
  }
  for (int nb = 0; nb < kDim / 8; ++nb) {
    for (int l = 0; l < 32; ++l) {
      for (int i = 0; i < 4; ++i) {
        const int row = l / 4 + 8 * (i / 2), dim = nb * 8 + 2 * (l % 4) + i % 2;
        double want = 0.0;
        for (int key = 0; key < kKeys; ++key) {
          double score = 0.0;
          for (int d = 0; d < kDim; ++d) score += q[at(row, d)] * k[at(key, d)];
          want += score * v[at(key, dim)];
        }
        REQUIRE(std::fabs(o[std::size_t(nb)][std::size_t(l)][std::size_t(i)] - want) < 1e-8);
      }
    }
  }
}
