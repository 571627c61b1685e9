#pragma once
/// @file block_hash.hpp
/// kvkit::BlockHash: the 128-bit identity of a full block's content, and the
/// small event and tier types that the block pool and prefix cache share.
///
/// This header only defines the value types; computing hashes lives in
/// prefix_cache.hpp (which needs xxHash). Users who never cache prefixes
/// need nothing beyond the C++ standard library.

#include <cstddef>
#include <cstdint>
#include <ostream>

namespace kvkit {

/// A 128-bit block hash. Chained: the hash of block i covers the hash of
/// block i-1, the block's token ids and an optional extra key, so equal hashes
/// mean equal prefixes (up to a 2^-128 collision chance).
struct BlockHash {
  std::uint64_t low = 0;
  std::uint64_t high = 0;

  friend bool operator==(const BlockHash& a, const BlockHash& b) {
    return a.low == b.low && a.high == b.high;
  }
  friend bool operator!=(const BlockHash& a, const BlockHash& b) { return !(a == b); }
  friend std::ostream& operator<<(std::ostream& out, const BlockHash& h) {
    const auto flags = out.flags();
    out << std::hex << "0x" << h.high << '_' << h.low;
    out.flags(flags);
    return out;
  }
};

/// std::hash-like functor for hash maps keyed by BlockHash. The low word of a
/// good 128-bit hash is already uniformly distributed, so it is used as is.
struct BlockHashHasher {
  std::size_t operator()(const BlockHash& h) const noexcept {
    return static_cast<std::size_t>(h.low ^ (h.high * 0x9E3779B97F4A7C15ull));
  }
};

/// Where a pool's blocks live. A device pool holds the KV cache the kernels
/// read; a host pool holds blocks offloaded (swapped out) to CPU memory.
enum class MemoryTier : std::uint8_t { kDevice, kHost };

inline const char* memory_tier_name(MemoryTier t) {
  return t == MemoryTier::kDevice ? "device" : "host";
}

/// An event for external caches and routers (vLLM's KV events): a block's
/// content became findable by hash (kStored) or stopped being so (kRemoved).
struct BlockEvent {
  enum class Kind : std::uint8_t { kStored, kRemoved };
  Kind kind = Kind::kStored;
  MemoryTier tier = MemoryTier::kDevice;
  BlockHash hash;
  std::int32_t block_id = -1;
};

}  // namespace kvkit
