// Layouts (paged NHD/HND, interleaved, strided; latent; contiguous and ring),
// page tables (padded, CSR, converters, validation) and capacity.

#include <catch2/catch.hpp>

#include <cstdint>
#include <set>
#include <vector>

#include "kvkit/layout/capacity.hpp"
#include "kvkit/layout/contiguous_kv_layout.hpp"
#include "kvkit/layout/latent_kv_layout.hpp"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"
#include "kvkit/layout/stride_overlap.hpp"

using Catch::Matchers::Contains;
using kvkit::ContiguousKVLayout;
using kvkit::KVStorage;
using kvkit::LatentKVLayout;
using kvkit::PagedKVLayout;

TEST_CASE("NHD offsets follow [pages, page_size, heads, head_dim]") {
  const auto l = PagedKVLayout::nhd(5, 4, 3, 7);
  CHECK(l.offset(0, 0, 0, 0) == 0);
  CHECK(l.offset(2, 3, 1, 6) == ((2 * 4 + 3) * 3 + 1) * 7 + 6);
  CHECK(l.slot_offset(2 * 4 + 3, 1) == l.offset(2, 3, 1, 0));
  CHECK(l.num_slots() == 20);
  CHECK(l.page_is_dense());
  CHECK(l.span_elements() == 5 * 4 * 3 * 7);
}

TEST_CASE("HND offsets follow [pages, heads, page_size, head_dim]") {
  const auto l = PagedKVLayout::hnd(5, 8, 3, 64);
  CHECK(l.offset(4, 7, 2, 63) == ((4 * 3 + 2) * 8 + 7) * 64 + 63);
  CHECK(l.slot_offset(4 * 8 + 7, 2) == l.offset(4, 7, 2, 0));
  CHECK(l.page_is_dense());
}

TEST_CASE("every (page, slot, head, dim) of a layout maps to a distinct element") {
  for (auto storage : {KVStorage::kSeparate, KVStorage::kInterleaved}) {
    for (int hnd = 0; hnd < 2; ++hnd) {
      const auto l = hnd ? PagedKVLayout::hnd(3, 4, 3, 5, storage)
                         : PagedKVLayout::nhd(3, 4, 3, 5, storage);
      std::set<std::int64_t> seen;
      for (std::int64_t p = 0; p < 3; ++p)
        for (std::int64_t s = 0; s < 4; ++s)
          for (std::int64_t h = 0; h < 3; ++h)
            for (std::int64_t d = 0; d < 5; ++d) {
              seen.insert(l.offset(p, s, h, d));
              seen.insert(l.v_offset + l.offset(p, s, h, d));  // V (== K when separate)
            }
      const std::size_t expected = storage == KVStorage::kInterleaved ? 2 * 180 : 180;
      CHECK(seen.size() == expected);
      CHECK(*seen.rbegin() < (storage == KVStorage::kInterleaved ? 360 : 180));
    }
  }
}

TEST_CASE("interleaved K/V places the V page right after the K page") {
  const auto l = PagedKVLayout::nhd(4, 16, 8, 128, KVStorage::kInterleaved);
  CHECK(l.v_offset == 16 * 8 * 128);
  CHECK(l.stride_page == 2 * 16 * 8 * 128);
  CHECK(l.page_is_dense());
}

TEST_CASE("page size 1 and large power-of-two page sizes work") {
  const auto one = PagedKVLayout::nhd(10, 1, 2, 4);
  CHECK(one.page_shift == 0);
  CHECK(one.slot_offset(9, 1) == 9 * 8 + 4);
  const auto big = PagedKVLayout::hnd(2, 256, 1, 4);
  CHECK(big.page_shift == 8);
  CHECK(big.slot_offset(257, 0) == big.offset(1, 1, 0, 0));
}

TEST_CASE("strided layouts describe a padded cache owned by another engine") {
  // Pages padded to 1000 elements, rows padded to 40.
  const auto l = PagedKVLayout::strided(3, 2, 4, 8, 1000, 200, 40);
  CHECK(l.offset(2, 1, 3, 7) == 2000 + 200 + 120 + 7);
  CHECK_FALSE(l.page_is_dense());
}

