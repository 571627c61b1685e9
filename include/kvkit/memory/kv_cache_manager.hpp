#pragma once
/// @file kv_cache_manager.hpp
/// kvkit::KVCacheManager: sequences and their block tables over a device
/// BlockPool (plus an optional host pool for swapped-out blocks): reserve
/// slots, roll back, fork with copy-on-write, commit full blocks to the prefix
/// cache, attach cached prefixes, preempt (swap or recompute), sliding windows,
/// and the arrays kernels consume (slot mapping, padded block table, CSR).
/// Optionally a token-granular radix index (options.radix_index) reuses
/// prefixes that end inside a block: attach_prefix_tokens shares the full
/// blocks and copies the partial one.
///
/// Lifetimes. A sequence holds one reference on every block in its table;
/// the radix index holds one per block it names (per node).
/// Copy-on-write: the first write into a block whose reference count is > 1
/// allocates a private copy and records a (src, dst) pair; writing into an
/// exclusively held block that is registered in the prefix cache first drops
/// its hash. Pending transfers (CoW copies, swap-outs, swap-ins) hold a
/// reference on their source block until take_transfers(), so within one step
/// no source is reallocated, no source is a pending destination (a copy from a
/// pending destination is redirected to that destination's own source) and no
/// destination appears twice (a destination freed before the flush cancels its
/// copy). Hence the three lists can be executed in any order and in parallel,
/// as long as they run before the step's KV writes.
///
/// Single-threaded by design: the scheduler owns the manager and serializes
/// calls. Running out of blocks is a `false` result; bad input throws
/// kvkit::Error and leaves every piece of state unchanged.

#include <algorithm>
#include <cstdint>
#include <ostream>
#include <vector>

#include "kvkit/core/error.hpp"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/memory/block_hash.hpp"
#include "kvkit/memory/block_pool.hpp"
#include "kvkit/memory/radix_index.hpp"

namespace kvkit {

/// Handle of a sequence: an index plus a generation, so that a handle that
/// outlived its sequence is detected instead of reaching a new sequence.
struct SequenceId {
  std::uint32_t index = ~0u;
  std::uint32_t generation = 0;
  friend bool operator==(SequenceId a, SequenceId b) {
    return a.index == b.index && a.generation == b.generation;
  }
  friend bool operator!=(SequenceId a, SequenceId b) { return !(a == b); }
  friend std::ostream& operator<<(std::ostream& out, SequenceId s) {
    return out << "seq#" << s.index << "." << s.generation;
  }
};

/// Per-sequence options.
struct SequenceOptions {
  /// Retention priority of the blocks this sequence frees, 0..BlockPool::kNumPriorities-1.
  /// Cached free blocks of lower priority are evicted first (LRU within a priority).
  int priority = 0;
  /// Sliding-window attention span in tokens (0: full attention). Blocks whose
  /// tokens all fall out of the window are freed and replaced by the null block.
  std::int64_t sliding_window = 0;
  /// With a sliding window: the first tokens that are always kept (StreamingLLM sinks).
  std::int64_t num_sink_tokens = 0;
};

/// Construction options of a KVCacheManager.
struct KVCacheManagerOptions {
  std::int32_t num_blocks = 0;        ///< device blocks, including the null block
  std::int32_t block_size = 16;       ///< tokens per block; a power of two
  bool reserve_null_block = true;     ///< block 0 is padding / window placeholder
  std::int32_t num_host_blocks = 0;   ///< host-tier blocks for swap-out (0: no swapping)
  bool enable_events = false;         ///< queue BlockStored / BlockRemoved events
  /// Also keep a token-granular radix index (attach_prefix_tokens /
  /// insert_prefix_tokens; see radix_index.hpp). The block-hash calls keep
  /// working alongside it. When allocation runs short, unshared radix leaves
  /// are evicted (LRU, lowest priority first) to make room.
  bool radix_index = false;
};

/// One block copy for a copy kernel: copy every layer's block `src` to `dst`.
struct BlockCopy {
  std::int32_t src = -1;
  std::int32_t dst = -1;
  friend bool operator==(BlockCopy a, BlockCopy b) { return a.src == b.src && a.dst == b.dst; }
};

/// The block transfers of one step: device->device copies (copy-on-write and
/// nothing else), device->host (swap-out) and host->device (swap-in, host-tier
/// prefix hits). Order-independent; execute all before the step's KV writes.
struct BlockTransfers {
  std::vector<BlockCopy> copies;    ///< device src -> device dst
  std::vector<BlockCopy> swap_out;  ///< device src -> host dst
  std::vector<BlockCopy> swap_in;   ///< host src -> device dst
  bool empty() const { return copies.empty() && swap_out.empty() && swap_in.empty(); }
};

/// `copies` as int64 (src, dst) pairs, [copies.size(), 2]: the form
/// CopyBlocksArgs::pairs (copy_blocks) and SwapPlan::make take.
inline std::vector<std::int64_t> block_copy_pairs(const std::vector<BlockCopy>& copies) {
  std::vector<std::int64_t> pairs;
  pairs.reserve(2 * copies.size());
  for (const BlockCopy& c : copies) {
    pairs.push_back(c.src);
    pairs.push_back(c.dst);
  }
  return pairs;
}

/// Result of attaching cached blocks to an empty sequence.
struct PrefixHit {
  std::int64_t num_tokens = 0;         ///< tokens now in the sequence (whole blocks)
  std::int32_t num_device_blocks = 0;  ///< blocks found on the device, shared as they are
  std::int32_t num_host_blocks = 0;    ///< blocks found on the host, swapped in (see take_transfers)
  /// Radix index only: tokens of a partially matched last block, copied into
  /// a new block (one `copies` entry); num_tokens includes them.
  std::int32_t num_copied_tokens = 0;
};

/// Counters of both tiers plus sequence count.
struct KVCacheStats {
  BlockPoolStats device;
  BlockPoolStats host;
  RadixIndexStats radix;  ///< zeros unless options.radix_index
  std::int32_t num_sequences = 0;
};

/// Sequences, block tables, copy-on-write, prefix caching and preemption over
/// a device block pool. See the file comment for lifetimes and the copy contract.
class KVCacheManager {
 public:
  /// Throws kvkit::Error if block_size is not a positive power of two, or the
  /// block counts are invalid (num_blocks >= 1, >= 2 with a null block; num_host_blocks >= 0).
  explicit KVCacheManager(const KVCacheManagerOptions& options)
      : block_size_(checked_block_size(options.block_size)),
        block_shift_(log2(options.block_size)),
        device_(options.num_blocks, options.reserve_null_block, MemoryTier::kDevice),
        host_(checked_host_blocks(options.num_host_blocks) > 0 ? options.num_host_blocks : 1, false,
              MemoryTier::kHost),
        has_host_(options.num_host_blocks > 0),
        pending_device_(static_cast<std::size_t>(options.num_blocks), kNone),
        pending_host_(static_cast<std::size_t>(host_.num_blocks()), kNone),
        pending_reads_(static_cast<std::size_t>(options.num_blocks), 0),
        radix_(options.block_size, options.num_blocks),
        has_radix_(options.radix_index) {
    device_.set_events_enabled(options.enable_events);
    host_.set_events_enabled(options.enable_events);
  }

  /// Tokens per block.
  std::int32_t block_size() const { return block_size_; }
  /// The device pool (read-only: the manager owns every change to it).
  const BlockPool& device_pool() const { return device_; }
  /// The host pool (one unusable block when num_host_blocks was 0).
  const BlockPool& host_pool() const { return host_; }
  /// The padding block id for block tables: the null block, else 0.
  std::int32_t null_block() const { return device_.null_block() == BlockPool::kNoBlock ? 0 : device_.null_block(); }

  // ------------------------------------------------------------ sequences

