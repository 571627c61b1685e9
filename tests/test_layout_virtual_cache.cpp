// Virtual contiguous KV cache: the chunk bookkeeping against a recording
// backend (which ranges are mapped and unmapped, budget, rollback), and the
// POSIX backend for real (growth, shrink, reuse, data surviving growth,
// pages given back, checked host access, append_kv through its layout).

#include <catch2/catch.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kvkit/layout/host_virtual_memory.hpp"
#include "kvkit/layout/virtual_kv_cache.hpp"
#include "kvkit/ops/append.hpp"

using Catch::Matchers::Contains;
using kvkit::ResizeStatus;
using kvkit::VirtualCacheConfig;

namespace {

/// A backend that maps nothing and records every call (addresses are
/// offsets from a fake base); it can be told to refuse the n-th map.
struct RecordingBackend {
  struct Call {
    char op;  // 'm' map, 'u' unmap
    std::int64_t offset, bytes;
  };
  static constexpr std::uintptr_t kBase = std::uintptr_t(1) << 40;
  std::vector<Call>* calls = nullptr;
  int* maps_until_failure = nullptr;  // < 0: never fail
  bool* released = nullptr;

  std::int64_t granularity() const { return 4096; }
  void* reserve(std::int64_t) { return reinterpret_cast<void*>(kBase); }
  bool map(void* addr, std::int64_t bytes) {
    if (*maps_until_failure == 0) return false;
    if (*maps_until_failure > 0) --*maps_until_failure;
    calls->push_back({'m', std::int64_t(reinterpret_cast<std::uintptr_t>(addr) - kBase), bytes});
    return true;
  }
  void unmap(void* addr, std::int64_t bytes) {
    calls->push_back({'u', std::int64_t(reinterpret_cast<std::uintptr_t>(addr) - kBase), bytes});
  }
  void release(void*, std::int64_t) noexcept { *released = true; }
};

bool is_call(const RecordingBackend::Call& c, char op, std::int64_t offset, std::int64_t bytes) {
  return c.op == op && c.offset == offset && c.bytes == bytes;
}

/// Pages of [p, p + bytes) resident in memory (Linux mincore).
std::int64_t resident_pages(const void* p, std::int64_t bytes) {
  const std::int64_t page = sysconf(_SC_PAGESIZE);
  std::vector<unsigned char> v(std::size_t((bytes + page - 1) / page));
  REQUIRE(mincore(const_cast<void*>(p), std::size_t(bytes), v.data()) == 0);
  std::int64_t n = 0;
  for (unsigned char c : v) n += c & 1;
  return n;
}

}  // namespace

