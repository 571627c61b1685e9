// kvkit::KVCacheManager: sequences, slots, rollback, fork + copy-on-write,
// prefix commit/attach, preemption (recompute, swap), sliding windows, kernel
// arrays, bad input. Every test ends with check_invariants().

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <set>
#include <vector>

#include "kvkit/memory/kv_cache_manager.hpp"

using Catch::Matchers::Contains;
using kvkit::BlockCopy;
using kvkit::BlockHash;
using kvkit::KVCacheManager;
using kvkit::KVCacheManagerOptions;
using kvkit::SequenceId;
using kvkit::SequenceOptions;

namespace {

KVCacheManagerOptions opts(std::int32_t blocks, std::int32_t block_size, std::int32_t host = 0) {
  KVCacheManagerOptions o;
  o.num_blocks = blocks;
  o.block_size = block_size;
  o.num_host_blocks = host;
  return o;
}

BlockHash h(std::uint64_t x) { return BlockHash{x * 0x9E3779B97F4A7C15ull + 1, ~x}; }

std::vector<BlockHash> chain(std::uint64_t first, int n) {
  std::vector<BlockHash> out;
  for (int i = 0; i < n; ++i) out.push_back(h(first + i));
  return out;
}

}  // namespace

TEST_CASE("reserving slots allocates blocks as needed and reports block * block_size + offset") {
  for (std::int32_t bs : {1, 8, 16}) {
    KVCacheManager m(opts(64, bs));
    const SequenceId s = m.create_sequence();
    for (std::int64_t k : {std::int64_t(1), std::int64_t(bs - 1), std::int64_t(bs + 1), std::int64_t(7), std::int64_t(33)}) {
      const std::int64_t before = m.num_tokens(s);
      std::vector<std::int64_t> slots(static_cast<std::size_t>(k) + 2, -99);
      REQUIRE(m.reserve(s, k, slots.data() + 1));
      CHECK(slots.front() == -99);
      CHECK(slots.back() == -99);
      CHECK(m.num_tokens(s) == before + k);
      const auto& table = m.block_table(s);
      CHECK(std::int64_t(table.size()) == (before + k + bs - 1) / bs);
      for (std::int64_t j = 0; j < k; ++j) {
        const std::int64_t p = before + j;
        CHECK(slots[j + 1] == std::int64_t(table[p / bs]) * bs + p % bs);
        CHECK(m.slot_of(s, p) == slots[j + 1]);
      }
    }
    const auto& table = m.block_table(s);
    CHECK(std::set<std::int32_t>(table.begin(), table.end()).size() == table.size());
    CHECK(std::count(table.begin(), table.end(), 0) == 0);  // never the null block
    m.check_invariants();
  }
}

TEST_CASE("a reservation that does not fit returns false and leaves state unchanged") {
  KVCacheManager m(opts(5, 4));  // 4 usable blocks = 16 tokens
  const SequenceId a = m.create_sequence();
  const SequenceId b = m.create_sequence();
  REQUIRE(m.reserve(a, 9));  // 3 blocks
  const auto table = m.block_table(a);
  std::vector<std::int64_t> slots(8, -5);
  CHECK_FALSE(m.reserve(b, 5, slots.data()));  // needs 2, 1 free
  CHECK(slots == std::vector<std::int64_t>(8, -5));
  CHECK(m.num_tokens(b) == 0);
  CHECK(m.block_table(b).empty());
  CHECK_FALSE(m.reserve(a, 4, nullptr, 4));  // look-ahead counts too
  CHECK(m.block_table(a) == table);
  CHECK(m.num_tokens(a) == 9);
  CHECK(m.device_pool().num_free_blocks() == 1);
  CHECK(m.reserve(b, 4));
  m.check_invariants();
}

TEST_CASE("look-ahead blocks are kept past the last token and their slots are addressable") {
  KVCacheManager m(opts(16, 4));
  const SequenceId s = m.create_sequence();
  REQUIRE(m.reserve(s, 3, nullptr, 6));  // 9 positions -> 3 blocks, 3 tokens
  CHECK(m.num_tokens(s) == 3);
  CHECK(m.block_table(s).size() == 3);
  CHECK(m.slot_of(s, 8) == std::int64_t(m.block_table(s)[2]) * 4);
  CHECK_THROWS_WITH(m.slot_of(s, 12), Contains("'position' = 12"));
  // Rolling back frees look-ahead blocks with the tokens.
  m.rollback(s, 0);
  CHECK(m.block_table(s).size() == 1);
  m.check_invariants();
}

TEST_CASE("rolling back tokens frees blocks that become empty") {
  KVCacheManager m(opts(16, 4));
  const SequenceId s = m.create_sequence();
  REQUIRE(m.reserve(s, 10));
  const auto table = m.block_table(s);
  m.rollback(s, 3);  // 7 tokens: 2 blocks
  CHECK(m.num_tokens(s) == 7);
  CHECK(m.block_table(s) == std::vector<std::int32_t>(table.begin(), table.begin() + 2));
  CHECK(m.device_pool().ref_count(table[2]) == 0);
  m.rollback(s, 7);
  CHECK(m.block_table(s).empty());
  CHECK(m.device_pool().num_used_blocks() == 0);
  CHECK_THROWS_WITH(m.rollback(s, 1), Contains("'m' = 1") && Contains("in [0, 0]"));
  CHECK_THROWS_WITH(m.rollback(s, -1), Contains("'m' = -1"));
  m.check_invariants();
}

