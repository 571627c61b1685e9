// kvkit::RadixPrefixIndex and its use through KVCacheManager
// (attach_prefix_tokens / insert_prefix_tokens): sub-block prefix hits with
// copy-on-partial-reuse (vLLM issue 54607), divergence inside a block, LRU and
// priority eviction under pool pressure, bad input. A simulated KV store (one
// value per slot) executes the copy lists, so that every hit is checked by
// content, not only by bookkeeping. Every test ends with check_invariants().

#include <catch2/catch.hpp>

#include <cstdint>
#include <vector>

#include "kvkit/memory/kv_cache_manager.hpp"
#include "kvkit/memory/radix_index.hpp"

using Catch::Matchers::Contains;
using kvkit::BlockCopy;
using kvkit::BlockHash;
using kvkit::BlockPool;
using kvkit::KVCacheManager;
using kvkit::KVCacheManagerOptions;
using kvkit::PrefixHit;
using kvkit::RadixMatch;
using kvkit::RadixPrefixIndex;
using kvkit::SequenceId;
using kvkit::SequenceOptions;

namespace {

KVCacheManagerOptions radix_opts(std::int32_t blocks, std::int32_t block_size) {
  KVCacheManagerOptions o;
  o.num_blocks = blocks;
  o.block_size = block_size;
  o.radix_index = true;
  return o;
}

std::vector<std::int32_t> tokens(int n, std::uint32_t seed) {
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& x : t) {
    seed = seed * 1664525u + 1013904223u;
    x = static_cast<std::int32_t>((seed >> 8) % 32000u) + 1;
  }
  return t;
}

std::vector<std::int32_t> concat(std::vector<std::int32_t> a, const std::vector<std::int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// One int64 per slot standing for a token's KV; the engine's side of the contract.
struct Store {
  std::int32_t block_size;
  std::vector<std::int64_t> kv;
  Store(std::int32_t blocks, std::int32_t bs)
      : block_size(bs), kv(static_cast<std::size_t>(blocks) * static_cast<std::size_t>(bs), -7) {}
  // Copies with parallel semantics (all reads before any write).
  void run(const std::vector<BlockCopy>& copies) {
    const std::vector<std::int64_t> before = kv;
    for (const BlockCopy& c : copies) {
      for (std::int32_t j = 0; j < block_size; ++j) {
        kv[std::size_t(c.dst) * block_size + j] = before[std::size_t(c.src) * block_size + j];
      }
    }
  }
  // Reserves the sequence's next tokens and writes them (after the step's copies).
  void append(KVCacheManager& m, SequenceId s, const std::int32_t* t, std::int64_t k) {
    std::vector<std::int64_t> slots(static_cast<std::size_t>(k));
    REQUIRE(m.reserve(s, k, slots.data()));
    run(m.take_transfers().copies);
    for (std::int64_t j = 0; j < k; ++j) kv[static_cast<std::size_t>(slots[j])] = t[j];
  }
  // Every token of the sequence reads back through its block table.
  void expect(const KVCacheManager& m, SequenceId s, const std::vector<std::int32_t>& t) {
    REQUIRE(m.num_tokens(s) <= std::int64_t(t.size()));
    for (std::int64_t p = 0; p < m.num_tokens(s); ++p) {
      INFO("position " << p);
      CHECK(kv[static_cast<std::size_t>(m.slot_of(s, p))] == t[static_cast<std::size_t>(p)]);
    }
  }
};

// A running sequence holding `t`, indexed in full.
SequenceId indexed_sequence(KVCacheManager& m, Store& store, const std::vector<std::int32_t>& t,
                            SequenceOptions o = {}) {
  const SequenceId s = m.create_sequence(o);
  store.append(m, s, t.data(), std::int64_t(t.size()));
  REQUIRE(m.insert_prefix_tokens(s, t.data(), std::int64_t(t.size())) == std::int64_t(t.size()));
  return s;
}

}  // namespace

