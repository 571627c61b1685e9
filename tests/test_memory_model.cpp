// Randomized model test of kvkit::KVCacheManager.
//
// A simulated KV store (one int64 "token value" per slot, device and host)
// is driven the way an engine drives it: the manager's transfer lists are
// executed with parallel semantics (all sources read before any destination
// is written) and then the step's token writes land at the slots reserve()
// returned. The reference model is each sequence's list of token values;
// after every flush every sequence's tokens are read back through its block
// table and compared. check_invariants() runs after every operation.
//
// Operations: create (with window/sinks/priority), attach a cached prefix,
// reserve (with look-ahead), roll back, fork, commit full blocks, count a
// prefix, free, preempt (recompute) and resume, swap out, swap in, offload
// committed blocks to the host, and bad calls that must throw and change
// nothing.
//
// 1,000,000 operations by default; 300,000 when built with sanitizers
// (KVKIT_TEST_SANITIZED, set by tests/CMakeLists.txt): about 25 s there.
// The environment variables KVKIT_MODEL_OPS and KVKIT_MODEL_SEED override
// the operation count and the seed.
//
// Radix mode (a second test case, options.radix_index = true) adds token-
// granular attaches (attach_prefix_tokens, with copy-on-partial-reuse),
// inserts, lookups and clears of the radix index to the same mix; after every
// flush every radix node's blocks must hold the node's tokens. 200,000
// operations (60,000 under sanitizers).

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kvkit/memory/kv_cache_manager.hpp"

using kvkit::BlockCopy;
using kvkit::BlockHash;
using kvkit::KVCacheManager;
using kvkit::KVCacheManagerOptions;
using kvkit::SequenceId;
using kvkit::SequenceOptions;

