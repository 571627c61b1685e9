#pragma once
/// @file radix_index.hpp
/// kvkit::RadixPrefixIndex: a token-granular prefix index (SGLang's radix
/// cache) over the blocks of a BlockPool, so that a shared prefix shorter than
/// one block, or one that ends inside a block, is still reused.
///
/// Model.
/// - A radix tree whose edges are runs of token ids; a run splits where two
///   inserted sequences diverge. A node covering sequence positions
///   [begin, end) holds the physical blocks of block indices
///   begin / block_size .. (end - 1) / block_size. When a node boundary falls
///   inside a block, the nodes on both sides name a block for that index (the
///   same one after a split, or different blocks written by different
///   sequences with equal content for the shared positions).
/// - Each block a node names is held by the node with one reference in the
///   BlockPool, so it is never reused while indexed, and anyone who writes
///   into it copies it first (KVCacheManager's copy-on-write sees a reference
///   count > 1). Hence a node's block for index i keeps the KV of positions
///   [i * block_size, min(end, (i + 1) * block_size)) as long as it is indexed.
/// - match(): walks the tree along the prompt and returns the longest matched
///   token count L, the blocks covering the full blocks [0, L / block_size)
///   (for each block index, the block of the deepest matched node covering it:
///   that one holds every matched position of the block), and, when L ends
///   inside a block, that block and the number of valid tokens in it. The
///   caller shares the full blocks and copies the partial one into a fresh
///   block (copy-on-partial-reuse), then writes after the L matched tokens.
/// - Eviction: only leaves are evicted, and only those none of whose blocks is
///   referenced by anyone but the index (a leaf a running sequence shares is
///   kept: evicting it would free nothing). Order: lowest retention priority
///   first, least recently used first within a priority (the pool's rules).
///   A node's priority is the highest priority of the sequences that inserted
///   through it; match-and-touch and insert refresh the whole path, so a
///   parent is never older or of lower priority than its children.
///
/// Costs. match(): O(matched tokens + nodes on the path) with one hash-map
/// lookup per node; insert(): the same plus one pool retain per newly indexed
/// block; evict(): O(log leaves) per evicted leaf plus the leaves skipped
/// because a sequence still shares them. Memory: 4 bytes per indexed token
/// plus one node (about 150 bytes) per divergence.
///
/// The index never allocates blocks and emits no BlockEvents (it has no block
/// hashes). Single-threaded, like the pool it holds references in.

#include <algorithm>
#include <cstdint>
#include <set>
#include <unordered_map>
#include <vector>

#include "kvkit/core/error.hpp"
#include "kvkit/memory/block_pool.hpp"

namespace kvkit {

/// Result of RadixPrefixIndex::match.
struct RadixMatch {
  /// Matched tokens L: the prompt's first L tokens are indexed.
  std::int64_t num_tokens = 0;
  /// Blocks holding the full blocks of the match, [num_tokens / block_size]:
  /// blocks[i] holds positions [i * block_size, (i + 1) * block_size).
  std::vector<std::int32_t> blocks;
  /// When num_tokens % block_size != 0: the block whose first partial_tokens
  /// positions hold the rest of the match (copy it before writing after it);
  /// otherwise BlockPool::kNoBlock.
  std::int32_t partial_block = BlockPool::kNoBlock;
  /// Valid tokens in partial_block, 0..block_size-1.
  std::int32_t partial_tokens = 0;
  /// The deepest node the match reached (-1: none); for RadixPrefixIndex::touch.
  std::int32_t node = -1;
};

/// Counters of a RadixPrefixIndex. Sizes are current values; the others are
/// totals since construction.
struct RadixIndexStats {
  std::int32_t num_nodes = 0;        ///< nodes, excluding the root
  std::int64_t num_tokens = 0;       ///< indexed tokens (sum of run lengths)
  std::int64_t num_block_holds = 0;  ///< pool references the index holds
  std::int64_t hit_tokens = 0;       ///< tokens attached from the index (record_lookup)
  std::int64_t miss_tokens = 0;      ///< tokens looked up and not attached
  std::int64_t partial_hits = 0;     ///< attaches that copied a partially matched block
  std::int64_t evicted_nodes = 0;    ///< leaves dropped by evict()/clear()
  std::int64_t evicted_blocks = 0;   ///< blocks that became free through evict()/clear()
};

/// Token-granular radix tree over the blocks of one BlockPool. See the file
/// comment for the model. The pool is passed to every call that changes
/// references, so the index stays a plain value (copyable with its owner).
class RadixPrefixIndex {
 public:
  /// An index for a pool of `num_blocks` blocks of `block_size` tokens.
  /// Throws kvkit::Error if block_size is not a positive power of two or num_blocks < 1.
  RadixPrefixIndex(std::int32_t block_size, std::int32_t num_blocks)
      : block_size_(block_size), holds_(static_cast<std::size_t>(num_blocks > 0 ? num_blocks : 0), 0) {
    check_argument(is_power_of_two(block_size), "kvkit::RadixPrefixIndex", "block_size", block_size,
                   "a positive power of two");
    check_argument(num_blocks >= 1, "kvkit::RadixPrefixIndex", "num_blocks", num_blocks, ">= 1");
    while ((std::int32_t{1} << shift_) < block_size) ++shift_;
    nodes_.emplace_back();  // the root: empty run, no blocks
    nodes_[0].live = true;
  }