TEST_CASE("a fork shares every block until a write into a shared partial block copies it") {
  KVCacheManager m(opts(32, 4));
  const SequenceId parent = m.create_sequence();
  REQUIRE(m.reserve(parent, 6));  // blocks P0 (full), P1 (2 of 4)
  const auto ptable = m.block_table(parent);
  const SequenceId child = m.fork(parent);
  CHECK(m.block_table(child) == ptable);
  CHECK(m.num_tokens(child) == 6);
  CHECK(m.device_pool().ref_count(ptable[0]) == 2);
  CHECK(m.device_pool().ref_count(ptable[1]) == 2);
  CHECK(m.take_transfers().empty());
  m.check_invariants();

  std::int64_t slot = -1;
  REQUIRE(m.reserve(child, 1, &slot));
  const auto ctable = m.block_table(child);
  CHECK(ctable[0] == ptable[0]);  // full block: still shared
  CHECK(ctable[1] != ptable[1]);  // private copy
  CHECK(slot == std::int64_t(ctable[1]) * 4 + 2);
  CHECK(m.device_pool().ref_count(ptable[1]) == 2);  // parent + the pending copy's hold
  m.check_invariants();
  const auto t = m.take_transfers();
  REQUIRE(t.copies.size() == 1);
  CHECK(t.copies[0] == BlockCopy{ptable[1], ctable[1]});
  CHECK(t.swap_in.empty());
  CHECK(t.swap_out.empty());
  CHECK(m.device_pool().ref_count(ptable[1]) == 1);
  // The parent now holds its block alone and writes in place.
  REQUIRE(m.reserve(parent, 1, &slot));
  CHECK(m.block_table(parent) == ptable);
  CHECK(slot == std::int64_t(ptable[1]) * 4 + 2);
  CHECK(m.take_transfers().empty());
  m.check_invariants();
}

TEST_CASE("in one step, forks of a partial block copy it once each and the last writer writes in place") {
  // The pending copies read the block before the step's writes, so the last
  // sequence still holding it needs no copy of its own (parallel sampling:
  // n children and the parent all decode in the step after the fork).
  KVCacheManager m(opts(32, 4));
  const SequenceId parent = m.create_sequence();
  REQUIRE(m.reserve(parent, 6));  // P0 full, P1 holds 2 of 4
  const auto ptable = m.block_table(parent);
  std::vector<SequenceId> children;
  for (int i = 0; i < 3; ++i) children.push_back(m.fork(parent));
  const std::int32_t free_before = m.stats().device.num_free;
  std::vector<std::int64_t> slots;
  for (const SequenceId c : children) {
    std::int64_t slot = -1;
    REQUIRE(m.reserve(c, 1, &slot));
    slots.push_back(slot);
  }
  std::int64_t parent_slot = -1;
  REQUIRE(m.reserve(parent, 1, &parent_slot));
  CHECK(m.block_table(parent) == ptable);  // in place: the three copies read P1 first
  CHECK(parent_slot == std::int64_t(ptable[1]) * 4 + 2);
  CHECK(m.stats().device.num_free == free_before - 3);
  m.check_invariants();
  const auto t = m.take_transfers();
  REQUIRE(t.copies.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) {
    const auto ctable = m.block_table(children[i]);
    CHECK(t.copies[i] == BlockCopy{ptable[1], ctable[1]});
    CHECK(slots[i] == std::int64_t(ctable[1]) * 4 + 2);
  }
  const std::vector<std::int64_t> pairs = kvkit::block_copy_pairs(t.copies);  // what copy_blocks takes
  REQUIRE(pairs.size() == 6);
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(pairs[2 * i] == t.copies[i].src);
    CHECK(pairs[2 * i + 1] == t.copies[i].dst);
  }
  CHECK(m.device_pool().ref_count(ptable[1]) == 1);
  CHECK(m.device_pool().ref_count(ptable[0]) == 4);
  m.check_invariants();
}

TEST_CASE("copies within one step never read a pending destination and drop freed destinations") {
  KVCacheManager m(opts(32, 4));
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, 2));
  const std::int32_t original = m.block_table(a)[0];
  const SequenceId b = m.fork(a);
  REQUIRE(m.reserve(b, 1));  // b copies original -> x
  const std::int32_t x = m.block_table(b)[0];
  const SequenceId c = m.fork(b);
  REQUIRE(m.reserve(c, 1));  // c would copy x, which is only filled at the flush
  const std::int32_t y = m.block_table(c)[0];
  const SequenceId d = m.fork(a);
  REQUIRE(m.reserve(d, 1));  // d copies original -> z, then d is freed
  const std::int32_t z = m.block_table(d)[0];
  m.free_sequence(d);
  m.check_invariants();
  const auto t = m.take_transfers();
  REQUIRE(t.copies.size() == 2);
  CHECK(t.copies[0] == BlockCopy{original, x});
  CHECK(t.copies[1] == BlockCopy{original, y});
  CHECK(std::none_of(t.copies.begin(), t.copies.end(), [&](const BlockCopy& cp) { return cp.dst == z; }));
  m.check_invariants();
}

