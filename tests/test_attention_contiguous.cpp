// Decode attention over contiguous caches (token-major, head-major, strided,
// ring buffer) through contiguous_page_view: against a float64 reference and
// against the same data in an explicit (scattered) paged cache.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "kvkit/layout/contiguous_page_view.hpp"
#include "kvkit/ops/attention_decode.hpp"
#include "support/contiguous_decode_problem.hpp"

using Catch::Matchers::Contains;
using kvkit::ContiguousKVLayout;
using kvkit::PagedDecodeParams;
using kvkit::PagedKVLayout;
using kvkit::testing::ContiguousCase;
using kvkit::testing::ContiguousDecodeProblem;

namespace {

// Runs the CPU op through the view, checks it against the float64 reference,
// then against the same positions copied into a scattered paged cache of the
// view's page size (NHD for token-major, HND for head-major): same keys in
// the same order, so the results must be identical.
template <class KVT>
void check_case(const ContiguousCase& c, std::uint64_t seed, double tol) {
  ContiguousDecodeProblem<KVT> prob(c, seed);
  const std::int64_t rows = std::int64_t(c.seq_lens.size()) * c.q_len * c.q_heads;
  std::vector<float> o(std::size_t(rows * c.head_dim), -777.0f), lse(std::size_t(rows), -777.0f);
  const PagedDecodeParams p = prob.params(o.data(), lse.data());
  kvkit::paged_decode_attention(p);
  prob.check(p, o, lse, tol);

  // The explicit paged cache: every position of every sequence (a ring's
  // overwritten ones included: only their rows in the contiguous cache are gone).
  const std::int64_t page = prob.view.layout.page_size;
  std::int64_t blocks = 0, max_blocks = 1;
  for (int len : c.seq_lens) {
    blocks += (len + page - 1) / page;
    max_blocks = std::max<std::int64_t>(max_blocks, (len + page - 1) / page);
  }
  const PagedKVLayout pl = c.head_major ? PagedKVLayout::hnd(blocks + 2, page, c.kv_heads, c.head_dim)
                                        : PagedKVLayout::nhd(blocks + 2, page, c.kv_heads, c.head_dim);
  std::vector<KVT> pk(std::size_t(pl.span_elements()), kvkit::from_float<KVT>(NAN)), pv = pk;
  std::vector<std::int32_t> pool(std::size_t(blocks + 2));
  std::iota(pool.begin(), pool.end(), 0);
  std::mt19937_64 rng(seed + 1);
  std::shuffle(pool.begin(), pool.end(), rng);
  std::vector<std::int32_t> table(std::size_t(std::int64_t(c.seq_lens.size()) * max_blocks), -1);
  std::size_t next = 0;
  for (std::size_t b = 0; b < c.seq_lens.size(); ++b) {
    for (std::int64_t pos = 0; pos < c.seq_lens[b]; ++pos) {
      if (pos % page == 0) table[std::size_t(std::int64_t(b) * max_blocks + pos / page)] = pool[next++];
      const std::int64_t slot = std::int64_t(table[std::size_t(std::int64_t(b) * max_blocks + pos / page)]) * page + pos % page;
      if (pos < prob.cl.first_held_position(c.seq_lens[b])) continue;  // overwritten: stays NaN
      for (int h = 0; h < c.kv_heads; ++h) {
        for (int d = 0; d < c.head_dim; ++d) {
          pk[std::size_t(pl.slot_offset(slot, h) + d)] = prob.k[std::size_t(prob.key_offset(b, pos, h) + d)];
          pv[std::size_t(pl.slot_offset(slot, h) + d)] = prob.v[std::size_t(prob.key_offset(b, pos, h) + d)];
        }
      }
    }
  }
  std::vector<float> o2(o.size(), -777.0f), lse2(lse.size(), -777.0f);
  PagedDecodeParams paged = p;
  paged.k_cache = pk.data();
  paged.v_cache = pv.data();
  paged.layout = pl;
  paged.page_table = {table.data(), prob.seq_lens.data(), std::int64_t(c.seq_lens.size()), max_blocks, max_blocks};
  paged.o = o2.data();
  paged.lse = lse2.data();
  kvkit::paged_decode_attention(paged);
  for (std::size_t i = 0; i < o.size(); ++i) REQUIRE(o[i] == o2[i]);
  for (std::size_t i = 0; i < lse.size(); ++i) REQUIRE(lse[i] == lse2[i]);
}

}  // namespace