TEST_CASE("the virtual cache maps exactly the chunks a sequence needs, in every buffer") {
  std::vector<RecordingBackend::Call> calls;
  int maps_until_failure = -1;
  bool released = false;
  {
    VirtualCacheConfig c;
    c.num_seqs = 3;
    c.max_tokens = 100;
    c.bytes_per_token = 1000;  // region: 100,000 bytes -> 25 chunks of 4,096
    c.num_buffers = 2;
    kvkit::VirtualKVCache<RecordingBackend> cache(c, {&calls, &maps_until_failure, &released});
    const std::int64_t region = 25 * 4096, buffer = 3 * region;
    CHECK(cache.chunk_bytes() == 4096);
    CHECK(cache.region_bytes() == region);
    CHECK(cache.reserved_bytes() == 2 * buffer);
    CHECK(cache.mapped_bytes() == 0);

    SECTION("growth maps the missing chunks; shrink unmaps the tail; release unmaps all") {
      REQUIRE(cache.resize(1, 5) == ResizeStatus::kOk);  // 5,000 bytes: 2 chunks
      REQUIRE(calls.size() == 2);
      CHECK(is_call(calls[0], 'm', region, 2 * 4096));
      CHECK(is_call(calls[1], 'm', buffer + region, 2 * 4096));
      CHECK(cache.capacity_tokens(1) == 8);  // 8,192 / 1,000
      CHECK(cache.mapped_bytes() == 4 * 4096);
      calls.clear();
      REQUIRE(cache.ensure(1, 8) == ResizeStatus::kOk);  // already held
      CHECK(calls.empty());
      REQUIRE(cache.resize(1, 9) == ResizeStatus::kOk);  // 9,000 bytes: 3 chunks
      REQUIRE(calls.size() == 2);
      CHECK(is_call(calls[0], 'm', region + 2 * 4096, 4096));
      CHECK(is_call(calls[1], 'm', buffer + region + 2 * 4096, 4096));
      calls.clear();
      REQUIRE(cache.resize(1, 1) == ResizeStatus::kOk);  // 1 chunk
      REQUIRE(calls.size() == 2);
      CHECK(is_call(calls[0], 'u', region + 4096, 2 * 4096));
      CHECK(cache.mapped_bytes() == 2 * 4096);
      calls.clear();
      cache.release(1);
      CHECK(is_call(calls[0], 'u', region, 4096));
      CHECK(cache.mapped_bytes() == 0);
      CHECK(cache.capacity_tokens(1) == 0);
    }
    SECTION("the last token of a full sequence is mapped; capacity stops at max_tokens") {
      REQUIRE(cache.resize(2, 100) == ResizeStatus::kOk);
      CHECK(cache.mapped_chunks(2) == 25);
      CHECK(cache.capacity_tokens(2) == 100);
      CHECK(cache.mapped_bytes() == 2 * region);
    }
    SECTION("a budget turns growth beyond it into kOutOfMemory with nothing changed") {
      c.max_mapped_bytes = 6 * 4096;
      kvkit::VirtualKVCache<RecordingBackend> small(c, {&calls, &maps_until_failure, &released});
      calls.clear();
      REQUIRE(small.resize(0, 12) == ResizeStatus::kOk);  // 3 chunks x 2 buffers
      CHECK(small.resize(1, 1) == ResizeStatus::kOutOfMemory);
      CHECK(small.mapped_chunks(1) == 0);
      CHECK(small.mapped_bytes() == 6 * 4096);
      REQUIRE(small.resize(0, 4) == ResizeStatus::kOk);  // shrink frees budget
      CHECK(small.resize(1, 4) == ResizeStatus::kOk);
    }
    SECTION("a backend that runs out mid-way is rolled back") {
      maps_until_failure = 1;  // the first buffer maps, the second refuses
      CHECK(cache.resize(0, 10) == ResizeStatus::kOutOfMemory);
      REQUIRE(calls.size() == 2);
      CHECK(is_call(calls[0], 'm', 0, 3 * 4096));
      CHECK(is_call(calls[1], 'u', 0, 3 * 4096));
      CHECK(cache.mapped_bytes() == 0);
      CHECK(cache.mapped_chunks(0) == 0);
    }
    SECTION("bad arguments throw and change nothing") {
      CHECK_THROWS_WITH(cache.resize(3, 1), Contains("'seq' = 3: expected in [0, num_seqs = 3)"));
      CHECK_THROWS_WITH(cache.resize(0, 101), Contains("'tokens' = 101: expected in [0, max_tokens = 100]"));
      CHECK_THROWS_WITH(cache.buffer(2), Contains("'b' = 2"));
      CHECK(calls.empty());
    }
    calls.clear();
  }
  // The destructor unmaps what is left and releases the reservation.
  CHECK(released);
}

TEST_CASE("the virtual cache rejects bad configurations") {
  VirtualCacheConfig c;
  c.num_seqs = 2;
  c.max_tokens = 10;
  c.bytes_per_token = 256;
  c.chunk_bytes = 1000;
  CHECK_THROWS_WITH(kvkit::VirtualKVCache<kvkit::HostVirtualMemory>(c),
                    Contains("'chunk_bytes' = 1000: expected 0 or a positive multiple of the backend's granularity"));
  c.chunk_bytes = 0;
  c.num_seqs = 0;
  CHECK_THROWS_WITH(kvkit::VirtualKVCache<kvkit::HostVirtualMemory>(c), Contains("'num_seqs' = 0"));
  c.num_seqs = 2;
  c.bytes_per_token = std::int64_t(1) << 40;
  c.max_tokens = std::int64_t(1) << 30;
  CHECK_THROWS_WITH(kvkit::VirtualKVCache<kvkit::HostVirtualMemory>(c), Contains("overflows"));
}