TEST_CASE("beam search forks, continues and frees branches for many steps without leaking") {
  KVCacheManager m(opts(200, 4));
  std::vector<SequenceId> beams = {m.create_sequence()};
  REQUIRE(m.reserve(beams[0], 5));
  std::uint32_t rng = 12345;
  for (int step = 0; step < 300; ++step) {
    std::vector<SequenceId> next;
    for (SequenceId s : beams) {
      rng = rng * 1664525u + 1013904223u;
      const int children = 1 + int(rng >> 30) % 2;  // 1 or 2 continuations
      for (int c = 0; c < children; ++c) next.push_back(m.fork(s));
      m.free_sequence(s);
    }
    while (next.size() > 4) {  // keep the 4 best beams
      m.free_sequence(next.back());
      next.pop_back();
    }
    for (SequenceId s : next) REQUIRE(m.reserve(s, 1));
    m.take_transfers();
    m.check_invariants();
    beams = next;
  }
  for (SequenceId s : beams) CHECK(m.num_tokens(s) == 305);
  for (SequenceId s : beams) m.free_sequence(s);
  CHECK(m.device_pool().num_used_blocks() == 0);
  CHECK(m.stats().num_sequences == 0);
  m.check_invariants();
}

TEST_CASE("committed blocks are found by a later sequence with the same prefix") {
  KVCacheManagerOptions o = opts(16, 4);
  o.enable_events = true;
  KVCacheManager m(o);
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, 10));  // 2 full blocks
  const auto hashes = chain(100, 3);
  CHECK_THROWS_WITH(m.commit_blocks(a, hashes.data(), 3), Contains("'n' = 3") && Contains("in [0, 2]"));
  m.commit_blocks(a, hashes.data(), 2);
  CHECK(m.committed_hashes(a).size() == 2);
  const auto events = m.take_events();
  REQUIRE(events.size() == 2);
  CHECK(events[1].hash == hashes[1]);
  CHECK(events[1].block_id == m.block_table(a)[1]);
  CHECK(m.count_cached_prefix(hashes.data(), 3) == 2);

  const SequenceId b = m.create_sequence();
  const auto hit = m.attach_prefix(b, hashes.data(), 3);
  CHECK(hit.num_tokens == 8);
  CHECK(hit.num_device_blocks == 2);
  CHECK(hit.num_host_blocks == 0);
  CHECK(m.block_table(b)[0] == m.block_table(a)[0]);
  CHECK(m.block_table(b)[1] == m.block_table(a)[1]);
  CHECK(m.stats().device.hits == 2);
  CHECK(m.stats().device.misses == 1);
  CHECK_THROWS_WITH(m.attach_prefix(b, hashes.data(), 3), Contains("an empty sequence"));
  m.check_invariants();

  // After both finish the blocks stay cached; a third request still hits.
  m.free_sequence(a);
  m.free_sequence(b);
  CHECK(m.device_pool().num_cached_free_blocks() == 2);
  const SequenceId c = m.create_sequence();
  CHECK(m.attach_prefix(c, hashes.data(), 2).num_device_blocks == 2);
  m.check_invariants();
}

TEST_CASE("cached free blocks are evicted least recently used first when the pool runs out") {
  KVCacheManager m(opts(5, 2));  // 4 usable blocks
  const auto ha = chain(1, 2), hb = chain(50, 2);
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, 4));
  m.commit_blocks(a, ha.data(), 2);
  const SequenceId b = m.create_sequence();
  REQUIRE(m.reserve(b, 4));
  m.commit_blocks(b, hb.data(), 2);
  m.free_sequence(a);  // a's blocks are older
  m.free_sequence(b);
  const SequenceId c = m.create_sequence();
  REQUIRE(m.reserve(c, 2));  // evicts a's last block first (freed tail first)
  CHECK(m.count_cached_prefix(ha.data(), 2) == 1);
  CHECK(m.count_cached_prefix(hb.data(), 2) == 2);
  CHECK(m.stats().device.evictions == 1);
  m.check_invariants();
}

TEST_CASE("writing into an exclusively held cached block drops its hash first") {
  KVCacheManager m(opts(8, 4));
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, 4));
  const auto hs = chain(7, 1);
  m.commit_blocks(a, hs.data(), 1);
  m.rollback(a, 1);  // speculative token rejected: block 0 is partial again
  CHECK(m.committed_hashes(a).empty());
  CHECK(m.count_cached_prefix(hs.data(), 1) == 1);  // content unchanged so far
  REQUIRE(m.reserve(a, 1));
  CHECK(m.count_cached_prefix(hs.data(), 1) == 0);
  m.check_invariants();
}

TEST_CASE("recompute preemption frees every block and resuming hits the cache") {
  KVCacheManager m(opts(16, 4));
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, 14));
  const auto hs = chain(30, 3);
  m.commit_blocks(a, hs.data(), 3);
  CHECK(m.preempt_recompute(a) == 3);
  CHECK(m.num_tokens(a) == 0);
  CHECK(m.device_pool().num_used_blocks() == 0);
  m.check_invariants();
  const auto hit = m.resume_from_cache(a);
  CHECK(hit.num_tokens == 12);
  CHECK(m.num_tokens(a) == 12);
  CHECK(m.reserve(a, 2));
  m.check_invariants();
}

