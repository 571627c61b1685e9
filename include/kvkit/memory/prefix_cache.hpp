#pragma once
/// @file prefix_cache.hpp
/// Chained block hashes for prefix caching (xxHash XXH3-128).
///
/// The hash of block i covers the hash of block i-1 (its parent; the root for
/// block 0), the block's token ids and a 64-bit extra key (LoRA adapter id,
/// multimodal content hash, per-tenant cache salt: anything that changes the
/// KV for the same tokens). Two blocks with equal hashes therefore end equal
/// prefixes. KVCacheManager::commit_blocks / attach_prefix take these hashes.
///
/// This is the only kvkit header that includes <xxhash.h> (Debian/Ubuntu:
/// libxxhash-dev; it is used header-only, nothing to link). XXH3-128 is fast
/// (tens of GB/s), stable across versions >= 0.8, and 128 bits make
/// accidental collisions negligible (vLLM moved to a 256-bit/128-bit hash
/// for the same reason).
/// The hashed bytes are the token ids and parent hash in the machine's byte
/// order, so hashes agree between machines of the same endianness (every
/// platform kvkit targets is little-endian), not across endianness. It is
/// not a cryptographic hash: where tenants must not probe each other's
/// cache, put a secret per-tenant salt into the extra key.

#include <cstddef>
#include <cstdint>
#include <cstring>

#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#endif
#include <xxhash.h>

#include "kvkit/core/error.hpp"
#include "kvkit/memory/block_hash.hpp"

namespace kvkit {

/// Hashes one block: parent hash, `tokens[0..n)` (token ids) and `extra_key`.
/// Hashes `n` tokens whatever the block size; callers hash full blocks only.
/// Throws kvkit::Error if n < 0 or tokens is null with n > 0.
inline BlockHash hash_block(const BlockHash& parent, const std::int32_t* tokens, std::int64_t n,
                            std::uint64_t extra_key = 0) {
  check_argument(n >= 0 && (n == 0 || tokens != nullptr), "kvkit::hash_block", "n", n,
                 ">= 0 with non-null tokens");
  const std::uint64_t header[3] = {parent.low, parent.high, extra_key};
  constexpr std::size_t kHeader = sizeof(header);
  const std::size_t token_bytes = static_cast<std::size_t>(n) * sizeof(std::int32_t);
  XXH128_hash_t h;
  // One contiguous buffer for the usual block sizes (<= 1024 tokens); the
  // streaming API (slower for short inputs, same result) beyond that.
  constexpr std::size_t kStack = 4096 + kHeader;
  if (kHeader + token_bytes <= kStack) {
    unsigned char buffer[kStack];
    std::memcpy(buffer, header, kHeader);
    if (token_bytes > 0) std::memcpy(buffer + kHeader, tokens, token_bytes);
    h = XXH3_128bits(buffer, kHeader + token_bytes);
  } else {
    XXH3_state_t state;
    XXH3_128bits_reset(&state);
    XXH3_128bits_update(&state, header, kHeader);
    XXH3_128bits_update(&state, tokens, token_bytes);
    h = XXH3_128bits_digest(&state);
  }
  return BlockHash{h.low64, h.high64};
}

/// Hashes every full block of `tokens[0..num_tokens)` in chain order into
/// `out[0..num_tokens / block_size)`, starting from `root` (use a
/// model-specific root, or BlockHash{}), with the same extra key for every
/// block. Returns the number of hashes written. Throws kvkit::Error if
/// block_size < 1, num_tokens < 0, or a pointer is null where data is needed.
inline std::int64_t hash_blocks(const std::int32_t* tokens, std::int64_t num_tokens,
                                std::int64_t block_size, BlockHash* out,
                                std::uint64_t extra_key = 0, BlockHash root = BlockHash{}) {
  check_argument(block_size >= 1, "kvkit::hash_blocks", "block_size", block_size, ">= 1");
  check_argument(num_tokens >= 0, "kvkit::hash_blocks", "num_tokens", num_tokens, ">= 0");
  const std::int64_t n = num_tokens / block_size;
  check_argument(n == 0 || (tokens != nullptr && out != nullptr), "kvkit::hash_blocks", "out", out,
                 "non-null, as is tokens");
  BlockHash parent = root;
  for (std::int64_t i = 0; i < n; ++i) {
    parent = hash_block(parent, tokens + i * block_size, block_size, extra_key);
    out[i] = parent;
  }
  return n;
}

/// A 64-bit extra key from arbitrary bytes (e.g. a cache salt string or a
/// LoRA adapter name). Throws kvkit::Error if data is null with size > 0.
inline std::uint64_t hash_extra_key(const void* data, std::size_t size) {
  check_argument(size == 0 || data != nullptr, "kvkit::hash_extra_key", "data", data, "non-null");
  return XXH3_64bits(data, size);
}

}  // namespace kvkit
