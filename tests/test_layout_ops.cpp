// CPU ops on cache layouts: append (K/V and latent), copy_blocks, gather.
// Copies must be exact; the expected cache is built with explicit index
// formulas (not the layout's own offset()), and destinations are poisoned so
// that any write outside the addressed slots shows.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/layout/contiguous_kv_layout.hpp"
#include "kvkit/layout/latent_kv_layout.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"
#include "kvkit/ops/append.hpp"
#include "kvkit/ops/copy_blocks.hpp"
#include "kvkit/ops/gather.hpp"
#include "kvkit/ops/streaming_copy.hpp"

using Catch::Matchers::Contains;
using kvkit::AppendKVArgs;
using kvkit::DType;
using kvkit::KVStorage;
using kvkit::PagedKVLayout;

namespace {

constexpr float kPoison = -12345.0f;

std::vector<float> random_values(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-4.0f, 4.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

/// Distinct random slots for num_tokens tokens, every third one padding (-1) when `pad`.
std::vector<std::int64_t> random_slots(std::int64_t num_tokens, std::int64_t num_slots, bool pad,
                                       std::uint32_t seed) {
  std::vector<std::int64_t> all(static_cast<std::size_t>(num_slots));
  std::iota(all.begin(), all.end(), 0);
  std::mt19937 rng(seed);
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<std::int64_t> slots(all.begin(), all.begin() + num_tokens);
  if (pad) {
    for (std::size_t t = 1; t < slots.size(); t += 3) slots[t] = -1 - std::int64_t(t % 2);
  }
  return slots;
}

enum class Kind { kNhd, kHnd };

/// Expected element index of (page, slot, head, dim) written from first principles.
std::int64_t reference_index(Kind kind, bool interleaved, bool is_v, std::int64_t ps,
                             std::int64_t heads, std::int64_t hd, std::int64_t page,
                             std::int64_t s, std::int64_t h, std::int64_t d) {
  const std::int64_t page_elems = ps * heads * hd;
  const std::int64_t in_page = kind == Kind::kNhd ? (s * heads + h) * hd + d : (h * ps + s) * hd + d;
  if (interleaved) return page * 2 * page_elems + (is_v ? page_elems : 0) + in_page;
  return page * page_elems + in_page;
}

void run_append_case(Kind kind, KVStorage storage, std::int64_t pages, std::int64_t ps,
                     std::int64_t heads, std::int64_t hd, std::int64_t num_tokens, bool pad,
                     bool padded_source,
                     kvkit::detail::StoreKind stores = kvkit::detail::StoreKind::kAuto) {
  const bool inter = storage == KVStorage::kInterleaved;
  const auto layout = kind == Kind::kNhd ? PagedKVLayout::nhd(pages, ps, heads, hd, storage)
                                         : PagedKVLayout::hnd(pages, ps, heads, hd, storage);
  // Source rows padded to (hd + 3) per head and one extra head per token when asked.
  const std::int64_t sh = padded_source ? hd + 3 : hd;
  const std::int64_t st = padded_source ? sh * (heads + 1) : sh * heads;
  const auto key = random_values(std::size_t(num_tokens * st), 1);
  const auto value = random_values(std::size_t(num_tokens * st), 2);
  const auto slots = random_slots(num_tokens, pages * ps, pad, 3);
  const std::size_t cache_elems = std::size_t(pages * ps * heads * hd * (inter ? 2 : 1));
  std::vector<float> k_cache(cache_elems, kPoison), v_cache(cache_elems, kPoison);
  float* v_ptr = inter ? k_cache.data() + layout.v_offset : v_cache.data();

  AppendKVArgs a;
  a.key = key.data();
  a.value = value.data();
  a.key_stride_token = a.value_stride_token = st;
  a.key_stride_head = a.value_stride_head = sh;
  a.slot_mapping = slots.data();
  a.num_tokens = num_tokens;
  a.k_cache = k_cache.data();
  a.v_cache = v_ptr;
  a.src_dtype = a.cache_dtype = DType::kFloat32;
  kvkit::detail::append_kv_with(layout, a, stores);

  std::vector<float> expect_k(cache_elems, kPoison), expect_v(cache_elems, kPoison);
  std::vector<float>& ev = inter ? expect_k : expect_v;
  for (std::int64_t t = 0; t < num_tokens; ++t) {
    if (slots[std::size_t(t)] < 0) continue;
    const std::int64_t page = slots[std::size_t(t)] / ps, s = slots[std::size_t(t)] % ps;
    for (std::int64_t h = 0; h < heads; ++h) {
      for (std::int64_t d = 0; d < hd; ++d) {
        const std::size_t src = std::size_t(t * st + h * sh + d);
        expect_k[std::size_t(reference_index(kind, inter, false, ps, heads, hd, page, s, h, d))] = key[src];
        ev[std::size_t(reference_index(kind, inter, true, ps, heads, hd, page, s, h, d))] = value[src];
      }
    }
  }
  CHECK(k_cache == expect_k);
  if (!inter) CHECK(v_cache == expect_v);
}

}  // namespace

TEST_CASE("append_kv writes each token's rows at its slot and nothing else") {
  const Kind kind = GENERATE(Kind::kNhd, Kind::kHnd);
  const KVStorage storage = GENERATE(KVStorage::kSeparate, KVStorage::kInterleaved);
  SECTION("decode: one token") { run_append_case(kind, storage, 3, 4, 2, 8, 1, false, false); }
  SECTION("page_size - 1, page_size, page_size + 1 tokens, 7 heads") {
    for (std::int64_t n : {15, 16, 17}) run_append_case(kind, storage, 5, 16, 7, 64, n, false, false);
  }
  SECTION("page size 1") { run_append_case(kind, storage, 40, 1, 3, 32, 33, true, false); }
  SECTION("head_dim 96, 128, 256, 576 with padding slots and a strided source") {
    for (std::int64_t hd : {96, 128, 256, 576}) run_append_case(kind, storage, 4, 8, 2, hd, 25, true, true);
  }
}

TEST_CASE("append_kv writes the same cache with ordinary and with streaming stores") {
  // append_kv picks the stores by cache size; both kinds are forced here on
  // small caches (rows of 4 to 2,304 bytes, whole tokens and single heads).
  using kvkit::detail::StoreKind;
  const StoreKind stores = GENERATE(StoreKind::kOrdinary, StoreKind::kStreaming);
  const Kind kind = GENERATE(Kind::kNhd, Kind::kHnd);
  const KVStorage storage = GENERATE(KVStorage::kSeparate, KVStorage::kInterleaved);
  CAPTURE(int(stores));
  run_append_case(kind, storage, 3, 4, 2, 8, 1, false, false, stores);
  run_append_case(kind, storage, 40, 1, 3, 1, 33, true, false, stores);
  run_append_case(kind, storage, 5, 16, 7, 7, 17, true, true, stores);
  for (std::int64_t hd : {33, 128, 576}) run_append_case(kind, storage, 4, 8, 2, hd, 25, true, true, stores);
}

TEST_CASE("append_kv streams into caches of at least kStreamingStoreMinCacheBytes") {
  using kvkit::detail::StoreKind;
  using kvkit::detail::use_streaming_stores;
  constexpr std::int64_t kMin = kvkit::kStreamingStoreMinCacheBytes;
  CHECK_FALSE(use_streaming_stores(StoreKind::kAuto, kMin - 1));
  CHECK(use_streaming_stores(StoreKind::kAuto, kMin));
  CHECK(use_streaming_stores(StoreKind::kStreaming, 64));
  CHECK_FALSE(use_streaming_stores(StoreKind::kOrdinary, kMin * 4));
  // Through the public entry point: a 4 MiB bfloat16 cache (2,048 pages of 16
  // x 64), K and V, written at 300 scattered slots of which every third is padding.
  const auto layout = PagedKVLayout::nhd(2048, 16, 1, 64);
  REQUIRE(layout.num_slots() * 64 * 2 == kMin);
  const std::int64_t n = 300;
  std::vector<std::uint16_t> key(std::size_t(n * 64)), value(key.size());
  std::mt19937 rng(21);
  for (auto& x : key) x = std::uint16_t(rng());
  for (auto& x : value) x = std::uint16_t(rng());
  const auto slots = random_slots(n, layout.num_slots(), true, 22);
  const std::uint16_t poison = 0xdead;
  std::vector<std::uint16_t> kc(std::size_t(layout.span_elements()), poison), vc(kc);
  kvkit::append_kv(layout, AppendKVArgs::dense(key.data(), value.data(), slots.data(), n, 1, 64,
                                               kc.data(), vc.data(), DType::kBFloat16));
  std::vector<std::uint16_t> ek(kc.size(), poison), ev(kc.size(), poison);
  for (std::int64_t t = 0; t < n; ++t) {
    const std::int64_t s = slots[std::size_t(t)];
    if (s < 0) continue;
    for (std::int64_t d = 0; d < 64; ++d) {
      ek[std::size_t(s * 64 + d)] = key[std::size_t(t * 64 + d)];
      ev[std::size_t(s * 64 + d)] = value[std::size_t(t * 64 + d)];
    }
  }
  CHECK(kc == ek);
  CHECK(vc == ev);
}

TEST_CASE("copy_row_streaming copies exactly the addressed bytes at any alignment") {
  // Destination and source offsets 0..17 bytes off a 64-byte boundary,
  // lengths around the 16- and 64-byte steps: only [dst, dst + n) changes.
  std::vector<unsigned char> src(512);
  std::mt19937 rng(23);
  for (auto& b : src) b = static_cast<unsigned char>(rng());
  alignas(64) unsigned char dst[512];
  for (std::size_t doff = 0; doff < 18; ++doff) {
    for (std::size_t soff : {std::size_t(0), std::size_t(1), std::size_t(8), std::size_t(17)}) {
      for (std::size_t n : {0, 1, 2, 15, 16, 17, 31, 47, 63, 64, 65, 100, 127, 128, 129, 255, 256, 300}) {
        std::memset(dst, 0xa5, sizeof dst);
        kvkit::detail::copy_row_streaming(dst + doff, src.data() + soff, n);
        kvkit::detail::streaming_store_fence();
        bool ok = true;
        for (std::size_t i = 0; i < sizeof dst; ++i) {
          const bool inside = i >= doff && i < doff + n;
          ok = ok && dst[i] == (inside ? src[soff + i - doff] : 0xa5);
        }
        CAPTURE(doff, soff, n);
        REQUIRE(ok);
      }
    }
  }
}

TEST_CASE("append_kv copies bfloat16 bit patterns exactly") {
  const auto layout = PagedKVLayout::nhd(4, 16, 8, 128);
  std::mt19937 rng(9);
  std::vector<std::uint16_t> key(7 * 8 * 128), value(key.size());
  for (auto& x : key) x = std::uint16_t(rng());  // any pattern, NaNs included
  for (auto& x : value) x = std::uint16_t(rng());
  const std::vector<std::int64_t> slots{0, 17, 63, -1, 5, 32, 48};
  std::vector<std::uint16_t> kc(4 * 16 * 8 * 128, 0xdead), vc(kc.size(), 0xdead);
  kvkit::append_kv(layout, AppendKVArgs::dense(key.data(), value.data(), slots.data(), 7, 8, 128,
                                               kc.data(), vc.data(), DType::kBFloat16));
  std::size_t touched = 0;
  for (std::size_t i = 0; i < kc.size(); ++i) touched += kc[i] != 0xdead;
  for (std::size_t t = 0; t < slots.size(); ++t) {
    if (slots[t] < 0) continue;
    for (std::size_t i = 0; i < 8 * 128; ++i) {
      REQUIRE(kc[std::size_t(slots[t]) * 1024 + i] == key[t * 1024 + i]);
      REQUIRE(vc[std::size_t(slots[t]) * 1024 + i] == value[t * 1024 + i]);
    }
  }
  CHECK(touched <= 6 * 1024);  // six real tokens; a random pattern may equal the poison
  CHECK(touched > 6 * 1024 - 8);
}

TEST_CASE("append_kv fills a ring buffer for a sliding window") {
  // One sequence of 11 tokens into a window of 4: rows hold positions 8, 9, 10, 7.
  const auto layout = kvkit::ContiguousKVLayout::token_major(2, 4, 1, 3, /*ring=*/true);
  std::vector<float> kc(2 * 4 * 3, kPoison), vc(kc.size(), kPoison);
  for (std::int64_t pos = 0; pos < 11; ++pos) {
    const std::vector<float> k{float(pos), float(pos) + 0.25f, float(pos) + 0.5f};
    const std::vector<float> v{-float(pos), -1.0f, -2.0f};
    const std::int64_t slot = layout.slot(1, pos);
    kvkit::append_kv(layout, AppendKVArgs::dense(k.data(), v.data(), &slot, 1, 1, 3, kc.data(),
                                                 vc.data(), DType::kFloat32));
  }
  const std::vector<float> expect_k{kPoison, kPoison, kPoison, kPoison, kPoison, kPoison,
                                    kPoison, kPoison, kPoison, kPoison, kPoison, kPoison,
                                    8, 8.25f, 8.5f, 9, 9.25f, 9.5f, 10, 10.25f, 10.5f, 7, 7.25f, 7.5f};
  CHECK(kc == expect_k);
  CHECK(layout.first_held_position(11) == 7);
}

TEST_CASE("append_kv into a head-major contiguous cache") {
  const auto layout = kvkit::ContiguousKVLayout::head_major(3, 5, 7, 4);
  const auto key = random_values(6 * 7 * 4, 4), value = random_values(6 * 7 * 4, 5);
  const std::vector<std::int64_t> slots{layout.slot(0, 0), layout.slot(2, 4), -1,
                                        layout.slot(1, 2), layout.slot(2, 0), layout.slot(0, 3)};
  std::vector<float> kc(3 * 5 * 7 * 4, kPoison), vc(kc.size(), kPoison);
  kvkit::append_kv(layout, AppendKVArgs::dense(key.data(), value.data(), slots.data(), 6, 7, 4,
                                               kc.data(), vc.data(), DType::kFloat32));
  std::vector<float> ek(kc.size(), kPoison), ev(kc.size(), kPoison);
  for (std::size_t t = 0; t < 6; ++t) {
    if (slots[t] < 0) continue;
    const std::int64_t seq = slots[t] / 5, pos = slots[t] % 5;
    for (std::int64_t h = 0; h < 7; ++h)
      for (std::int64_t d = 0; d < 4; ++d) {
        const std::size_t dst = std::size_t(((seq * 7 + h) * 5 + pos) * 4 + d);
        ek[dst] = key[t * 28 + std::size_t(h * 4 + d)];
        ev[dst] = value[t * 28 + std::size_t(h * 4 + d)];
      }
  }
  CHECK(kc == ek);
  CHECK(vc == ev);
}

TEST_CASE("append_latent writes [c_kv | k_pe] rows with page size 64") {
  const auto layout = kvkit::LatentKVLayout::dense(3, 64, 512, 64);
  const std::int64_t n = 65;
  const auto c = random_values(std::size_t(n * 520), 6);  // stride 520 > 512
  const auto r = random_values(std::size_t(n * 64), 7);
  const auto slots = random_slots(n, 3 * 64, true, 8);
  std::vector<float> cache(3 * 64 * 576, kPoison);
  kvkit::AppendLatentArgs a;
  a.c_kv = c.data();
  a.k_pe = r.data();
  a.c_kv_stride_token = 520;
  a.k_pe_stride_token = 64;
  a.slot_mapping = slots.data();
  a.num_tokens = n;
  a.cache = cache.data();
  a.src_dtype = a.cache_dtype = DType::kFloat32;
  kvkit::append_latent(layout, a);
  std::vector<float> expect(cache.size(), kPoison);
  for (std::int64_t t = 0; t < n; ++t) {
    const std::int64_t s = slots[std::size_t(t)];
    if (s < 0) continue;
    for (std::int64_t d = 0; d < 512; ++d) expect[std::size_t(s * 576 + d)] = c[std::size_t(t * 520 + d)];
    for (std::int64_t d = 0; d < 64; ++d) expect[std::size_t(s * 576 + 512 + d)] = r[std::size_t(t * 64 + d)];
  }
  CHECK(cache == expect);
}

TEST_CASE("append_latent writes the same rows with ordinary and streaming stores, unaligned") {
  // bfloat16 rows [512 | 64] in a cache that starts 2 bytes past a 64-byte
  // boundary, so every row has partial 16-byte chunks at both ends and at
  // the c_kv / k_pe junction.
  using kvkit::detail::StoreKind;
  const StoreKind stores = GENERATE(StoreKind::kOrdinary, StoreKind::kStreaming);
  const auto layout = kvkit::LatentKVLayout::dense(3, 64, 512, 64);
  const std::int64_t n = 65, row = 576;
  std::vector<std::uint16_t> c(std::size_t(n * 515)), r(std::size_t(n * 64));  // c_kv stride 515
  std::mt19937 rng(24);
  for (auto& x : c) x = std::uint16_t(rng());
  for (auto& x : r) x = std::uint16_t(rng());
  const auto slots = random_slots(n, layout.num_slots(), true, 25);
  const std::uint16_t poison = 0xbeef;
  std::vector<std::uint16_t> storage(std::size_t(layout.num_slots() * row + 64), poison);
  auto* base = reinterpret_cast<std::uint16_t*>(
      (reinterpret_cast<std::uintptr_t>(storage.data()) + 63) / 64 * 64 + 2);
  kvkit::AppendLatentArgs a;
  a.c_kv = c.data();
  a.k_pe = r.data();
  a.c_kv_stride_token = 515;
  a.k_pe_stride_token = 64;
  a.slot_mapping = slots.data();
  a.num_tokens = n;
  a.cache = base;
  a.src_dtype = a.cache_dtype = DType::kBFloat16;
  kvkit::detail::append_latent_with(layout, a, stores);
  std::vector<std::uint16_t> expect(storage.size(), poison);
  const std::size_t at = std::size_t(base - storage.data());
  for (std::int64_t t = 0; t < n; ++t) {
    const std::int64_t s = slots[std::size_t(t)];
    if (s < 0) continue;
    for (std::int64_t d = 0; d < 512; ++d) expect[at + std::size_t(s * row + d)] = c[std::size_t(t * 515 + d)];
    for (std::int64_t d = 0; d < 64; ++d) expect[at + std::size_t(s * row + 512 + d)] = r[std::size_t(t * 64 + d)];
  }
  CHECK(storage == expect);
}

TEST_CASE("append rejects bad slots, dtypes and pointers before writing anything") {
  const auto layout = PagedKVLayout::nhd(2, 4, 2, 8);
  const auto key = random_values(3 * 16, 1);
  std::vector<float> kc(2 * 4 * 16, kPoison), vc(kc.size(), kPoison);
  std::vector<std::int64_t> slots{1, 8, 2};
  auto a = AppendKVArgs::dense(key.data(), key.data(), slots.data(), 3, 2, 8, kc.data(),
                               vc.data(), DType::kFloat32);
  CHECK_THROWS_WITH(kvkit::append_kv(layout, a),
                    Contains("slot_mapping[1] = 8: expected < num_slots (8)"));
  CHECK(std::all_of(kc.begin(), kc.end(), [](float x) { return x == kPoison; }));
  slots[1] = 3;
  auto b = a;
  b.cache_dtype = DType::kFloat8E4M3;
  CHECK_THROWS_WITH(kvkit::append_kv(layout, b),
                    Contains("source dtype float32 differs from cache dtype float8_e4m3"));
  b = a;
  b.v_cache = nullptr;
  CHECK_THROWS_WITH(kvkit::append_kv(layout, b),
                    Contains("argument 'v_cache' = nullptr: expected a non-null pointer"));
  b = a;
  b.key = reinterpret_cast<const unsigned char*>(key.data()) + 2;
  CHECK_THROWS_WITH(kvkit::append_kv(layout, b),
                    Contains("argument 'key'") && Contains("aligned to 4 bytes (float32)"));
  b = a;
  b.key_stride_head = 4;
  CHECK_THROWS_WITH(kvkit::append_kv(layout, b),
                    Contains("'key_stride_head' = 4: expected >= head_dim (8)"));
  CHECK(std::all_of(kc.begin(), kc.end(), [](float x) { return x == kPoison; }));
  kvkit::AppendLatentArgs l;
  l.num_tokens = 1;
  CHECK_THROWS_WITH(kvkit::append_latent(kvkit::LatentKVLayout::dense(1, 64, 16, 4), l),
                    Contains("'c_kv' = nullptr"));
}

TEST_CASE("copy_blocks copies pages in every cache and leaves the others alone") {
  const Kind kind = GENERATE(Kind::kNhd, Kind::kHnd);
  // 17,500 pages of 240 bytes: caches over kStreamingStoreMinCacheBytes,
  // written with streaming stores (20-byte rows: unaligned heads and tails).
  const std::int64_t pages = GENERATE(9, 17500), ps = 4, heads = 3, hd = 5;
  static_assert(17500 * 4 * 3 * 5 * 4 >= kvkit::kStreamingStoreMinCacheBytes, "a streamed cache");
  const auto dense = kind == Kind::kNhd ? PagedKVLayout::nhd(pages, ps, heads, hd)
                                        : PagedKVLayout::hnd(pages, ps, heads, hd);
  // Also a strided (non-dense) layout: rows padded to 8, pages to 128 elements.
  const auto strided = PagedKVLayout::strided(pages, ps, heads, hd, 128, 3 * 8, 8);
  for (const auto& layout : {dense, strided}) {
    const std::size_t elems = std::size_t(layout.span_elements());
    std::vector<std::vector<float>> caches;
    for (std::uint32_t c = 0; c < 3; ++c) caches.push_back(random_values(elems, 20 + c));
    const auto before = caches;
    std::vector<void*> ptrs;
    for (auto& c : caches) ptrs.push_back(c.data());
    const std::vector<std::int64_t> pairs{0, 5, 3, 8, 0, 1};  // page 0 copied twice
    kvkit::CopyBlocksArgs a{ptrs.data(), 3, pairs.data(), 3, DType::kFloat32};
    kvkit::copy_blocks(layout, a);
    for (std::size_t c = 0; c < 3; ++c) {
      auto expect = before[c];
      for (std::size_t i = 0; i < 3; ++i) {
        for (std::int64_t s = 0; s < ps; ++s)
          for (std::int64_t h = 0; h < heads; ++h)
            for (std::int64_t d = 0; d < hd; ++d)
              expect[std::size_t(layout.offset(pairs[2 * i + 1], s, h, d))] =
                  before[c][std::size_t(layout.offset(pairs[2 * i], s, h, d))];
      }
      // The first difference, not the vectors (Catch would print millions of values).
      const auto diff = std::mismatch(caches[c].begin(), caches[c].end(), expect.begin());
      INFO("cache " << c << ", " << pages << " pages");
      CHECK(diff.first - caches[c].begin() == std::ptrdiff_t(elems));
    }
  }
}

TEST_CASE("copy_blocks rejects out-of-range and conflicting pairs before copying") {
  const auto layout = PagedKVLayout::nhd(4, 2, 1, 4);
  auto cache = random_values(4 * 8, 3);
  const auto before = cache;
  void* ptr = cache.data();
  std::vector<std::int64_t> pairs{0, 1, 2, 4};
  kvkit::CopyBlocksArgs a{&ptr, 1, pairs.data(), 2, DType::kFloat32};
  CHECK_THROWS_WITH(kvkit::copy_blocks(layout, a),
                    Contains("pairs[1][1] = 4: expected a page id in [0, 4)"));
  pairs = {0, 1, 2, 1};
  CHECK_THROWS_WITH(kvkit::copy_blocks(layout, a),
                    Contains("pairs[1][1] = 1: expected a destination that is neither"));
  pairs = {0, 1, 1, 2};
  CHECK_THROWS_WITH(kvkit::copy_blocks(layout, a), Contains("pairs[0][1] = 1"));
  CHECK(cache == before);
  void* null_ptr = nullptr;
  pairs = {0, 1, 2, 3};
  kvkit::CopyBlocksArgs b{&null_ptr, 1, pairs.data(), 2, DType::kFloat32};
  CHECK_THROWS_WITH(kvkit::copy_blocks(layout, b), Contains("'caches[i]' = nullptr"));
}

TEST_CASE("validate_copy_pairs needs memory for the pairs only, however many pages the cache has") {
  // Regression: it kept a byte per cache page (2^50 here: std::bad_alloc).
  const std::int64_t pages = std::int64_t(1) << 50;
  std::vector<std::int64_t> pairs{pages - 1, 5, 7, pages - 2, 9, 3};
  CHECK_NOTHROW(kvkit::validate_copy_pairs(pairs.data(), 3, pages, "test"));
  pairs[5] = 5;  // a second copy into page 5
  CHECK_THROWS_WITH(kvkit::validate_copy_pairs(pairs.data(), 3, pages, "test"),
                    Contains("pairs[2][1] = 5: expected a destination that is neither"));
  pairs[5] = pages - 1;  // the destination is the first pair's source
  CHECK_THROWS_WITH(kvkit::validate_copy_pairs(pairs.data(), 3, pages, "test"),
                    Contains("pairs[2][1] = 1125899906842623"));
}

TEST_CASE("gather_kv reads a sequence's pages back into dense tensors") {
  const Kind kind = GENERATE(Kind::kNhd, Kind::kHnd);
  const std::int64_t pages = 6, ps = 8, heads = 7, hd = 64;
  const auto layout = kind == Kind::kNhd ? PagedKVLayout::nhd(pages, ps, heads, hd)
                                         : PagedKVLayout::hnd(pages, ps, heads, hd);
  const std::vector<std::int32_t> seq_pages{4, 0, 5};
  for (std::int64_t n : {1, 7, 8, 9, 24}) {
    // Append n tokens through the page list, gather them, get the input back.
    const auto key = random_values(std::size_t(n * heads * hd), 30);
    const auto value = random_values(std::size_t(n * heads * hd), 31);
    std::vector<std::int64_t> slots;
    for (std::int64_t t = 0; t < n; ++t) slots.push_back(kvkit::token_slot(seq_pages.data(), t, 3));
    const auto kc0 = random_values(std::size_t(pages * ps * heads * hd), 32);
    auto kc = kc0, vc = kc0;
    kvkit::append_kv(layout, AppendKVArgs::dense(key.data(), value.data(), slots.data(), n, heads,
                                                 hd, kc.data(), vc.data(), DType::kFloat32));
    std::vector<float> ko(std::size_t(n * heads * hd + 1), kPoison), vo(ko.size(), kPoison);
    kvkit::GatherKVArgs g{kc.data(), vc.data(), seq_pages.data(), n, ko.data(), vo.data(),
                          heads * hd, hd, DType::kFloat32};
    kvkit::gather_kv(layout, g);
    CHECK(std::equal(key.begin(), key.end(), ko.begin()));
    CHECK(std::equal(value.begin(), value.end(), vo.begin()));
    CHECK(ko.back() == kPoison);
    CHECK(vo.back() == kPoison);
  }
}

TEST_CASE("gather_kv of a long sequence: threads, both store kinds, whole-token and per-head copies") {
  // 1,100 tokens (chunks of 256 shared among threads where OpenMP is on),
  // 16-token pages in random order; outputs dense (one copy per token) or
  // with padded heads (one copy per head row), poisoned around the rows.
  const std::int64_t ps = 16, heads = 3, hd = 40, n = 1100, pages = 80;
  const auto layout = PagedKVLayout::nhd(pages, ps, heads, hd);
  std::vector<std::int32_t> seq_pages(static_cast<std::size_t>(pages));
  std::iota(seq_pages.begin(), seq_pages.end(), 0);
  std::shuffle(seq_pages.begin(), seq_pages.end(), std::mt19937(6));
  const auto kc = random_values(std::size_t(layout.span_elements()), 41);
  const auto vc = random_values(std::size_t(layout.span_elements()), 42);
  const auto stores = GENERATE(kvkit::detail::StoreKind::kOrdinary, kvkit::detail::StoreKind::kStreaming);
  const std::int64_t head_stride = GENERATE(std::int64_t(40), std::int64_t(43));
  CAPTURE(int(stores), head_stride);
  const std::int64_t token_stride = heads * head_stride + 1;
  std::vector<float> ko(std::size_t(n * token_stride), kPoison), vo(ko.size(), kPoison);
  kvkit::GatherKVArgs g{kc.data(), vc.data(), seq_pages.data(), n, ko.data(), vo.data(), token_stride,
                        head_stride, DType::kFloat32};
  kvkit::detail::gather_kv_with(layout, g, stores);
  std::size_t mismatches = 0;
  for (std::int64_t t = 0; t < n; ++t) {
    const std::int64_t slot = kvkit::token_slot(seq_pages.data(), t, 4);
    for (std::int64_t e = 0; e < token_stride; ++e) {
      const std::int64_t h = e / head_stride, d = e % head_stride;
      const bool in_row = h < heads && d < hd;
      const std::size_t at = std::size_t(t * token_stride + e);
      const float want_k = in_row ? kc[std::size_t(layout.slot_offset(slot, h) + d)] : kPoison;
      const float want_v = in_row ? vc[std::size_t(layout.slot_offset(slot, h) + d)] : kPoison;
      mismatches += ko[at] != want_k || vo[at] != want_v;
    }
  }
  CHECK(mismatches == 0);
}

TEST_CASE("gather_kv of a latent cache through its paged view, K only") {
  const auto latent = kvkit::LatentKVLayout::dense(4, 64, 512, 64);
  const auto cache = random_values(4 * 64 * 576, 40);
  const std::vector<std::int32_t> seq_pages{3, 1};
  std::vector<float> out(70 * 576, kPoison);
  kvkit::GatherKVArgs g{cache.data(), nullptr, seq_pages.data(), 70, out.data(), nullptr, 576,
                        576, DType::kFloat32};
  kvkit::gather_kv(latent.as_paged(), g);
  for (std::size_t t = 0; t < 70; ++t) {
    const std::size_t src = (t < 64 ? 3 * 64 + t : 64 + (t - 64)) * 576;
    REQUIRE(std::equal(out.begin() + std::ptrdiff_t(t * 576), out.begin() + std::ptrdiff_t(t * 576 + 576),
                       cache.begin() + std::ptrdiff_t(src)));
  }
  const std::vector<std::int32_t> bad{3, 4};
  g.pages = bad.data();
  CHECK_THROWS_WITH(kvkit::gather_kv(latent.as_paged(), g),
                    Contains("pages[1] = 4: expected a page id in [0, 4)"));
  g.pages = seq_pages.data();
  g.value_out = out.data();
  CHECK_THROWS_WITH(kvkit::gather_kv(latent.as_paged(), g),
                    Contains("v_cache and value_out must both be given or both be null"));
}
