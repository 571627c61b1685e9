// Swap plans (validation, coalescing of consecutive pages) and the CPU
// swap_blocks between two host caches: exact copies of the planned pages,
// nothing else written, bad input rejected before anything is copied.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "kvkit/layout/paged_kv_layout.hpp"
#include "kvkit/ops/swap_blocks.hpp"

using Catch::Matchers::Contains;
using kvkit::BlockRun;
using kvkit::DType;
using kvkit::KVStorage;
using kvkit::PagedKVLayout;
using kvkit::SwapDirection;
using kvkit::SwapPlan;

namespace {

constexpr std::uint16_t kPoison = 0xdead;
using Pairs = std::vector<std::pair<std::int64_t, std::int64_t>>;

std::vector<std::uint16_t> random_bits(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::uint16_t> v(n);
  for (auto& x : v) x = std::uint16_t(rng());
  return v;
}

bool same_run(const BlockRun& a, const BlockRun& b) {
  return a.src == b.src && a.dst == b.dst && a.count == b.count;
}

/// Expected destination cache: poison everywhere, then for every pair the
/// page copied element by element through the layouts' offset() (the
/// reference knows nothing about runs or pitches). `src_base` is added to
/// source offsets (v_offset for the V half of an interleaved cache).
std::vector<std::uint16_t> expected_pages(const PagedKVLayout& src_layout,
                                          const PagedKVLayout& dst_layout,
                                          const std::vector<std::uint16_t>& src,
                                          std::int64_t src_base, const Pairs& pairs) {
  std::vector<std::uint16_t> dst(std::size_t(dst_layout.span_elements()), kPoison);
  for (const auto& p : pairs)
    for (std::int64_t s = 0; s < src_layout.page_size; ++s)
      for (std::int64_t h = 0; h < src_layout.num_heads; ++h)
        for (std::int64_t d = 0; d < src_layout.head_dim; ++d)
          dst[std::size_t(dst_layout.offset(p.second, s, h, d))] =
              src[std::size_t(src_base + src_layout.offset(p.first, s, h, d))];
  return dst;
}

}  // namespace

TEST_CASE("a swap plan coalesces pairs whose source and destination pages both advance by one") {
  SECTION("consecutive pairs become one run, a gap starts a new one") {
    const auto plan = SwapPlan::make(SwapDirection::kDeviceToHost,
                                     Pairs{{3, 10}, {4, 11}, {5, 12}, {9, 2}, {10, 4}}, 16, 16);
    REQUIRE(plan.runs().size() == 3);
    CHECK(same_run(plan.runs()[0], {3, 10, 3}));
    CHECK(same_run(plan.runs()[1], {9, 2, 1}));
    CHECK(same_run(plan.runs()[2], {10, 4, 1}));  // dst 4 does not follow dst 2
    CHECK(plan.num_pages() == 5);
  }
  SECTION("pairs in any order are sorted by source first") {
    const auto plan = SwapPlan::make(SwapDirection::kHostToDevice,
                                     Pairs{{7, 1}, {5, 6}, {6, 0}, {4, 5}}, 8, 8);
    REQUIRE(plan.runs().size() == 2);
    CHECK(same_run(plan.runs()[0], {4, 5, 2}));
    CHECK(same_run(plan.runs()[1], {6, 0, 2}));
    CHECK(plan.direction() == SwapDirection::kHostToDevice);
  }
  SECTION("a whole sequence swapped out to a contiguous host range is one run") {
    Pairs pairs;
    for (std::int64_t i = 0; i < 33; ++i) pairs.emplace_back(100 + i, i);
    const auto plan = SwapPlan::make(SwapDirection::kDeviceToHost, pairs, 200, 33);
    REQUIRE(plan.runs().size() == 1);
    CHECK(same_run(plan.runs()[0], {100, 0, 33}));
  }
  SECTION("no pairs: no runs") {
    const auto plan = SwapPlan::make(SwapDirection::kDeviceToHost, Pairs{}, 4, 4);
    CHECK(plan.runs().empty());
    CHECK(plan.num_pages() == 0);
  }
}

TEST_CASE("a swap plan rejects out-of-range pages and repeated destinations") {
  CHECK_THROWS_WITH(SwapPlan::make(SwapDirection::kDeviceToHost, Pairs{{0, 1}, {8, 2}}, 8, 4),
                    Contains("pairs[1][0] = 8: expected a source page id in [0, 8)"));
  CHECK_THROWS_WITH(SwapPlan::make(SwapDirection::kDeviceToHost, Pairs{{0, -1}}, 8, 4),
                    Contains("pairs[0][1] = -1: expected a destination page id in [0, 4)"));
  CHECK_THROWS_WITH(SwapPlan::make(SwapDirection::kDeviceToHost, Pairs{{0, 3}, {1, 2}, {5, 3}}, 8, 4),
                    Contains("destination page 3 twice"));
  CHECK_THROWS_WITH(SwapPlan::make(SwapDirection::kDeviceToHost, nullptr, 2, 8, 4),
                    Contains("'pairs' = nullptr"));
  // The same source twice is allowed (two copies of one page).
  CHECK(SwapPlan::make(SwapDirection::kDeviceToHost, Pairs{{1, 0}, {1, 2}}, 8, 4).num_pages() == 2);
}