TEST_CASE("contiguous_page_view: a power-of-two capacity is one page per sequence, with the cache's strides") {
  const auto cl = ContiguousKVLayout::head_major(5, 64, 3, 32);
  const auto v = kvkit::contiguous_page_view(cl);
  CHECK(v.layout.page_size == 64);
  CHECK(v.pages_per_seq == 1);
  CHECK(v.layout.num_pages == 5);
  CHECK(v.layout.stride_page == cl.stride_seq);
  CHECK(v.layout.stride_slot == cl.stride_token);
  CHECK(v.layout.stride_head == cl.stride_head);
}

TEST_CASE("contiguous_page_view: every (sequence, row) has the same element offset and slot as in the contiguous layout") {
  for (const auto& cl : {ContiguousKVLayout::token_major(3, 48, 2, 8), ContiguousKVLayout::token_major(2, 33, 3, 8),
                         ContiguousKVLayout::head_major(3, 64, 2, 8), ContiguousKVLayout::head_major(1, 48, 2, 8),
                         ContiguousKVLayout::make(2, 24, 2, 8, 24 * 2 * 11, 2 * 11, 11, false)}) {
    const auto v = kvkit::contiguous_page_view(cl);
    CHECK(cl.capacity % v.layout.page_size == 0);
    for (std::int64_t s = 0; s < cl.num_seqs; ++s) {
      for (std::int64_t row = 0; row < cl.capacity; ++row) {
        const std::int64_t vslot = std::int64_t(v.page(s, row / v.layout.page_size)) * v.layout.page_size +
                                   row % v.layout.page_size;
        REQUIRE(vslot == cl.slot(s, row));
        for (std::int64_t h = 0; h < cl.num_heads; ++h) REQUIRE(v.layout.slot_offset(vslot, h) == cl.offset(s, row, h, 0));
      }
    }
  }
  SECTION("48 rows token-major: pages of 16") {
    const auto v = kvkit::contiguous_page_view(ContiguousKVLayout::token_major(4, 48, 2, 8));
    CHECK(v.layout.page_size == 16);
    CHECK(v.pages_per_seq == 3);
    CHECK(v.layout.num_pages == 12);
  }
}

TEST_CASE("decode over a token-major contiguous cache of capacity 48 equals the reference and the paged cache") {
  ContiguousCase c;
  c.capacity = 48;
  c.seq_lens = {1, 33, 48, 17, 16};
  check_case<kvkit::bfloat16>(c, 11, 1e-5);
  c.q_len = 4;
  c.seq_lens = {4, 47, 48};
  check_case<float>(c, 12, 1e-5);
}

TEST_CASE("decode over a head-major contiguous cache of capacity 64 equals the reference and the paged cache") {
  ContiguousCase c;
  c.head_major = true;
  c.capacity = 64;
  c.head_dim = 128;
  c.q_heads = 16;
  c.kv_heads = 2;
  c.seq_lens = {64, 1, 63, 2};
  check_case<kvkit::bfloat16>(c, 21, 1e-5);
  c.q_len = 3;
  c.seq_lens = {3, 64, 40};
  check_case<float>(c, 22, 1e-5);
}

TEST_CASE("decode over a strided (padded head rows) contiguous cache with an odd capacity uses pages of 1") {
  ContiguousCase c;
  c.capacity = 33;
  c.head_pad = 5;
  c.q_heads = 4;
  c.kv_heads = 4;
  c.seq_lens = {33, 7, 1};
  check_case<float>(c, 31, 1e-5);
}

TEST_CASE("decode over a ring buffer with a sliding window reads only the positions still held") {
  SECTION("token-major, capacity 32 (one page), window 20, q_len 2, wrapped several times") {
    ContiguousCase c;
    c.ring = true;
    c.capacity = 32;
    c.window = 20;
    c.q_len = 2;
    c.seq_lens = {100, 7, 32, 33, 2};
    check_case<float>(c, 41, 1e-5);
  }
  SECTION("token-major, capacity 48 (three pages of 16), window = capacity") {
    ContiguousCase c;
    c.ring = true;
    c.capacity = 48;
    c.window = 48;
    c.seq_lens = {200, 49, 48, 5};
    check_case<kvkit::bfloat16>(c, 42, 1e-5);
  }
  SECTION("head-major, capacity 16, window 9 with q_len 8 (window + q_len - 1 = capacity)") {
    ContiguousCase c;
    c.ring = true;
    c.head_major = true;
    c.capacity = 16;
    c.window = 9;
    c.q_len = 8;
    c.seq_lens = {77, 16, 8};
    check_case<float>(c, 43, 1e-5);
  }
}