TEST_CASE("a 5-token shared prefix with block size 16 hits and costs exactly one block copy (vLLM 54607)") {
  const int bs = 16;
  KVCacheManager m(radix_opts(32, bs));
  Store store(32, bs);
  const auto system = tokens(5, 1);
  const auto a = concat(system, tokens(30, 2));
  const auto b = concat(system, tokens(20, 3));
  const SequenceId sa = indexed_sequence(m, store, a);
  // The block-hash path cannot see this prefix: block 0's hashes differ.
  const BlockHash ha{11, 1}, hb{22, 2};
  m.commit_blocks(sa, &ha, 1);
  CHECK(m.count_cached_prefix(&hb, 1) == 0);

  const SequenceId sb = m.create_sequence();
  const std::int64_t free_before = m.device_pool().num_free_blocks();
  const PrefixHit hit = m.attach_prefix_tokens(sb, b.data(), std::int64_t(b.size()) - 1);
  CHECK(hit.num_tokens == 5);
  CHECK(hit.num_device_blocks == 0);
  CHECK(hit.num_copied_tokens == 5);
  CHECK(hit.num_host_blocks == 0);
  CHECK(m.num_tokens(sb) == 5);
  CHECK(m.device_pool().num_free_blocks() == free_before - 1);
  REQUIRE(m.block_table(sb).size() == 1);
  const std::int32_t dst = m.block_table(sb)[0];
  CHECK(dst != m.block_table(sa)[0]);
  const auto transfers = m.take_transfers();
  REQUIRE(transfers.copies.size() == 1);
  CHECK(transfers.copies[0] == BlockCopy{m.block_table(sa)[0], dst});
  CHECK(transfers.swap_in.empty());
  CHECK(transfers.swap_out.empty());
  store.run(transfers.copies);
  // B continues right after the shared tokens, in its own block.
  std::int64_t slot = -1;
  REQUIRE(m.reserve(sb, 1, &slot));
  CHECK(slot == std::int64_t(dst) * bs + 5);
  CHECK(m.take_transfers().empty());
  store.kv[static_cast<std::size_t>(slot)] = b[5];
  store.append(m, sb, b.data() + 6, std::int64_t(b.size()) - 6);
  store.expect(m, sb, b);
  store.expect(m, sa, a);  // A's block 0 was not written by B
  const auto st = m.stats().radix;
  CHECK(st.hit_tokens == 5);
  CHECK(st.miss_tokens == std::int64_t(b.size()) - 1 - 5);
  CHECK(st.partial_hits == 1);
  m.check_invariants();
}

TEST_CASE("a match ending inside a later block shares the full blocks and copies only the last one") {
  for (const int bs : {1, 4, 16}) {
    INFO("block size " << bs);
    KVCacheManager m(radix_opts(64, bs));
    Store store(64, bs);
    const auto a = tokens(3 * bs + 7, 5);
    const SequenceId sa = indexed_sequence(m, store, a);
    // B shares 2 * bs + 5 tokens (for bs = 1 and 4: whole blocks and a partial one, or none).
    const std::int64_t shared = 2 * bs + 5;
    const auto b = concat(std::vector<std::int32_t>(a.begin(), a.begin() + shared), tokens(9, 6));
    const SequenceId sb = m.create_sequence();
    const PrefixHit hit = m.attach_prefix_tokens(sb, b.data(), std::int64_t(b.size()));
    CHECK(hit.num_tokens == shared);
    CHECK(hit.num_device_blocks == shared / bs);
    CHECK(hit.num_copied_tokens == shared % bs);
    const auto& ta = m.block_table(sa);
    const auto& tb = m.block_table(sb);
    for (std::int64_t i = 0; i < shared / bs; ++i) {
      CHECK(tb[std::size_t(i)] == ta[std::size_t(i)]);
      CHECK(m.device_pool().ref_count(ta[std::size_t(i)]) == 3);  // A, B and the index
    }
    const auto transfers = m.take_transfers();
    if (shared % bs == 0) {
      CHECK(transfers.copies.empty());
    } else {
      REQUIRE(transfers.copies.size() == 1);
      CHECK(transfers.copies[0] == BlockCopy{ta[std::size_t(shared / bs)], tb.back()});
    }
    store.run(transfers.copies);
    store.append(m, sb, b.data() + shared, std::int64_t(b.size()) - shared);
    store.expect(m, sb, b);
    store.expect(m, sa, a);
    // The full prompt of A hits completely; an unknown prompt misses.
    CHECK(m.radix_index().match(a.data(), std::int64_t(a.size())).num_tokens == std::int64_t(a.size()));
    const auto other = tokens(40, 99);
    CHECK(m.radix_index().match(other.data(), 40).num_tokens == 0);
    m.check_invariants();
  }
}

