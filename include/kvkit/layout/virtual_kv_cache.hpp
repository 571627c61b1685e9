#pragma once
/// @file virtual_kv_cache.hpp
/// kvkit::VirtualKVCache: a contiguous per-sequence KV cache whose memory is
/// reserved as virtual address space for the worst case and backed by
/// physical chunks only as sequences grow (the vAttention idea, arXiv
/// 2405.04437). Kernels written for contiguous caches (ContiguousKVLayout)
/// then run unchanged, without paging, while memory use follows the actual
/// sequence lengths.
///
///   buffer b (e.g. layer l's K or V), one region per sequence slot:
///   | seq 0: [mapped chunks][ reserved, unmapped ...... ] | seq 1: [mapped][ ... ] | ...
///     ^ region_bytes apart (max_tokens * bytes_per_token rounded up to a chunk)
///
/// This header is the bookkeeping, shared by every backend: which chunks of
/// which sequence are mapped, growing and shrinking all buffers together,
/// the physical budget, rollback when mapping fails, mapped vs reserved
/// bytes, a checked host accessor. A Backend provides the memory calls:
///   std::int64_t granularity() const;            // bytes; chunks are multiples of it
///   void* reserve(std::int64_t bytes);          // address range, no memory; throws kvkit::Error
///   bool map(void* addr, std::int64_t bytes);   // back [addr, +bytes); false: out of memory,
///                                               //   nothing left mapped
///   void unmap(void* addr, std::int64_t bytes); // give [addr, +bytes) back
///   void release(void* base, std::int64_t bytes) noexcept;  // the whole reservation
/// kvkit::HostVirtualMemory (kvkit/layout/host_virtual_memory.hpp, POSIX
/// mmap) and kvkit::cuda::DeviceVirtualMemory (kvkit/cuda/virtual_memory.hpp,
/// the CUDA driver's virtual memory API) are the two backends.
///
/// Contents of a newly mapped chunk are unspecified (zeros on the host);
/// data in chunks that stay mapped survives growth. Not thread-safe: the
/// scheduler that owns it calls it from one thread. Running out of physical
/// memory (budget or backend) is a normal result, kOutOfMemory, with the
/// state unchanged; bad arguments throw kvkit::Error.

#include <cstdint>
#include <utility>
#include <vector>

#include "kvkit/core/error.hpp"
#include "kvkit/layout/contiguous_kv_layout.hpp"