TEST_CASE("swap_blocks copies exactly the planned pages of every cache") {
  const bool hnd = GENERATE(false, true);
  const std::int64_t page_size = GENERATE(1, 16);
  const std::int64_t heads = 7, hd = 33, src_pages = 40, dst_pages = 17;
  const auto make = [&](std::int64_t pages) {
    return hnd ? PagedKVLayout::hnd(pages, page_size, heads, hd)
               : PagedKVLayout::nhd(pages, page_size, heads, hd);
  };
  const auto src_layout = make(src_pages), dst_layout = make(dst_pages);
  // Random distinct destinations, random sources, plus a run of three.
  std::vector<std::int64_t> dsts(static_cast<std::size_t>(dst_pages));
  std::iota(dsts.begin(), dsts.end(), 0);
  std::shuffle(dsts.begin(), dsts.end(), std::mt19937(4));
  Pairs pairs{{20, 4}, {21, 5}, {22, 6}};
  std::mt19937 rng(8);
  for (std::int64_t d : dsts) {
    if (d >= 4 && d <= 6) continue;
    if (pairs.size() == 11) break;
    pairs.emplace_back(std::int64_t(rng() % std::uint32_t(src_pages)), d);
  }
  const auto plan = SwapPlan::make(SwapDirection::kDeviceToHost, pairs, src_pages, dst_pages);
  CHECK(plan.runs().size() < pairs.size());

  const std::int64_t num_caches = 3;
  std::vector<std::vector<std::uint16_t>> src, dst;
  std::vector<void*> src_ptrs, dst_ptrs;
  for (std::int64_t c = 0; c < num_caches; ++c) {
    src.push_back(random_bits(std::size_t(src_layout.span_elements()), std::uint32_t(10 + c)));
    dst.emplace_back(std::size_t(dst_layout.span_elements()), kPoison);
  }
  for (auto& v : src) src_ptrs.push_back(v.data());
  for (auto& v : dst) dst_ptrs.push_back(v.data());
  kvkit::swap_blocks(src_layout, dst_layout, plan,
                     {src_ptrs.data(), dst_ptrs.data(), num_caches, DType::kBFloat16});
  for (std::int64_t c = 0; c < num_caches; ++c) {
    CHECK(dst[std::size_t(c)] == expected_pages(src_layout, dst_layout, src[std::size_t(c)], 0, pairs));
  }
}

TEST_CASE("swap_blocks between an interleaved device-style cache and a separate host-style cache") {
  // Source: [pages, 2, page_size, heads, hd] (K page then V page); destination:
  // separate K and V caches. Pitches differ, so each run is copied page by page.
  const std::int64_t ps = 4, heads = 2, hd = 8, src_pages = 9, dst_pages = 5;
  const auto src_layout = PagedKVLayout::nhd(src_pages, ps, heads, hd, KVStorage::kInterleaved);
  const auto dst_layout = PagedKVLayout::nhd(dst_pages, ps, heads, hd);
  const Pairs pairs{{2, 0}, {3, 1}, {4, 2}, {8, 4}};
  auto src = random_bits(std::size_t(src_layout.span_elements() + src_layout.v_offset), 5);
  std::vector<std::uint16_t> dk(std::size_t(dst_layout.span_elements()), kPoison), dv(dk);
  const auto plan = SwapPlan::make(SwapDirection::kHostToDevice, pairs, src_pages, dst_pages);
  CHECK(plan.runs().size() == 2);
  void* srcs[2] = {src.data(), src.data() + src_layout.v_offset};
  void* dsts[2] = {dk.data(), dv.data()};
  kvkit::swap_blocks(src_layout, dst_layout, plan, {srcs, dsts, 2, DType::kFloat16});
  CHECK(dk == expected_pages(src_layout, dst_layout, src, 0, pairs));
  CHECK(dv == expected_pages(src_layout, dst_layout, src, src_layout.v_offset, pairs));
}

TEST_CASE("swap_blocks rejects mismatched layouts, stale plans and bad pointers before copying") {
  const auto src_layout = PagedKVLayout::nhd(8, 16, 2, 64);
  const auto dst_layout = PagedKVLayout::nhd(4, 16, 2, 64);
  const auto plan = SwapPlan::make(SwapDirection::kDeviceToHost, Pairs{{1, 0}, {2, 1}}, 8, 4);
  auto src = random_bits(std::size_t(src_layout.span_elements()), 1);
  std::vector<std::uint16_t> dst(std::size_t(dst_layout.span_elements()), kPoison);
  void* s[1] = {src.data()};
  void* d[1] = {dst.data()};
  const kvkit::SwapBlocksArgs args{s, d, 1, DType::kBFloat16};

  CHECK_THROWS_WITH(kvkit::swap_blocks(src_layout, PagedKVLayout::nhd(4, 8, 2, 64), plan, args),
                    Contains("differ in shape or order"));
  CHECK_THROWS_WITH(kvkit::swap_blocks(src_layout, PagedKVLayout::hnd(4, 16, 2, 64), plan, args),
                    Contains("differ in shape or order"));
  CHECK_THROWS_WITH(kvkit::swap_blocks(src_layout, PagedKVLayout::nhd(5, 16, 2, 64), plan, args),
                    Contains("'plan.dst_num_pages()' = 4: expected the destination layout's num_pages (5)"));
  const auto strided = PagedKVLayout::strided(4, 16, 2, 64, 16 * 2 * 80, 2 * 80, 80);
  CHECK_THROWS_WITH(kvkit::swap_blocks(src_layout, strided, plan, args), Contains("must be dense"));
  void* null_ptrs[1] = {nullptr};
  CHECK_THROWS_WITH(kvkit::swap_blocks(src_layout, dst_layout, plan, {s, null_ptrs, 1, DType::kBFloat16}),
                    Contains("'dst_caches[i]' = nullptr"));
  void* odd[1] = {reinterpret_cast<unsigned char*>(src.data()) + 1};
  CHECK_THROWS_WITH(kvkit::swap_blocks(src_layout, dst_layout, plan, {odd, d, 1, DType::kBFloat16}),
                    Contains("aligned to 2 bytes"));
  CHECK(std::all_of(dst.begin(), dst.end(), [](std::uint16_t x) { return x == kPoison; }));
}