TEST_CASE("sequences diverging inside a block split the node, and each branch hits with its own blocks") {
  const int bs = 16;
  KVCacheManager m(radix_opts(64, bs));
  Store store(64, bs);
  const auto a = tokens(40, 7);
  const auto b = concat(std::vector<std::int32_t>(a.begin(), a.begin() + 20), tokens(23, 8));
  const SequenceId sa = indexed_sequence(m, store, a);
  CHECK(m.radix_index().stats().num_nodes == 1);
  const SequenceId sb = m.create_sequence();
  CHECK(m.attach_prefix_tokens(sb, b.data(), 43).num_tokens == 20);
  store.run(m.take_transfers().copies);
  store.append(m, sb, b.data() + 20, 23);
  CHECK(m.insert_prefix_tokens(sb, b.data(), 43) == 23);  // only the new branch is indexed
  const auto st = m.radix_index().stats();
  CHECK(st.num_nodes == 3);  // [0, 20), A's [20, 40), B's [20, 43)
  CHECK(st.num_tokens == 40 + 23);
  const std::int32_t a1 = m.block_table(sa)[1], b1 = m.block_table(sb)[1];
  CHECK(a1 != b1);
  CHECK(m.radix_index().holds(a1) == 2);  // the cut at 20 falls inside block 1: both halves name it
  CHECK(m.radix_index().holds(b1) == 1);
  CHECK(m.radix_index().holds(m.block_table(sa)[0]) == 1);
  CHECK(m.block_table(sb)[0] == m.block_table(sa)[0]);  // block 0 was shared, not copied

  // A prompt through A's branch uses A's block 1, one through B's uses B's.
  for (const auto* src : {&a, &b}) {
    const auto& t = *src;
    const SequenceId s = m.create_sequence();
    const std::int64_t n = std::int64_t(t.size()) - 1;
    const PrefixHit hit = m.attach_prefix_tokens(s, t.data(), n);
    CHECK(hit.num_tokens == n);
    CHECK(hit.num_device_blocks == n / bs);
    CHECK(m.block_table(s)[0] == m.block_table(sa)[0]);
    CHECK(m.block_table(s)[1] == (src == &a ? a1 : b1));
    store.run(m.take_transfers().copies);
    store.append(m, s, t.data() + n, 1);
    store.expect(m, s, t);
    m.free_sequence(s);
  }
  // A prompt that stops in the middle of the split (18 tokens) copies block 1 from either half.
  const SequenceId c = m.create_sequence();
  const PrefixHit hc = m.attach_prefix_tokens(c, a.data(), 18);
  CHECK(hc.num_tokens == 18);
  CHECK(hc.num_copied_tokens == 2);
  store.run(m.take_transfers().copies);
  store.expect(m, c, a);
  m.check_invariants();
}