namespace {

#ifdef KVKIT_TEST_SANITIZED
constexpr long kDefaultOps = 300000;
constexpr long kDefaultRadixOps = 60000;
#else
constexpr long kDefaultOps = 1000000;
constexpr long kDefaultRadixOps = 200000;
#endif

std::uint32_t seed() {
  if (const char* env = std::getenv("KVKIT_MODEL_SEED")) return static_cast<std::uint32_t>(std::atol(env));
  return 20240607u;
}

long num_ops(long default_ops = kDefaultOps) {
  if (const char* env = std::getenv("KVKIT_MODEL_OPS")) return std::atol(env);
  return default_ops;
}

std::uint64_t mix(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A test-local chained hash (the manager is hash-agnostic).
BlockHash chain_hash(const BlockHash& parent, const std::int64_t* tokens, int n) {
  std::uint64_t a = mix(parent.low ^ 0x1234), b = mix(parent.high ^ 0x5678);
  for (int i = 0; i < n; ++i) {
    a = mix(a ^ static_cast<std::uint64_t>(tokens[i]));
    b = mix(b + static_cast<std::uint64_t>(tokens[i]) * 31);
  }
  return BlockHash{a, b};
}

std::vector<BlockHash> hashes_of(const std::vector<std::int64_t>& tokens, int bs) {
  std::vector<BlockHash> out;
  BlockHash parent;
  for (std::size_t i = 0; i + bs <= tokens.size(); i += bs) {
    parent = chain_hash(parent, tokens.data() + i, bs);
    out.push_back(parent);
  }
  return out;
}

struct RefSeq {
  SequenceId id;
  std::vector<std::int64_t> tokens;         // the reference: value of every token
  std::vector<std::int64_t> resume_tokens;  // after a recompute preemption
  SequenceOptions options;
  bool swapped = false;
};

struct PendingOffload {
  std::vector<std::int64_t> tokens;  // the committed blocks' tokens at the call
  std::size_t on_host = 0;           // leading blocks findable on the host right after it
  bool exact = true;                 // no host allocation since
};

struct PendingWrite {
  SequenceId seq;
  std::int64_t position;
  std::int64_t value;
};

class Model {
 public:
  static constexpr int kBlockSize = 4;
  static constexpr int kDeviceBlocks = 48;
  static constexpr int kHostBlocks = 24;

  explicit Model(bool radix = false)
      : radix_(radix), m_(options(radix)), dev_(kDeviceBlocks * kBlockSize, -1), host_(kHostBlocks * kBlockSize, -1) {}

  void run(long ops, std::uint32_t seed) {
    rng_.seed(seed);
    for (long op = 0; op < ops; ++op) {
      step();
      m_.check_invariants();
      if (pick(4) == 0) flush();
    }
    flush();
    for (RefSeq& s : seqs_) m_.free_sequence(s.id);
    seqs_.clear();
    m_.take_transfers();
    m_.check_invariants();
    const auto radix_before_clear = m_.stats().radix;
    if (radix_) {
      // Only the index holds blocks now; dropping it must free every one.
      CHECK(m_.device_pool().num_used_blocks() == m_.radix_index().stats().num_block_holds -
                                                      duplicate_holds());
      m_.clear_radix_index();
      m_.check_invariants();
    }
    const auto st = m_.stats();
    CHECK(st.num_sequences == 0);
    CHECK(st.device.num_used == 0);
    CHECK(st.device.num_free == kDeviceBlocks - 1);
    CHECK(st.host.num_used == 0);
    CHECK(st.host.num_free == kHostBlocks);
    INFO("counters: attaches " << attaches_ << ", device hits " << st.device.hits << ", host hits "
                               << st.host.hits << ", evictions " << st.device.evictions << ", CoW copies "
                               << copies_ << ", swap-outs " << swap_outs_ << ", swap-ins " << swap_ins_
                               << ", offloaded blocks " << offloads_
                               << ", failed reserves " << failed_reserves_ << ", bad calls " << bad_calls_);
    // Every path must have been exercised, or the test proves less than it claims.
    CHECK(st.device.hits > 0);
    CHECK(st.host.hits > 0);
    CHECK(st.device.evictions > 0);
    CHECK(copies_ > 0);
    CHECK(swap_outs_ > 0);
    CHECK(swap_ins_ > 0);
    CHECK(offloads_ > 0);
    CHECK(failed_reserves_ > 0);
    CHECK(bad_calls_ > 0);
    if (radix_) {
      INFO("radix: attaches " << radix_attaches_ << ", inserts " << radix_inserts_ << ", hit tokens "
                              << radix_before_clear.hit_tokens << ", partial copies "
                              << radix_before_clear.partial_hits << ", evicted nodes "
                              << radix_before_clear.evicted_nodes << ", checked nodes " << radix_checked_nodes_);
      CHECK(radix_before_clear.hit_tokens > 0);
      CHECK(radix_before_clear.partial_hits > 0);
      CHECK(radix_before_clear.evicted_nodes > radix_clears_);  // evictions under pressure, not only clears
      CHECK(radix_inserts_ > 0);
      CHECK(radix_checked_nodes_ > 0);
      CHECK(radix_bad_calls_ > 0);
    }
  }

 private:
  static KVCacheManagerOptions options(bool radix) {
    KVCacheManagerOptions o;
    o.radix_index = radix;
    o.num_blocks = kDeviceBlocks;
    o.block_size = kBlockSize;
    o.num_host_blocks = kHostBlocks;
    return o;
  }

  int pick(int n) { return static_cast<int>(rng_() % static_cast<std::uint32_t>(n)); }
  // Low-entropy tokens so that different sequences share prefixes.
  std::int64_t token() { return pick(2); }

  std::vector<RefSeq*> running() {
    std::vector<RefSeq*> out;
    for (RefSeq& s : seqs_) if (!s.swapped) out.push_back(&s);
    return out;
  }

  bool has_pending_writes(SequenceId id) const {
    for (const PendingWrite& w : writes_) if (w.seq == id) return true;
    return false;
  }

  void trace(const std::string& what, SequenceId id) {
    std::ostringstream o;
    o << what << " " << id << " tokens=" << (m_.contains(id) ? m_.num_tokens(id) : -1) << " table=";
    if (m_.contains(id)) for (auto b : m_.block_table(id)) o << b << ",";
    log_.push_back(o.str());
  }

  // Blocks named by several radix nodes count once in the pool.
  std::int64_t duplicate_holds() const {
    std::int64_t d = 0;
    for (std::int32_t b = 0; b < kDeviceBlocks; ++b) {
      if (m_.radix_index().holds(b) > 1) d += m_.radix_index().holds(b) - 1;
    }
    return d;
  }

  void step() {
    if (radix_) return step_radix();
    const int kind = pick(100);
    if (seqs_.empty() || (kind < 8 && seqs_.size() < 10)) return create();
    RefSeq& s = seqs_[static_cast<std::size_t>(pick(static_cast<int>(seqs_.size())))];
    if (kind < 45) return reserve(s);
    if (kind < 53) return rollback(s);
    if (kind < 60) return fork(s);
    if (kind < 70) return commit(s);
    if (kind < 75) return count_prefix();
    if (kind < 81) return free_seq(s);
    if (kind < 85) return preempt(s);
    if (kind < 91) return swap_out(s);
    if (kind < 95) return swap_in(s);
    if (kind < 98) return offload(s);
    return bad_call(s);
  }

  void step_radix() {
    const int kind = pick(100);
    if (seqs_.empty() || (kind < 8 && seqs_.size() < 10)) return create();
    RefSeq& s = seqs_[static_cast<std::size_t>(pick(static_cast<int>(seqs_.size())))];
    if (kind < 40) return reserve(s);
    if (kind < 46) return rollback(s);
    if (kind < 52) return fork(s);
    if (kind < 58) return commit(s);
    if (kind < 68) return radix_insert(s);
    if (kind < 73) return radix_lookup();
    if (kind < 80) return free_seq(s);
    if (kind < 84) return preempt(s);
    if (kind < 89) return swap_out(s);
    if (kind < 94) return swap_in(s);
    if (kind < 96) return offload(s);
    if (kind < 99) return bad_call(s);
    if (pick(4) == 0) {
      m_.clear_radix_index();
      ++radix_clears_;
    }
  }

  std::vector<std::int32_t> ids(const std::vector<std::int64_t>& t, std::size_t n) const {
    return std::vector<std::int32_t>(t.begin(), t.begin() + static_cast<std::ptrdiff_t>(n));
  }

  void radix_insert(RefSeq& s) {
    if (s.swapped || s.options.sliding_window > 0) return;
    if (has_pending_writes(s.id)) flush();  // engines index tokens once their KV is written
    const std::size_t n = pick(2) == 0 ? s.tokens.size() : static_cast<std::size_t>(pick(static_cast<int>(s.tokens.size()) + 1));
    const auto t = ids(s.tokens, n);
    const auto before = m_.radix_index().stats().num_tokens;
    const std::int64_t added = m_.insert_prefix_tokens(s.id, t.data(), static_cast<std::int64_t>(n));
    REQUIRE(added <= static_cast<std::int64_t>(n));
    REQUIRE(m_.radix_index().stats().num_tokens == before + added);
    REQUIRE(m_.radix_index().match(t.data(), static_cast<std::int64_t>(n)).num_tokens == static_cast<std::int64_t>(n));
    ++radix_inserts_;
    trace("radix insert " + std::to_string(n), s.id);
  }

  void radix_lookup() {
    std::vector<std::int32_t> prompt(static_cast<std::size_t>(pick(24)));
    for (auto& t : prompt) t = static_cast<std::int32_t>(token());
    const auto m = m_.radix_index().match(prompt.data(), static_cast<std::int64_t>(prompt.size()));
    REQUIRE(m.num_tokens <= static_cast<std::int64_t>(prompt.size()));
    REQUIRE(static_cast<std::int64_t>(m.blocks.size()) == m.num_tokens / kBlockSize);
    REQUIRE(m.partial_tokens == m.num_tokens % kBlockSize);
    REQUIRE((m.partial_block >= 0) == (m.partial_tokens > 0));
  }

  // Every radix node's blocks hold its tokens (after a flush: copies done).
  void verify_radix() {
    m_.radix_index().for_each_node([&](std::int64_t begin, const std::int32_t* t, std::int64_t n,
                                       const std::int32_t* blocks, std::int64_t num_blocks) {
      ++radix_checked_nodes_;
      REQUIRE(num_blocks == (begin + n - 1) / kBlockSize - begin / kBlockSize + 1);
      for (std::int64_t p = begin; p < begin + n; ++p) {
        const std::int32_t b = blocks[p / kBlockSize - begin / kBlockSize];
        INFO("radix node at " << begin << " position " << p << " block " << b);
        REQUIRE(dev_[std::size_t(b) * kBlockSize + std::size_t(p % kBlockSize)] == t[p - begin]);
      }
    });
  }

  void create() {
    SequenceOptions o;
    o.priority = pick(3);
    if (pick(6) == 0) {
      o.sliding_window = 1 + pick(10);
      o.num_sink_tokens = pick(6);
    }
    RefSeq s;
    s.id = m_.create_sequence(o);
    s.options = o;
    const bool with_prompt = pick(2) == 0;
    if (with_prompt && radix_ && pick(3) != 0) {
      // A prompt: attach its longest indexed prefix, token by token.
      std::vector<std::int64_t> prompt(static_cast<std::size_t>(pick(20)));
      for (auto& t : prompt) t = token();
      const auto t = ids(prompt, prompt.size());
      const auto hit = m_.attach_prefix_tokens(s.id, t.data(), static_cast<std::int64_t>(t.size()));
      REQUIRE(hit.num_tokens == hit.num_device_blocks * kBlockSize + hit.num_copied_tokens);
      REQUIRE(hit.num_copied_tokens < kBlockSize);
      REQUIRE(m_.num_tokens(s.id) == hit.num_tokens);
      s.tokens.assign(prompt.begin(), prompt.begin() + hit.num_tokens);
      ++radix_attaches_;
    } else if (with_prompt) {
      // A prompt: attach its cached prefix.
      std::vector<std::int64_t> prompt(static_cast<std::size_t>(pick(20)));
      for (auto& t : prompt) t = token();
      const auto hs = hashes_of(prompt, kBlockSize);
      const auto ahead = m_.lookup_prefix(hs.data(), static_cast<std::int64_t>(hs.size()));
      const auto hit = m_.attach_prefix(s.id, hs.data(), static_cast<std::int64_t>(hs.size()));
      REQUIRE(hit.num_tokens == (hit.num_device_blocks + hit.num_host_blocks) * kBlockSize);
      REQUIRE(ahead.num_tokens == hit.num_tokens);  // the lookup foretold the attach
      REQUIRE(ahead.num_device_blocks == hit.num_device_blocks);
      REQUIRE(ahead.num_host_blocks == hit.num_host_blocks);
      s.tokens.assign(prompt.begin(), prompt.begin() + hit.num_tokens);
      ++attaches_;
    }
    trace("create", s.id);
    seqs_.push_back(s);
  }

  void reserve(RefSeq& s) {
    if (s.swapped) return;
    const std::int64_t k = s.tokens.size() > 40 ? 0 : 1 + pick(kBlockSize + 2);
    const std::int64_t lookahead = pick(4) == 0 ? pick(6) : 0;
    const auto table = m_.block_table(s.id);
    const auto free_before = m_.device_pool().num_free_blocks();
    std::vector<std::int64_t> slots(static_cast<std::size_t>(k));
    if (!m_.reserve(s.id, k, slots.data(), lookahead)) {
      ++failed_reserves_;
      REQUIRE(m_.block_table(s.id) == table);
      REQUIRE(m_.num_tokens(s.id) == static_cast<std::int64_t>(s.tokens.size()));
      // The radix index may have evicted unshared leaves trying: free blocks only grow.
      if (radix_) {
        REQUIRE(m_.device_pool().num_free_blocks() >= free_before);
      } else {
        REQUIRE(m_.device_pool().num_free_blocks() == free_before);
      }
      return;
    }
    s.resume_tokens.clear();
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int64_t pos = static_cast<std::int64_t>(s.tokens.size());
      const std::int64_t value = token();
      REQUIRE(slots[j] == m_.slot_of(s.id, pos));
      s.tokens.push_back(value);
      writes_.push_back(PendingWrite{s.id, pos, value});
    }
    trace("reserve " + std::to_string(k) + "+" + std::to_string(lookahead), s.id);
  }

  void rollback(RefSeq& s) {
    if (s.swapped) return;
    const std::int64_t m = pick(static_cast<int>(s.tokens.size()) + 1);
    try {
      m_.rollback(s.id, m);
    } catch (const kvkit::Error&) {
      // Only a sliding window may refuse a rollback within the token count.
      REQUIRE(s.options.sliding_window > 0);
      REQUIRE(m_.num_tokens(s.id) == static_cast<std::int64_t>(s.tokens.size()));
      return;
    }
    s.tokens.resize(s.tokens.size() - static_cast<std::size_t>(m));
    trace("rollback " + std::to_string(m), s.id);
  }

  void fork(RefSeq& s) {
    if (s.swapped || seqs_.size() >= 10) return;
    if (has_pending_writes(s.id)) flush();  // engines fork after the forward pass
    RefSeq c = s;
    c.id = m_.fork(s.id);
    c.resume_tokens.clear();
    trace("fork from " + std::to_string(s.id.index), c.id);
    seqs_.push_back(c);
  }

  void commit(RefSeq& s) {
    if (s.swapped) return;
    if (has_pending_writes(s.id)) flush();  // engines commit blocks once their KV is written
    const auto hs = hashes_of(s.tokens, kBlockSize);
    const std::size_t done = m_.committed_hashes(s.id).size();
    REQUIRE(done <= hs.size());
    for (std::size_t i = 0; i < done; ++i) REQUIRE(m_.committed_hashes(s.id)[i] == hs[i]);
    m_.commit_blocks(s.id, hs.data() + done, static_cast<std::int64_t>(hs.size() - done));
    trace("commit", s.id);
  }

  void count_prefix() {
    std::vector<std::int64_t> prompt(static_cast<std::size_t>(pick(24)));
    for (auto& t : prompt) t = token();
    const auto hs = hashes_of(prompt, kBlockSize);
    const std::int64_t n = m_.count_cached_prefix(hs.data(), static_cast<std::int64_t>(hs.size()));
    REQUIRE(n <= static_cast<std::int64_t>(hs.size()));
    pending_lookups_.push_back(prompt);
    pending_lookups_.back().resize(static_cast<std::size_t>(n * kBlockSize));
  }

  void free_seq(RefSeq& s) {
    trace("free", s.id);
    m_.free_sequence(s.id);
    seqs_.erase(seqs_.begin() + (&s - seqs_.data()));
  }

  void preempt(RefSeq& s) {
    if (!s.tokens.empty()) {
      const std::int64_t kept = m_.preempt_recompute(s.id);
      REQUIRE(kept <= static_cast<std::int64_t>(s.tokens.size()) / kBlockSize);
      s.resume_tokens = s.tokens;
      s.resume_tokens.resize(static_cast<std::size_t>(kept * kBlockSize));
      s.tokens.clear();
      s.swapped = false;
      trace("preempt", s.id);
    } else if (!s.resume_tokens.empty() && !s.swapped) {
      const auto hit = m_.resume_from_cache(s.id);
      REQUIRE(hit.num_tokens <= static_cast<std::int64_t>(s.resume_tokens.size()));
      s.tokens.assign(s.resume_tokens.begin(), s.resume_tokens.begin() + hit.num_tokens);
      s.resume_tokens.clear();
      trace("resume", s.id);
    }
  }

  void swap_out(RefSeq& s) {
    if (s.swapped) return;
    if (has_pending_writes(s.id)) flush();  // engines swap out between steps
    const auto table = m_.block_table(s.id);
    if (m_.swap_out(s.id)) {
      for (PendingOffload& o : pending_offloads_) o.exact = false;
      s.swapped = true;
      ++swap_outs_;
      trace("swap_out", s.id);
    } else {
      REQUIRE(m_.block_table(s.id) == table);
      REQUIRE_FALSE(m_.is_swapped(s.id));
    }
  }

  void swap_in(RefSeq& s) {
    if (!s.swapped) return;
    const auto table = m_.block_table(s.id);
    if (m_.swap_in(s.id)) {
      s.swapped = false;
      ++swap_ins_;
      trace("swap_in", s.id);
    } else {
      REQUIRE(m_.block_table(s.id) == table);
      REQUIRE(m_.is_swapped(s.id));
    }
  }

  // Write-through offload of the committed blocks. After the flush the host
  // blocks found by their hashes must hold the tokens, and the blocks found
  // right after the call must all still be there unless a later host
  // allocation (swap_out, offload) may have evicted them.
  void offload(RefSeq& s) {
    if (s.swapped) return;
    const auto table = m_.block_table(s.id);
    const std::size_t committed = m_.committed_hashes(s.id).size();
    const std::int64_t n = m_.offload_to_host(s.id);
    REQUIRE(n <= static_cast<std::int64_t>(committed));
    REQUIRE(m_.block_table(s.id) == table);
    offloads_ += n;
    for (PendingOffload& o : pending_offloads_) o.exact = false;
    PendingOffload o;
    o.tokens.assign(s.tokens.begin(), s.tokens.begin() + static_cast<std::ptrdiff_t>(committed * kBlockSize));
    for (const BlockHash& h : hashes_of(o.tokens, kBlockSize)) {
      if (m_.host_pool().find_cached(h) >= 0) ++o.on_host;
      else break;
    }
    pending_offloads_.push_back(o);
    trace("offload", s.id);
  }

  void bad_call(RefSeq& s) {
    const auto stats = m_.stats();
    const auto table = m_.block_table(s.id);
    const std::int64_t tokens = m_.num_tokens(s.id);
    const auto radix_nodes = m_.radix_index().stats().num_nodes;
    bool threw = false;
    try {
      const std::int32_t t[2] = {0, 1};
      switch (pick(radix_ ? 6 : 4)) {
        case 0: m_.rollback(s.id, tokens + 1 + pick(3)); break;
        case 1: m_.free_sequence(SequenceId{s.id.index, s.id.generation + 1}); break;
        case 2: m_.fork(SequenceId{999, 0}); break;
        case 4: ++radix_bad_calls_; m_.attach_prefix_tokens(s.id, t, -1); break;
        case 5: ++radix_bad_calls_; m_.insert_prefix_tokens(s.id, t, tokens + 1); break;
        default: m_.reserve(s.id, -1); break;
      }
    } catch (const kvkit::Error&) {
      threw = true;
    }
    REQUIRE(threw);
    ++bad_calls_;
    REQUIRE(m_.block_table(s.id) == table);
    REQUIRE(m_.num_tokens(s.id) == tokens);
    REQUIRE(m_.stats().device.num_free == stats.device.num_free);
    REQUIRE(m_.stats().host.num_free == stats.host.num_free);
    REQUIRE(m_.radix_index().stats().num_nodes == radix_nodes);
  }

  // Executes the step: transfers with parallel semantics, then token writes.
  void flush() {
    const auto t = m_.take_transfers();
    copies_ += static_cast<long>(t.copies.size());
    struct Move { std::vector<std::int64_t>* dst; std::int64_t at; std::int64_t value; };
    std::vector<Move> moves;
    auto read = [&](const std::vector<std::int64_t>& src_store, std::vector<std::int64_t>& dst_store,
                    const std::vector<BlockCopy>& list) {
      for (const BlockCopy& c : list) {
        for (int j = 0; j < kBlockSize; ++j) {
          moves.push_back(Move{&dst_store, std::int64_t(c.dst) * kBlockSize + j,
                               src_store[std::size_t(c.src) * kBlockSize + j]});
        }
      }
    };
    read(dev_, dev_, t.copies);
    read(dev_, host_, t.swap_out);
    read(host_, dev_, t.swap_in);
    for (const Move& mv : moves) (*mv.dst)[static_cast<std::size_t>(mv.at)] = mv.value;
    for (const PendingWrite& w : writes_) {
      if (!m_.contains(w.seq) || m_.is_swapped(w.seq) || w.position >= m_.num_tokens(w.seq)) continue;
      // A later reserve in the same step may have slid the window past it.
      if (m_.block_table(w.seq)[std::size_t(w.position / kBlockSize)] == m_.device_pool().null_block()) continue;
      dev_[static_cast<std::size_t>(m_.slot_of(w.seq, w.position))] = w.value;
    }
    writes_.clear();
    std::string log;
    for (auto& l : log_) log += l + "\n";
    for (auto& c : t.copies) log += "copy " + std::to_string(c.src) + "->" + std::to_string(c.dst) + "\n";
    for (auto& c : t.swap_out) log += "out " + std::to_string(c.src) + "->" + std::to_string(c.dst) + "\n";
    for (auto& c : t.swap_in) log += "in " + std::to_string(c.src) + "->" + std::to_string(c.dst) + "\n";
    INFO(log);
    log_.clear();
    verify_all();
    if (radix_) verify_radix();
    // Prefixes that count_cached_prefix reported must hold their tokens.
    for (const auto& prompt : pending_lookups_) {
      const auto hs = hashes_of(prompt, kBlockSize);
      for (std::size_t b = 0; b < hs.size(); ++b) {
        const std::int32_t block = m_.device_pool().find_cached(hs[b]);
        if (block < 0) break;  // evicted since: fine
        for (int j = 0; j < kBlockSize; ++j) {
          REQUIRE(dev_[std::size_t(block) * kBlockSize + j] == prompt[b * kBlockSize + j]);
        }
      }
    }
    pending_lookups_.clear();
    for (const PendingOffload& o : pending_offloads_) {
      const auto hs = hashes_of(o.tokens, kBlockSize);
      for (std::size_t b = 0; b < hs.size(); ++b) {
        const std::int32_t block = m_.host_pool().find_cached(hs[b]);
        if (o.exact && b < o.on_host) REQUIRE(block >= 0);  // a write-through was lost
        if (block < 0) continue;  // no room, or evicted since: fine
        for (int j = 0; j < kBlockSize; ++j) {
          REQUIRE(host_[std::size_t(block) * kBlockSize + j] == o.tokens[b * kBlockSize + j]);
        }
      }
    }
    pending_offloads_.clear();
  }

  void verify_all() {
    for (const RefSeq& s : seqs_) {
      REQUIRE(m_.num_tokens(s.id) == static_cast<std::int64_t>(s.tokens.size()));
      REQUIRE(m_.is_swapped(s.id) == s.swapped);
      const auto& table = m_.block_table(s.id);
      const auto& store = s.swapped ? host_ : dev_;
      for (std::size_t p = 0; p < s.tokens.size(); ++p) {
        const std::int32_t b = table[p / kBlockSize];
        if (s.swapped ? b < 0 : b == m_.device_pool().null_block()) {
          // Freed by the sliding window: only positions before the window qualify.
          REQUIRE(s.options.sliding_window > 0);
          REQUIRE(static_cast<std::int64_t>(p) >= s.options.num_sink_tokens);
          REQUIRE(static_cast<std::int64_t>(p) + s.options.sliding_window <=
                  static_cast<std::int64_t>(s.tokens.size()));
          continue;
        }
        INFO("sequence " << s.id << " position " << p << " block " << b);
        REQUIRE(store[std::size_t(b) * kBlockSize + p % kBlockSize] == s.tokens[p]);
      }
    }
  }

  bool radix_;
  KVCacheManager m_;
  std::vector<std::int64_t> dev_;
  std::vector<std::int64_t> host_;
  std::vector<RefSeq> seqs_;
  std::vector<PendingWrite> writes_;
  std::vector<std::vector<std::int64_t>> pending_lookups_;
  std::vector<PendingOffload> pending_offloads_;
  std::mt19937 rng_;
  std::vector<std::string> log_;
  long radix_attaches_ = 0, radix_inserts_ = 0, radix_clears_ = 0, radix_checked_nodes_ = 0, radix_bad_calls_ = 0;
  long offloads_ = 0;
  long attaches_ = 0, copies_ = 0, swap_outs_ = 0, swap_ins_ = 0, failed_reserves_ = 0, bad_calls_ = 0;
};

}  // namespace

TEST_CASE("a million random operations agree with the reference model and leak nothing") {
  Model model;
  model.run(num_ops(), seed());
}

TEST_CASE("random operations with the radix index agree with the reference model and leak nothing") {
  Model model(true);
  model.run(num_ops(kDefaultRadixOps), seed());
}