  /// Tokens per block.
  std::int32_t block_size() const { return block_size_; }
  /// References the index holds on `block` (0 for an id out of range).
  std::int32_t holds(std::int32_t block) const {
    return block >= 0 && static_cast<std::size_t>(block) < holds_.size() ? holds_[block] : 0;
  }
  /// Current sizes and counters.
  RadixIndexStats stats() const {
    RadixIndexStats s = counters_;
    s.num_nodes = static_cast<std::int32_t>(nodes_.size() - free_nodes_.size() - 1);
    s.num_tokens = num_tokens_;
    s.num_block_holds = num_holds_;
    return s;
  }

  /// Finds the longest indexed prefix of `tokens[0..n)` (token ids) into
  /// `out` (reusing its storage). Changes nothing. Throws kvkit::Error if
  /// n < 0 or tokens is null with n > 0.
  void match(const std::int32_t* tokens, std::int64_t n, RadixMatch& out) const {
    check_argument(n >= 0 && (n == 0 || tokens != nullptr), "kvkit::RadixPrefixIndex::match", "n", n,
                   ">= 0 with non-null tokens");
    out.blocks.clear();
    out.partial_block = BlockPool::kNoBlock;
    out.partial_tokens = 0;
    out.node = -1;
    std::int32_t node = 0;
    std::int64_t pos = 0;
    while (pos < n) {
      const auto& children = nodes_[static_cast<std::size_t>(node)].children;
      const auto it = children.find(tokens[pos]);
      if (it == children.end()) break;
      const Node& c = nodes_[static_cast<std::size_t>(it->second)];
      const std::int64_t len = static_cast<std::int64_t>(c.tokens.size());
      const std::int64_t limit = std::min(len, n - pos);
      std::int64_t k = 1;  // the first token matched through the child key
      while (k < limit && c.tokens[static_cast<std::size_t>(k)] == tokens[pos + k]) ++k;
      // Deeper nodes overwrite the boundary block of shallower ones: they
      // hold every matched position of it.
      const std::int64_t first = pos >> shift_, last = (pos + k - 1) >> shift_, base = c.begin >> shift_;
      out.blocks.resize(static_cast<std::size_t>(last + 1));
      for (std::int64_t i = first; i <= last; ++i) {
        out.blocks[static_cast<std::size_t>(i)] = c.blocks[static_cast<std::size_t>(i - base)];
      }
      pos += k;
      out.node = it->second;
      if (k < len) break;
      node = it->second;
    }
    out.num_tokens = pos;
    const std::int64_t full = pos >> shift_;
    if ((pos & (block_size_ - 1)) != 0) {
      out.partial_block = out.blocks[static_cast<std::size_t>(full)];
      out.partial_tokens = static_cast<std::int32_t>(pos & (block_size_ - 1));
      out.blocks.resize(static_cast<std::size_t>(full));
    }
  }