  /// Creates an empty sequence. Throws kvkit::Error for a priority out of
  /// range, a negative window or sink count, or a window without a null block.
  SequenceId create_sequence(const SequenceOptions& options = {}) {
    const char* where = "kvkit::KVCacheManager::create_sequence";
    check_argument(options.priority >= 0 && options.priority < BlockPool::kNumPriorities, where,
                   "options.priority", options.priority, "in [0, ", BlockPool::kNumPriorities, ")");
    check_argument(options.sliding_window >= 0, where, "options.sliding_window",
                   options.sliding_window, ">= 0 (0 disables the window)");
    check_argument(options.num_sink_tokens >= 0, where, "options.num_sink_tokens",
                   options.num_sink_tokens, ">= 0");
    check_argument(options.sliding_window == 0 || device_.null_block() != BlockPool::kNoBlock, where,
                   "options.sliding_window", options.sliding_window,
                   "0 when the manager has no null block (reserve_null_block = false)");
    std::uint32_t index;
    if (!free_slots_.empty()) {
      index = free_slots_.back();
      free_slots_.pop_back();
    } else {
      index = static_cast<std::uint32_t>(seqs_.size());
      seqs_.emplace_back();
    }
    Seq& s = seqs_[index];
    s.live = true;
    s.swapped = false;
    s.options = options;
    s.num_tokens = 0;
    s.window_begin = sink_blocks(s);
    s.blocks.clear();
    s.hashes.clear();
    s.resume_hashes.clear();
    ++num_live_;
    return SequenceId{index, s.generation};
  }

  /// True when `seq` names a sequence that exists (created and not freed).
  bool contains(SequenceId seq) const {
    return seq.index < seqs_.size() && seqs_[seq.index].live &&
           seqs_[seq.index].generation == seq.generation;
  }

  /// Number of tokens with a reserved slot. Throws for an unknown sequence.
  std::int64_t num_tokens(SequenceId seq) const { return get(seq, "kvkit::KVCacheManager::num_tokens").num_tokens; }
  /// The block table: device ids while running (null block for window-freed
  /// entries), host ids (-1 for no block) while swapped. May hold look-ahead
  /// blocks past the last token. Throws for an unknown sequence.
  const std::vector<std::int32_t>& block_table(SequenceId seq) const {
    return get(seq, "kvkit::KVCacheManager::block_table").blocks;
  }
  /// Hashes of the sequence's committed (full, cached) blocks, in order.
  const std::vector<BlockHash>& committed_hashes(SequenceId seq) const {
    return get(seq, "kvkit::KVCacheManager::committed_hashes").hashes;
  }
  /// True while the sequence's blocks are on the host tier.
  bool is_swapped(SequenceId seq) const { return get(seq, "kvkit::KVCacheManager::is_swapped").swapped; }

  /// Slot (block_id * block_size + offset) of token `position`, which must be
  /// covered by a live block of a running sequence (including look-ahead).
  std::int64_t slot_of(SequenceId seq, std::int64_t position) const {
    const char* where = "kvkit::KVCacheManager::slot_of";
    const Seq& s = get_running(seq, where);
    const std::int64_t capacity = static_cast<std::int64_t>(s.blocks.size()) << block_shift_;
    check_argument(position >= 0 && position < capacity, where, "position", position, "in [0, ",
                   capacity, ") (positions covered by the block table)");
    const std::int32_t b = s.blocks[static_cast<std::size_t>(position >> block_shift_)];
    check_argument(b != device_.null_block(), where, "position", position,
                   "a position whose block was not freed by the sliding window");
    return slot(b, position);
  }

  /// Reserves slots for `k` new tokens and keeps blocks for `num_lookahead`
  /// more (speculative drafts), writing the k slots (int64, block_id *
  /// block_size + offset) to `slots_out[0..k)` when it is not null. Blocks
  /// about to be written that are shared are copied (see take_transfers).
  /// Returns false, changing nothing, when the device pool cannot supply the
  /// blocks. Throws kvkit::Error for an unknown or swapped sequence or k,
  /// num_lookahead < 0.
  bool reserve(SequenceId seq, std::int64_t k, std::int64_t* slots_out = nullptr,
               std::int64_t num_lookahead = 0) {
    const char* where = "kvkit::KVCacheManager::reserve";
    Seq& s = get_running(seq, where);
    check_argument(k >= 0, where, "k", k, ">= 0");
    check_argument(num_lookahead >= 0, where, "num_lookahead", num_lookahead, ">= 0");
    // More tokens than the whole pool holds can never fit (all their blocks are
    // held at once); refusing them here also keeps n0 + k + num_lookahead and
    // the block counts below from overflowing (which made a huge k throw
    // std::length_error after the copy-on-write loop had changed the table).
    const std::int64_t pool_tokens = static_cast<std::int64_t>(device_.num_blocks()) << block_shift_;
    if (k > pool_tokens || num_lookahead > pool_tokens) return false;
    const std::int64_t n0 = s.num_tokens;
    const std::int64_t n1 = n0 + k;
    const std::int64_t end = n1 + num_lookahead;
    const std::size_t have = s.blocks.size();
    const std::size_t need = static_cast<std::size_t>(blocks_for(end));
    const std::size_t first_written = static_cast<std::size_t>(n0 >> block_shift_);
    const std::size_t last_existing = std::min(need, have);
    // Fast path of a decode step: one token into an exclusively held block.
    std::int64_t to_allocate = need > have ? static_cast<std::int64_t>(need - have) : 0;
    for (std::size_t i = first_written; i < last_existing; ++i) {
      if (sharers(s.blocks[i]) > 1) ++to_allocate;
    }
    // Radix eviction never touches blocks a table names: to_allocate stays valid.
    // make_room takes an int32: a count above the pool size cannot be met anyway.
    if (to_allocate > device_.num_free_blocks() &&
        (to_allocate > device_.num_blocks() || !make_room(static_cast<std::int32_t>(to_allocate)))) {
      return false;
    }
    if (!s.resume_hashes.empty()) s.resume_hashes.clear();  // recomputing from scratch instead
    for (std::size_t i = first_written; i < last_existing; ++i) {
      const std::int32_t b = s.blocks[i];
      if (sharers(b) > 1) {
        const std::int32_t copy = device_.allocate_one();
        record_copy(MemoryTier::kDevice, b, MemoryTier::kDevice, copy, s.options.priority);
        device_.release_one(b, s.options.priority);  // stays > 0: someone else holds it
        s.blocks[i] = copy;
      } else if (device_.is_cached(b)) {
        device_.uncache_block(b);  // content is about to change
      }
    }
    if (need > have) {
      s.blocks.resize(need);
      device_.allocate(static_cast<std::int32_t>(need - have), s.blocks.data() + have);
    }
    if (slots_out != nullptr) {
      for (std::int64_t p = n0; p < n1; ++p) {
        slots_out[p - n0] = slot(s.blocks[static_cast<std::size_t>(p >> block_shift_)], p);
      }
    }
    s.num_tokens = n1;
    if (s.options.sliding_window > 0) free_out_of_window(s, n0);
    return true;
  }

  /// Removes the last `m` tokens (e.g. rejected speculative tokens) and frees
  /// the blocks past the new last token (look-ahead blocks included).
  /// Committed hashes of blocks no longer full are forgotten by the sequence;
  /// the pool keeps the content cached until someone writes into it.
  /// Throws kvkit::Error, changing nothing, for an unknown or swapped sequence,
  /// m < 0, m > num_tokens, or a rollback into tokens a sliding window freed.
  void rollback(SequenceId seq, std::int64_t m) {
    const char* where = "kvkit::KVCacheManager::rollback";
    Seq& s = get_running(seq, where);
    check_argument(m >= 0 && m <= s.num_tokens, where, "m", m, "in [0, ", s.num_tokens,
                   "] (the sequence's token count)");
    const std::int64_t n = s.num_tokens - m;
    if (s.options.sliding_window > 0 && s.window_begin > sink_blocks(s)) {
      // Token n (the next to be written) needs positions >= n - window + 1.
      const std::int64_t freed_end = static_cast<std::int64_t>(s.window_begin) << block_shift_;
      check_argument(freed_end <= n - s.options.sliding_window + 1, where, "m", m,
                     "at most ", s.num_tokens - (freed_end + s.options.sliding_window - 1),
                     " (the sliding window already freed the blocks before token ", freed_end, ")");
    }
    const std::size_t keep = static_cast<std::size_t>(blocks_for(n));
    release_tail(s, keep);
    s.num_tokens = n;
    const std::size_t full = static_cast<std::size_t>(n >> block_shift_);
    if (s.hashes.size() > full) s.hashes.resize(full);
  }

