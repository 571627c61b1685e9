// kvkit::HostCacheBuffer: aligned, zero-filled, writable to its last byte,
// move-only ownership, clear errors.

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <utility>

#include "kvkit/layout/host_cache_buffer.hpp"

using Catch::Matchers::Contains;
using kvkit::HostCacheBuffer;

namespace {

bool all_zero(const HostCacheBuffer& b) {
  const auto* p = b.as<unsigned char>();
  for (std::int64_t i = 0; i < b.bytes(); ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("HostCacheBuffer is 2 MiB aligned, zero-filled and writable to its last byte") {
  // Sizes below a page, odd, a whole number of huge pages, and in between.
  for (std::int64_t bytes : {std::int64_t(1), std::int64_t(4095), std::int64_t(4097), std::int64_t(12345),
                             std::int64_t(2) << 20, (std::int64_t(5) << 20) + 77}) {
    CAPTURE(bytes);
    HostCacheBuffer b(bytes);
    REQUIRE(b.bytes() == bytes);
    REQUIRE_FALSE(b.empty());
    REQUIRE(b.data() != nullptr);
    CHECK(reinterpret_cast<std::uintptr_t>(b.data()) % std::uintptr_t(HostCacheBuffer::kAlignment) == 0);
    CHECK(all_zero(b));
    std::memset(b.data(), 0x5a, std::size_t(bytes));
    CHECK(b.as<unsigned char>()[bytes - 1] == 0x5a);
  }
}

TEST_CASE("HostCacheBuffer moves its memory and frees it once") {
  HostCacheBuffer a(std::int64_t(3) << 20);
  a.as<float>()[7] = 2.5f;
  void* const p = a.data();
  const bool huge = a.huge_pages_requested();

  HostCacheBuffer b(std::move(a));
  CHECK(b.data() == p);
  CHECK(b.as<float>()[7] == 2.5f);
  CHECK(b.huge_pages_requested() == huge);
  CHECK(a.empty());  // NOLINT(bugprone-use-after-move): the moved-from state is specified
  CHECK(a.data() == nullptr);

  HostCacheBuffer c(100);
  c = std::move(b);  // c's own 100 bytes are freed (ASan would report a leak)
  CHECK(c.data() == p);
  CHECK(c.bytes() == (std::int64_t(3) << 20));
  CHECK(b.empty());

  HostCacheBuffer empty;
  CHECK(empty.empty());
  CHECK(empty.data() == nullptr);
  CHECK(HostCacheBuffer(0).empty());
}

TEST_CASE("HostCacheBuffer rejects a negative size, naming it") {
  CHECK_THROWS_WITH(HostCacheBuffer(-1), Contains("kvkit::HostCacheBuffer") && Contains("'bytes' = -1"));
}

TEST_CASE("HostCacheBuffer reports an allocation the OS refuses as kvkit::Error") {
  // 2^62 bytes: more address space than any x86-64 or arm64 process has.
  CHECK_THROWS_AS(HostCacheBuffer(std::int64_t(1) << 62), kvkit::Error);
}