TEST_CASE("host virtual memory: data survives growth, shrinking gives pages back, reuse reads zeros") {
  const std::int64_t page = sysconf(_SC_PAGESIZE);
  VirtualCacheConfig c;
  c.num_seqs = 4;
  c.max_tokens = 4096;
  c.bytes_per_token = 8 * 64 * 2;  // 8 heads x 64 x bf16 = 1 KiB
  c.num_buffers = 2;
  c.chunk_bytes = 16 * page;
  kvkit::VirtualKVCache<kvkit::HostVirtualMemory> cache(c);
  CHECK(cache.reserved_bytes() == 2 * 4 * 4096 * 1024);
  CHECK(cache.mapped_bytes() == 0);

  // Grow sequence 2 to 33 tokens and fill them with a pattern.
  REQUIRE(cache.resize(2, 33) == ResizeStatus::kOk);
  const std::int64_t tokens_per_chunk = c.chunk_bytes / c.bytes_per_token;
  CHECK(cache.capacity_tokens(2) == tokens_per_chunk * ((33 + tokens_per_chunk - 1) / tokens_per_chunk));
  std::mt19937 rng(3);
  std::vector<unsigned char> pattern(std::size_t(33 * c.bytes_per_token) * 2);
  for (auto& b : pattern) b = static_cast<unsigned char>(rng());
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t t = 0; t < 33; ++t)
      std::memcpy(cache.token_address(b, 2, t), &pattern[std::size_t((b * 33 + t) * c.bytes_per_token)],
                  std::size_t(c.bytes_per_token));

  // Grow a lot: the first 33 tokens are still there, the new ones are writable.
  REQUIRE(cache.resize(2, 4096) == ResizeStatus::kOk);
  CHECK(cache.mapped_bytes() == 2 * 4096 * 1024);
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t t = 0; t < 33; ++t)
      REQUIRE(std::memcmp(cache.token_address(b, 2, t), &pattern[std::size_t((b * 33 + t) * c.bytes_per_token)],
                          std::size_t(c.bytes_per_token)) == 0);
  std::memset(cache.token_address(1, 2, 4095), 0x5a, std::size_t(c.bytes_per_token));
  // Other sequences' regions are untouched by all this.
  CHECK(cache.capacity_tokens(1) == 0);
  CHECK(cache.capacity_tokens(3) == 0);

  // Shrink to 33 tokens: the pages of the tail (token 4095 was written) are
  // no longer resident.
  auto* region = static_cast<unsigned char*>(cache.buffer(1)) + 2 * cache.region_bytes();
  const std::int64_t last_chunk = cache.region_bytes() - c.chunk_bytes;
  CHECK(resident_pages(region + last_chunk, c.chunk_bytes) > 0);
  REQUIRE(cache.resize(2, 33) == ResizeStatus::kOk);
  const std::int64_t kept = (33 * c.bytes_per_token + c.chunk_bytes - 1) / c.chunk_bytes;
  CHECK(cache.mapped_chunks(2) == kept);
  CHECK(cache.mapped_bytes() == 2 * kept * c.chunk_bytes);
  CHECK(resident_pages(region + kept * c.chunk_bytes, cache.region_bytes() - kept * c.chunk_bytes) == 0);
  for (std::int64_t t = 0; t < 33; ++t)
    REQUIRE(std::memcmp(cache.token_address(0, 2, t), &pattern[std::size_t(t * c.bytes_per_token)],
                        std::size_t(c.bytes_per_token)) == 0);

  // Finish, reuse the slot: the memory comes back as zeros.
  cache.release(2);
  CHECK(cache.mapped_bytes() == 0);
  REQUIRE(cache.resize(2, 10) == ResizeStatus::kOk);
  const auto* first = static_cast<const unsigned char*>(cache.token_address(0, 2, 0));
  bool all_zero = true;
  for (std::int64_t i = 0; i < 10 * c.bytes_per_token; ++i) all_zero = all_zero && first[i] == 0;
  CHECK(all_zero);
}