  /// Forks a running sequence (parallel sampling, beam search): the child
  /// shares every block (reference counts go up) and inherits the token count,
  /// committed hashes and options. Never allocates. Throws kvkit::Error for an
  /// unknown (e.g. freed) or swapped parent.
  SequenceId fork(SequenceId parent) {
    const char* where = "kvkit::KVCacheManager::fork";
    const SequenceOptions options = get_running(parent, where).options;  // a copy: seqs_ may grow
    const SequenceId child = create_sequence(options);
    Seq& p = seqs_[parent.index];  // create_sequence may have grown seqs_
    Seq& c = seqs_[child.index];
    c.blocks = p.blocks;
    c.hashes = p.hashes;
    c.num_tokens = p.num_tokens;
    c.window_begin = p.window_begin;
    for (std::int32_t b : c.blocks) {
      if (b != device_.null_block()) device_.retain(b);
    }
    return child;
  }

  /// Frees a sequence: drops its references (tail first, at its priority) and
  /// invalidates the handle. Cached content stays reusable until evicted.
  /// Throws kvkit::Error for an unknown sequence (including a double free).
  void free_sequence(SequenceId seq) {
    Seq& s = get(seq, "kvkit::KVCacheManager::free_sequence");
    if (s.swapped) {
      release_host_table(s);
    } else {
      release_tail(s, 0);
    }
    s.blocks.clear();
    s.hashes.clear();
    s.resume_hashes.clear();
    s.live = false;
    ++s.generation;
    free_slots_.push_back(seq.index);
    --num_live_;
  }

  // ------------------------------------------------------------ prefix cache

  /// Registers the next `n` full blocks of a running sequence in the prefix
  /// cache under `hashes[0..n)` (chained hashes, see prefix_cache.hpp): block
  /// i = committed_hashes(seq).size() + j gets hashes[j]. Blocks whose hash is
  /// already cached elsewhere stay uncached (duplicate content); the
  /// sequence remembers every hash for recompute preemption.
  /// Throws kvkit::Error, changing nothing, for an unknown or swapped
  /// sequence, n < 0, more blocks than are full, a block already cached
  /// under a different hash, or a hash this sequence already committed (the
  /// chain passed from block 0 again).
  void commit_blocks(SequenceId seq, const BlockHash* hashes, std::int64_t n) {
    const char* where = "kvkit::KVCacheManager::commit_blocks";
    Seq& s = get_running(seq, where);
    const std::int64_t full = s.num_tokens >> block_shift_;
    const std::int64_t done = static_cast<std::int64_t>(s.hashes.size());
    check_argument(n >= 0 && n <= full - done, where, "n", n, "in [0, ", full - done,
                   "] (full blocks not yet committed)");
    check_argument(n == 0 || hashes != nullptr, where, "hashes", hashes, "non-null");
    for (std::int64_t j = 0; j < n; ++j) {
      const std::int32_t b = s.blocks[static_cast<std::size_t>(done + j)];
      if (b != device_.null_block() && device_.is_cached(b) && device_.block_hash(b) != hashes[j]) {
        fail(where, "block ", b, " (index ", done + j, ") is already cached under ",
             device_.block_hash(b), ", not ", hashes[j]);
      }
      // Chained hashes differ at every position, so a hash this sequence
      // already committed means the chain was passed from block 0 again
      // rather than from block `done` on. Looked for only when the hash is
      // cached on another block (as it then is), so commits stay O(n).
      const std::int32_t found = device_.find_cached(hashes[j]);
      if (found != BlockPool::kNoBlock && found != b &&
          std::find(s.hashes.begin(), s.hashes.end(), hashes[j]) != s.hashes.end()) {
        fail(where, "argument 'hashes[", j, "]' = ", hashes[j], " is the hash of an already committed block ",
             "of this sequence: expected the hashes of blocks ", done, "..", done + n - 1,
             " (from committed_hashes(seq).size() on)");
      }
    }
    for (std::int64_t j = 0; j < n; ++j) {
      const std::int32_t b = s.blocks[static_cast<std::size_t>(done + j)];
      if (b != device_.null_block()) device_.cache_block(b, hashes[j]);
      s.hashes.push_back(hashes[j]);
    }
  }

  /// Number of leading `hashes[0..n)` cached on the device. Changes nothing.
  std::int64_t count_cached_prefix(const BlockHash* hashes, std::int64_t n) const {
    check_argument(n >= 0 && (n == 0 || hashes != nullptr), "kvkit::KVCacheManager::count_cached_prefix",
                   "n", n, ">= 0 with non-null hashes");
    std::int64_t i = 0;
    while (i < n && device_.find_cached(hashes[i]) != BlockPool::kNoBlock) ++i;
    return i;
  }

  /// What attach_prefix(seq, hashes, n) would give an empty sequence now
  /// (device blocks, then host blocks as far as free device blocks allow),
  /// without changing anything or counting hits: for a scheduler weighing
  /// which request to admit. num_copied_tokens is 0.
  PrefixHit lookup_prefix(const BlockHash* hashes, std::int64_t n) const {
    check_argument(n >= 0 && (n == 0 || hashes != nullptr), "kvkit::KVCacheManager::lookup_prefix", "n", n,
                   ">= 0 with non-null hashes");
    const PrefixTiers t = prefix_tiers(hashes, n);
    PrefixHit hit;
    hit.num_tokens = (t.on_device + t.on_host) << block_shift_;
    hit.num_device_blocks = static_cast<std::int32_t>(t.on_device);
    hit.num_host_blocks = static_cast<std::int32_t>(t.on_host);
    return hit;
  }

  /// Gives an empty running sequence the longest cached prefix of the blocks
  /// named by `hashes[0..n)`: device hits are shared as they are; the chain
  /// then continues on the host tier, whose hits are copied into new device
  /// blocks (swap_in transfers) as far as free device blocks allow. Counts
  /// hits and misses. To keep at least one token to compute, pass fewer hashes.
  /// Throws kvkit::Error, changing nothing, for an unknown, swapped or
  /// non-empty sequence, or n < 0.
  PrefixHit attach_prefix(SequenceId seq, const BlockHash* hashes, std::int64_t n) {
    const char* where = "kvkit::KVCacheManager::attach_prefix";
    Seq& s = get_running(seq, where);
    check_argument(s.num_tokens == 0 && s.blocks.empty(), where, "seq", seq,
                   "an empty sequence (it has ", s.num_tokens, " tokens)");
    check_argument(n >= 0 && (n == 0 || hashes != nullptr), where, "n", n,
                   ">= 0 with non-null hashes");
    s.resume_hashes.clear();
    PrefixHit hit;
    const auto [on_device, on_host] = prefix_tiers(hashes, n);
    const std::int64_t total = on_device + on_host;
    s.blocks.resize(static_cast<std::size_t>(total));
    for (std::int64_t i = 0; i < on_device; ++i) s.blocks[i] = device_.acquire_cached(hashes[i]);
    for (std::int64_t i = on_device; i < total; ++i) {
      const std::int32_t d = device_.allocate_one();
      const std::int32_t h = host_.acquire_cached(hashes[i]);  // record_copy needs it referenced
      record_copy(MemoryTier::kHost, h, MemoryTier::kDevice, d, s.options.priority);
      host_.release_one(h);
      device_.cache_block(d, hashes[i]);
      s.blocks[i] = d;
    }
    s.hashes.assign(hashes, hashes + total);
    s.num_tokens = total << block_shift_;
    device_.record_lookup(on_device, n - on_device);
    if (has_host_ && n > on_device) host_.record_lookup(on_host, n - on_device - on_host);
    hit.num_tokens = s.num_tokens;
    hit.num_device_blocks = static_cast<std::int32_t>(on_device);
    hit.num_host_blocks = static_cast<std::int32_t>(on_host);
    if (s.options.sliding_window > 0 && s.num_tokens > 0) free_out_of_window(s, s.num_tokens);
    return hit;
  }

