#pragma once
/// @file block_pool.hpp
/// kvkit::BlockPool: a fixed set of physical KV-cache blocks (ids 0..N-1)
/// with reference counts, an intrusive LRU free queue and a hash index that
/// keeps freed blocks findable until they are actually reused.
///
/// Model (vLLM v1's BlockPool, with retention priorities as TensorRT-LLM's):
/// - A block is *used* while its reference count is > 0, *free* otherwise.
/// - A free block either holds no cached content (it sits on the "empty"
///   list, reused first) or still holds content registered under a
///   BlockHash (it sits on the cached list of its retention priority, in
///   least-recently-freed order). Cached free blocks are evicted lazily: the
///   hash stays valid until allocate() takes the block for something else.
/// - allocate() takes empty blocks first, then evicts cached ones from the
///   lowest priority list, oldest first. All-or-nothing; running out is a
///   `false` result, never an exception.
/// - Optional null block (id 0): never allocated, never freed; padding for
///   block tables and a placeholder for blocks dropped by a sliding window.
///
/// Every operation is O(1) per block (the hash index is a hash map).
/// Single-threaded by design: the scheduler that owns the pool serializes calls.

#include <cstdint>
#include <unordered_map>
#include <vector>

#include "kvkit/core/error.hpp"
#include "kvkit/memory/block_hash.hpp"

namespace kvkit {

/// Counters of a BlockPool. Block counts are current values; hits, misses,
/// evictions are totals since construction, counted in blocks.
struct BlockPoolStats {
  std::int32_t num_blocks = 0;        ///< all blocks, including the null block
  std::int32_t num_free = 0;          ///< reference count 0 (cached or not), excluding the null block
  std::int32_t num_used = 0;          ///< reference count > 0
  std::int32_t num_cached_free = 0;   ///< free but still findable by hash
  std::int32_t num_cached = 0;        ///< entries of the hash index (used or free)
  std::int64_t hits = 0;              ///< blocks found by prefix lookups
  std::int64_t misses = 0;            ///< blocks asked for by prefix lookups and not found
  std::int64_t evictions = 0;         ///< cached free blocks whose content was dropped for reuse
};

/// Fixed-size pool of block ids with reference counts, LRU free queue and a
/// hash index for prefix caching. See the file comment for the model.
class BlockPool {
 public:
  /// Returned where no block exists.
  static constexpr std::int32_t kNoBlock = -1;
  /// Retention priorities are 0..kNumPriorities-1; lower is evicted first.
  static constexpr int kNumPriorities = 8;

  /// Creates `num_blocks` blocks, all free. With `reserve_null_block`, block 0
  /// is the null block and num_blocks - 1 blocks can be allocated.
  /// Throws kvkit::Error if num_blocks < 1 (< 2 with a null block).
  explicit BlockPool(std::int32_t num_blocks, bool reserve_null_block = false,
                     MemoryTier tier = MemoryTier::kDevice)
      : tier_(tier),
        null_block_(reserve_null_block ? 0 : kNoBlock),
        ref_(static_cast<std::size_t>(num_blocks > 0 ? num_blocks : 0), 0),
        prev_(ref_.size(), kNoBlock),
        next_(ref_.size(), kNoBlock),
        list_(ref_.size(), kNotListed),
        hash_(ref_.size()),
        has_hash_(ref_.size(), 0) {
    check_argument(num_blocks >= (reserve_null_block ? 2 : 1), "kvkit::BlockPool", "num_blocks",
                   num_blocks, reserve_null_block ? ">= 2 (one is the null block)" : ">= 1");
    for (int l = 0; l < kNumLists; ++l) head_[l] = tail_[l] = kNoBlock;
    for (std::int32_t b = num_blocks - 1; b >= 0; --b) {
      if (b != null_block_) push_front(b, kEmptyList);
    }
  }