TEST_CASE("paged layouts reject bad sizes and overlapping strides") {
  CHECK_THROWS_WITH(PagedKVLayout::nhd(4, 3, 2, 8),
                    Contains("argument 'page_size' = 3: expected a power of two"));
  CHECK_THROWS_WITH(PagedKVLayout::nhd(4, 0, 2, 8), Contains("'page_size' = 0"));
  CHECK_THROWS_WITH(PagedKVLayout::nhd(4, 4, 0, 8), Contains("'num_heads' = 0: expected > 0"));
  CHECK_THROWS_WITH(PagedKVLayout::nhd(4, 4, 2, -1), Contains("'head_dim' = -1"));
  CHECK_THROWS_WITH(PagedKVLayout::nhd(-1, 4, 2, 8), Contains("'num_pages' = -1"));
  // Heads 4 elements apart but 8 wide: they overlap.
  CHECK_THROWS_WITH(PagedKVLayout::strided(2, 2, 2, 8, 64, 16, 4),
                    Contains("'stride_head' = 4: expected >= 8"));
  // Slots overlap the heads of the previous slot.
  CHECK_THROWS_WITH(PagedKVLayout::strided(2, 2, 2, 8, 64, 8, 8),
                    Contains("share memory"));
  // V inside K.
  CHECK_THROWS_WITH(PagedKVLayout::strided(2, 2, 2, 8, 64, 16, 8, 16), Contains("'v_offset'"));
  CHECK_THROWS_WITH(PagedKVLayout::strided(2, 2, 2, 8, -64, 16, 8), Contains("'stride_page' = -64"));
}

TEST_CASE("find_stride_overlap names the first dimension, by stride, that steps inside the inner extent") {
  using kvkit::detail::find_stride_overlap;
  using kvkit::detail::StrideDim;
  using Kind = kvkit::detail::StrideOverlapKind;
  SECTION("rows exactly apart, given in any order, pass") {
    const StrideDim nhd[3] = {{8, 2}, {16, 4}, {64, 3}};  // heads, slots, pages over rows of 8
    CHECK(find_stride_overlap(nhd, 8).kind == Kind::kNone);
    const StrideDim shuffled[3] = {{64, 3}, {8, 2}, {16, 4}};
    CHECK(find_stride_overlap(shuffled, 8).kind == Kind::kNone);
    const StrideDim padded[2] = {{10, 3}, {40, 2}};  // gaps are fine
    CHECK(find_stride_overlap(padded, 8).dim == -1);
  }
  SECTION("too close: the inner extent, then the extent grown by the dimensions inside") {
    const StrideDim rows[2] = {{8, 2}, {7, 1}};
    const auto r = find_stride_overlap(rows, 9);
    CHECK(r.kind == Kind::kTooClose);
    CHECK(r.dim == 0);
    CHECK(r.inner_extent == 9);
    // Heads span 8 + 8 = 16; slots 12 apart land inside them.
    const StrideDim slots[3] = {{64, 2}, {12, 4}, {8, 2}};
    const auto s = find_stride_overlap(slots, 8);
    CHECK(s.kind == Kind::kTooClose);
    CHECK(s.dim == 1);
    CHECK(s.inner_extent == 16);
  }
  SECTION("equal strides keep the array's order, so the later one is blamed") {
    const StrideDim ab[2] = {{8, 2}, {8, 3}};
    CHECK(find_stride_overlap(ab, 8).dim == 1);
    CHECK(find_stride_overlap(ab, 8).inner_extent == 16);
    const StrideDim ba[2] = {{8, 3}, {8, 2}};
    CHECK(find_stride_overlap(ba, 8).dim == 1);
    CHECK(find_stride_overlap(ba, 8).inner_extent == 24);
  }
  SECTION("dimensions of size 0 or 1 never step, whatever their stride") {
    const StrideDim dims[4] = {{0, 1}, {3, 0}, {8, 2}, {-5, 1}};
    CHECK(find_stride_overlap(dims, 8).kind == Kind::kNone);
    const StrideDim zero[2] = {{0, 2}, {8, 1}};
    CHECK(find_stride_overlap(zero, 8).kind == Kind::kTooClose);
    CHECK(find_stride_overlap(zero, 8).dim == 0);
  }
  SECTION("an extent beyond INT64_MAX is an overflow; INT64_MAX itself fits") {
    const std::int64_t max = INT64_MAX;
    const StrideDim fits[2] = {{1, 2}, {max - 2, 2}};  // 2 + (max - 2) = max
    CHECK(find_stride_overlap(fits, 1).kind == Kind::kNone);
    const StrideDim over[2] = {{1, 2}, {max - 1, 2}};
    const auto r = find_stride_overlap(over, 1);
    CHECK(r.kind == Kind::kOverflow);
    CHECK(r.dim == 1);
    CHECK(r.inner_extent == 2);
    const StrideDim many[2] = {{max / 2, 4}, {1, 1}};
    CHECK(find_stride_overlap(many, 8).kind == Kind::kOverflow);
    CHECK(find_stride_overlap(many, 8).dim == 0);
  }
}