namespace kvkit {

/// Shape of a virtual cache.
struct VirtualCacheConfig {
  std::int64_t num_seqs = 1;         ///< sequence slots (the batch the cache can hold)
  std::int64_t max_tokens = 1;       ///< tokens one sequence may grow to
  std::int64_t bytes_per_token = 1;  ///< per buffer, e.g. kv_heads * head_dim * element size
  std::int64_t num_buffers = 1;      ///< buffers growing together, e.g. 2 * layers (K and V)
  std::int64_t chunk_bytes = 0;      ///< mapping unit; 0: the backend's granularity (2 MiB on CUDA)
  std::int64_t max_mapped_bytes = -1;  ///< physical budget over all buffers; < 0: none
};

/// Outcome of growing a sequence.
enum class ResizeStatus : std::uint8_t {
  kOk,           ///< the sequence's chunks now hold the requested tokens
  kOutOfMemory,  ///< budget or backend exhausted; nothing changed
};

/// Virtual contiguous KV cache over a Backend (see the file comment).
template <class Backend>
class VirtualKVCache {
 public:
  /// Reserves num_buffers * num_seqs * region_bytes() of address space;
  /// maps nothing. Throws kvkit::Error on a non-positive size, a chunk size
  /// that is not a multiple of the backend's granularity, a size overflow,
  /// or a failed reservation.
  explicit VirtualKVCache(const VirtualCacheConfig& config, Backend backend = Backend())
      : config_(config), backend_(std::move(backend)) {
    constexpr const char* kWhere = "kvkit::VirtualKVCache";
    check_argument(config.num_seqs > 0, kWhere, "num_seqs", config.num_seqs, "> 0");
    check_argument(config.max_tokens > 0, kWhere, "max_tokens", config.max_tokens, "> 0");
    check_argument(config.bytes_per_token > 0, kWhere, "bytes_per_token", config.bytes_per_token, "> 0");
    check_argument(config.num_buffers > 0, kWhere, "num_buffers", config.num_buffers, "> 0");
    const std::int64_t granularity = backend_.granularity();
    chunk_bytes_ = config.chunk_bytes == 0 ? granularity : config.chunk_bytes;
    check_argument(chunk_bytes_ > 0 && chunk_bytes_ % granularity == 0, kWhere, "chunk_bytes",
                   config.chunk_bytes, "0 or a positive multiple of the backend's granularity (",
                   granularity, " bytes)");
    constexpr std::int64_t kLimit = std::int64_t(1) << 56;  // far beyond any address space
    check(config.max_tokens <= kLimit / config.bytes_per_token, kWhere, "max_tokens (",
          config.max_tokens, ") * bytes_per_token (", config.bytes_per_token, ") overflows");
    chunks_per_seq_ = (config.max_tokens * config.bytes_per_token + chunk_bytes_ - 1) / chunk_bytes_;
    check(chunks_per_seq_ <= kLimit / chunk_bytes_ / config.num_seqs / config.num_buffers, kWhere,
          "the reservation (", config.num_buffers, " buffers x ", config.num_seqs, " sequences x ",
          chunks_per_seq_, " chunks of ", chunk_bytes_, " bytes) is too large");
    region_bytes_ = chunks_per_seq_ * chunk_bytes_;
    reserved_bytes_ = region_bytes_ * config.num_seqs * config.num_buffers;
    base_ = static_cast<unsigned char*>(backend_.reserve(reserved_bytes_));
    mapped_chunks_.assign(std::size_t(config.num_seqs), 0);
  }

  /// Unmaps every chunk and releases the reservation.
  ~VirtualKVCache() { destroy(); }

  VirtualKVCache(const VirtualKVCache&) = delete;
  VirtualKVCache& operator=(const VirtualKVCache&) = delete;
  VirtualKVCache(VirtualKVCache&& other) noexcept
      : config_(other.config_),
        backend_(std::move(other.backend_)),
        base_(std::exchange(other.base_, nullptr)),
        chunk_bytes_(other.chunk_bytes_),
        chunks_per_seq_(other.chunks_per_seq_),
        region_bytes_(other.region_bytes_),
        reserved_bytes_(other.reserved_bytes_),
        mapped_bytes_(std::exchange(other.mapped_bytes_, 0)),
        mapped_chunks_(std::move(other.mapped_chunks_)) {}
  VirtualKVCache& operator=(VirtualKVCache&& other) noexcept {
    if (this != &other) {
      destroy();
      steal(other);
    }
    return *this;
  }

