// Host bookkeeping of kvkit::memory: block pool, one decode step for a batch,
// prefix lookup (block hashes and radix index), fork + copy-on-write,
// write-through offload to the host tier.
// Reports ns_per_op and ops_per_second.

#include <cstdint>
#include <vector>

#include "harness/harness.hpp"
#include "kvkit/memory/kv_cache_manager.hpp"
#include "kvkit/memory/prefix_cache.hpp"

namespace {

using kvkit::bench::report_ops;

// One op = allocate one block + release it.
void BM_alloc_free_one_block(benchmark::State& state) {
  kvkit::BlockPool pool(65536, true);
  for (auto _ : state) {
    const std::int32_t b = pool.allocate_one();
    benchmark::DoNotOptimize(b);
    pool.release_one(b);
  }
  report_ops(state, 1);
}

// One op = one decode step's bookkeeping for 256 running sequences: reserve
// one slot each (writing the int64 slot mapping), allocating a block every
// block_size steps. Sequences are rolled back periodically (outside the
// timing) so that they do not grow without bound.
void BM_decode_step_256(benchmark::State& state) {
  const int num_seqs = 256, bs = 16;
  kvkit::KVCacheManagerOptions o;
  o.num_blocks = num_seqs * 200 + 1;  // room for 1,000 more tokens each
  o.block_size = bs;
  kvkit::KVCacheManager m(o);
  std::vector<kvkit::SequenceId> seqs;
  for (int i = 0; i < num_seqs; ++i) {
    seqs.push_back(m.create_sequence());
    m.reserve(seqs.back(), 100 + i * 3);  // varied offsets within blocks
  }
  std::vector<std::int64_t> slots(num_seqs);
  std::int64_t steps = 0;
  for (auto _ : state) {
    for (int i = 0; i < num_seqs; ++i) {
      if (!m.reserve(seqs[i], 1, &slots[i])) state.SkipWithError("pool exhausted");
    }
    benchmark::DoNotOptimize(slots.data());
    if (++steps == 1000) {
      state.PauseTiming();
      for (auto s : seqs) m.rollback(s, 1000);
      steps = 0;
      state.ResumeTiming();
    }
  }
  report_ops(state, 1);
  state.counters["ns_per_sequence"] = benchmark::Counter(
      double(state.iterations()) * num_seqs * 1e-9, benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

// One op = hash a 4,096-token prompt (256 blocks of 16) and find its cached
// prefix; half of the blocks are cached.
void BM_prefix_lookup_4k_half_hit(benchmark::State& state) {
  const int bs = 16, n = 4096, blocks = n / bs;
  kvkit::KVCacheManagerOptions o;
  o.num_blocks = 4096;
  o.block_size = bs;
  kvkit::KVCacheManager m(o);
  std::vector<std::int32_t> prompt(n);
  std::uint32_t x = 7;
  for (auto& t : prompt) t = std::int32_t((x = x * 1664525u + 1013904223u) >> 16);
  std::vector<kvkit::BlockHash> hashes(blocks);
  kvkit::hash_blocks(prompt.data(), n, bs, hashes.data());
  const auto warm = m.create_sequence();
  m.reserve(warm, n / 2);
  m.commit_blocks(warm, hashes.data(), blocks / 2);
  // Unrelated cached content so that the index is not tiny.
  for (int r = 0; r < 8; ++r) {
    auto other = prompt;
    other[0] += r + 1;
    std::vector<kvkit::BlockHash> oh(blocks);
    kvkit::hash_blocks(other.data(), n, bs, oh.data());
    const auto s = m.create_sequence();
    if (!m.reserve(s, n)) break;
    m.commit_blocks(s, oh.data(), blocks);
    m.free_sequence(s);
  }
  std::int64_t hit = 0;
  for (auto _ : state) {
    kvkit::hash_blocks(prompt.data(), n, bs, hashes.data());
    hit = m.count_cached_prefix(hashes.data(), blocks);
    benchmark::DoNotOptimize(hit);
  }
  state.counters["hit_blocks"] = double(hit);
  report_ops(state, 1);
}

// The 4,096-token prompt of the prefix benchmarks (LCG token ids).
std::vector<std::int32_t> prompt_4k(std::uint32_t x) {
  std::vector<std::int32_t> prompt(4096);
  for (auto& t : prompt) t = std::int32_t((x = x * 1664525u + 1013904223u) >> 16);
  return prompt;
}

// A radix-indexed manager holding the first half of `prompt` plus 8
// unrelated 4,096-token prompts that share its first 100 tokens (so that the
// lookup walks through a split node, as with a shared system prompt).
kvkit::KVCacheManager radix_manager(const std::vector<std::int32_t>& prompt) {
  const int bs = 16, n = static_cast<int>(prompt.size());
  kvkit::KVCacheManagerOptions o;
  o.num_blocks = 4096;
  o.block_size = bs;
  o.radix_index = true;
  kvkit::KVCacheManager m(o);
  const auto warm = m.create_sequence();
  m.reserve(warm, n / 2);
  m.insert_prefix_tokens(warm, prompt.data(), n / 2);
  m.free_sequence(warm);
  for (int r = 0; r < 8; ++r) {
    auto other = prompt;
    for (int i = 100; i < n; ++i) other[i] += r + 1;
    const auto s = m.create_sequence();
    if (!m.reserve(s, n)) break;
    m.insert_prefix_tokens(s, other.data(), n);
    m.free_sequence(s);
  }
  return m;
}

// One op = radix lookup (match) of a 4,096-token prompt whose first 2,048
// tokens are indexed: the token-granular counterpart of the hash lookup above
// (no hashing needed; the tokens are compared along the tree).
void BM_radix_lookup_4k_half_hit(benchmark::State& state) {
  const auto prompt = prompt_4k(7);
  const kvkit::KVCacheManager m = radix_manager(prompt);
  kvkit::RadixMatch match;
  for (auto _ : state) {
    m.radix_index().match(prompt.data(), std::int64_t(prompt.size()), match);
    benchmark::DoNotOptimize(match.num_tokens);
  }
  state.counters["hit_tokens"] = double(match.num_tokens);
  report_ops(state, 1);
}

// One op = attach_prefix_tokens of a 4,096-token prompt with 2,053 indexed
// tokens (128 shared blocks + a 5-token partial block copied), take the copy
// list, free the sequence: what admitting a request costs with the radix index.
void BM_radix_attach_4k_half_hit(benchmark::State& state) {
  auto prompt = prompt_4k(7);
  kvkit::KVCacheManager m = radix_manager(prompt);
  {
    const auto s = m.create_sequence();  // index 5 more tokens: the match ends inside a block
    m.reserve(s, 2053);
    m.insert_prefix_tokens(s, prompt.data(), 2053);
    m.free_sequence(s);
  }
  std::int64_t hit = 0;
  for (auto _ : state) {
    const auto s = m.create_sequence();
    hit = m.attach_prefix_tokens(s, prompt.data(), std::int64_t(prompt.size()) - 1).num_tokens;
    auto t = m.take_transfers();
    benchmark::DoNotOptimize(t.copies.data());
    m.free_sequence(s);
  }
  state.counters["hit_tokens"] = double(hit);
  report_ops(state, 1);
}

// One op = fork a 1,000-token sequence, write one token into the shared
// partial block (copy-on-write), take the copy list, free the child.
void BM_fork_cow(benchmark::State& state) {
  kvkit::KVCacheManagerOptions o;
  o.num_blocks = 1024;
  o.block_size = 16;
  kvkit::KVCacheManager m(o);
  const auto parent = m.create_sequence();
  m.reserve(parent, 1000);
  std::int64_t slot = 0;
  for (auto _ : state) {
    const auto child = m.fork(parent);
    m.reserve(child, 1, &slot);
    auto t = m.take_transfers();
    benchmark::DoNotOptimize(t.copies.data());
    m.free_sequence(child);
  }
  report_ops(state, 1);
}

// One op = write-through offload of a 4,096-token conversation (256 committed
// blocks of 16) to the host tier + take_transfers. Two conversations take
// turns in a host pool that holds one of them, so every op copies all 256.
void BM_offload_4k(benchmark::State& state) {
  kvkit::KVCacheManagerOptions o;
  o.num_blocks = 1024;
  o.block_size = 16;
  o.num_host_blocks = 256;
  kvkit::KVCacheManager m(o);
  kvkit::SequenceId seqs[2];
  for (int c = 0; c < 2; ++c) {
    std::vector<std::int32_t> tokens(4096);
    for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = std::int32_t(i * 7 + std::size_t(c) * 100003);
    std::vector<kvkit::BlockHash> hashes(tokens.size() / 16);
    kvkit::hash_blocks(tokens.data(), std::int64_t(tokens.size()), 16, hashes.data());
    seqs[c] = m.create_sequence();
    m.reserve(seqs[c], 4096);
    m.commit_blocks(seqs[c], hashes.data(), std::int64_t(hashes.size()));
  }
  int turn = 0;
  std::int64_t copies = 0;
  for (auto _ : state) {
    copies += m.offload_to_host(seqs[turn]);
    auto t = m.take_transfers();
    benchmark::DoNotOptimize(t.swap_out.data());
    turn ^= 1;
  }
  if (copies != 256 * std::int64_t(state.iterations())) state.SkipWithError("an offload copied fewer than 256 blocks");
  report_ops(state, 1);
}

BENCHMARK(BM_alloc_free_one_block)->Name("memory/alloc_free_one_block");
BENCHMARK(BM_decode_step_256)->Name("memory/decode_step_256_seqs")->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_prefix_lookup_4k_half_hit)->Name("memory/prefix_lookup_4k_tokens_50pct_hit")->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_radix_lookup_4k_half_hit)->Name("memory/radix_lookup_4k_tokens_50pct_hit")->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_radix_attach_4k_half_hit)->Name("memory/radix_attach_4k_tokens_50pct_hit_free")->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_fork_cow)->Name("memory/fork_cow_free")->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_offload_4k)->Name("memory/offload_4k_tokens_to_host")->Unit(benchmark::kMicrosecond);

}  // namespace