TEST_CASE("swap out and in produce block transfer plans and keep the host copies cached") {
  KVCacheManager m(opts(9, 4, 6));  // 8 device blocks, 6 host blocks
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, 10, nullptr, 4));  // 3 blocks + 1 look-ahead block
  const auto hs = chain(70, 2);
  m.commit_blocks(a, hs.data(), 2);
  const auto dev = m.block_table(a);
  REQUIRE(m.swap_out(a));
  CHECK(m.is_swapped(a));
  const auto host = m.block_table(a);
  REQUIRE(host.size() == 3);  // the look-ahead block is dropped
  CHECK_THROWS_WITH(m.reserve(a, 1), Contains("swapped out"));
  m.check_invariants();
  const auto out = m.take_transfers();
  REQUIRE(out.swap_out.size() == 3);
  for (int i = 0; i < 3; ++i) CHECK(out.swap_out[i] == BlockCopy{dev[i], host[i]});
  CHECK(m.device_pool().num_used_blocks() == 0);

  // Evict the device copies, then swap in: every block comes back from the host.
  m.device_pool().check_invariants();
  const SequenceId filler = m.create_sequence();
  REQUIRE(m.reserve(filler, 32));
  m.free_sequence(filler);
  CHECK(m.count_cached_prefix(hs.data(), 2) == 0);
  REQUIRE(m.swap_in(a));
  CHECK_FALSE(m.is_swapped(a));
  const auto back = m.block_table(a);
  const auto in = m.take_transfers();
  REQUIRE(in.swap_in.size() == 3);
  for (int i = 0; i < 3; ++i) CHECK(in.swap_in[i] == BlockCopy{host[i], back[i]});
  CHECK(m.num_tokens(a) == 10);
  m.check_invariants();

  // The host copies stay findable: a new request with the same prefix loads them.
  m.free_sequence(a);
  const SequenceId f2 = m.create_sequence();
  REQUIRE(m.reserve(f2, 32));  // evicts the device copies again
  m.free_sequence(f2);
  const SequenceId b = m.create_sequence();
  const auto hit = m.attach_prefix(b, hs.data(), 2);
  CHECK(hit.num_device_blocks == 0);
  CHECK(hit.num_host_blocks == 2);
  const auto load = m.take_transfers();
  REQUIRE(load.swap_in.size() == 2);
  CHECK(load.swap_in[0] == BlockCopy{host[0], m.block_table(b)[0]});
  CHECK(m.stats().host.hits == 2);
  m.check_invariants();
}

TEST_CASE("swap out returns false when the host pool is too small and changes nothing") {
  KVCacheManager m(opts(9, 4, 2));
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, 9));
  const auto table = m.block_table(a);
  CHECK_FALSE(m.swap_out(a));
  CHECK(m.block_table(a) == table);
  CHECK_FALSE(m.is_swapped(a));
  CHECK(m.take_transfers().empty());
  KVCacheManager no_host(opts(9, 4));
  const SequenceId s = no_host.create_sequence();
  CHECK_THROWS_WITH(no_host.swap_out(s), Contains("no host blocks"));
  CHECK_THROWS_WITH(no_host.swap_in(s), Contains("a swapped-out sequence"));
  m.check_invariants();
}

TEST_CASE("a sliding window frees blocks that fall out of it and keeps sink blocks") {
  KVCacheManager m(opts(32, 4));
  SequenceOptions so;
  so.sliding_window = 6;
  so.num_sink_tokens = 3;
  const SequenceId s = m.create_sequence(so);
  REQUIRE(m.reserve(s, 20));  // token 0 was the first new one: nothing falls out yet
  CHECK(m.device_pool().num_used_blocks() == 5);
  REQUIRE(m.reserve(s, 1));  // token 20 sees positions 15..20 and sinks 0..2
  const auto& t = m.block_table(s);
  // Blocks 1, 2 (positions 4..11) are out; block 3 (12..15) still holds position 15.
  CHECK(t[0] != m.null_block());
  CHECK(t[1] == m.null_block());
  CHECK(t[2] == m.null_block());
  CHECK(t[3] != m.null_block());
  CHECK(m.device_pool().num_used_blocks() == 4);
  CHECK_THROWS_WITH(m.slot_of(s, 5), Contains("sliding window"));
  // Token 21 - m must still see position 12 (the first one kept), so m <= 4.
  CHECK_THROWS_WITH(m.rollback(s, 5), Contains("'m' = 5") && Contains("at most 4") &&
                                          Contains("sliding window"));
  CHECK(m.num_tokens(s) == 21);
  m.rollback(s, 4);
  CHECK(m.num_tokens(s) == 17);
  m.check_invariants();
  KVCacheManagerOptions o = opts(8, 4);
  o.reserve_null_block = false;
  KVCacheManager no_null(o);
  CHECK_THROWS_WITH(no_null.create_sequence(so), Contains("no null block"));
}