  // ------------------------------------------------------------ radix index

  /// True when the manager keeps a radix index (options.radix_index).
  bool has_radix_index() const { return has_radix_; }
  /// The radix index (read-only; match() on it is the side-effect-free lookup).
  const RadixPrefixIndex& radix_index() const { return radix_; }

  /// Gives an empty running sequence the longest prefix of `tokens[0..n)`
  /// (token ids) found in the radix index: full blocks are shared as they
  /// are; when the match ends inside a block, a new block is allocated and a
  /// (src, dst) copy is queued (see take_transfers) so that the sequence
  /// continues writing after the matched tokens in a block of its own
  /// (copy-on-partial-reuse). When no block can be had even after evicting
  /// radix leaves, the partial tokens are dropped (num_tokens rounds down to
  /// whole blocks). Refreshes the matched path for LRU and counts hits and
  /// misses in tokens. To keep at least one token to compute, pass n - 1.
  /// Throws kvkit::Error, changing nothing, without a radix index, for an
  /// unknown, swapped or non-empty sequence, n < 0, or null tokens with n > 0.
  PrefixHit attach_prefix_tokens(SequenceId seq, const std::int32_t* tokens, std::int64_t n) {
    const char* where = "kvkit::KVCacheManager::attach_prefix_tokens";
    check(has_radix_, where, "the manager has no radix index (options.radix_index = false)");
    Seq& s = get_running(seq, where);
    check_argument(s.num_tokens == 0 && s.blocks.empty(), where, "seq", seq,
                   "an empty sequence (it has ", s.num_tokens, " tokens)");
    check_argument(n >= 0 && (n == 0 || tokens != nullptr), where, "n", n, ">= 0 with non-null tokens");
    radix_.match(tokens, n, radix_match_);
    const RadixMatch& m = radix_match_;
    s.resume_hashes.clear();
    s.blocks.assign(m.blocks.begin(), m.blocks.end());
    for (std::int32_t b : s.blocks) device_.retain(b);  // held by the index, so in use
    std::int32_t copied = 0;
    if (m.partial_tokens > 0) {
      // Pin the source: make_room must not evict the node that holds it.
      device_.retain(m.partial_block);
      if (device_.num_free_blocks() > 0 || make_room(1)) {
        const std::int32_t d = device_.allocate_one();
        record_copy(MemoryTier::kDevice, m.partial_block, MemoryTier::kDevice, d, s.options.priority);
        s.blocks.push_back(d);
        copied = m.partial_tokens;
      }
      device_.release_one(m.partial_block);  // stays > 0: the index holds it
    }
    radix_.touch(m);  // its path is pinned by the blocks retained above
    s.num_tokens = (static_cast<std::int64_t>(m.blocks.size()) << block_shift_) + copied;
    radix_.record_lookup(s.num_tokens, n - s.num_tokens, copied > 0);
    PrefixHit hit;
    hit.num_tokens = s.num_tokens;
    hit.num_device_blocks = static_cast<std::int32_t>(m.blocks.size());
    hit.num_copied_tokens = copied;
    if (s.options.sliding_window > 0 && s.num_tokens > 0) free_out_of_window(s, s.num_tokens);
    return hit;
  }

  /// Adds the first `n` tokens of a running sequence (token ids
  /// `tokens[0..n)`, the sequence's own, whose KV has been written) to the
  /// radix index, which then holds a reference on each newly indexed block.
  /// Call it when a prompt's prefill is done or when a request finishes.
  /// Indexing a partially filled last block is allowed; the sequence's next
  /// write into that block then copies it (copy-on-write), so index only full
  /// blocks of a sequence that keeps decoding if that copy matters.
  /// Independent of commit_blocks (hashes) and of events: the radix index
  /// has no block hashes and emits no BlockEvents.
  /// Returns the number of newly indexed tokens. Throws kvkit::Error,
  /// changing nothing, without a radix index, for an unknown or swapped
  /// sequence, one with a sliding window (its table has holes), n outside
  /// [0, num_tokens], or null tokens with n > 0.
  std::int64_t insert_prefix_tokens(SequenceId seq, const std::int32_t* tokens, std::int64_t n) {
    const char* where = "kvkit::KVCacheManager::insert_prefix_tokens";
    check(has_radix_, where, "the manager has no radix index (options.radix_index = false)");
    Seq& s = get_running(seq, where);
    check_argument(s.options.sliding_window == 0, where, "seq", seq,
                   "a sequence without a sliding window (window-freed blocks cannot be indexed)");
    check_argument(n >= 0 && n <= s.num_tokens, where, "n", n, "in [0, ", s.num_tokens,
                   "] (the sequence's token count)");
    check_argument(n == 0 || tokens != nullptr, where, "tokens", tokens, "non-null");
    return radix_.insert(device_, tokens, n, s.blocks.data(), static_cast<std::int64_t>(s.blocks.size()),
                         s.options.priority);
  }

  /// Drops the whole radix index (e.g. after the weights change), releasing
  /// its references. Returns the number of blocks that became free.
  /// No-op (returns 0) without a radix index.
  std::int64_t clear_radix_index() {
    if (!has_radix_) return 0;
    radix_freed_.clear();
    const std::int64_t n = radix_.clear(device_, &radix_freed_);
    for (std::int32_t b : radix_freed_) cancel_if_pending(MemoryTier::kDevice, b);
    return n;
  }

  // ------------------------------------------------------------ preemption

  /// Preempts by recomputation: frees every block (content stays cached, so
  /// resuming hits) and empties the sequence, remembering its committed
  /// hashes for resume_from_cache(). Works on running and swapped sequences.
  /// Returns the number of remembered block hashes. Throws for an unknown sequence.
  std::int64_t preempt_recompute(SequenceId seq) {
    Seq& s = get(seq, "kvkit::KVCacheManager::preempt_recompute");
    std::vector<BlockHash> keep = s.hashes;
    if (s.swapped) {
      release_host_table(s);
      s.swapped = false;
    } else {
      release_tail(s, 0);
    }
    s.hashes.clear();
    s.resume_hashes.swap(keep);
    s.num_tokens = 0;
    s.window_begin = sink_blocks(s);
    return static_cast<std::int64_t>(s.resume_hashes.size());
  }

  /// After preempt_recompute(): attaches the still-cached prefix of the
  /// remembered hashes (see attach_prefix) and forgets them. The engine
  /// recomputes the remaining tokens. Throws as attach_prefix does.
  PrefixHit resume_from_cache(SequenceId seq) {
    Seq& s = get_running(seq, "kvkit::KVCacheManager::resume_from_cache");
    std::vector<BlockHash> hashes;
    hashes.swap(s.resume_hashes);
    try {
      return attach_prefix(seq, hashes.data(), static_cast<std::int64_t>(hashes.size()));
    } catch (...) {
      seqs_[seq.index].resume_hashes.swap(hashes);
      throw;
    }
  }