TEST_CASE("the latent layout is [pages, page_size, kv_lora_rank + rope_dim] with two views") {
  const auto l = LatentKVLayout::dense(7, 64, 512, 64);
  CHECK(l.row_elements() == 576);
  CHECK(l.page_shift == 6);
  CHECK(l.offset(3, 5, 0) == (3 * 64 + 5) * 576);
  CHECK(l.slot_offset(3 * 64 + 5) == l.offset(3, 5, 0));
  const auto nope = l.nope_view();
  const auto rope = l.rope_view();
  CHECK(nope.head_dim == 512);
  CHECK(rope.head_dim == 64);
  CHECK(l.rope_begin() + rope.slot_offset(100, 0) == l.slot_offset(100) + 512);
  CHECK(nope.slot_offset(100, 0) == l.slot_offset(100));
  CHECK(l.as_paged().head_dim == 576);
  CHECK(l.as_paged().page_is_dense());
  CHECK_THROWS_WITH(LatentKVLayout::dense(7, 48, 512, 64), Contains("'page_size' = 48"));
  CHECK_THROWS_WITH(LatentKVLayout::strided(7, 64, 512, 64, 64 * 600, 500),
                    Contains("'stride_slot' = 500: expected >= kv_lora_rank + rope_dim (576)"));
}

TEST_CASE("contiguous layouts: token-major, head-major and ring buffer slots") {
  const auto tm = ContiguousKVLayout::token_major(3, 10, 2, 4);
  CHECK(tm.slot(2, 7) == 27);
  CHECK(tm.slot_offset(27, 1) == ((2 * 10 + 7) * 2 + 1) * 4);
  const auto hm = ContiguousKVLayout::head_major(3, 10, 2, 4);
  CHECK(hm.slot_offset(27, 1) == ((2 * 2 + 1) * 10 + 7) * 4);
  const auto ring = ContiguousKVLayout::token_major(2, 4, 1, 8, /*ring=*/true);
  CHECK(ring.slot(1, 9) == 4 + 1);
  CHECK(ring.first_held_position(9) == 5);
  CHECK(ring.first_held_position(3) == 0);
  CHECK(tm.first_held_position(9) == 0);
  CHECK_THROWS_WITH(ContiguousKVLayout::make(2, 4, 2, 8, 64, 8, 8, false), Contains("overlap"));
  CHECK_THROWS_WITH(ContiguousKVLayout::make(2, 4, 2, 8, 32, 16, 8, false),
                    Contains("'stride_seq' = 32: expected >= 64"));
  CHECK_THROWS_WITH(ContiguousKVLayout::token_major(2, 0, 2, 8), Contains("'capacity' = 0"));
}

TEST_CASE("bytes per token and page for each layout and dtype") {
  const auto llama = PagedKVLayout::nhd(100, 16, 8, 128);
  CHECK(kvkit::bytes_per_token(llama, kvkit::DType::kBFloat16) == 2 * 8 * 128 * 2);
  CHECK(kvkit::bytes_per_page(llama, kvkit::DType::kBFloat16) == 16 * 4096);
  CHECK(kvkit::bytes_per_token(llama, kvkit::DType::kFloat8E4M3) == 2048);
  CHECK(kvkit::bytes_per_token(llama, kvkit::DType::kFloat8E4M3,
                               kvkit::ScaleGranularity::kPerTokenHead) == 2048 + 2 * 8 * 4);
  const auto mla = LatentKVLayout::dense(10, 64, 512, 64);
  CHECK(kvkit::bytes_per_token(mla, kvkit::DType::kBFloat16) == 1152);
  CHECK(kvkit::bytes_per_page(mla, kvkit::DType::kBFloat16) == 64 * 1152);
  const auto c = ContiguousKVLayout::token_major(4, 4096, 8, 128);
  CHECK(kvkit::bytes_per_token(c, kvkit::DType::kFloat16) == 4096);
  CHECK(kvkit::bytes_per_sequence(c, kvkit::DType::kFloat16) == 4096 * 4096);
}

namespace {
// Three sequences of 5, 0 and 8 tokens with page size 4.
struct Tables {
  std::vector<std::int32_t> block_table{7, 2, 0, /**/ 0, 0, 0, /**/ 5, 1, 0};
  std::vector<std::int32_t> seq_lens{5, 0, 8};
  kvkit::PaddedPageTable padded() const {
    return {block_table.data(), seq_lens.data(), 3, 3, 3};
  }
};
}  // namespace