  /// match() returning a fresh RadixMatch.
  RadixMatch match(const std::int32_t* tokens, std::int64_t n) const {
    RadixMatch m;
    match(tokens, n, m);
    return m;
  }

  /// Marks the path of a match as just used (LRU). Valid only for a match
  /// taken since the last insert/evict/clear. Throws kvkit::Error for a node
  /// that is not a live node of this index.
  void touch(const RadixMatch& m) {
    if (m.node < 0) return;
    check_argument(static_cast<std::size_t>(m.node) < nodes_.size() && nodes_[m.node].live,
                   "kvkit::RadixPrefixIndex::touch", "m.node", m.node, "a live node (stale match?)");
    const std::uint64_t tick = ++tick_;
    for (std::int32_t v = m.node; v > 0; v = nodes_[static_cast<std::size_t>(v)].parent) {
      refresh(v, tick, nodes_[static_cast<std::size_t>(v)].priority);
    }
  }

  /// Adds the first `n` tokens of a sequence (token ids `tokens[0..n)`, whose
  /// KV is already written) to the index. `blocks[0..num_blocks)` is the
  /// sequence's block table: block i holds positions [i * block_size, (i + 1) * block_size);
  /// num_blocks must cover n tokens. Positions already indexed keep their
  /// blocks; the new ones are held with one reference each (pool.retain).
  /// Raises the retention priority of the path to at least `priority`.
  /// Returns the number of newly indexed tokens.
  /// Throws kvkit::Error, changing nothing, if n < 0, a pointer is null where
  /// data is needed, num_blocks < ceil(n / block_size), priority is out of
  /// range, the pool has a different size than the index was made for, or one
  /// of the blocks covering the n tokens is out of range, the null block or free.
  std::int64_t insert(BlockPool& pool, const std::int32_t* tokens, std::int64_t n,
                      const std::int32_t* blocks, std::int64_t num_blocks, int priority = 0) {
    const char* where = "kvkit::RadixPrefixIndex::insert";
    check_argument(pool.num_blocks() == static_cast<std::int32_t>(holds_.size()), where,
                   "pool.num_blocks()", pool.num_blocks(), holds_.size(), " (the index's pool)");
    check_argument(n >= 0 && (n == 0 || tokens != nullptr), where, "n", n, ">= 0 with non-null tokens");
    const std::int64_t need = (n + block_size_ - 1) >> shift_;
    check_argument(num_blocks >= need, where, "num_blocks", num_blocks, ">= ", need,
                   " (blocks covering ", n, " tokens)");
    check_argument(need == 0 || blocks != nullptr, where, "blocks", blocks, "non-null");
    check_argument(priority >= 0 && priority < BlockPool::kNumPriorities, where, "priority", priority,
                   "in [0, ", BlockPool::kNumPriorities, ")");
    for (std::int64_t i = 0; i < need; ++i) {
      const std::int32_t b = blocks[i];
      check_argument(b >= 0 && b < pool.num_blocks() && b != pool.null_block() && pool.ref_count(b) > 0,
                     where, "blocks[i]", b, "a block in use, not the null block (i = ", i, ")");
    }
    const std::uint64_t tick = ++tick_;
    std::int32_t node = 0;
    std::int64_t pos = 0;
    while (pos < n) {
      const auto it = nodes_[static_cast<std::size_t>(node)].children.find(tokens[pos]);
      if (it == nodes_[static_cast<std::size_t>(node)].children.end()) {
        add_child(pool, node, pos, tokens + pos, n - pos, blocks, priority, tick);
        return n - pos;
      }
      const std::int32_t c = it->second;
      const Node& cn = nodes_[static_cast<std::size_t>(c)];
      const std::int64_t len = static_cast<std::int64_t>(cn.tokens.size());
      const std::int64_t limit = std::min(len, n - pos);
      std::int64_t k = 1;
      while (k < limit && cn.tokens[static_cast<std::size_t>(k)] == tokens[pos + k]) ++k;
      if (k == len) {
        refresh(c, tick, priority);
        node = c;
        pos += len;
      } else if (pos + k == n) {
        refresh(c, tick, priority);  // the sequence ends inside this run: nothing new
        pos = n;
      } else {
        node = split(pool, c, k);  // diverges inside the run
        refresh(node, tick, priority);
        pos += k;
      }
    }
    return 0;
  }