TEST_CASE("fill_contiguous_page_table: batch rows may read any cache sequence, several rows the same one") {
  const auto v = kvkit::contiguous_page_view(ContiguousKVLayout::token_major(4, 48, 1, 8));
  const std::vector<std::int32_t> lens = {48, 20, 1}, ids = {3, 0, 3};
  std::vector<std::int32_t> table(9, -5);
  const auto t = kvkit::fill_contiguous_page_table(v, lens.data(), 3, table.data(), 3, {}, ids.data());
  CHECK(t.stride_batch == 3);
  CHECK(table == std::vector<std::int32_t>{9, 10, 11, 0, 1, -5, 9, -5, -5});
}

TEST_CASE("contiguous_page_view and fill_contiguous_page_table reject what pages cannot express, naming why") {
  SECTION("head-major, several sequences, capacity not a power of two") {
    CHECK_THROWS_WITH(kvkit::contiguous_page_view(ContiguousKVLayout::head_major(2, 48, 2, 8)),
                      Contains("capacity 48 is not a power of two") && Contains("needs a power-of-two capacity") &&
                          Contains("stride_seq = 768"));
  }
  const auto ring = kvkit::contiguous_page_view(ContiguousKVLayout::token_major(2, 32, 1, 8, true));
  const auto flat = kvkit::contiguous_page_view(ContiguousKVLayout::token_major(2, 48, 1, 8));
  std::vector<std::int32_t> table(16, -5);
  const std::vector<std::int32_t> before = table;
  std::vector<std::int32_t> lens = {10, 100};
  kvkit::ContiguousAccess a;
  SECTION("a wrapped ring read without a window") {
    CHECK_THROWS_WITH(kvkit::fill_contiguous_page_table(ring, lens.data(), 2, table.data(), 8, a),
                      Contains("sequence 1 has seq_len 100 in a ring buffer of capacity 32: positions < 68 were "
                               "overwritten, but the call reads position 0"));
  }
  SECTION("a window longer than the ring holds") {
    a.window = 32;
    a.q_len = 2;
    CHECK_THROWS_WITH(kvkit::fill_contiguous_page_table(ring, lens.data(), 2, table.data(), 8, a),
                      Contains("reads position 67") && Contains("window + q_len - 1 <= capacity"));
    a.q_len = 1;  // window + q_len - 1 = capacity: valid
    std::vector<std::int32_t> ok(16, -5);
    CHECK_NOTHROW(kvkit::fill_contiguous_page_table(ring, lens.data(), 2, ok.data(), 8, a));
    CHECK(ok == std::vector<std::int32_t>{0, -5, -5, -5, -5, -5, -5, -5, 1, 1, 1, 1, -5, -5, -5, -5});
  }
  SECTION("sinks once the ring has wrapped") {
    a.window = 16;
    a.num_sinks = 4;
    CHECK_THROWS_WITH(kvkit::fill_contiguous_page_table(ring, lens.data(), 2, table.data(), 8, a),
                      Contains("reads position 0") && Contains("sinks 4"));
  }
  SECTION("too few block-table columns") {
    a.window = 16;
    CHECK_THROWS_WITH(kvkit::fill_contiguous_page_table(ring, lens.data(), 2, table.data(), 3, a),
                      Contains("seq_lens[1] = 100 needs 4 blocks of 32 tokens: expected max_blocks (3)"));
  }
  SECTION("a sequence longer than a non-ring cache") {
    lens[0] = 49;
    CHECK_THROWS_WITH(kvkit::fill_contiguous_page_table(flat, lens.data(), 1, table.data(), 8),
                      Contains("seq_lens[0] = 49: expected at most the capacity (48)"));
  }
  SECTION("a negative length, a sequence id out of range") {
    lens[1] = -1;
    CHECK_THROWS_WITH(kvkit::fill_contiguous_page_table(flat, lens.data(), 2, table.data(), 8),
                      Contains("seq_lens[1] = -1: expected >= 0"));
    lens[1] = 3;
    const std::vector<std::int32_t> ids = {1, 2};
    CHECK_THROWS_WITH(kvkit::fill_contiguous_page_table(flat, lens.data(), 2, table.data(), 8, {}, ids.data()),
                      Contains("seq_ids[1] = 2: expected a sequence in [0, 2)"));
  }
  SECTION("null arrays") {
    CHECK_THROWS_WITH(kvkit::fill_contiguous_page_table(flat, nullptr, 2, table.data(), 8),
                      Contains("'seq_lens'"));
    CHECK_THROWS_WITH(kvkit::fill_contiguous_page_table(flat, lens.data(), 2, nullptr, 8),
                      Contains("'block_table'"));
  }
  // A failed call writes nothing (the first sequence was valid in every case).
  CHECK(table == before);
}
