// kvkit::BlockPool: allocation, reference counts, LRU free queue with lazy
// eviction of cached blocks, priorities, null block, events, invariants.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <set>
#include <vector>

#include "kvkit/memory/block_pool.hpp"

using Catch::Matchers::Contains;
using kvkit::BlockEvent;
using kvkit::BlockHash;
using kvkit::BlockPool;

namespace {
BlockHash h(std::uint64_t x) { return BlockHash{x * 0x9E3779B97F4A7C15ull + 1, x}; }
}  // namespace

TEST_CASE("a new pool has every block free and a consistent state") {
  for (std::int32_t n : {1, 7, 33}) {
    BlockPool pool(n);
    CHECK(pool.num_blocks() == n);
    CHECK(pool.num_free_blocks() == n);
    CHECK(pool.num_used_blocks() == 0);
    CHECK(pool.null_block() == BlockPool::kNoBlock);
    pool.check_invariants();
  }
  BlockPool with_null(7, true);
  CHECK(with_null.null_block() == 0);
  CHECK(with_null.num_free_blocks() == 6);
  with_null.check_invariants();
}

TEST_CASE("allocating n blocks is all or nothing") {
  BlockPool pool(8, true);  // 7 allocatable
  std::vector<std::int32_t> out(8, -7);
  REQUIRE(pool.allocate(5, out.data()));
  std::set<std::int32_t> ids(out.begin(), out.begin() + 5);
  CHECK(ids.size() == 5);
  CHECK(ids.count(0) == 0);  // never the null block
  for (int i = 0; i < 5; ++i) CHECK(pool.ref_count(out[i]) == 1);
  std::vector<std::int32_t> more(3, -7);
  CHECK_FALSE(pool.allocate(3, more.data()));
  CHECK(more == std::vector<std::int32_t>(3, -7));  // untouched
  CHECK(pool.num_free_blocks() == 2);
  pool.check_invariants();
  CHECK(pool.allocate(2, more.data()));
  CHECK(pool.num_free_blocks() == 0);
  CHECK(pool.allocate_one() == BlockPool::kNoBlock);
  CHECK(pool.allocate(0, nullptr));
  pool.check_invariants();
}

TEST_CASE("releasing drops references and frees a block only at zero") {
  BlockPool pool(4);
  const std::int32_t b = pool.allocate_one();
  pool.retain(b);
  CHECK(pool.ref_count(b) == 2);
  pool.release_one(b);
  CHECK(pool.ref_count(b) == 1);
  CHECK(pool.num_free_blocks() == 3);
  pool.release_one(b);
  CHECK(pool.ref_count(b) == 0);
  CHECK(pool.num_free_blocks() == 4);
  pool.check_invariants();
}

TEST_CASE("a double free or a bad id throws and changes nothing") {
  BlockPool pool(6, true);
  std::int32_t ids[2] = {};
  REQUIRE(pool.allocate(2, ids));
  const auto before = pool.stats();
  // ids[0] appears twice but holds one reference: the whole call fails.
  const std::int32_t twice[3] = {ids[1], ids[0], ids[0]};
  CHECK_THROWS_WITH(pool.release(twice, 3), Contains("'block' = " + std::to_string(ids[0])) &&
                                                Contains("double free"));
  CHECK(pool.ref_count(ids[0]) == 1);
  CHECK(pool.ref_count(ids[1]) == 1);
  CHECK_THROWS_WITH(pool.release_one(0), Contains("not the null block"));
  CHECK_THROWS_WITH(pool.release_one(6), Contains("'block' = 6") && Contains("in [0, 6)"));
  CHECK_THROWS_WITH(pool.release_one(-1), Contains("'block' = -1"));
  std::int32_t unused = 1;
  while (unused == ids[0] || unused == ids[1]) ++unused;
  CHECK_THROWS_WITH(pool.retain(unused), Contains("reference count is 0"));
  CHECK_THROWS_WITH(pool.release_one(ids[0], 8), Contains("'priority' = 8"));
  CHECK_THROWS_WITH(pool.allocate(-1, ids), Contains("'n' = -1"));
  const auto after = pool.stats();
  CHECK(after.num_free == before.num_free);
  CHECK(after.num_used == before.num_used);
  pool.check_invariants();
  CHECK_THROWS_WITH(BlockPool(0), Contains("'num_blocks' = 0"));
  CHECK_THROWS_WITH(BlockPool(1, true), Contains("'num_blocks' = 1") && Contains("null block"));
}