TEST_CASE("padded block table and CSR page table describe the running sequences") {
  KVCacheManager m(opts(64, 4));
  std::vector<SequenceId> seqs;
  const std::int64_t lens[] = {1, 7, 8, 0, 13};
  for (std::int64_t len : lens) {
    seqs.push_back(m.create_sequence());
    REQUIRE(m.reserve(seqs.back(), len, nullptr, 3));  // look-ahead blocks are not reported
  }
  const std::int64_t n = std::int64_t(seqs.size()), max_blocks = 5;
  std::vector<std::int32_t> table(std::size_t(n * max_blocks), -3), seq_lens(std::size_t(n) + 1, -3);
  m.build_block_table(seqs.data(), n, max_blocks, table.data(), seq_lens.data());
  CHECK(seq_lens[std::size_t(n)] == -3);
  const std::int64_t pages = m.csr_num_pages(seqs.data(), n);
  CHECK(pages == 1 + 2 + 2 + 0 + 4);
  std::vector<std::int32_t> indptr(std::size_t(n) + 1, -3), indices(std::size_t(pages) + 1, -3),
      last(std::size_t(n) + 1, -3);
  m.build_csr_page_table(seqs.data(), n, indptr.data(), indices.data(), last.data());
  CHECK(indices.back() == -3);
  CHECK(last.back() == -3);
  for (std::int64_t i = 0; i < n; ++i) {
    const auto& bt = m.block_table(seqs[i]);
    const std::int64_t used = (lens[i] + 3) / 4;
    CHECK(seq_lens[i] == lens[i]);
    CHECK(indptr[i + 1] - indptr[i] == used);
    CHECK(last[i] == (used == 0 ? 0 : lens[i] - (used - 1) * 4));
    for (std::int64_t j = 0; j < max_blocks; ++j) {
      CHECK(table[i * max_blocks + j] == (j < used ? bt[j] : m.null_block()));
      if (j < used) CHECK(indices[indptr[i] + j] == bt[j]);
    }
  }
  CHECK_THROWS_WITH(m.build_block_table(seqs.data(), n, 3, table.data(), seq_lens.data()),
                    Contains("'max_blocks' = 3") && Contains(">= 4"));

  // The allocating form: rows as long as the longest sequence, or as asked.
  const kvkit::PaddedPageTableStorage fitted = m.build_page_table(seqs.data(), n);
  CHECK(fitted.max_blocks == 4);
  const kvkit::PaddedPageTable view = fitted.view();
  CHECK(view.batch_size == n);
  kvkit::validate_page_table(view, 4, 64);
  for (std::int64_t i = 0; i < n; ++i) {
    CHECK(view.seq_len(i) == lens[i]);
    for (std::int64_t j = 0; j < 4; ++j) CHECK(view.page(i, j) == table[i * max_blocks + j]);
  }
  CHECK(m.build_page_table(seqs.data(), n, 6).max_blocks == 6);
  CHECK(m.build_page_table(seqs.data() + 3, 1).max_blocks == 1);  // the empty sequence: one null entry
  CHECK_THROWS_WITH(m.build_page_table(seqs.data(), n, 3), Contains("'max_blocks' = 3"));
  // Wider rows than any int32-length sequence can use: refused, not allocated.
  const std::int64_t widest = (std::int64_t(INT32_MAX) + 3) / 4;
  CHECK(kvkit::max_pages_per_sequence(4) == widest);
  CHECK_THROWS_WITH(m.build_page_table(seqs.data(), n, widest + 1),
                    Contains("'max_blocks' = 536870913") && Contains("in [0, 536870912]"));
}

TEST_CASE("bad input throws kvkit::Error and leaves all state unchanged") {
  CHECK_THROWS_WITH(KVCacheManager(opts(8, 0)), Contains("'options.block_size' = 0") &&
                                                    Contains("power of two"));
  CHECK_THROWS_WITH(KVCacheManager(opts(8, 12)), Contains("'options.block_size' = 12"));
  CHECK_THROWS_WITH(KVCacheManager(opts(1, 4)), Contains("'num_blocks' = 1"));
  CHECK_THROWS_WITH(KVCacheManager(opts(8, 4, -1)), Contains("'options.num_host_blocks' = -1"));

  KVCacheManager m(opts(16, 4, 4));
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, 6));
  const SequenceId freed = m.create_sequence();
  m.free_sequence(freed);
  const auto table = m.block_table(a);
  const auto stats = m.stats();
  const SequenceId never{77, 0};

  CHECK_THROWS_WITH(m.reserve(never, 1), Contains("kvkit::KVCacheManager::reserve") &&
                                             Contains("'seq' = seq#77.0") && Contains("unknown"));
  CHECK_THROWS_WITH(m.free_sequence(freed), Contains("already freed"));  // double free
  CHECK_THROWS_WITH(m.fork(freed), Contains("kvkit::KVCacheManager::fork"));
  CHECK_THROWS_WITH(m.rollback(a, 7), Contains("'m' = 7") && Contains("in [0, 6]"));
  CHECK_THROWS_WITH(m.reserve(a, -1), Contains("'k' = -1"));
  CHECK_THROWS_WITH(m.reserve(a, 1, nullptr, -2), Contains("'num_lookahead' = -2"));
  CHECK_THROWS_WITH(m.commit_blocks(a, nullptr, 1), Contains("'hashes'"));
  CHECK_THROWS_WITH(m.create_sequence(SequenceOptions{9, 0, 0}), Contains("'options.priority' = 9"));
  CHECK_THROWS_WITH(m.create_sequence(SequenceOptions{0, -1, 0}), Contains("'options.sliding_window' = -1"));
  CHECK_THROWS_WITH(m.swap_in(a), Contains("a swapped-out sequence"));
  // A handle whose slot was reused by a new sequence is still detected.
  const SequenceId reused = m.create_sequence();
  CHECK(reused.index == freed.index);
  CHECK_THROWS_WITH(m.num_tokens(freed), Contains("unknown or already freed"));

  CHECK(m.block_table(a) == table);
  CHECK(m.num_tokens(a) == 6);
  CHECK(m.stats().device.num_used == stats.device.num_used);
  CHECK(m.stats().device.num_free == stats.device.num_free);
  CHECK(m.take_transfers().empty());
  m.check_invariants();
}

