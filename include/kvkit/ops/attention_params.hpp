#pragma once
/// @file attention_params.hpp
/// Parameters of decode attention over a paged KV cache, shared by the CPU op
/// (ops/attention_decode.hpp) and, later, the CUDA kernels, with the masking
/// rule both use.

#include <cmath>
#include <cstdint>

#include "kvkit/core/config.hpp"
#include "kvkit/core/dtype.hpp"
#include "kvkit/layout/kv_scales.hpp"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"

namespace kvkit {

/// Decode attention: each of `batch_size` sequences has `q_len` new query
/// tokens (1 for plain decode, a few for speculative decoding, a whole chunk
/// for chunked prefill: any q_len >= 1) whose K/V are
/// already in the cache; they are the last q_len of the sequence's
/// page_table.seq_len(b) tokens. Query token i of sequence b sits at position
/// seq_len - q_len + i and attends causally to keys at positions <= its own.
///
/// Query rows are numbered t = b * q_len + i. Element (t, head, dim) of q is at
/// q[t * q_stride_token + head * q_stride_head + dim]; o likewise.
struct PagedDecodeParams {
  const void* q = nullptr;          ///< [batch * q_len, num_q_heads, head_dim]
  std::int64_t q_stride_token = 0;
  std::int64_t q_stride_head = 0;
  const void* k_cache = nullptr;    ///< paged K, addressed by `layout`
  const void* v_cache = nullptr;    ///< paged V, addressed by `layout`
  PagedKVLayout layout{};           ///< num_heads = kv heads, head_dim = head_dim
  PaddedPageTable page_table{};     ///< batch_size rows; seq_lens include the new tokens
  int q_len = 1;
  /// Optional ragged queries (chunked prefill of several sequences in one
  /// call): sequence b's query rows are t in [q_indptr[b], q_indptr[b+1])
  /// and its q_len is their count; `q_len` is then ignored.
  /// [batch_size + 1], q_indptr[0] = 0, non-decreasing. Like every pointer
  /// here it lives where the op runs: host memory for the CPU
  /// paged_decode_attention, device memory for cuda::run_prefill (whose
  /// plan_prefill takes a host copy). The CUDA decode rejects it.
  const std::int64_t* q_indptr = nullptr;
  int num_q_heads = 0;              ///< a multiple of layout.num_heads (GQA/MQA)
  float sm_scale = 0.0f;            ///< usually head_dim^-0.5
  int window = 0;                   ///< > 0: attend to the last `window` positions only
  int num_sinks = 0;                ///< with a window: the first num_sinks positions stay visible
  float logit_softcap = 0.0f;       ///< > 0: scores become cap * tanh(score / cap) (Gemma-2)
  /// false: every query row sees every key in [kv_begin, kv_end) regardless of
  /// positions (no window allowed). Used for the shared-prefix level of
  /// cascade attention, where the q rows are the last tokens of many
  /// sequences that all follow the prefix.
  bool causal = true;
  std::int64_t kv_begin = 0;        ///< only keys at positions in [kv_begin, kv_end) are
  std::int64_t kv_end = INT64_MAX;  ///<   attended (split-KV); merge the parts with merge_states
  /// Width of the value rows: 0 means layout.head_dim. A smaller width reads
  /// V as the first v_head_dim elements at each K row's offset in v_cache:
  /// MLA's absorbed decode attends with 576-wide keys [c_kv | k_pe] and
  /// 512-wide values c_kv sharing the same storage (v_cache = k_cache).
  int v_head_dim = 0;
  void* o = nullptr;                ///< [batch * q_len, num_q_heads, v_head_dim], dtype q_dtype
  std::int64_t o_stride_token = 0;
  std::int64_t o_stride_head = 0;
  float* lse = nullptr;             ///< optional [batch * q_len, num_q_heads], natural log
  DType q_dtype = DType::kFloat32;  ///< of q and o: float32, float16, bfloat16
  /// Of the cache: float32, float16, bfloat16, or a quantized cache written
  /// by quantize_append_kv (float8_e4m3, float8_e5m2, int8), read as
  /// float(stored) * scale with the scales below.
  DType kv_dtype = DType::kFloat32;
  /// Quantized caches only (nullptr otherwise): the scales quantize_append_kv
  /// used, with the same granularity. kPerTensor: [1]; kPerHead: [kv_heads];
  /// kPerTokenHead: [num_slots, kv_heads] (its k_scale_cache / v_scale_cache,
  /// indexed by slot, so they follow the page table like the cache does).
  ScaleGranularity kv_scale_granularity = ScaleGranularity::kPerTensor;
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
};

/// Whether the query at `q_pos` attends to the key at `k_pos`.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE bool attention_visible(const PagedDecodeParams& p,
                                                           std::int64_t q_pos,
                                                           std::int64_t k_pos) {
  if (k_pos < p.kv_begin || k_pos >= p.kv_end) return false;
  if (!p.causal) return true;
  if (k_pos > q_pos) return false;
  return p.window <= 0 || k_pos > q_pos - p.window || k_pos < p.num_sinks;
}