TEST_CASE("freed cached blocks stay findable until reused, oldest evicted first") {
  BlockPool pool(4);
  std::int32_t b[4] = {};
  REQUIRE(pool.allocate(4, b));
  for (int i = 0; i < 3; ++i) CHECK(pool.cache_block(b[i], h(i)));
  // Free the cached ones in order 2, 0, 1 and the uncached one last.
  pool.release_one(b[2]);
  pool.release_one(b[0]);
  pool.release_one(b[1]);
  pool.release_one(b[3]);
  CHECK(pool.num_cached_free_blocks() == 3);
  CHECK(pool.stats().num_cached == 3);
  CHECK(pool.find_cached(h(0)) == b[0]);
  // The uncached block is reused first, then cached blocks in LRU order.
  CHECK(pool.allocate_one() == b[3]);
  CHECK(pool.stats().evictions == 0);
  CHECK(pool.allocate_one() == b[2]);
  CHECK(pool.find_cached(h(2)) == BlockPool::kNoBlock);
  CHECK(pool.stats().evictions == 1);
  // A hit takes the block off the free queue with a new reference.
  CHECK(pool.acquire_cached(h(1)) == b[1]);
  CHECK(pool.ref_count(b[1]) == 1);
  CHECK(pool.num_free_blocks() == 1);
  CHECK(pool.allocate_one() == b[0]);
  CHECK(pool.allocate_one() == BlockPool::kNoBlock);
  CHECK(pool.find_cached(h(1)) == b[1]);  // still cached while used
  pool.check_invariants();
}

TEST_CASE("lower retention priorities are evicted before higher ones") {
  BlockPool pool(3);
  std::int32_t b[3] = {};
  REQUIRE(pool.allocate(3, b));
  for (int i = 0; i < 3; ++i) pool.cache_block(b[i], h(10 + i));
  pool.release_one(b[0], 5);
  pool.release_one(b[1], 1);
  pool.release_one(b[2], 5);
  CHECK(pool.allocate_one() == b[1]);
  CHECK(pool.allocate_one() == b[0]);
  CHECK(pool.allocate_one() == b[2]);
  pool.check_invariants();
}

TEST_CASE("a hash names at most one block and a block holds at most one hash") {
  BlockPool pool(3);
  std::int32_t b[2] = {};
  REQUIRE(pool.allocate(2, b));
  CHECK(pool.cache_block(b[0], h(1)));
  CHECK_FALSE(pool.cache_block(b[1], h(1)));  // duplicate content stays uncached
  CHECK_FALSE(pool.is_cached(b[1]));
  CHECK_FALSE(pool.cache_block(b[0], h(1)));  // already registered: no-op
  CHECK_THROWS_WITH(pool.cache_block(b[0], h(2)), Contains("already cached"));
  pool.uncache_block(b[0]);
  CHECK(pool.find_cached(h(1)) == BlockPool::kNoBlock);
  CHECK_THROWS_WITH(pool.cache_block(2, h(3)), Contains("reference count is 0"));
  pool.check_invariants();
}

TEST_CASE("events report stored and removed hashes in order") {
  BlockPool pool(2, false, kvkit::MemoryTier::kHost);
  pool.set_events_enabled(true);
  const std::int32_t a = pool.allocate_one();
  pool.cache_block(a, h(7));
  pool.release_one(a);
  pool.allocate_one();  // the empty block
  pool.allocate_one();  // evicts a
  const auto events = pool.take_events();
  REQUIRE(events.size() == 2);
  CHECK(events[0].kind == BlockEvent::Kind::kStored);
  CHECK(events[0].hash == h(7));
  CHECK(events[0].tier == kvkit::MemoryTier::kHost);
  CHECK(events[1].kind == BlockEvent::Kind::kRemoved);
  CHECK(events[1].block_id == a);
  CHECK(pool.take_events().empty());
}

TEST_CASE("lookup counters and evict_all_cached_free") {
  BlockPool pool(3);
  pool.record_lookup(3, 2);
  CHECK(pool.stats().hits == 3);
  CHECK(pool.stats().misses == 2);
  std::int32_t b[2] = {};
  REQUIRE(pool.allocate(2, b));
  pool.cache_block(b[0], h(1));
  pool.cache_block(b[1], h(2));
  pool.release(b, 2);
  CHECK(pool.evict_all_cached_free() == 2);
  CHECK(pool.num_cached_free_blocks() == 0);
  CHECK(pool.stats().num_cached == 0);
  CHECK(pool.stats().evictions == 2);
  pool.check_invariants();
}