TEST_CASE("host access outside a sequence's mapped tokens raises kvkit::Error") {
  VirtualCacheConfig c;
  c.num_seqs = 2;
  c.max_tokens = 1000;
  c.bytes_per_token = 128;
  kvkit::VirtualKVCache<kvkit::HostVirtualMemory> cache(c);
  const std::int64_t per_chunk = cache.chunk_bytes() / 128;
  CHECK_THROWS_WITH(cache.token_address(0, 0, 0),
                    Contains("'token' = 0: expected a mapped token of sequence 0: [0, 0)"));
  REQUIRE(cache.resize(0, 1) == ResizeStatus::kOk);
  CHECK_NOTHROW(cache.token_address(0, 0, per_chunk - 1));
  CHECK_THROWS_WITH(cache.token_address(0, 0, per_chunk), Contains("[0, " + std::to_string(per_chunk) + ")"));
  CHECK_THROWS_WITH(cache.token_address(0, 1, 0), Contains("sequence 1: [0, 0)"));
  CHECK_THROWS_WITH(cache.token_address(0, 0, -1), Contains("'token' = -1"));
  CHECK_THROWS_WITH(cache.token_address(1, 0, 0), Contains("'b' = 1"));
}

TEST_CASE("append_kv writes into a virtual cache through its contiguous layout") {
  const std::int64_t heads = 2, hd = 64, es = 2;
  VirtualCacheConfig c;
  c.num_seqs = 3;
  c.max_tokens = 2048;
  c.bytes_per_token = heads * hd * es;
  c.num_buffers = 2;  // K and V of one layer
  kvkit::VirtualKVCache<kvkit::HostVirtualMemory> cache(c);
  const auto layout = cache.layout(heads, hd, es);
  CHECK(layout.stride_seq * es == cache.region_bytes());
  // Sequence 1 decodes token 40, sequence 2 prefills 7 tokens; only those are mapped.
  REQUIRE(cache.ensure(1, 41) == ResizeStatus::kOk);
  REQUIRE(cache.ensure(2, 7) == ResizeStatus::kOk);
  std::vector<std::int64_t> slots{layout.slot(1, 40)};
  for (std::int64_t t = 0; t < 7; ++t) slots.push_back(layout.slot(2, t));
  const std::int64_t n = std::int64_t(slots.size());
  std::vector<std::uint16_t> k(std::size_t(n * heads * hd)), v(k.size());
  std::mt19937 rng(9);
  for (auto& x : k) x = std::uint16_t(rng());
  for (auto& x : v) x = std::uint16_t(rng());
  kvkit::append_kv(layout, kvkit::AppendKVArgs::dense(k.data(), v.data(), slots.data(), n, heads, hd,
                                                      cache.buffer(0), cache.buffer(1),
                                                      kvkit::DType::kBFloat16));
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t seq = i == 0 ? 1 : 2, token = i == 0 ? 40 : i - 1;
    CHECK(std::memcmp(cache.token_address(0, seq, token), &k[std::size_t(i * heads * hd)],
                      std::size_t(c.bytes_per_token)) == 0);
    CHECK(std::memcmp(cache.token_address(1, seq, token), &v[std::size_t(i * heads * hd)],
                      std::size_t(c.bytes_per_token)) == 0);
  }
  CHECK(cache.mapped_bytes() == 2 * (3 + 1) * cache.chunk_bytes());  // 41 and 7 tokens of 256 bytes
}