TEST_CASE("padded tables convert to CSR and back") {
  Tables t;
  const auto csr = kvkit::padded_to_csr(t.padded(), 4);
  CHECK(csr.indptr == std::vector<std::int32_t>{0, 2, 2, 4});
  CHECK(csr.indices == std::vector<std::int32_t>{7, 2, 5, 1});
  CHECK(csr.last_page_len == std::vector<std::int32_t>{1, 0, 4});
  const auto v = csr.view();
  CHECK(v.seq_len(0, 4) == 5);
  CHECK(v.seq_len(1, 4) == 0);
  CHECK(v.seq_len(2, 4) == 8);
  CHECK(kvkit::token_slot(v.pages(2), 5, 2) == 1 * 4 + 1);
  const auto back = kvkit::csr_to_padded(v, 4, 0, -1);
  CHECK(back.max_blocks == 2);
  CHECK(back.block_table == std::vector<std::int32_t>{7, 2, -1, -1, 5, 1});
  CHECK(back.seq_lens == t.seq_lens);
  const auto wide = kvkit::csr_to_padded(v, 4, 3);
  CHECK(wide.block_table == std::vector<std::int32_t>{7, 2, 0, 0, 0, 0, 5, 1, 0});
  CHECK_THROWS_WITH(kvkit::csr_to_padded(v, 4, 1),
                    Contains("'max_blocks' = 1: expected >= the longest page list (2 pages)"));
  // Rows wider than an int32 sequence length can fill would only allocate
  // (here 3 x 2^29 entries): refused.
  CHECK_THROWS_WITH(kvkit::csr_to_padded(v, 4, 536870913),
                    Contains("'max_blocks' = 536870913: expected in [0, 536870912]"));
}

TEST_CASE("page table validation names the inconsistent entry") {
  Tables t;
  CHECK_NOTHROW(kvkit::validate_page_table(t.padded(), 4, 8));
  CHECK_THROWS_WITH(kvkit::validate_page_table(t.padded(), 4, 7),
                    Contains("block_table[0][0] = 7: expected a page id in [0, 7)"));
  CHECK_THROWS_WITH(kvkit::validate_page_table(t.padded(), 2, 8),
                    Contains("seq_lens[2] = 8 needs 4 pages of 2 tokens: expected at most max_blocks (3)"));
  CHECK_THROWS_WITH(kvkit::validate_page_table(t.padded(), 3, 8), Contains("'page_size' = 3"));
  t.seq_lens[1] = -2;
  CHECK_THROWS_WITH(kvkit::validate_page_table(t.padded(), 4, 8), Contains("seq_lens[1] = -2"));

  std::vector<std::int32_t> indptr{0, 2, 1}, indices{3, 4}, last{2, 1};
  kvkit::CsrPageTable csr{indptr.data(), indices.data(), last.data(), 2};
  CHECK_THROWS_WITH(kvkit::validate_page_table(csr, 4), Contains("indptr[2] = 1: expected >= indptr[1] = 2"));
  indptr = {0, 2, 2};
  last = {5, 0};
  CHECK_THROWS_WITH(kvkit::validate_page_table(csr, 4),
                    Contains("last_page_len[0] = 5: expected a value in [1, page_size]"));
  last = {4, 3};
  CHECK_THROWS_WITH(kvkit::validate_page_table(csr, 4),
                    Contains("last_page_len[1] = 3: expected 0 for a sequence with no pages"));
  last = {4, 0};
  CHECK_NOTHROW(kvkit::validate_page_table(csr, 4, 5));
  CHECK_THROWS_WITH(kvkit::validate_page_table(csr, 4, 4),
                    Contains("indices[1] = 4: expected a page id in [0, 4)"));
  indptr[0] = 1;
  CHECK_THROWS_WITH(kvkit::validate_page_table(csr, 4), Contains("'indptr[0]' = 1: expected 0"));
}

TEST_CASE("csr_to_padded refuses a CSR row longer than an int32 seq_len, whatever max_blocks") {
  const std::int64_t page_size = std::int64_t(1) << 30;  // two pages hold 2^31 tokens
  const std::int32_t indptr[2] = {0, 3}, indices[3] = {0, 1, 2}, last[1] = {1};
  const kvkit::CsrPageTable t{indptr, indices, last, 1};
  CHECK_THROWS_WITH(kvkit::csr_to_padded(t, page_size), Catch::Matchers::Contains("2147483649 tokens"));
}