  /// Evicts least recently used leaves (lowest priority first) whose blocks
  /// nobody but the index references, until `pool` has at least `target_free`
  /// free blocks or nothing evictable is left. Blocks whose reference count
  /// reaches 0 are appended to `freed` when it is not null. Returns true when
  /// the target is reached. Throws kvkit::Error if the pool has a different
  /// size than the index was made for.
  bool evict(BlockPool& pool, std::int32_t target_free, std::vector<std::int32_t>* freed = nullptr) {
    check_argument(pool.num_blocks() == static_cast<std::int32_t>(holds_.size()), "kvkit::RadixPrefixIndex::evict",
                   "pool.num_blocks()", pool.num_blocks(), holds_.size(), " (the index's pool)");
    // A parent that becomes a leaf sorts after its child (never older, never of
    // lower priority) unless both keys tie and its id is smaller: another pass.
    bool progress = true;
    while (pool.num_free_blocks() < target_free && progress) {
      progress = false;
      for (auto it = leaves_.begin(); it != leaves_.end() && pool.num_free_blocks() < target_free;) {
        const std::int32_t v = it->node;
        if (!evictable(pool, v)) {
          ++it;
          continue;
        }
        it = leaves_.erase(it);
        remove_leaf(pool, v, freed);
        progress = true;
      }
    }
    return pool.num_free_blocks() >= target_free;
  }

  /// Drops every node and releases every hold (e.g. after weights change).
  /// Blocks whose reference count reaches 0 are appended to `freed` when it
  /// is not null. Returns the number of blocks that became free. Throws
  /// kvkit::Error if the pool has a different size than the index was made for.
  std::int64_t clear(BlockPool& pool, std::vector<std::int32_t>* freed = nullptr) {
    check_argument(pool.num_blocks() == static_cast<std::int32_t>(holds_.size()), "kvkit::RadixPrefixIndex::clear",
                   "pool.num_blocks()", pool.num_blocks(), holds_.size(), " (the index's pool)");
    const std::int64_t before = counters_.evicted_blocks;
    for (std::size_t v = 1; v < nodes_.size(); ++v) {
      Node& nd = nodes_[v];
      if (!nd.live) continue;
      release_blocks(pool, nd, freed);
      ++counters_.evicted_nodes;
    }
    nodes_.resize(1);
    nodes_[0].children.clear();
    free_nodes_.clear();
    leaves_.clear();
    num_tokens_ = 0;
    return counters_.evicted_blocks - before;
  }

  /// Adds to the lookup counters (attached tokens, tokens not attached, and
  /// whether a partially matched block was copied).
  void record_lookup(std::int64_t hit_tokens, std::int64_t miss_tokens, bool partial) {
    counters_.hit_tokens += hit_tokens;
    counters_.miss_tokens += miss_tokens;
    counters_.partial_hits += partial ? 1 : 0;
  }

  /// Calls f(begin, tokens, num_tokens, blocks, num_blocks) for every node
  /// but the root (parents before children): the node covers positions
  /// [begin, begin + num_tokens) with token ids tokens[0..num_tokens) and holds
  /// blocks[0..num_blocks) for block indices begin / block_size onwards.
  template <class F>
  void for_each_node(F&& f) const {
    std::vector<std::int32_t> stack{0};
    while (!stack.empty()) {
      const Node& nd = nodes_[static_cast<std::size_t>(stack.back())];
      const bool root = stack.back() == 0;
      stack.pop_back();
      if (!root) {
        f(nd.begin, nd.tokens.data(), static_cast<std::int64_t>(nd.tokens.size()), nd.blocks.data(),
          static_cast<std::int64_t>(nd.blocks.size()));
      }
      for (const auto& kv : nd.children) stack.push_back(kv.second);
    }
  }