TEST_CASE("blocks a swap-out frees at the flush keep the sequence's retention priority") {
  // Regression: take_transfers released the sources of pending transfers at
  // priority 0, so every device block of a swapped-out priority-7 sequence was
  // evicted before the priority-0 blocks freed after it.
  KVCacheManager m(opts(4, 4, 4));  // 3 device blocks
  SequenceOptions high;
  high.priority = 7;
  const SequenceId a = m.create_sequence(high);
  const SequenceId b = m.create_sequence();
  REQUIRE(m.reserve(a, 4));
  REQUIRE(m.reserve(b, 4));
  const BlockHash ha = h(1), hb = h(2);
  m.commit_blocks(a, &ha, 1);
  m.commit_blocks(b, &hb, 1);
  REQUIRE(m.swap_out(a));
  CHECK(m.take_transfers().swap_out.size() == 1);  // a's device block is freed here
  m.free_sequence(b);                              // b's block: priority 0, freed later
  const SequenceId c = m.create_sequence();
  REQUIRE(m.reserve(c, 8));  // the empty block plus one eviction
  CHECK(m.device_pool().find_cached(ha) != kvkit::BlockPool::kNoBlock);  // priority 7 survives
  CHECK(m.device_pool().find_cached(hb) == kvkit::BlockPool::kNoBlock);
  m.check_invariants();
}

TEST_CASE("a reservation larger than the pool returns false before anything changes") {
  // Regression: n0 + k overflowed for a huge k; reserve then copied a shared
  // block (copy-on-write) and threw std::length_error with the table changed.
  KVCacheManager m(opts(8, 4));
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, 5));
  const SequenceId c = m.fork(a);  // shares a's partial block 1
  const auto table = m.block_table(c);
  const auto stats = m.stats();
  const std::int64_t huge = INT64_MAX - 5;
  CHECK_FALSE(m.reserve(c, huge));
  CHECK_FALSE(m.reserve(c, 1, nullptr, huge));
  CHECK_FALSE(m.reserve(c, 8 * 4 + 1));  // one token more than the pool's 32 slots
  CHECK(m.block_table(c) == table);
  CHECK(m.num_tokens(c) == 5);
  CHECK(m.stats().device.num_free == stats.device.num_free);
  CHECK(m.take_transfers().empty());
  // A huge sink count is accepted and must not overflow the block arithmetic.
  SequenceOptions so;
  so.sliding_window = 4;
  so.num_sink_tokens = INT64_MAX;
  const SequenceId w = m.create_sequence(so);
  REQUIRE(m.reserve(w, 9));
  CHECK(m.block_table(w).size() == 3);  // every block is a sink block: nothing freed
  m.check_invariants();
}

TEST_CASE("a CSR page table with null indices throws instead of writing through it") {
  KVCacheManager m(opts(8, 4));
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, 5));
  std::int32_t indptr[2] = {-3, -3}, last[1] = {-3};
  CHECK_THROWS_WITH(m.build_csr_page_table(&a, 1, indptr, nullptr, last),
                    Contains("'indices' = nullptr") && Contains("2 pages"));
  CHECK(indptr[0] == -3);
  const SequenceId e = m.create_sequence();  // no pages: indices may be null
  m.build_csr_page_table(&e, 1, indptr, nullptr, last);
  CHECK(indptr[1] == 0);
  CHECK(last[0] == 0);
  m.check_invariants();
}

TEST_CASE("a block table refuses a sequence whose length does not fit the int32 seq_lens") {
  KVCacheManager m(opts(4, 1 << 30));  // 3 usable blocks of 2^30 tokens
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, (std::int64_t{1} << 31) + 1));
  std::int32_t table[3] = {-5, -5, -5}, lens[1] = {-5};
  CHECK_THROWS_WITH(m.build_block_table(&a, 1, 3, table, lens),
                    Contains("'seqs'") && Contains("a sequence of < 2^31 tokens (it has 2147483649)"));
  CHECK(lens[0] == -5);
  CHECK(table[0] == -5);
  REQUIRE(m.reserve(a, 0));
  m.rollback(a, 2);  // 2^31 - 1 tokens fit
  m.build_block_table(&a, 1, 3, table, lens);
  CHECK(lens[0] == INT32_MAX);
}