TEST_CASE("unshared radix leaves are evicted least recently used first when the pool runs short") {
  const int bs = 4;
  KVCacheManager m(radix_opts(9, bs));  // 8 usable blocks
  Store store(9, bs);
  const auto p = tokens(8, 10), q = tokens(8, 11), r = tokens(8, 12);
  for (const auto* t : {&p, &q, &r}) m.free_sequence(indexed_sequence(m, store, *t));
  CHECK(m.device_pool().num_free_blocks() == 2);  // 6 blocks are held by the index alone
  CHECK(m.radix_index().stats().num_block_holds == 6);
  // Touch p: q becomes the least recently used leaf.
  const SequenceId tp = m.create_sequence();
  CHECK(m.attach_prefix_tokens(tp, p.data(), 8).num_tokens == 8);
  m.free_sequence(tp);
  // 4 blocks needed, 2 free: exactly one leaf (q) is evicted.
  const SequenceId big = m.create_sequence();
  const auto t = tokens(16, 13);
  store.append(m, big, t.data(), 16);
  CHECK(m.radix_index().match(q.data(), 8).num_tokens == 0);
  CHECK(m.radix_index().match(p.data(), 8).num_tokens == 8);
  CHECK(m.radix_index().match(r.data(), 8).num_tokens == 8);
  CHECK(m.stats().radix.evicted_nodes == 1);
  CHECK(m.stats().radix.evicted_blocks == 2);
  m.check_invariants();

  SECTION("a leaf a running sequence shares is kept, and a reserve that cannot be met returns false") {
    const SequenceId user = m.create_sequence();
    CHECK(m.attach_prefix_tokens(user, r.data(), 8).num_tokens == 8);  // shares r's blocks
    const SequenceId more = m.create_sequence();
    // p can go (2 blocks), r cannot: 3 blocks are out of reach.
    CHECK_FALSE(m.reserve(more, 3 * bs));
    CHECK(m.num_tokens(more) == 0);
    CHECK(m.radix_index().match(r.data(), 8).num_tokens == 8);
    CHECK(m.radix_index().match(p.data(), 8).num_tokens == 0);  // evicted trying
    CHECK(m.reserve(more, 2 * bs));
    m.check_invariants();
  }
  SECTION("a higher retention priority outlives a more recent lower one") {
    m.free_sequence(big);  // 4 free, p and r held
    SequenceOptions keep;
    keep.priority = 3;
    const auto k = tokens(8, 14);
    m.free_sequence(indexed_sequence(m, store, k, keep));  // newest, priority 3
    const auto u = tokens(8, 15);
    m.free_sequence(indexed_sequence(m, store, u));  // newest of priority 0
    CHECK(m.device_pool().num_free_blocks() == 0);
    const SequenceId s = m.create_sequence();
    REQUIRE(m.reserve(s, 6 * bs));  // evicts p, r, u (priority 0, oldest first), keeps k
    CHECK(m.radix_index().match(k.data(), 8).num_tokens == 8);
    CHECK(m.radix_index().match(u.data(), 8).num_tokens == 0);
    m.check_invariants();
  }
  SECTION("a block that is also hash-committed stays findable by hash after the radix lets it go") {
    m.free_sequence(big);
    const auto h = tokens(4, 16);
    const SequenceId s = m.create_sequence();
    store.append(m, s, h.data(), 4);
    const BlockHash hash{77, 7};
    m.commit_blocks(s, &hash, 1);
    m.insert_prefix_tokens(s, h.data(), 4);
    const std::int32_t block = m.block_table(s)[0];
    m.free_sequence(s);
    CHECK(m.device_pool().ref_count(block) == 1);  // the index's hold
    m.clear_radix_index();
    CHECK(m.device_pool().ref_count(block) == 0);
    CHECK(m.device_pool().find_cached(hash) == block);
    CHECK(m.radix_index().stats().num_nodes == 0);
    m.check_invariants();
  }
}