  /// Verifies the tree in O(nodes + indexed tokens): every node reachable
  /// from the root exactly once, parent links and child keys consistent,
  /// runs non-empty and contiguous with their parent's, each node naming
  /// exactly the blocks of its block-index span, every named block in range,
  /// not the null block and referenced at least as often as it is held, the
  /// per-block hold counts and totals agree, the leaf set holds exactly the
  /// leaves with their current keys, and parents never sort before children.
  /// Throws kvkit::Error naming the first violation.
  void check_invariants(const BlockPool& pool) const {
    const char* where = "kvkit::RadixPrefixIndex::check_invariants";
    check(pool.num_blocks() == static_cast<std::int32_t>(holds_.size()), where, "pool has ",
          pool.num_blocks(), " blocks, index was made for ", holds_.size());
    const Node& root = nodes_[0];
    check(root.live && root.parent == -1 && root.tokens.empty() && root.blocks.empty() && root.begin == 0,
          where, "the root is malformed");
    std::vector<std::int32_t> holds(holds_.size(), 0);
    std::vector<std::uint8_t> seen(nodes_.size(), 0);
    std::vector<std::int32_t> stack{0};
    std::size_t reachable = 0, leaves = 0;
    std::int64_t tokens = 0, total_holds = 0;
    seen[0] = 1;
    while (!stack.empty()) {
      const std::int32_t v = stack.back();
      stack.pop_back();
      const Node& nd = nodes_[static_cast<std::size_t>(v)];
      ++reachable;
      for (const auto& kv : nd.children) {
        const std::int32_t c = kv.second;
        check(c > 0 && static_cast<std::size_t>(c) < nodes_.size(), where, "node ", v, " has child id ", c);
        check(!seen[static_cast<std::size_t>(c)], where, "node ", c, " is reachable twice");
        seen[static_cast<std::size_t>(c)] = 1;
        const Node& cn = nodes_[static_cast<std::size_t>(c)];
        check(cn.live, where, "node ", c, " is a child of ", v, " but not live");
        check(cn.parent == v, where, "node ", c, " has parent ", cn.parent, ", is a child of ", v);
        check(!cn.tokens.empty() && cn.tokens[0] == kv.first, where, "node ", c, " is keyed by ",
              kv.first, " but its run starts differently or is empty");
        check(cn.begin == nd.begin + static_cast<std::int64_t>(nd.tokens.size()), where, "node ", c,
              " begins at ", cn.begin, ", its parent ends at ", nd.begin + static_cast<std::int64_t>(nd.tokens.size()));
        if (v != 0) {
          check(cn.priority <= nd.priority && cn.last_access <= nd.last_access, where, "node ", c,
                " sorts after its parent ", v, " for eviction");
        }
        stack.push_back(c);
      }
      if (v == 0) continue;
      const std::int64_t end = nd.begin + static_cast<std::int64_t>(nd.tokens.size());
      const std::int64_t span = ((end - 1) >> shift_) - (nd.begin >> shift_) + 1;
      check(static_cast<std::int64_t>(nd.blocks.size()) == span, where, "node ", v, " covering [",
            nd.begin, ", ", end, ") names ", nd.blocks.size(), " blocks, not ", span);
      for (std::int32_t b : nd.blocks) {
        check(b >= 0 && b < pool.num_blocks() && b != pool.null_block(), where, "node ", v,
              " names block ", b, ", not an allocatable block");
        ++holds[static_cast<std::size_t>(b)];
        ++total_holds;
      }
      tokens += static_cast<std::int64_t>(nd.tokens.size());
      if (nd.children.empty()) {
        ++leaves;
        check(leaves_.count(LeafKey{nd.priority, nd.last_access, v}) == 1, where, "leaf ", v,
              " is missing from the eviction set (or has a stale key)");
      }
    }
    check(leaves == leaves_.size(), where, "eviction set holds ", leaves_.size(), " entries for ",
          leaves, " leaves");
    check(reachable + free_nodes_.size() == nodes_.size(), where, reachable, " reachable nodes + ",
          free_nodes_.size(), " free ones != ", nodes_.size());
    for (std::int32_t f : free_nodes_) {
      check(f > 0 && static_cast<std::size_t>(f) < nodes_.size() && !nodes_[f].live, where,
            "free node ", f, " is live or out of range");
    }
    check(tokens == num_tokens_, where, "nodes hold ", tokens, " tokens, counter says ", num_tokens_);
    check(total_holds == num_holds_, where, "nodes hold ", total_holds, " blocks, counter says ", num_holds_);
    for (std::size_t b = 0; b < holds.size(); ++b) {
      check(holds[b] == holds_[b], where, "block ", b, " is named by ", holds[b], " nodes, hold count says ",
            holds_[b]);
      if (holds[b] > 0) {
        check(pool.ref_count(static_cast<std::int32_t>(b)) >= holds[b], where, "block ", b, " is held ",
              holds[b], " times by the index but has reference count ",
              pool.ref_count(static_cast<std::int32_t>(b)));
      }
    }
  }