TEST_CASE("commit_blocks refuses the chain passed from block 0 again, changing nothing") {
  // Regression of a caller mistake that went unnoticed: the hashes start at
  // the first uncommitted block; passing the whole chain again registered
  // block 1 under block 0's hash (as duplicate content: silently uncached).
  KVCacheManager m(opts(16, 4));
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, 4));
  const auto hashes = chain(7, 3);
  m.commit_blocks(a, hashes.data(), 1);
  REQUIRE(m.reserve(a, 8));  // blocks 1 and 2 full
  CHECK_THROWS_WITH(m.commit_blocks(a, hashes.data(), 2),
                    Contains("'hashes[0]'") && Contains("expected the hashes of blocks 1..2"));
  CHECK(m.committed_hashes(a).size() == 1);
  m.commit_blocks(a, hashes.data() + 1, 2);  // the right call
  CHECK(m.committed_hashes(a).size() == 3);
  CHECK(m.count_cached_prefix(hashes.data(), 3) == 3);
  m.check_invariants();
}

TEST_CASE("offload_to_host copies committed blocks to the host, where a later request finds them") {
  KVCacheManager m(opts(9, 4, 6));  // 8 device blocks, 6 host blocks
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, 14));  // 3 full blocks + 2 tokens
  const auto hs = chain(90, 3);
  m.commit_blocks(a, hs.data(), 3);
  const auto dev = m.block_table(a);
  CHECK(m.offload_to_host(a) == 3);
  CHECK(m.offload_to_host(a) == 0);  // already on the host (content in flight)
  CHECK(m.block_table(a) == dev);    // the sequence keeps running on its device blocks
  CHECK_FALSE(m.is_swapped(a));
  m.check_invariants();
  m.free_sequence(a);  // the queued copies still read the device blocks
  m.check_invariants();
  const auto out = m.take_transfers();
  REQUIRE(out.swap_out.size() == 3);
  CHECK(out.copies.empty());
  CHECK(out.swap_in.empty());
  for (int i = 0; i < 3; ++i) {
    CHECK(out.swap_out[std::size_t(i)].src == dev[std::size_t(i)]);
    CHECK(m.host_pool().find_cached(hs[std::size_t(i)]) == out.swap_out[std::size_t(i)].dst);
  }
  CHECK(m.host_pool().num_used_blocks() == 0);  // cached and free on the host
  m.check_invariants();

  // The device evicts the blocks; the request comes back and loads them from the host.
  const SequenceId filler = m.create_sequence();
  REQUIRE(m.reserve(filler, 32));
  m.free_sequence(filler);
  CHECK(m.count_cached_prefix(hs.data(), 3) == 0);
  const SequenceId b = m.create_sequence();
  const auto host_hits = m.stats().host.hits;
  const auto ahead = m.lookup_prefix(hs.data(), 3);  // a scheduler's look, changing nothing
  CHECK(ahead.num_tokens == 12);
  CHECK(ahead.num_device_blocks == 0);
  CHECK(ahead.num_host_blocks == 3);
  CHECK(m.stats().host.hits == host_hits);
  CHECK(m.take_transfers().empty());
  const auto hit = m.attach_prefix(b, hs.data(), 3);
  CHECK(hit.num_device_blocks == 0);
  CHECK(hit.num_host_blocks == 3);
  const auto load = m.take_transfers();
  REQUIRE(load.swap_in.size() == 3);
  for (int i = 0; i < 3; ++i) {
    CHECK(load.swap_in[std::size_t(i)] == BlockCopy{out.swap_out[std::size_t(i)].dst, m.block_table(b)[std::size_t(i)]});
  }
  m.check_invariants();
  CHECK(m.offload_to_host(b) == 0);  // its blocks came from there
}

TEST_CASE("offload_to_host stops where the host runs out and keeps the chain it already holds") {
  KVCacheManager m(opts(17, 4, 2));  // 16 device blocks, 2 host blocks
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, 16));
  const auto hs = chain(110, 4);
  m.commit_blocks(a, hs.data(), 4);
  CHECK(m.offload_to_host(a) == 2);  // blocks 0 and 1
  m.take_transfers();
  CHECK(m.host_pool().find_cached(hs[0]) != kvkit::BlockPool::kNoBlock);
  CHECK(m.host_pool().find_cached(hs[1]) != kvkit::BlockPool::kNoBlock);
  // Another chain's offload may evict cached host blocks, but a chain never
  // evicts its own earlier blocks to make room for later ones.
  const SequenceId c = m.create_sequence();
  REQUIRE(m.reserve(c, 8));
  const auto other = chain(500, 2);
  m.commit_blocks(c, other.data(), 2);
  CHECK(m.offload_to_host(a) == 0);
  CHECK(m.offload_to_host(c) == 2);
  m.take_transfers();
  CHECK(m.host_pool().find_cached(hs[0]) == kvkit::BlockPool::kNoBlock);
  CHECK(m.host_pool().find_cached(other[1]) != kvkit::BlockPool::kNoBlock);
  m.check_invariants();
}

TEST_CASE("offload_to_host refuses a swapped or unknown sequence and a manager without host blocks") {
  KVCacheManager m(opts(9, 4, 4));
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, 8));
  const auto hs = chain(130, 2);
  m.commit_blocks(a, hs.data(), 2);
  REQUIRE(m.swap_out(a));
  const auto stats = m.stats();
  CHECK_THROWS_WITH(m.offload_to_host(a), Contains("swapped out"));
  CHECK_THROWS_WITH(m.offload_to_host(SequenceId{7, 0}), Contains("offload_to_host"));
  CHECK(m.stats().host.num_free == stats.host.num_free);
  KVCacheManager no_host(opts(9, 4));
  const SequenceId s = no_host.create_sequence();
  CHECK_THROWS_WITH(no_host.offload_to_host(s), Contains("no host blocks"));
  m.check_invariants();
}