/// Whether every key at positions [first, last] is visible to every query
/// row at positions [q_pos_lo, q_pos_hi], so that a tile of them needs no
/// per-key mask (the common case). The keys must come from the rows' key
/// span (inside [kv_begin, kv_end)). Shared by the CPU decode and the kernels.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE bool attention_keys_all_visible(const PagedDecodeParams& p,
                                                                    std::int64_t q_pos_lo, std::int64_t q_pos_hi,
                                                                    std::int64_t first, std::int64_t last) {
  if (!p.causal) return true;
  return last <= q_pos_lo && (p.window <= 0 || first > q_pos_hi - p.window || last < p.num_sinks);
}

/// Score after scaling and the optional soft-cap.
/// First query row of sequence b and its number of query tokens.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t attention_q_begin(const PagedDecodeParams& p, std::int64_t b) {
  return p.q_indptr != nullptr ? p.q_indptr[b] : b * p.q_len;
}
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t attention_q_count(const PagedDecodeParams& p, std::int64_t b) {
  return p.q_indptr != nullptr ? p.q_indptr[b + 1] - p.q_indptr[b] : p.q_len;
}

/// The value width of a call (v_head_dim, or head_dim when it is 0).
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE int attention_v_dim(const PagedDecodeParams& p) {
  return p.v_head_dim > 0 ? p.v_head_dim : int(p.layout.head_dim);
}

KVKIT_HOST_DEVICE KVKIT_FORCEINLINE float attention_logit(const PagedDecodeParams& p, float dot) {
  const float s = dot * p.sm_scale;
  return p.logit_softcap > 0.0f ? p.logit_softcap * tanhf(s / p.logit_softcap) : s;
}

/// The keys that some query row of a sequence may see, as at most two
/// position ranges in order: [begin, first_end) and [second_begin, end).
/// Without a window the first range is [max(kv_begin, 0), min(kv_end, seq_len))
/// and the second is empty; with a window the first holds the sinks and the
/// second the window of the earliest query row onwards, so the keys that no
/// row sees (between the sinks and the window) are left out. Keys inside the
/// span can still be invisible to some rows (causal order among the q_len new
/// tokens, the window's edge): attention_visible decides per row. Split-KV
/// divides the span's size() into chunks, so that a window costs what it reads.
struct AttentionKeySpan {
  std::int64_t begin = 0;
  std::int64_t first_end = 0;
  std::int64_t second_begin = 0;
  std::int64_t end = 0;

  /// Keys in the span.
  KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t size() const {
    return (first_end - begin) + (end - second_begin);
  }
  /// Position of the i-th key of the span (0 <= i < size()), increasing in i.
  KVKIT_HOST_DEVICE KVKIT_FORCEINLINE std::int64_t position(std::int64_t i) const {
    const std::int64_t n_first = first_end - begin;
    return i < n_first ? begin + i : second_begin + (i - n_first);
  }
};

/// The keys that query rows at positions [q_pos_lo, q_pos_hi] of a sequence
/// of `seq_len` tokens may see, as at most two ranges (see AttentionKeySpan):
/// [kv_begin, kv_end) ∩ [0, seq_len), cut at q_pos_hi + 1 under causal
/// attention; with a window, the sinks and then the window of the earliest
/// row (keys between them are hidden from every row). Adjacent ranges are
/// merged into the first. Keys inside can still be hidden from some rows
/// (the causal diagonal, the window's edge): attention_visible decides.
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE AttentionKeySpan attention_key_span(const PagedDecodeParams& p,
                                                                        std::int64_t seq_len,
                                                                        std::int64_t q_pos_lo,
                                                                        std::int64_t q_pos_hi) {
  AttentionKeySpan s;
  s.end = p.kv_end < seq_len ? p.kv_end : seq_len;
  if (p.causal && q_pos_hi + 1 < s.end) s.end = q_pos_hi + 1;
  if (s.end < 0) s.end = 0;
  s.begin = p.kv_begin > 0 ? p.kv_begin : 0;
  if (s.begin > s.end) s.begin = s.end;
  s.first_end = s.end;
  s.second_begin = s.end;
  if (!p.causal || p.window <= 0) return s;
  std::int64_t sinks_end = p.num_sinks < s.begin ? s.begin : p.num_sinks;
  if (sinks_end > s.end) sinks_end = s.end;
  const std::int64_t earliest = q_pos_lo - p.window + 1;
  std::int64_t window_begin = earliest > sinks_end ? earliest : sinks_end;
  if (window_begin > s.end) window_begin = s.end;
  if (window_begin > sinks_end) {  // a gap: two ranges
    s.first_end = sinks_end;
    s.second_begin = window_begin;
  }
  return s;
}

/// The key span of a sequence of `seq_len` tokens whose last p.q_len tokens
/// are the query rows (see AttentionKeySpan).
KVKIT_HOST_DEVICE KVKIT_FORCEINLINE AttentionKeySpan attention_key_span(const PagedDecodeParams& p,
                                                                        std::int64_t seq_len) {
  return attention_key_span(p, seq_len, seq_len - p.q_len, seq_len - 1);
}

}  // namespace kvkit