  /// Which memory this pool's blocks live in (used to tag events).
  MemoryTier tier() const { return tier_; }
  /// Number of blocks, including the null block.
  std::int32_t num_blocks() const { return static_cast<std::int32_t>(ref_.size()); }
  /// The null block's id (0), or kNoBlock when the pool has none.
  std::int32_t null_block() const { return null_block_; }
  /// Blocks with reference count 0 (cached or not), excluding the null block.
  std::int32_t num_free_blocks() const { return num_free_; }
  /// Blocks with reference count > 0.
  std::int32_t num_used_blocks() const {
    return num_blocks() - num_free_ - (null_block_ == kNoBlock ? 0 : 1);
  }
  /// Free blocks still findable by hash (candidates for lazy eviction).
  std::int32_t num_cached_free_blocks() const { return num_cached_free_; }

  /// Reference count of a block. Throws kvkit::Error for an id out of range.
  std::int32_t ref_count(std::int32_t block) const {
    check_block(block, "kvkit::BlockPool::ref_count");
    return ref_[block];
  }
  /// True when the block is registered in the hash index.
  bool is_cached(std::int32_t block) const {
    check_block(block, "kvkit::BlockPool::is_cached");
    return has_hash_[block] != 0;
  }
  /// The hash a cached block is registered under. Throws if it has none.
  const BlockHash& block_hash(std::int32_t block) const {
    check_argument(block >= 0 && block < num_blocks() && has_hash_[block], "kvkit::BlockPool::block_hash",
                   "block", block, "a cached block");
    return hash_[block];
  }

  /// Allocates `n` blocks (reference count 1 each) into `out[0..n)`, or none
  /// at all: returns false and changes nothing when fewer than n are free.
  /// Evicts cached free blocks (lowest priority, oldest first) only once no
  /// empty block is left. Throws kvkit::Error if n < 0 or out is null with n > 0.
  bool allocate(std::int32_t n, std::int32_t* out) {
    check_argument(n >= 0, "kvkit::BlockPool::allocate", "n", n, ">= 0");
    check_argument(n == 0 || out != nullptr, "kvkit::BlockPool::allocate", "out", out, "non-null");
    if (n > num_free_) return false;
    for (std::int32_t i = 0; i < n; ++i) out[i] = take_one();
    return true;
  }

  /// Allocates one block; kNoBlock when none is free.
  std::int32_t allocate_one() { return num_free_ > 0 ? take_one() : kNoBlock; }

  /// Adds a reference to a block that is in use (e.g. a fork sharing it).
  /// Throws kvkit::Error if the block is free, the null block, or out of range.
  void retain(std::int32_t block) {
    check_block(block, "kvkit::BlockPool::retain");
    check_argument(ref_[block] > 0, "kvkit::BlockPool::retain", "block", block,
                   "a block in use (reference count is 0)");
    ++ref_[block];
  }

  /// Drops one reference from each of `blocks[0..n)` (an id may repeat). A
  /// block reaching 0 becomes free: onto its priority's cached list (most
  /// recent last) if it holds cached content, else onto the empty list.
  /// Callers free a sequence's blocks tail first so that its last blocks,
  /// least likely to be shared, are evicted first.
  /// Throws kvkit::Error, changing nothing, if an id is out of range, the null
  /// block, or would drop below zero (double free); or if priority is out of range.
  void release(const std::int32_t* blocks, std::int32_t n, int priority = 0) {
    check_argument(priority >= 0 && priority < kNumPriorities, "kvkit::BlockPool::release",
                   "priority", priority, "in [0, ", kNumPriorities, ")");
    check_argument(n >= 0 && (n == 0 || blocks != nullptr), "kvkit::BlockPool::release", "n", n,
                   ">= 0 with non-null blocks");
    // Decrement first, undo on failure: repeated ids are handled without a set.
    for (std::int32_t i = 0; i < n; ++i) {
      const std::int32_t b = blocks[i];
      if (b < 0 || b >= num_blocks() || b == null_block_ || ref_[b] == 0) {
        for (std::int32_t j = 0; j < i; ++j) ++ref_[blocks[j]];
        check_block(b, "kvkit::BlockPool::release");
        fail_argument("kvkit::BlockPool::release", "block", b,
                      "a block in use (double free: reference count is already 0)");
      }
      --ref_[b];
    }
    for (std::int32_t i = 0; i < n; ++i) {
      const std::int32_t b = blocks[i];
      if (ref_[b] == 0 && list_[b] == kNotListed) make_free(b, priority);
    }
  }

