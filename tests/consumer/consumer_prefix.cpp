// Uses the installed prefix-cache header through kvkit::prefix_cache (xxHash).
#include <kvkit/memory/prefix_cache.hpp>

#include <cstdint>
#include <cstdio>
#include <vector>

int main() {
  std::vector<std::int32_t> tokens(64);
  for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = std::int32_t(i * 7);
  std::vector<kvkit::BlockHash> hashes(4);
  const auto n = kvkit::hash_blocks(tokens.data(), 64, 16, hashes.data());
  const bool ok = n == 4 && !(hashes[0] == hashes[1]);
  std::printf("consumer_prefix: prefix hashes %s\n", ok ? "work" : "FAILED");
  return ok ? 0 : 1;
}