  /// Makes sequence `seq` hold `tokens` tokens: maps the missing chunks of
  /// its region in every buffer, or unmaps those no longer needed (in
  /// [0, max_tokens]). kOutOfMemory, with nothing changed, when growing
  /// would exceed max_mapped_bytes or the backend runs out. Throws
  /// kvkit::Error on a bad seq or tokens.
  ResizeStatus resize(std::int64_t seq, std::int64_t tokens) {
    constexpr const char* kWhere = "kvkit::VirtualKVCache::resize";
    check_seq(seq, kWhere);
    check_argument(tokens >= 0 && tokens <= config_.max_tokens, kWhere, "tokens", tokens,
                   "in [0, max_tokens = ", config_.max_tokens, "]");
    const std::int64_t want = chunks_for(tokens);
    std::int64_t& have = mapped_chunks_[std::size_t(seq)];
    if (want < have) {
      for (std::int64_t b = 0; b < config_.num_buffers; ++b) {
        backend_.unmap(chunk_address(b, seq, want), (have - want) * chunk_bytes_);
      }
      mapped_bytes_ -= (have - want) * chunk_bytes_ * config_.num_buffers;
      have = want;
      return ResizeStatus::kOk;
    }
    if (want == have) return ResizeStatus::kOk;
    const std::int64_t added = (want - have) * chunk_bytes_ * config_.num_buffers;
    if (config_.max_mapped_bytes >= 0 && mapped_bytes_ + added > config_.max_mapped_bytes) {
      return ResizeStatus::kOutOfMemory;
    }
    for (std::int64_t b = 0; b < config_.num_buffers; ++b) {
      if (!backend_.map(chunk_address(b, seq, have), (want - have) * chunk_bytes_)) {
        for (std::int64_t u = 0; u < b; ++u) backend_.unmap(chunk_address(u, seq, have), (want - have) * chunk_bytes_);
        return ResizeStatus::kOutOfMemory;
      }
    }
    mapped_bytes_ += added;
    have = want;
    return ResizeStatus::kOk;
  }

  /// Grows sequence `seq` to hold at least `tokens` tokens; never shrinks.
  ResizeStatus ensure(std::int64_t seq, std::int64_t tokens) {
    check_seq(seq, "kvkit::VirtualKVCache::ensure");
    if (tokens >= 0 && tokens <= capacity_tokens(seq)) return ResizeStatus::kOk;
    return resize(seq, tokens);
  }

  /// Unmaps all of sequence `seq`'s chunks (it finished or was preempted).
  void release(std::int64_t seq) { (void)resize(seq, 0); }

  /// Tokens that sequence `seq`'s mapped chunks hold (>= the size it was
  /// resized to; capped at max_tokens).
  std::int64_t capacity_tokens(std::int64_t seq) const {
    check_seq(seq, "kvkit::VirtualKVCache::capacity_tokens");
    const std::int64_t bytes = mapped_chunks_[std::size_t(seq)] * chunk_bytes_;
    const std::int64_t tokens = bytes / config_.bytes_per_token;
    return tokens < config_.max_tokens ? tokens : config_.max_tokens;
  }

  /// Chunks mapped for sequence `seq` (per buffer).
  std::int64_t mapped_chunks(std::int64_t seq) const {
    check_seq(seq, "kvkit::VirtualKVCache::mapped_chunks");
    return mapped_chunks_[std::size_t(seq)];
  }

  /// Base of buffer b (the pointer a contiguous kernel gets).
  void* buffer(std::int64_t b) const {
    check_argument(b >= 0 && b < config_.num_buffers, "kvkit::VirtualKVCache::buffer", "b", b,
                   "in [0, num_buffers = ", config_.num_buffers, ")");
    return base_ + b * buffer_bytes();
  }

  /// Address of token `token` of sequence `seq` in buffer b, for host code.
  /// Throws kvkit::Error when the token lies outside the mapped chunks (an
  /// access there would fault) or the arguments are out of range.
  void* token_address(std::int64_t b, std::int64_t seq, std::int64_t token) const {
    constexpr const char* kWhere = "kvkit::VirtualKVCache::token_address";
    check_seq(seq, kWhere);
    check_argument(b >= 0 && b < config_.num_buffers, kWhere, "b", b, "in [0, num_buffers = ",
                   config_.num_buffers, ")");
    const std::int64_t capacity = capacity_tokens(seq);
    check_argument(token >= 0 && token < capacity, kWhere, "token", token,
                   "a mapped token of sequence ", seq, ": [0, ", capacity, ")");
    return base_ + b * buffer_bytes() + seq * region_bytes_ + token * config_.bytes_per_token;
  }