TEST_CASE("writing after an indexed partial block copies it, so the index keeps its content") {
  const int bs = 8;
  KVCacheManager m(radix_opts(16, bs));
  Store store(16, bs);
  const auto t = tokens(13, 20);
  const SequenceId s = m.create_sequence();
  store.append(m, s, t.data(), 5);
  m.insert_prefix_tokens(s, t.data(), 5);
  const std::int32_t indexed = m.block_table(s)[0];
  std::vector<std::int64_t> slots(8);
  REQUIRE(m.reserve(s, 8, slots.data()));
  const auto copies = m.take_transfers().copies;
  REQUIRE(copies.size() == 1);
  CHECK(copies[0].src == indexed);
  CHECK(m.block_table(s)[0] != indexed);
  store.run(copies);
  for (int j = 0; j < 8; ++j) store.kv[std::size_t(slots[std::size_t(j)])] = t[std::size_t(5 + j)];
  store.expect(m, s, t);
  // Rolling back and rewriting does not disturb the index either.
  m.rollback(s, 10);
  const auto other = tokens(10, 21);
  store.append(m, s, other.data(), 10);
  const RadixMatch hit = m.radix_index().match(t.data(), 13);
  CHECK(hit.num_tokens == 5);
  CHECK(hit.partial_block == indexed);
  CHECK(hit.partial_tokens == 5);
  for (int j = 0; j < 5; ++j) CHECK(store.kv[std::size_t(indexed) * bs + j] == t[std::size_t(j)]);
  m.free_sequence(s);
  CHECK(m.clear_radix_index() == 1);
  CHECK(m.device_pool().num_used_blocks() == 0);
  m.check_invariants();
}

TEST_CASE("radix bad input throws, names the argument and changes nothing") {
  SECTION("a manager without a radix index") {
    KVCacheManagerOptions o;
    o.num_blocks = 8;
    o.block_size = 4;
    KVCacheManager m(o);
    const SequenceId s = m.create_sequence();
    const std::int32_t t[3] = {1, 2, 3};
    CHECK_THROWS_WITH(m.attach_prefix_tokens(s, t, 3), Contains("radix_index = false"));
    m.reserve(s, 3);
    CHECK_THROWS_WITH(m.insert_prefix_tokens(s, t, 3), Contains("radix_index = false"));
    CHECK(m.clear_radix_index() == 0);
    CHECK_FALSE(m.has_radix_index());
    m.check_invariants();
  }
  SECTION("the manager's radix calls") {
    KVCacheManager m(radix_opts(8, 4));
    Store store(8, 4);
    const auto t = tokens(6, 30);
    const SequenceId s = indexed_sequence(m, store, t);
    const auto stats = m.stats();
    const auto table = m.block_table(s);
    const SequenceId e = m.create_sequence();
    CHECK_THROWS_WITH(m.attach_prefix_tokens(s, t.data(), 6), Contains("an empty sequence"));
    CHECK_THROWS_WITH(m.attach_prefix_tokens(e, t.data(), -1), Contains("argument 'n' = -1"));
    CHECK_THROWS_WITH(m.attach_prefix_tokens(e, nullptr, 2), Contains("non-null tokens"));
    CHECK_THROWS_WITH(m.attach_prefix_tokens(SequenceId{77, 0}, t.data(), 2), Contains("argument 'seq'"));
    CHECK_THROWS_WITH(m.insert_prefix_tokens(s, t.data(), 7), Contains("argument 'n' = 7: expected in [0, 6]"));
    CHECK_THROWS_WITH(m.insert_prefix_tokens(s, t.data(), -1), Contains("argument 'n' = -1"));
    CHECK_THROWS_WITH(m.insert_prefix_tokens(s, nullptr, 2), Contains("argument 'tokens'"));
    SequenceOptions w;
    w.sliding_window = 4;
    const SequenceId ws = m.create_sequence(w);
    m.reserve(ws, 2);
    CHECK_THROWS_WITH(m.insert_prefix_tokens(ws, t.data(), 2), Contains("sliding window"));
    m.free_sequence(ws);
    CHECK(m.num_tokens(e) == 0);
    CHECK(m.block_table(e).empty());
    CHECK(m.block_table(s) == table);
    CHECK(m.stats().radix.num_nodes == stats.radix.num_nodes);
    CHECK(m.stats().radix.hit_tokens == stats.radix.hit_tokens);
    CHECK(m.stats().device.num_free == stats.device.num_free);
    m.check_invariants();
  }
  SECTION("the index on its own") {
    CHECK_THROWS_WITH(RadixPrefixIndex(0, 8), Contains("argument 'block_size' = 0"));
    CHECK_THROWS_WITH(RadixPrefixIndex(12, 8), Contains("a positive power of two"));
    CHECK_THROWS_WITH(RadixPrefixIndex(4, 0), Contains("argument 'num_blocks' = 0"));
    BlockPool pool(8, true);
    RadixPrefixIndex index(4, 8);
    std::int32_t blocks[2];
    REQUIRE(pool.allocate(2, blocks));
    const auto t = tokens(6, 31);
    REQUIRE(index.insert(pool, t.data(), 6, blocks, 2) == 6);
    CHECK(pool.ref_count(blocks[0]) == 2);
    const auto u = tokens(6, 32);
    std::int32_t bad[2] = {blocks[0], 5};  // block 5 is free
    CHECK_THROWS_WITH(index.insert(pool, u.data(), 6, bad, 2), Contains("a block in use"));
    std::int32_t null_too[2] = {blocks[0], 0};
    CHECK_THROWS_WITH(index.insert(pool, u.data(), 6, null_too, 2), Contains("not the null block"));
    CHECK_THROWS_WITH(index.insert(pool, u.data(), 6, blocks, 1), Contains("argument 'num_blocks' = 1"));
    CHECK_THROWS_WITH(index.insert(pool, u.data(), 6, blocks, 2, 8), Contains("argument 'priority' = 8"));
    CHECK_THROWS_WITH(index.match(nullptr, 3), Contains("non-null tokens"));
    BlockPool other(16);
    CHECK_THROWS_WITH(index.insert(other, u.data(), 6, blocks, 2), Contains("the index's pool"));
    CHECK_THROWS_WITH(index.evict(other, 1), Contains("the index's pool"));
    RadixMatch stale;
    stale.node = 99;
    CHECK_THROWS_WITH(index.touch(stale), Contains("stale match"));
    CHECK(index.stats().num_nodes == 1);
    CHECK(index.stats().num_block_holds == 2);
    CHECK(pool.ref_count(5) == 0);
    index.check_invariants(pool);
    // Standalone eviction: the caller's references keep the leaf; once dropped it goes.
    CHECK_FALSE(index.evict(pool, 7));
    pool.release(blocks, 2);
    std::vector<std::int32_t> freed;
    CHECK(index.evict(pool, 7, &freed));
    CHECK(freed.size() == 2);
    CHECK(pool.num_free_blocks() == 7);
    CHECK(index.stats().num_nodes == 0);
    index.check_invariants(pool);
    pool.check_invariants();
  }
}