  /// Drops one reference from a single block; see release().
  void release_one(std::int32_t block, int priority = 0) { release(&block, 1, priority); }

  /// The block registered under `hash`, or kNoBlock. Changes nothing.
  std::int32_t find_cached(const BlockHash& hash) const {
    const auto it = index_.find(hash);
    return it == index_.end() ? kNoBlock : it->second;
  }

  /// Takes a reference on the block registered under `hash` (taking it off
  /// the free queue if it was free) and returns it; kNoBlock if not cached.
  std::int32_t acquire_cached(const BlockHash& hash) {
    const auto it = index_.find(hash);
    if (it == index_.end()) return kNoBlock;
    const std::int32_t b = it->second;
    if (ref_[b] == 0) unlink(b);
    ++ref_[b];
    return b;
  }

  /// Registers a used block's (full, final) content under `hash`. Returns
  /// false, changing nothing, if the hash already names another block
  /// (duplicate content stays uncached) or this block is already registered
  /// under the same hash. Throws kvkit::Error if the block is not in use or is
  /// already registered under a different hash.
  bool cache_block(std::int32_t block, const BlockHash& hash) {
    check_block(block, "kvkit::BlockPool::cache_block");
    check_argument(ref_[block] > 0, "kvkit::BlockPool::cache_block", "block", block,
                   "a block in use (reference count is 0)");
    if (has_hash_[block]) {
      check(hash_[block] == hash, "kvkit::BlockPool::cache_block", "block ", block,
            " is already cached under ", hash_[block], ", not ", hash);
      return false;
    }
    if (!index_.emplace(hash, block).second) return false;
    hash_[block] = hash;
    has_hash_[block] = 1;
    emit(BlockEvent::Kind::kStored, block);
    return true;
  }

  /// Removes a block from the hash index: its content is about to change (a
  /// used block) or will never arrive (a free block whose fill was cancelled;
  /// it moves to the empty list). No-op for a block that is not cached.
  /// Throws kvkit::Error if the block is out of range or the null block.
  void uncache_block(std::int32_t block) {
    check_block(block, "kvkit::BlockPool::uncache_block");
    if (!has_hash_[block]) return;
    drop_hash(block);
    if (ref_[block] == 0) {
      unlink(block);
      push_front(block, kEmptyList);
    }
  }

  /// Drops every cached free block's content (e.g. after weights change).
  /// Used blocks keep their hashes. Returns how many were dropped.
  std::int32_t evict_all_cached_free() {
    std::int32_t dropped = 0;
    for (int l = kFirstCachedList; l < kNumLists; ++l) {
      while (head_[l] != kNoBlock) {
        const std::int32_t b = head_[l];
        unlink(b);
        drop_hash(b);
        ++evictions_;
        push_front(b, kEmptyList);
        ++dropped;
      }
    }
    return dropped;
  }

  /// Adds to the hit/miss counters (used by prefix lookups).
  void record_lookup(std::int64_t hits, std::int64_t misses) {
    hits_ += hits;
    misses_ += misses;
  }

  /// Current counters.
  BlockPoolStats stats() const {
    BlockPoolStats s;
    s.num_blocks = num_blocks();
    s.num_free = num_free_;
    s.num_used = num_used_blocks();
    s.num_cached_free = num_cached_free_;
    s.num_cached = static_cast<std::int32_t>(index_.size());
    s.hits = hits_;
    s.misses = misses_;
    s.evictions = evictions_;
    return s;
  }