  /// Swaps a running sequence out to the host tier: every block covering its
  /// tokens gets a host block (committed blocks already on the host are
  /// shared instead of copied), device->host copies are queued (swap_out) and
  /// the device blocks are freed (their cached content stays reusable).
  /// Look-ahead blocks are dropped. Returns false, changing nothing, when the
  /// host pool is too small. Throws kvkit::Error for an unknown or swapped
  /// sequence or a manager without host blocks.
  bool swap_out(SequenceId seq) {
    const char* where = "kvkit::KVCacheManager::swap_out";
    Seq& s = get_running(seq, where);
    check(has_host_, where, "the manager has no host blocks (options.num_host_blocks = 0)");
    const std::size_t used = static_cast<std::size_t>(blocks_for(s.num_tokens));
    std::int64_t need = 0;
    for (std::size_t i = 0; i < used; ++i) {
      if (s.blocks[i] == device_.null_block()) continue;
      const std::int32_t h = i < s.hashes.size() ? host_.find_cached(s.hashes[i]) : BlockPool::kNoBlock;
      if (h != BlockPool::kNoBlock) {
        need += host_.ref_count(h) == 0;
      } else {
        need += pending_swap_in_source(s.blocks[i]) == BlockPool::kNoBlock;
      }
    }
    if (need > host_.num_free_blocks()) return false;
    std::vector<std::int32_t> table(used, BlockPool::kNoBlock);
    // Hits first: an allocation could otherwise evict a cached block we are about to share.
    for (std::size_t i = 0; i < used && i < s.hashes.size(); ++i) {
      if (s.blocks[i] != device_.null_block()) table[i] = host_.acquire_cached(s.hashes[i]);
    }
    for (std::size_t i = 0; i < used; ++i) {
      const std::int32_t d = s.blocks[i];
      if (d == device_.null_block() || table[i] != BlockPool::kNoBlock) continue;
      std::int32_t h = pending_swap_in_source(d);
      if (h != BlockPool::kNoBlock) {
        // Swapped in and out within one step: the host block still holds the content.
        host_.retain(h);
      } else {
        h = host_.allocate_one();
        record_copy(MemoryTier::kDevice, d, MemoryTier::kHost, h, s.options.priority);
        if (i < s.hashes.size()) host_.cache_block(h, s.hashes[i]);
      }
      table[i] = h;
    }
    const std::size_t window_begin = s.window_begin;
    release_tail(s, 0);
    s.window_begin = window_begin;  // the host table keeps the window's holes
    s.blocks.swap(table);
    s.swapped = true;
    return true;
  }

  /// Swaps a sequence back in: committed blocks still cached on the device
  /// are shared, the others get new device blocks filled by host->device
  /// copies (swap_in); host blocks are freed and stay cached on the host.
  /// Returns false, with every sequence unchanged, when the device pool is
  /// too small (radix leaves evicted while trying stay evicted, as in
  /// reserve). Throws kvkit::Error for an unknown or running sequence.
  bool swap_in(SequenceId seq) {
    const char* where = "kvkit::KVCacheManager::swap_in";
    Seq& s = get(seq, where);
    check_argument(s.swapped, where, "seq", seq, "a swapped-out sequence");
    auto blocks_needed = [&] {
      std::int64_t need = 0;
      for (std::size_t i = 0; i < s.blocks.size(); ++i) {
        if (s.blocks[i] == BlockPool::kNoBlock) continue;
        const std::int32_t d = i < s.hashes.size() ? device_.find_cached(s.hashes[i]) : BlockPool::kNoBlock;
        if (d == BlockPool::kNoBlock || device_.ref_count(d) == 0) ++need;
      }
      return need;
    };
    std::int64_t need = blocks_needed();
    // Radix eviction may turn a hash hit held only by the index into a free
    // cached block, which then costs a free block: count again.
    while (need > device_.num_free_blocks()) {
      if (!make_room(static_cast<std::int32_t>(need))) return false;
      need = blocks_needed();
    }
    std::vector<std::int32_t> table(s.blocks.size(), device_.null_block());
    std::vector<std::uint8_t> done(s.blocks.size(), 0);
    // Hits first: an allocation could otherwise evict a cached block we are about to share.
    for (std::size_t i = 0; i < s.blocks.size() && i < s.hashes.size(); ++i) {
      if (s.blocks[i] == BlockPool::kNoBlock) continue;
      const std::int32_t d = device_.acquire_cached(s.hashes[i]);
      if (d != BlockPool::kNoBlock) {
        table[i] = d;
        done[i] = 1;
      }
    }
    for (std::size_t i = 0; i < s.blocks.size(); ++i) {
      const std::int32_t h = s.blocks[i];
      if (h == BlockPool::kNoBlock || done[i]) continue;
      std::int32_t d;
      {
        d = device_.allocate_one();
        record_copy(MemoryTier::kHost, h, MemoryTier::kDevice, d, s.options.priority);
        if (i < s.hashes.size()) device_.cache_block(d, s.hashes[i]);
      }
      table[i] = d;
    }
    release_host_table(s);
    s.blocks.swap(table);
    s.swapped = false;
    return true;
  }

  /// Copies a running sequence's committed blocks to the host tier, in order,
  /// where the host does not hold their hash yet (write-through offload:
  /// call it before free_sequence for a conversation that may come back).
  /// The device blocks stay as they are; the copies are queued in swap_out
  /// and the host blocks are findable by hash at once, so a later
  /// attach_prefix that misses on the device (its blocks evicted meanwhile)
  /// continues on the host. Stops at the first block the host has no free
  /// block for (a chain is only useful from its start; cached host blocks
  /// are evicted as for any host allocation, never this chain's earlier
  /// blocks, but possibly later ones it already held) or that the sliding
  /// window dropped. A block swapped in this step is not copied: the host
  /// block it comes from is cached under its hash. Returns the number of
  /// copies queued. Throws
  /// kvkit::Error for an unknown or swapped sequence or a manager without
  /// host blocks.
  std::int64_t offload_to_host(SequenceId seq) {
    const char* where = "kvkit::KVCacheManager::offload_to_host";
    Seq& s = get_running(seq, where);
    check(has_host_, where, "the manager has no host blocks (options.num_host_blocks = 0)");
    std::vector<std::int32_t> pinned;  // host hits, held so that allocations below keep them
    std::int64_t queued = 0;
    for (std::size_t i = 0; i < s.hashes.size(); ++i) {
      const std::int32_t d = s.blocks[i];
      if (d == device_.null_block()) break;
      const std::int32_t hit = host_.acquire_cached(s.hashes[i]);
      if (hit != BlockPool::kNoBlock) {
        // A hit whose content is still in flight (another swap-out's or
        // offload's destination) is held until the flush like our own copies:
        // its other holder may free it before then, cancelling the copy.
        if (pending_host_[static_cast<std::size_t>(hit)] != kNone) {
          hold_until_flush(hit, s.options.priority);
        } else {
          pinned.push_back(hit);
        }
        continue;
      }
      // Swapped in this step: the host block it comes from holds the content
      // (and is held by that transfer): make it findable instead of copying.
      const std::int32_t src = pending_swap_in_source(d);
      if (src != BlockPool::kNoBlock) {
        if (host_.is_cached(src) || !host_.cache_block(src, s.hashes[i])) break;
        continue;
      }
      const std::int32_t h = host_.allocate_one();
      if (h == BlockPool::kNoBlock) break;
      record_copy(MemoryTier::kDevice, d, MemoryTier::kHost, h, s.options.priority);
      host_.cache_block(h, s.hashes[i]);
      hold_until_flush(h, s.options.priority);
      ++queued;
    }
    for (std::size_t i = pinned.size(); i > 0; --i) host_.release_one(pinned[i - 1], s.options.priority);
    return queued;
  }

