#pragma once
/// @file token_chunks.hpp
/// Splitting a CPU op's tokens into chunks that OpenMP threads share.

#include <cstdint>

namespace kvkit::detail {

/// Calls fn(first, end) for consecutive chunks of `chunk` tokens covering
/// [0, num_tokens). Where the including program enables OpenMP and there
/// are at least `min_tokens_to_thread` tokens, threads share the chunks
/// (static schedule); otherwise they run in order on the calling thread.
/// fn must not throw (an exception cannot leave an OpenMP region): ops
/// check their arguments before they call this.
template <class Fn>
void for_each_token_chunk(std::int64_t num_tokens, std::int64_t chunk, std::int64_t min_tokens_to_thread,
                          const Fn& fn) {
  const std::int64_t chunks = (num_tokens + chunk - 1) / chunk;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (num_tokens >= min_tokens_to_thread)
#else
  (void)min_tokens_to_thread;
#endif
  for (std::int64_t c = 0; c < chunks; ++c) {
    const std::int64_t first = c * chunk;
    fn(first, num_tokens - first < chunk ? num_tokens : first + chunk);
  }
}

}  // namespace kvkit::detail