  /// Turns the BlockStored / BlockRemoved event queue on or off (off by default).
  void set_events_enabled(bool on) { events_enabled_ = on; }
  /// Returns the queued events, oldest first, and clears the queue.
  std::vector<BlockEvent> take_events() {
    std::vector<BlockEvent> out;
    out.swap(events_);
    return out;
  }

  /// Verifies in O(N) that the free lists are well-formed doubly-linked lists
  /// holding exactly the free blocks (cached ones on cached lists, others on
  /// the empty list), that free + used + null = total, that the counters
  /// agree, and that the hash index and the per-block hashes agree.
  /// Throws kvkit::Error naming the first violation.
  void check_invariants() const {
    const char* where = "kvkit::BlockPool::check_invariants";
    std::int32_t listed = 0, cached_listed = 0;
    for (int l = 0; l < kNumLists; ++l) {
      std::int32_t prev = kNoBlock;
      for (std::int32_t b = head_[l]; b != kNoBlock; b = next_[b]) {
        check(b >= 0 && b < num_blocks(), where, "list ", l, " holds id ", b);
        check(list_[b] == l, where, "block ", b, " is on list ", l, " but records list ", int(list_[b]));
        check(prev_[b] == prev, where, "block ", b, " has a broken prev link");
        check(ref_[b] == 0, where, "block ", b, " is free and referenced (", ref_[b], ")");
        check(b != null_block_, where, "the null block is on a free list");
        check((l >= kFirstCachedList) == (has_hash_[b] != 0), where, "block ", b, " on list ", l,
              (has_hash_[b] ? " has" : " has no"), " cached content");
        ++listed;
        if (l >= kFirstCachedList) ++cached_listed;
        check(listed <= num_blocks(), where, "a free list has a cycle");
        prev = b;
      }
      check(tail_[l] == prev, where, "list ", l, " has a wrong tail");
      check(((nonempty_ >> l) & 1u) == (head_[l] != kNoBlock ? 1u : 0u), where,
            "nonempty mask disagrees with list ", l);
    }
    check(listed == num_free_, where, "free lists hold ", listed, " blocks, counter says ", num_free_);
    check(cached_listed == num_cached_free_, where, "cached free lists hold ", cached_listed,
          " blocks, counter says ", num_cached_free_);
    std::int32_t free_count = 0, hashed = 0;
    for (std::int32_t b = 0; b < num_blocks(); ++b) {
      check(ref_[b] >= 0, where, "block ", b, " has negative reference count");
      if (b == null_block_) {
        check(ref_[b] == 0 && list_[b] == kNotListed && !has_hash_[b], where,
              "the null block is referenced, listed or cached");
        continue;
      }
      if (ref_[b] == 0) {
        ++free_count;
        check(list_[b] != kNotListed, where, "free block ", b, " is on no free list");
      } else {
        check(list_[b] == kNotListed, where, "used block ", b, " is on a free list");
      }
      if (has_hash_[b]) {
        ++hashed;
        const auto it = index_.find(hash_[b]);
        check(it != index_.end() && it->second == b, where, "block ", b, " has hash ", hash_[b],
              " but the index does not map it back");
      }
    }
    check(free_count == num_free_, where, "free count ", free_count, " != counter ", num_free_);
    check(hashed == static_cast<std::int32_t>(index_.size()), where, "index holds ", index_.size(),
          " hashes, blocks hold ", hashed);
    check(free_count + num_used_blocks() + (null_block_ == kNoBlock ? 0 : 1) == num_blocks(), where,
          "free + used + null != total");
  }

 private:
  static constexpr int kEmptyList = 0;
  static constexpr int kFirstCachedList = 1;
  static constexpr int kNumLists = 1 + kNumPriorities;
  static constexpr std::int8_t kNotListed = -1;