  /// A token-major ContiguousKVLayout [num_seqs, max_tokens, num_heads,
  /// head_dim] over each buffer, for the append / attention ops (elements
  /// of `element_bytes`; bytes_per_token must be num_heads * head_dim *
  /// element_bytes, and region_bytes a multiple of element_bytes).
  ContiguousKVLayout layout(std::int64_t num_heads, std::int64_t head_dim,
                            std::int64_t element_bytes) const {
    constexpr const char* kWhere = "kvkit::VirtualKVCache::layout";
    check_argument(element_bytes > 0 && num_heads > 0 && head_dim > 0 &&
                       num_heads * head_dim * element_bytes == config_.bytes_per_token &&
                       region_bytes_ % element_bytes == 0,
                   kWhere, "num_heads * head_dim * element_bytes",
                   num_heads * head_dim * element_bytes, "bytes_per_token (",
                   config_.bytes_per_token, ")");
    return ContiguousKVLayout::make(config_.num_seqs, config_.max_tokens, num_heads, head_dim,
                                    region_bytes_ / element_bytes, num_heads * head_dim, head_dim,
                                    false);
  }

  std::int64_t chunk_bytes() const { return chunk_bytes_; }
  /// Bytes between consecutive sequences' regions in a buffer.
  std::int64_t region_bytes() const { return region_bytes_; }
  /// Bytes of one buffer (num_seqs regions).
  std::int64_t buffer_bytes() const { return region_bytes_ * config_.num_seqs; }
  /// Address space held, all buffers.
  std::int64_t reserved_bytes() const { return reserved_bytes_; }
  /// Physical memory mapped, all buffers.
  std::int64_t mapped_bytes() const { return mapped_bytes_; }
  const VirtualCacheConfig& config() const { return config_; }
  const Backend& backend() const { return backend_; }

 private:
  std::int64_t chunks_for(std::int64_t tokens) const {
    return (tokens * config_.bytes_per_token + chunk_bytes_ - 1) / chunk_bytes_;
  }
  void* chunk_address(std::int64_t b, std::int64_t seq, std::int64_t chunk) const {
    return base_ + b * buffer_bytes() + seq * region_bytes_ + chunk * chunk_bytes_;
  }
  void check_seq(std::int64_t seq, const char* where) const {
    check_argument(seq >= 0 && seq < config_.num_seqs, where, "seq", seq, "in [0, num_seqs = ",
                   config_.num_seqs, ")");
  }
  void destroy() noexcept {
    if (base_ == nullptr) return;
    for (std::int64_t s = 0; s < config_.num_seqs; ++s) {
      const std::int64_t have = mapped_chunks_[std::size_t(s)];
      if (have == 0) continue;
      for (std::int64_t b = 0; b < config_.num_buffers; ++b) {
        try {
          backend_.unmap(chunk_address(b, s, 0), have * chunk_bytes_);
        } catch (...) {  // destructors must not throw; release below frees the range anyway
        }
      }
    }
    backend_.release(base_, reserved_bytes_);
    base_ = nullptr;
    mapped_bytes_ = 0;
  }
  void steal(VirtualKVCache& other) noexcept {
    config_ = other.config_;
    backend_ = std::move(other.backend_);
    base_ = std::exchange(other.base_, nullptr);
    chunk_bytes_ = other.chunk_bytes_;
    chunks_per_seq_ = other.chunks_per_seq_;
    region_bytes_ = other.region_bytes_;
    reserved_bytes_ = other.reserved_bytes_;
    mapped_bytes_ = std::exchange(other.mapped_bytes_, 0);
    mapped_chunks_ = std::move(other.mapped_chunks_);
  }

  VirtualCacheConfig config_;
  Backend backend_;
  unsigned char* base_ = nullptr;
  std::int64_t chunk_bytes_ = 0;
  std::int64_t chunks_per_seq_ = 0;
  std::int64_t region_bytes_ = 0;
  std::int64_t reserved_bytes_ = 0;
  std::int64_t mapped_bytes_ = 0;
  std::vector<std::int64_t> mapped_chunks_;  ///< per sequence, per buffer
};

}  // namespace kvkit