  /// Returns the step's pending block transfers and releases the references
  /// they held on their sources (and offload_to_host's holds on host blocks).
  /// Call once per step, execute the three lists
  /// (in any order) before the step's KV writes.
  BlockTransfers take_transfers() {
    BlockTransfers out;
    for (int l = 0; l < kNumLists; ++l) {
      std::vector<BlockCopy>& list = lists_[l];
      std::vector<BlockCopy>& dst_list = l == kCopies ? out.copies : (l == kSwapOut ? out.swap_out : out.swap_in);
      for (const BlockCopy& c : list) {
        if (c.dst == BlockPool::kNoBlock) continue;  // cancelled: destination freed
        dst_list.push_back(c);
        (l == kSwapOut ? pending_host_ : pending_device_)[static_cast<std::size_t>(c.dst)] = kNone;
      }
      // A source whose last reference this is (e.g. every device block of a
      // swap_out) is freed here: at the priority of the sequence that queued
      // the transfer, not 0, and tail first as free_sequence does.
      for (std::size_t e = list.size(); e > 0; --e) {
        const BlockCopy& c = list[e - 1];
        if (c.dst == BlockPool::kNoBlock) continue;
        if (l != kSwapIn) --pending_reads_[static_cast<std::size_t>(c.src)];
        (l == kSwapIn ? host_ : device_).release_one(c.src, priorities_[l][e - 1]);
      }
      list.clear();
      priorities_[l].clear();
    }
    // Offloaded host blocks were held so that nothing reused them before
    // their content arrived; they now stay cached on the host (tail first).
    for (std::size_t e = offload_holds_.size(); e > 0; --e) {
      host_.release_one(offload_holds_[e - 1], offload_priorities_[e - 1]);
    }
    offload_holds_.clear();
    offload_priorities_.clear();
    return out;
  }

  /// Returns and clears the queued BlockStored / BlockRemoved events of both
  /// tiers (device first), if events were enabled.
  std::vector<BlockEvent> take_events() {
    std::vector<BlockEvent> out = device_.take_events();
    std::vector<BlockEvent> host = host_.take_events();
    out.insert(out.end(), host.begin(), host.end());
    return out;
  }

  // ------------------------------------------------------------ kernel arrays

  /// Fills a padded block table `table` [n, max_blocks] (int32, row-major,
  /// unused entries = null_block()) and `seq_lens` [n] (int32 token counts)
  /// for running sequences `seqs[0..n)`. Only blocks covering tokens are
  /// written (not look-ahead ones). Throws kvkit::Error for an unknown or
  /// swapped sequence, or one needing more than max_blocks blocks.
  void build_block_table(const SequenceId* seqs, std::int64_t n, std::int64_t max_blocks,
                         std::int32_t* table, std::int32_t* seq_lens) const {
    const char* where = "kvkit::KVCacheManager::build_block_table";
    check_argument(n >= 0 && (n == 0 || (seqs && table && seq_lens)), where, "n", n,
                   ">= 0 with non-null seqs, table and seq_lens");
    for (std::int64_t i = 0; i < n; ++i) {
      const Seq& s = get_running(seqs[i], where);
      check_argument(blocks_for(s.num_tokens) <= max_blocks, where, "max_blocks", max_blocks,
                     ">= ", blocks_for(s.num_tokens), " (blocks of sequence ", seqs[i], ")");
      // seq_lens are int32, as the kernels read them.
      check_argument(s.num_tokens <= INT32_MAX, where, "seqs", seqs[i], "a sequence of < 2^31 tokens (it has ",
                     s.num_tokens, ")");
    }
    for (std::int64_t i = 0; i < n; ++i) {
      const Seq& s = seqs_[seqs[i].index];
      const std::int64_t used = blocks_for(s.num_tokens);
      std::int32_t* row = table + i * max_blocks;
      std::copy(s.blocks.begin(), s.blocks.begin() + used, row);
      std::fill(row + used, row + max_blocks, null_block());
      seq_lens[i] = static_cast<std::int32_t>(s.num_tokens);
    }
  }

  /// build_block_table into arrays it allocates: the padded page table of
  /// running sequences `seqs[0..n)`, as attention's `PaddedPageTable`
  /// (`.view()`). Rows hold `max_blocks` entries, or when that is 0 as many as
  /// the longest sequence needs (at least 1). A fixed `max_blocks` keeps the
  /// shape constant from step to step (CUDA graphs); build_block_table itself
  /// fills arrays the caller owns, without allocating. Throws as it does.
  PaddedPageTableStorage build_page_table(const SequenceId* seqs, std::int64_t n,
                                          std::int64_t max_blocks = 0) const {
    const char* where = "kvkit::KVCacheManager::build_page_table";
    check_argument(n >= 0 && (n == 0 || seqs), where, "n", n, ">= 0 with non-null seqs");
    check_argument(max_blocks >= 0 && max_blocks <= max_pages_per_sequence(block_size()), where, "max_blocks",
                   max_blocks, "in [0, ", max_pages_per_sequence(block_size()),
                   "] (0: the longest sequence's; seq_lens are int32)");
    std::int64_t longest = 1;
    for (std::int64_t i = 0; i < n; ++i) longest = std::max(longest, blocks_for(get_running(seqs[i], where).num_tokens));
    PaddedPageTableStorage out;
    out.max_blocks = max_blocks > 0 ? max_blocks : longest;
    out.block_table.resize(static_cast<std::size_t>(n * out.max_blocks));
    out.seq_lens.resize(static_cast<std::size_t>(n));
    build_block_table(seqs, n, out.max_blocks, out.block_table.data(), out.seq_lens.data());
    return out;
  }

  /// Total pages of running sequences `seqs[0..n)`: the length of the CSR `indices`.
  std::int64_t csr_num_pages(const SequenceId* seqs, std::int64_t n) const {
    std::int64_t total = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      total += blocks_for(get_running(seqs[i], "kvkit::KVCacheManager::csr_num_pages").num_tokens);
    }
    return total;
  }