TEST_CASE("an indexed block whose copy is still pending and is evicted cancels that copy") {
  const int bs = 4;
  KVCacheManager m(radix_opts(6, bs));  // 5 usable blocks
  Store store(6, bs);
  const auto a = tokens(6, 40);
  m.free_sequence(indexed_sequence(m, store, a));  // 2 blocks held by the index
  // B takes 5 tokens: block 0 shared, block 1 copied (pending), and indexes
  // them before the step runs (allowed: the copy runs before anything reads).
  const auto b = concat(std::vector<std::int32_t>(a.begin(), a.begin() + 5), tokens(3, 41));
  const SequenceId sb = m.create_sequence();
  CHECK(m.attach_prefix_tokens(sb, b.data(), 5).num_copied_tokens == 1);
  REQUIRE(m.reserve(sb, 1));
  const std::int32_t pending = m.block_table(sb)[1];
  CHECK(m.insert_prefix_tokens(sb, b.data(), 6) == 1);
  CHECK(m.radix_index().holds(pending) == 1);
  m.free_sequence(sb);
  m.check_invariants();
  // Pressure: the leaf holding the pending block goes, and so must its copy.
  // (A's leaf stays: its block 1 is the pending copy's source.)
  CHECK(m.device_pool().num_free_blocks() == 2);
  const SequenceId c = m.create_sequence();
  REQUIRE(m.reserve(c, 3 * bs));
  CHECK(m.radix_index().holds(pending) == 0);
  CHECK(m.radix_index().stats().num_nodes == 2);
  m.check_invariants();
  CHECK(m.take_transfers().copies.empty());
  m.check_invariants();
}