  void check_block(std::int32_t block, const char* where) const {
    check_argument(block >= 0 && block < num_blocks(), where, "block", block, "in [0, ",
                   num_blocks(), ")");
    check_argument(block != null_block_, where, "block", block, "not the null block");
  }

  void emit(BlockEvent::Kind kind, std::int32_t block) {
    if (!events_enabled_) return;
    BlockEvent e;
    e.kind = kind;
    e.tier = tier_;
    e.hash = hash_[block];
    e.block_id = block;
    events_.push_back(e);
  }

  void drop_hash(std::int32_t b) {
    emit(BlockEvent::Kind::kRemoved, b);
    index_.erase(hash_[b]);
    has_hash_[b] = 0;
  }

  // Pops the block to reuse next: an empty one, else the oldest cached block
  // of the lowest non-empty priority (whose content is evicted now).
  std::int32_t take_one() {
    if (head_[kEmptyList] != kNoBlock) {
      const std::int32_t b = head_[kEmptyList];
      unlink(b);
      ref_[b] = 1;
      return b;
    }
    const int l = __builtin_ctz(nonempty_);  // nonempty_ != 0 since num_free_ > 0
    const std::int32_t b = head_[l];
    unlink(b);
    drop_hash(b);
    ++evictions_;
    ref_[b] = 1;
    return b;
  }

  void make_free(std::int32_t b, int priority) {
    if (has_hash_[b]) {
      push_back(b, kFirstCachedList + priority);
    } else {
      push_front(b, kEmptyList);  // LIFO: the most recently used block is warm in caches
    }
  }

  void push_front(std::int32_t b, int l) {
    prev_[b] = kNoBlock;
    next_[b] = head_[l];
    if (head_[l] != kNoBlock) prev_[head_[l]] = b; else tail_[l] = b;
    head_[l] = b;
    on_link(b, l);
  }

  void push_back(std::int32_t b, int l) {
    next_[b] = kNoBlock;
    prev_[b] = tail_[l];
    if (tail_[l] != kNoBlock) next_[tail_[l]] = b; else head_[l] = b;
    tail_[l] = b;
    on_link(b, l);
  }

  void on_link(std::int32_t b, int l) {
    list_[b] = static_cast<std::int8_t>(l);
    nonempty_ |= 1u << l;
    ++num_free_;
    if (l >= kFirstCachedList) ++num_cached_free_;
  }

  void unlink(std::int32_t b) {
    const int l = list_[b];
    const std::int32_t p = prev_[b], n = next_[b];
    if (p != kNoBlock) next_[p] = n; else head_[l] = n;
    if (n != kNoBlock) prev_[n] = p; else tail_[l] = p;
    if (head_[l] == kNoBlock) nonempty_ &= ~(1u << l);
    prev_[b] = next_[b] = kNoBlock;
    list_[b] = kNotListed;
    --num_free_;
    if (l >= kFirstCachedList) --num_cached_free_;
  }

  MemoryTier tier_;
  std::int32_t null_block_;
  std::vector<std::int32_t> ref_;
  std::vector<std::int32_t> prev_;
  std::vector<std::int32_t> next_;
  std::vector<std::int8_t> list_;
  std::vector<BlockHash> hash_;
  std::vector<std::uint8_t> has_hash_;
  std::int32_t head_[kNumLists];
  std::int32_t tail_[kNumLists];
  std::uint32_t nonempty_ = 0;
  std::int32_t num_free_ = 0;
  std::int32_t num_cached_free_ = 0;
  std::unordered_map<BlockHash, std::int32_t, BlockHashHasher> index_;
  std::int64_t hits_ = 0;
  std::int64_t misses_ = 0;
  std::int64_t evictions_ = 0;
  bool events_enabled_ = false;
  std::vector<BlockEvent> events_;
};

}  // namespace kvkit