  /// Fills FlashInfer's CSR page table for running sequences `seqs[0..n)`:
  /// `indptr` [n + 1], `indices` [csr_num_pages(seqs, n)] (block ids; the null
  /// block for window-freed pages), `last_page_len` [n] (tokens in each last
  /// page, 0 for an empty sequence). Throws kvkit::Error for an unknown or
  /// swapped sequence.
  void build_csr_page_table(const SequenceId* seqs, std::int64_t n, std::int32_t* indptr,
                            std::int32_t* indices, std::int32_t* last_page_len) const {
    const char* where = "kvkit::KVCacheManager::build_csr_page_table";
    check_argument(n >= 0 && (n == 0 || (seqs && last_page_len)) && indptr, where, "n", n,
                   ">= 0 with non-null seqs, indptr and last_page_len");
    std::int64_t total = 0;
    for (std::int64_t i = 0; i < n; ++i) total += blocks_for(get_running(seqs[i], where).num_tokens);
    // indices was not checked: a null one with pages to write crashed instead of throwing.
    check_argument(total == 0 || indices != nullptr, where, "indices", indices, "non-null (",
                   total, " pages to write)");
    indptr[0] = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      const Seq& s = seqs_[seqs[i].index];
      const std::int64_t pages = blocks_for(s.num_tokens);
      std::copy(s.blocks.begin(), s.blocks.begin() + pages, indices + indptr[i]);
      indptr[i + 1] = static_cast<std::int32_t>(indptr[i] + pages);
      last_page_len[i] = static_cast<std::int32_t>(pages == 0 ? 0 : s.num_tokens - ((pages - 1) << block_shift_));
    }
  }

  // ------------------------------------------------------------ accounting

  /// Counters of both tiers and the number of live sequences.
  KVCacheStats stats() const {
    KVCacheStats st;
    st.device = device_.stats();
    st.host = has_host_ ? host_.stats() : BlockPoolStats{};
    if (has_radix_) st.radix = radix_.stats();
    st.num_sequences = num_live_;
    return st;
  }

  /// Verifies in O(blocks + table entries) both pools' invariants and that
  /// every block's reference count equals the number of block-table entries
  /// naming it plus the pending transfers reading from it plus the radix
  /// index's holds (host blocks: plus offload_to_host's holds); the radix
  /// tree's own structure (see RadixPrefixIndex::check_invariants); that tables cover their tokens,
  /// window-freed entries are exactly the null ones, committed hashes only
  /// name full blocks, pending-destination marks match the transfer lists
  /// and every pending destination is in use. Throws kvkit::Error naming the
  /// first violation.
  void check_invariants() const {
    const char* where = "kvkit::KVCacheManager::check_invariants";
    device_.check_invariants();
    host_.check_invariants();
    radix_.check_invariants(device_);
    std::vector<std::int32_t> dev_refs(static_cast<std::size_t>(device_.num_blocks()), 0);
    for (std::int32_t b = 0; b < device_.num_blocks(); ++b) dev_refs[static_cast<std::size_t>(b)] = radix_.holds(b);
    std::vector<std::int32_t> host_refs(static_cast<std::size_t>(host_.num_blocks()), 0);
    std::int32_t live = 0;
    for (std::size_t idx = 0; idx < seqs_.size(); ++idx) {
      const Seq& s = seqs_[idx];
      if (!s.live) continue;
      ++live;
      const std::int64_t used = blocks_for(s.num_tokens);
      check(static_cast<std::int64_t>(s.blocks.size()) >= used, where, "sequence ", idx, " has ",
            s.blocks.size(), " blocks for ", s.num_tokens, " tokens");
      check(static_cast<std::int64_t>(s.hashes.size()) <= (s.num_tokens >> block_shift_), where,
            "sequence ", idx, " committed ", s.hashes.size(), " blocks but has only ",
            s.num_tokens >> block_shift_, " full ones");
      check(s.resume_hashes.empty() || s.num_tokens == 0, where, "sequence ", idx,
            " has tokens and resume hashes");
      if (s.swapped) {
        check(static_cast<std::int64_t>(s.blocks.size()) == used, where, "swapped sequence ", idx,
              " keeps look-ahead blocks");
      }
      for (std::size_t i = 0; i < s.blocks.size(); ++i) {
        const std::int32_t b = s.blocks[i];
        const bool windowed = i >= sink_blocks(s) && i < s.window_begin;
        if (s.swapped) {
          if (windowed) {
            check(b == BlockPool::kNoBlock, where, "swapped sequence ", idx, " keeps window-freed entry ", i);
            continue;
          }
          check(b >= 0 && b < host_.num_blocks(), where, "swapped sequence ", idx, " entry ", i,
                " = ", b, " is not a host block");
          ++host_refs[b];
        } else {
          if (windowed) {
            check(b == device_.null_block(), where, "sequence ", idx, " entry ", i,
                  " should have been freed by the sliding window");
            continue;
          }
          check(b >= 0 && b < device_.num_blocks() && b != device_.null_block(), where, "sequence ",
                idx, " entry ", i, " = ", b, " is not an allocatable device block");
          ++dev_refs[b];
        }
      }
    }
    check(live == num_live_, where, "live sequence count ", live, " != counter ", num_live_);
    for (std::int32_t h : offload_holds_) ++host_refs[static_cast<std::size_t>(h)];
    std::int64_t pending_marks = 0;
    for (int l = 0; l < kNumLists; ++l) {
      for (std::size_t e = 0; e < lists_[l].size(); ++e) {
        const BlockCopy& c = lists_[l][e];
        const bool src_host = l == kSwapIn, dst_host = l == kSwapOut;
        if (c.dst == BlockPool::kNoBlock) continue;
        ++(src_host ? host_refs : dev_refs)[static_cast<std::size_t>(c.src)];
        const std::int64_t mark = (dst_host ? pending_host_ : pending_device_)[static_cast<std::size_t>(c.dst)];
        check(mark == encode(l, e), where, "transfer ", c.src, "->", c.dst, " is not marked on its destination");
        const std::int64_t src_mark = (src_host ? pending_host_ : pending_device_)[static_cast<std::size_t>(c.src)];
        check(src_mark == kNone, where, "transfer source ", c.src, " is itself a pending destination");
        // A freed destination must have cancelled its transfer (it may be reallocated).
        check((dst_host ? host_ : device_).ref_count(c.dst) > 0, where, "transfer destination ", c.dst,
              " is free");
      }
    }
    std::vector<std::int32_t> reads(static_cast<std::size_t>(device_.num_blocks()), 0);
    for (int l = 0; l < kNumLists; ++l) {
      if (l == kSwapIn) continue;
      for (const BlockCopy& c : lists_[l]) {
        if (c.dst != BlockPool::kNoBlock) ++reads[static_cast<std::size_t>(c.src)];
      }
    }
    check(reads == pending_reads_, where, "pending-read counts do not match the transfer lists");
    for (std::int64_t m : pending_device_) pending_marks += m != kNone;
    for (std::int64_t m : pending_host_) pending_marks += m != kNone;
    std::int64_t live_entries = 0;
    for (int l = 0; l < kNumLists; ++l) {
      for (const BlockCopy& c : lists_[l]) live_entries += c.dst != BlockPool::kNoBlock;
    }
    check(pending_marks == live_entries, where, pending_marks, " pending marks for ", live_entries,
          " pending transfers");
    for (std::int32_t b = 0; b < device_.num_blocks(); ++b) {
      if (b == device_.null_block()) continue;
      check(device_.ref_count(b) == dev_refs[b], where, "device block ", b, " has reference count ",
            device_.ref_count(b), " but ", dev_refs[b], " table entries, pending transfers and radix holds");
    }
    for (std::int32_t b = 0; b < host_.num_blocks(); ++b) {
      check(host_.ref_count(b) == host_refs[b], where, "host block ", b, " has reference count ",
            host_.ref_count(b), " but ", host_refs[b], " table entries, pending transfers and offloads");
    }
  }

 private:
  struct Seq {
    std::vector<std::int32_t> blocks;
    std::vector<BlockHash> hashes;         // of blocks [0, hashes.size()), all full
    std::vector<BlockHash> resume_hashes;  // after preempt_recompute
    std::int64_t num_tokens = 0;
    std::size_t window_begin = 0;          // blocks [sink_blocks, window_begin) were freed
    SequenceOptions options;
    std::uint32_t generation = 0;
    bool live = false;
    bool swapped = false;
  };

  static constexpr int kCopies = 0, kSwapOut = 1, kSwapIn = 2, kNumLists = 3;
  static constexpr std::int64_t kNone = -1;

  static std::int32_t checked_block_size(std::int32_t bs) {
    check_argument(is_power_of_two(bs), "kvkit::KVCacheManager", "options.block_size", bs,
                   "a positive power of two");
    return bs;
  }
  static std::int32_t checked_host_blocks(std::int32_t n) {
    check_argument(n >= 0, "kvkit::KVCacheManager", "options.num_host_blocks", n, ">= 0");
    return n;
  }
  static int log2(std::int32_t bs) {
    int s = 0;
    while ((std::int32_t{1} << s) < bs) ++s;
    return s;
  }
  static std::int64_t encode(int list, std::size_t index) {
    return (static_cast<std::int64_t>(list) << 40) | static_cast<std::int64_t>(index);
  }

  std::int64_t blocks_for(std::int64_t tokens) const {
    // Not (tokens + block_size - 1) >> shift: that overflows for counts near
    // INT64_MAX (e.g. options.num_sink_tokens, which create_sequence accepts).
    return (tokens >> block_shift_) + ((tokens & (block_size_ - 1)) != 0);
  }
  std::int64_t slot(std::int32_t block, std::int64_t position) const {
    return (static_cast<std::int64_t>(block) << block_shift_) + (position & (block_size_ - 1));
  }
  std::size_t sink_blocks(const Seq& s) const {
    return s.options.sliding_window > 0 ? static_cast<std::size_t>(blocks_for(s.options.num_sink_tokens)) : 0;
  }

  const Seq& get(SequenceId seq, const char* where) const {
    check_argument(contains(seq), where, "seq", seq, "a live sequence (unknown or already freed)");
    return seqs_[seq.index];
  }
  Seq& get(SequenceId seq, const char* where) {
    check_argument(contains(seq), where, "seq", seq, "a live sequence (unknown or already freed)");
    return seqs_[seq.index];
  }
  const Seq& get_running(SequenceId seq, const char* where) const {
    const Seq& s = get(seq, where);
    check_argument(!s.swapped, where, "seq", seq, "a running sequence (it is swapped out)");
    return s;
  }
  Seq& get_running(SequenceId seq, const char* where) {
    Seq& s = get(seq, where);
    check_argument(!s.swapped, where, "seq", seq, "a running sequence (it is swapped out)");
    return s;
  }

  struct PrefixTiers {
    std::int64_t on_device, on_host;
  };
  // The leading hashes cached on the device, then those the chain continues
  // with on the host, as far as the device has free blocks to copy them into
  // (device hits that are free blocks themselves take some of those).
  PrefixTiers prefix_tiers(const BlockHash* hashes, std::int64_t n) const {
    std::int64_t on_device = 0, device_free_hits = 0;
    for (; on_device < n; ++on_device) {
      const std::int32_t b = device_.find_cached(hashes[on_device]);
      if (b == BlockPool::kNoBlock) break;
      if (device_.ref_count(b) == 0) ++device_free_hits;
    }
    std::int64_t on_host = 0;
    if (has_host_) {
      const std::int64_t room = device_.num_free_blocks() - device_free_hits;
      while (on_device + on_host < n && on_host < room &&
             host_.find_cached(hashes[on_device + on_host]) != BlockPool::kNoBlock) {
        ++on_host;
      }
    }
    return {on_device, on_host};
  }

  // References to device block b other than pending transfers reading it:
  // those run before the step's KV writes, so a block only they share with
  // its writer is written in place (a fork's parent after its child's copy).
  std::int32_t sharers(std::int32_t b) const {
    return device_.ref_count(b) - pending_reads_[static_cast<std::size_t>(b)];
  }

  // Queues a copy; holds a reference on the source until take_transfers(),
  // which releases it at `priority` (that of the sequence queuing the copy).
  void record_copy(MemoryTier src_tier, std::int32_t src, MemoryTier dst_tier, std::int32_t dst,
                   int priority) {
    const std::int64_t mark = (src_tier == MemoryTier::kHost ? pending_host_ : pending_device_)[static_cast<std::size_t>(src)];
    if (mark != kNone) {
      // The source is itself waiting for its content: copy from where that comes from.
      const int l = static_cast<int>(mark >> 40);
      src = lists_[l][static_cast<std::size_t>(mark & ((std::int64_t{1} << 40) - 1))].src;
      src_tier = l == kSwapIn ? MemoryTier::kHost : MemoryTier::kDevice;
    }
    (src_tier == MemoryTier::kHost ? host_ : device_).retain(src);
    if (src_tier == MemoryTier::kDevice) ++pending_reads_[static_cast<std::size_t>(src)];
    // host -> host cannot arise: swap_out shares a pending swap-in's host source instead.
    const int l = src_tier == MemoryTier::kHost ? kSwapIn
                  : dst_tier == MemoryTier::kDevice ? kCopies : kSwapOut;
    (dst_tier == MemoryTier::kHost ? pending_host_ : pending_device_)[static_cast<std::size_t>(dst)] =
        encode(l, lists_[l].size());
    lists_[l].push_back(BlockCopy{src, dst});
    priorities_[l].push_back(static_cast<std::int8_t>(priority));
  }

  // Keeps host block h (already referenced) in use until take_transfers().
  void hold_until_flush(std::int32_t h, int priority) {
    offload_holds_.push_back(h);
    offload_priorities_.push_back(static_cast<std::int8_t>(priority));
  }

  // The host block a pending swap-in fills device block d from, or kNoBlock.
  std::int32_t pending_swap_in_source(std::int32_t d) const {
    const std::int64_t mark = pending_device_[static_cast<std::size_t>(d)];
    if (mark == kNone || static_cast<int>(mark >> 40) != kSwapIn) return BlockPool::kNoBlock;
    return lists_[kSwapIn][static_cast<std::size_t>(mark & ((std::int64_t{1} << 40) - 1))].src;
  }

  // Evicts unshared radix leaves until `need` blocks are free; false if that
  // cannot be reached (always without a radix index). Blocks the eviction
  // frees may be pending destinations: their copies are cancelled.
  bool make_room(std::int32_t need) {
    if (!has_radix_) return false;
    radix_freed_.clear();
    const bool ok = radix_.evict(device_, need, &radix_freed_);
    for (std::int32_t b : radix_freed_) cancel_if_pending(MemoryTier::kDevice, b);
    return ok;
  }

  // A destination freed before the flush: its copy is dead and must not run.
  void cancel_if_pending(MemoryTier tier, std::int32_t block) {
    std::int64_t& mark = (tier == MemoryTier::kHost ? pending_host_ : pending_device_)[static_cast<std::size_t>(block)];
    if (mark == kNone) return;
    const int l = static_cast<int>(mark >> 40);
    const std::size_t e = static_cast<std::size_t>(mark & ((std::int64_t{1} << 40) - 1));
    BlockCopy& c = lists_[l][e];
    mark = kNone;
    const std::int32_t src = c.src;
    c.src = c.dst = BlockPool::kNoBlock;
    if (l != kSwapIn) --pending_reads_[static_cast<std::size_t>(src)];
    (l == kSwapIn ? host_ : device_).release_one(src, priorities_[l][e]);
    // Its content will never arrive: it must not stay findable by hash.
    (tier == MemoryTier::kHost ? host_ : device_).uncache_block(block);
  }

  // Releases device blocks [keep, size) tail first and truncates the table.
  void release_tail(Seq& s, std::size_t keep) {
    for (std::size_t i = s.blocks.size(); i > keep; --i) {
      const std::int32_t b = s.blocks[i - 1];
      if (b == device_.null_block()) continue;
      device_.release_one(b, s.options.priority);
      if (device_.ref_count(b) == 0) cancel_if_pending(MemoryTier::kDevice, b);
    }
    s.blocks.resize(keep);
    s.window_begin = std::max(sink_blocks(s), std::min(s.window_begin, keep));
  }

  void release_host_table(Seq& s) {
    for (std::size_t i = s.blocks.size(); i > 0; --i) {
      const std::int32_t h = s.blocks[i - 1];
      if (h == BlockPool::kNoBlock) continue;
      host_.release_one(h, s.options.priority);
      if (host_.ref_count(h) == 0) cancel_if_pending(MemoryTier::kHost, h);
    }
    s.blocks.clear();
  }

  // Frees blocks no longer visible to the token at `position` (and later ones).
  void free_out_of_window(Seq& s, std::int64_t position) {
    const std::int64_t lo = position - s.options.sliding_window + 1;  // first position still needed
    while (s.window_begin < s.blocks.size() &&
           static_cast<std::int64_t>(s.window_begin + 1) * block_size_ <= lo) {
      std::int32_t& b = s.blocks[s.window_begin];
      device_.release_one(b, s.options.priority);
      if (device_.ref_count(b) == 0) cancel_if_pending(MemoryTier::kDevice, b);
      b = device_.null_block();
      ++s.window_begin;
    }
  }

  std::int32_t block_size_;
  int block_shift_;
  BlockPool device_;
  BlockPool host_;
  bool has_host_;
  std::vector<Seq> seqs_;
  std::vector<std::uint32_t> free_slots_;
  std::int32_t num_live_ = 0;
  std::vector<BlockCopy> lists_[kNumLists];
  std::vector<std::int8_t> priorities_[kNumLists];  // per transfer: priority its source is released at
  std::vector<std::int64_t> pending_device_;  // per device block: encoded transfer writing it, or kNone
  std::vector<std::int64_t> pending_host_;
  std::vector<std::int32_t> pending_reads_;   // per device block: pending transfers reading it
  std::vector<std::int32_t> offload_holds_;   // host destinations of offload_to_host, held until the flush
  std::vector<std::int8_t> offload_priorities_;
  RadixPrefixIndex radix_;
  bool has_radix_;
  std::vector<std::int32_t> radix_freed_;  // scratch of make_room
  RadixMatch radix_match_;                 // scratch of attach_prefix_tokens
};

}  // namespace kvkit