 private:
  struct Node {
    std::int64_t begin = 0;                // position of tokens[0] in the sequence
    std::vector<std::int32_t> tokens;      // the run; empty only for the root
    std::vector<std::int32_t> blocks;      // block indices begin>>shift .. (end-1)>>shift
    std::unordered_map<std::int32_t, std::int32_t> children;  // first token -> node
    std::int32_t parent = -1;
    std::uint64_t last_access = 0;
    int priority = 0;
    bool live = false;
  };

  struct LeafKey {
    int priority;
    std::uint64_t last_access;
    std::int32_t node;
    friend bool operator<(const LeafKey& a, const LeafKey& b) {
      if (a.priority != b.priority) return a.priority < b.priority;
      if (a.last_access != b.last_access) return a.last_access < b.last_access;
      return a.node < b.node;
    }
  };

  bool is_leaf(std::int32_t v) const { return v != 0 && nodes_[static_cast<std::size_t>(v)].children.empty(); }

  // Sets the node's access time and raises its priority, re-keying a leaf.
  void refresh(std::int32_t v, std::uint64_t tick, int priority) {
    Node& nd = nodes_[static_cast<std::size_t>(v)];
    const int p = std::max(nd.priority, priority);
    if (nd.last_access == tick && nd.priority == p) return;
    if (is_leaf(v)) leaves_.erase(LeafKey{nd.priority, nd.last_access, v});
    nd.last_access = tick;
    nd.priority = p;
    if (is_leaf(v)) leaves_.insert(LeafKey{nd.priority, nd.last_access, v});
  }

  std::int32_t new_node() {
    if (!free_nodes_.empty()) {
      const std::int32_t v = free_nodes_.back();
      free_nodes_.pop_back();
      return v;
    }
    nodes_.emplace_back();
    return static_cast<std::int32_t>(nodes_.size() - 1);
  }

  void hold(BlockPool& pool, std::int32_t b) {
    pool.retain(b);
    ++holds_[static_cast<std::size_t>(b)];
    ++num_holds_;
  }

  // New leaf under `parent` for positions [begin, begin + n); seq_blocks is
  // the inserting sequence's whole block table.
  void add_child(BlockPool& pool, std::int32_t parent, std::int64_t begin, const std::int32_t* tokens,
                 std::int64_t n, const std::int32_t* seq_blocks, int priority, std::uint64_t tick) {
    const std::int32_t v = new_node();
    Node& nd = nodes_[static_cast<std::size_t>(v)];
    nd.live = true;
    nd.parent = parent;
    nd.begin = begin;
    nd.tokens.assign(tokens, tokens + n);
    nd.children.clear();
    nd.blocks.assign(seq_blocks + (begin >> shift_), seq_blocks + ((begin + n - 1) >> shift_) + 1);
    nd.last_access = tick;
    nd.priority = priority;
    for (std::int32_t b : nd.blocks) hold(pool, b);
    num_tokens_ += n;
    if (is_leaf(parent)) {
      const Node& p = nodes_[static_cast<std::size_t>(parent)];
      leaves_.erase(LeafKey{p.priority, p.last_access, parent});
    }
    nodes_[static_cast<std::size_t>(parent)].children.emplace(tokens[0], v);
    leaves_.insert(LeafKey{priority, tick, v});
  }