TEST_CASE("lookup_prefix foretells attach_prefix: device hits, then host hits as far as free device blocks go") {
  KVCacheManager m(opts(9, 4, 8));  // 8 device blocks, 8 host blocks
  const SequenceId a = m.create_sequence();
  REQUIRE(m.reserve(a, 16));
  const auto hs = chain(150, 4);
  m.commit_blocks(a, hs.data(), 4);
  REQUIRE(m.offload_to_host(a) == 4);
  m.take_transfers();
  m.free_sequence(a);
  // Keep blocks 0 and 1 on the device (a sequence holds them), evict 2 and 3,
  // and leave one free device block.
  const SequenceId keep = m.create_sequence();
  REQUIRE(m.attach_prefix(keep, hs.data(), 2).num_device_blocks == 2);
  const SequenceId filler = m.create_sequence();
  REQUIRE(m.reserve(filler, 24));  // the 6 other blocks: evicts 2 and 3
  m.rollback(filler, 4);           // its last block back, empty
  m.take_transfers();
  REQUIRE(m.device_pool().num_free_blocks() == 1);
  REQUIRE(m.count_cached_prefix(hs.data(), 4) == 2);
  const auto ahead = m.lookup_prefix(hs.data(), 4);
  CHECK(ahead.num_device_blocks == 2);
  CHECK(ahead.num_host_blocks == 1);  // one free device block to copy into
  CHECK(ahead.num_tokens == 12);
  const SequenceId b = m.create_sequence();
  const auto hit = m.attach_prefix(b, hs.data(), 4);
  CHECK(hit.num_device_blocks == ahead.num_device_blocks);
  CHECK(hit.num_host_blocks == ahead.num_host_blocks);
  CHECK(hit.num_tokens == ahead.num_tokens);
  CHECK(m.lookup_prefix(hs.data(), 0).num_tokens == 0);
  CHECK_THROWS_WITH(m.lookup_prefix(nullptr, 1), Contains("'n' = 1"));
  m.check_invariants();
}

// offload_to_host within one step, beside swaps of sequences sharing its blocks

TEST_CASE("offload_to_host holds a host hit whose copy is still in flight until the flush") {
  for (int variant = 0; variant < 2; ++variant) {
    INFO("variant " << variant << (variant == 0 ? " (free the swapped sequence)" : " (swap it back in)"));
    KVCacheManager m(opts(9, 4, 4));
    const SequenceId b = m.create_sequence();
    REQUIRE(m.reserve(b, 4));
    m.take_transfers();
    const auto hs = chain(700, 1);
    m.commit_blocks(b, hs.data(), 1);
    REQUIRE(m.swap_out(b));  // queues dB -> hB; hB cached under hs[0], held by b's host table
    const SequenceId a = m.create_sequence();
    REQUIRE(m.attach_prefix(a, hs.data(), 1).num_device_blocks == 1);  // shares dB (held by the copy)
    CHECK(m.offload_to_host(a) == 0);  // the host "already holds" hs[0]: its copy is in flight
    if (variant == 0) {
      m.free_sequence(b);   // b's request is aborted...
    } else {
      REQUIRE(m.swap_in(b));  // ...or b comes back in the same step
    }
    m.free_sequence(a);  // the engine offloaded a because it may come back
    m.check_invariants();
    m.take_transfers();
    m.check_invariants();
    // a's write-through must have reached the host.
    CHECK(m.host_pool().find_cached(hs[0]) != kvkit::BlockPool::kNoBlock);
  }
}

TEST_CASE("offload_to_host caches blocks swapped in this step on their host source, leaving no hole in the chain") {
  KVCacheManager m(opts(9, 4, 4));
  const SequenceId s = m.create_sequence();
  REQUIRE(m.reserve(s, 8));
  m.take_transfers();
  REQUIRE(m.swap_out(s));  // nothing committed yet: its host blocks carry no hash
  m.take_transfers();
  REQUIRE(m.swap_in(s));
  const auto hs = chain(800, 2);
  m.commit_blocks(s, hs.data(), 2);  // the KV was written before the swap-out
  m.offload_to_host(s);
  m.free_sequence(s);
  m.check_invariants();
  m.take_transfers();
  m.check_invariants();
  CHECK(m.host_pool().find_cached(hs[0]) != kvkit::BlockPool::kNoBlock);
  CHECK(m.host_pool().find_cached(hs[1]) != kvkit::BlockPool::kNoBlock);
  // The device evicts them; the request comes back and must find them on the host.
  const SequenceId filler = m.create_sequence();
  REQUIRE(m.reserve(filler, 32));
  m.free_sequence(filler);
  m.take_transfers();
  const SequenceId r = m.create_sequence();
  CHECK(m.lookup_prefix(hs.data(), 2).num_host_blocks == 2);
  CHECK(m.attach_prefix(r, hs.data(), 2).num_host_blocks == 2);
  m.check_invariants();
}