  // Splits node c after its first k tokens (0 < k < run length): a new node
  // takes the first k tokens and becomes c's parent. A block that straddles
  // the cut is named by both and gets one more reference. Returns the new node.
  std::int32_t split(BlockPool& pool, std::int32_t c, std::int64_t k) {
    const std::int32_t m = new_node();  // may reallocate nodes_: no references before this
    Node& up = nodes_[static_cast<std::size_t>(m)];
    Node& lo = nodes_[static_cast<std::size_t>(c)];
    const std::int64_t cut = lo.begin + k;
    const std::int64_t base = lo.begin >> shift_;
    const std::int64_t up_last = (cut - 1) >> shift_;   // last block index of the upper part
    const std::int64_t lo_first = cut >> shift_;         // first block index of the lower part
    up.live = true;
    up.parent = lo.parent;
    up.begin = lo.begin;
    up.tokens.assign(lo.tokens.begin(), lo.tokens.begin() + k);
    up.blocks.assign(lo.blocks.begin(), lo.blocks.begin() + (up_last - base + 1));
    up.last_access = lo.last_access;
    up.priority = lo.priority;
    up.children.clear();
    up.children.emplace(lo.tokens[static_cast<std::size_t>(k)], c);
    nodes_[static_cast<std::size_t>(lo.parent)].children[lo.tokens[0]] = m;
    lo.tokens.erase(lo.tokens.begin(), lo.tokens.begin() + k);
    lo.blocks.erase(lo.blocks.begin(), lo.blocks.begin() + (lo_first - base));
    lo.begin = cut;
    lo.parent = m;
    if (lo_first == up_last) hold(pool, lo.blocks.front());  // the cut falls inside this block
    return m;
  }

  // True when no block of leaf v is referenced by anyone but the index.
  bool evictable(const BlockPool& pool, std::int32_t v) const {
    for (std::int32_t b : nodes_[static_cast<std::size_t>(v)].blocks) {
      if (pool.ref_count(b) != holds_[static_cast<std::size_t>(b)]) return false;
    }
    return true;
  }

  void release_blocks(BlockPool& pool, Node& nd, std::vector<std::int32_t>* freed) {
    for (std::int32_t b : nd.blocks) {
      --holds_[static_cast<std::size_t>(b)];
      --num_holds_;
      pool.release_one(b, nd.priority);
      if (pool.ref_count(b) == 0) {
        ++counters_.evicted_blocks;
        if (freed != nullptr) freed->push_back(b);
      }
    }
    nd.blocks.clear();
  }

  // Removes leaf v (already out of leaves_) and releases its holds.
  void remove_leaf(BlockPool& pool, std::int32_t v, std::vector<std::int32_t>* freed) {
    Node& nd = nodes_[static_cast<std::size_t>(v)];
    release_blocks(pool, nd, freed);
    num_tokens_ -= static_cast<std::int64_t>(nd.tokens.size());
    const std::int32_t parent = nd.parent;
    nodes_[static_cast<std::size_t>(parent)].children.erase(nd.tokens[0]);
    nd.tokens.clear();
    nd.live = false;
    nd.parent = -1;
    free_nodes_.push_back(v);
    ++counters_.evicted_nodes;
    if (is_leaf(parent)) {
      const Node& p = nodes_[static_cast<std::size_t>(parent)];
      leaves_.insert(LeafKey{p.priority, p.last_access, parent});
    }
  }

  std::int32_t block_size_;
  int shift_ = 0;
  std::vector<Node> nodes_;                 // nodes_[0] is the root
  std::vector<std::int32_t> free_nodes_;
  std::set<LeafKey> leaves_;                // eviction order
  std::vector<std::int32_t> holds_;         // per block: nodes naming it
  std::int64_t num_holds_ = 0;
  std::int64_t num_tokens_ = 0;
  std::uint64_t tick_ = 0;
  RadixIndexStats counters_;
};

}  // namespace kvkit
