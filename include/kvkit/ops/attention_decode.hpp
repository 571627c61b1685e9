#pragma once
/// @file attention_decode.hpp
/// Decode attention over a paged KV cache on the CPU: MHA, GQA and MQA,
/// q_len >= 1 with causal offsets, sliding window with sinks, logit soft-cap,
/// a key range for split-KV, and the log-sum-exp output that merge_states
/// combines. Each KV head is read once for all of its query heads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/core/x86_dispatch.hpp"
#include "kvkit/ops/attention_params.hpp"
#include "kvkit/ops/attention_state.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace kvkit {

namespace detail {

/// Keys per tile: scores of a tile are computed before the softmax rescale,
/// so the rescale costs one pass per tile rather than per key.
constexpr int kDecodeTile = 32;

/// Dot product with 8 independent partial sums: compilers vectorize it
/// without -ffast-math (a single running sum is a serial dependency they may
/// not reorder).
KVKIT_FORCEINLINE float dot_product(const float* a, const float* b, int n) {
  float lanes[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] += a[d + l] * b[d + l];
  }
  float tail = 0.0f;
  for (; d < n; ++d) tail += a[d] * b[d];
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail;
}

/// Checks everything about a decode call that needs no memory reads (shapes,
/// strides, flags, pointers, dtypes). Shared by the CPU op and the CUDA plan,
/// whose page tables live on the device.
inline void validate_decode_shapes(const PagedDecodeParams& p, const char* where) {
  p.layout.validate(where);
  const std::int64_t kv_heads = p.layout.num_heads;
  const std::int64_t head_dim = p.layout.head_dim;
  check_argument(p.q_len >= 1, where, "q_len", p.q_len, ">= 1");
  check_argument(p.num_q_heads > 0 && p.num_q_heads % kv_heads == 0, where, "num_q_heads",
                 p.num_q_heads, "a positive multiple of the kv heads (", kv_heads, ")");
  check_argument(std::isfinite(p.sm_scale) && p.sm_scale > 0.0f, where, "sm_scale", p.sm_scale,
                 "a finite value > 0 (usually head_dim^-0.5)");
  check_argument(p.window >= 0, where, "window", p.window, ">= 0 (0: no window)");
  check_argument(p.num_sinks >= 0, where, "num_sinks", p.num_sinks, ">= 0");
  check_argument(p.logit_softcap >= 0.0f, where, "logit_softcap", p.logit_softcap,
                 ">= 0 (0: no soft-cap)");
  check_argument(p.kv_begin >= 0 && p.kv_begin <= p.kv_end, where, "kv_begin", p.kv_begin,
                 ">= 0 and <= kv_end (", p.kv_end, ")");
  check_argument(p.causal || p.window == 0, where, "window", p.window,
                 "0 when causal is false (a window needs query positions)");
  const PaddedPageTable& t = p.page_table;
  check_argument(t.batch_size >= 0, where, "page_table.batch_size", t.batch_size, ">= 0");
  check_argument(t.max_blocks >= 0, where, "page_table.max_blocks", t.max_blocks, ">= 0");
  check_argument(t.stride_batch >= t.max_blocks, where, "page_table.stride_batch", t.stride_batch,
                 ">= max_blocks (", t.max_blocks, ")");
  dispatch_dtype<FloatTypes>(p.q_dtype, where, "q_dtype", [](auto) {});
  dispatch_dtype<FloatTypes>(p.kv_dtype, where, "kv_dtype", [](auto) {});
  const std::int64_t rows = t.batch_size * p.q_len;
  if (rows == 0) return;
  check_argument(t.seq_lens != nullptr, where, "page_table.seq_lens", t.seq_lens, "a non-null pointer");
  check_argument(t.block_table != nullptr || t.max_blocks == 0, where, "page_table.block_table",
                 t.block_table, "a non-null pointer");
  check_argument(p.q != nullptr, where, "q", p.q, "a non-null pointer");
  check_argument(p.o != nullptr, where, "o", p.o, "a non-null pointer");
  check_argument(p.k_cache != nullptr, where, "k_cache", p.k_cache, "a non-null pointer");
  check_argument(p.v_cache != nullptr, where, "v_cache", p.v_cache, "a non-null pointer");
  check_argument(p.q_stride_head >= head_dim, where, "q_stride_head", p.q_stride_head,
                 ">= head_dim (", head_dim, ")");
  check_argument(p.q_stride_token >= p.num_q_heads * p.q_stride_head || rows == 1, where,
                 "q_stride_token", p.q_stride_token, ">= num_q_heads * q_stride_head (",
                 p.num_q_heads * p.q_stride_head, ")");
  check_argument(p.v_head_dim >= 0 && p.v_head_dim <= head_dim, where, "v_head_dim", p.v_head_dim,
                 "in [0, head_dim (", head_dim, ")] (0: head_dim)");
  const std::int64_t v_dim = attention_v_dim(p);
  check_argument(p.o_stride_head >= v_dim, where, "o_stride_head", p.o_stride_head,
                 ">= the value width (", v_dim, ")");
  check_argument(p.o_stride_token >= p.num_q_heads * p.o_stride_head || rows == 1, where,
                 "o_stride_token", p.o_stride_token, ">= num_q_heads * o_stride_head (",
                 p.num_q_heads * p.o_stride_head, ")");
}

/// For ops without ragged queries (the CUDA kernels, the fp8 MLA loop).
inline void reject_ragged_queries(const PagedDecodeParams& p, const char* where) {
  check_argument(p.q_indptr == nullptr, where, "q_indptr", p.q_indptr,
                 "nullptr here (ragged queries: one call per sequence, or the CPU paged_decode_attention)");
}

/// Checks one sequence length (host memory): with causal attention the q_len
/// new tokens must already be in the cache.
inline void check_decode_seq_len(const PagedDecodeParams& p, std::int64_t b, std::int64_t len,
                                 const char* where, std::int64_t q_len) {
  if (p.causal && len < q_len) {
    fail(where, "sequence ", b, " has seq_len ", len, " < q_len (", q_len,
         "); expected the new tokens to be in the cache already");
  }
}
inline void check_decode_seq_len(const PagedDecodeParams& p, std::int64_t b, std::int64_t len,
                                 const char* where) {
  check_decode_seq_len(p, b, len, where, p.q_len);
}

inline void validate_decode_params(const PagedDecodeParams& p, const char* where) {
  validate_decode_shapes(p, where);
  validate_page_table(p.page_table, p.layout.page_size, p.layout.num_pages);
  if (p.q_indptr != nullptr) {
    check_argument(p.q_indptr[0] == 0, where, "q_indptr[0]", p.q_indptr[0], "0");
    for (std::int64_t b = 0; b < p.page_table.batch_size; ++b) {
      if (p.q_indptr[b + 1] < p.q_indptr[b]) {
        fail(where, "argument 'q_indptr[", b + 1, "]' = ", p.q_indptr[b + 1], ": expected >= q_indptr[", b,
             "] (", p.q_indptr[b], ")");
      }
    }
  }
  for (std::int64_t b = 0; b < p.page_table.batch_size; ++b) {
    check_decode_seq_len(p, b, p.page_table.seq_len(b), where, attention_q_count(p, b));
  }
}

/// All query rows (q_len tokens x all q heads) of one sequence. A tile of
/// keys is converted to float for every kv head at once: in NHD caches a
/// token's heads are contiguous, so the cache is read as a stream instead of
/// one 2-KiB-strided row per head, which left the CPU waiting on memory.
template <class QT, class KVT>
KVKIT_FORCEINLINE void decode_one_sequence_body(const PagedDecodeParams& p, std::int64_t b,
                                                int kv_head_begin, int kv_head_end,
                                                std::vector<float>& scratch,
                                                std::vector<OnlineSoftmax>& softmax,
                                                std::vector<std::int64_t>& q_pos) {
  const int head_dim = int(p.layout.head_dim);
  const int v_dim = attention_v_dim(p);
  // This call covers kv heads [kv_head_begin, kv_head_end) and their q heads.
  const int kv_heads = kv_head_end - kv_head_begin;
  const int group = p.num_q_heads / int(p.layout.num_heads);
  const int q_heads = kv_heads * group;
  const int q_head0 = kv_head_begin * group;
  const int q_len = int(attention_q_count(p, b));
  const std::int64_t q_begin = attention_q_begin(p, b);
  const int rows = q_len * q_heads;  // row r: token q_begin + r / q_heads, q head q_head0 + r % q_heads
  const std::int64_t seq_len = p.page_table.seq_len(b);
  if (rows == 0) return;
  const std::int32_t* pages = p.page_table.pages(b);
  const std::size_t row_floats = std::size_t(rows) * head_dim;
  const std::size_t acc_floats = std::size_t(rows) * v_dim;
  const std::size_t k_tile_floats = std::size_t(kDecodeTile) * kv_heads * head_dim;
  const std::size_t v_tile_floats = std::size_t(kDecodeTile) * kv_heads * v_dim;

  scratch.assign(row_floats + acc_floats + k_tile_floats + v_tile_floats + std::size_t(rows) * kDecodeTile, 0.0f);
  float* q = scratch.data();               // [rows, head_dim]
  float* acc = q + row_floats;             // [rows, v_dim]
  float* k_tile = acc + acc_floats;        // [tile, kv_heads, head_dim]
  float* v_tile = k_tile + k_tile_floats;  // [tile, kv_heads, v_dim]
  float* scores = v_tile + v_tile_floats;  // [rows, tile]
  softmax.assign(std::size_t(rows), OnlineSoftmax{});
  q_pos.resize(std::size_t(rows));

  const QT* q_base = static_cast<const QT*>(p.q);
  for (int r = 0; r < rows; ++r) {
    const std::int64_t t = q_begin + r / q_heads;
    const std::int64_t h = q_head0 + r % q_heads;
    const QT* src = q_base + t * p.q_stride_token + h * p.q_stride_head;
    for (int d = 0; d < head_dim; ++d) q[std::size_t(r) * head_dim + d] = to_float(src[d]);
    q_pos[r] = seq_len - q_len + r / q_heads;
  }

  const std::int64_t first = std::max<std::int64_t>(p.kv_begin, 0);
  const std::int64_t last = std::min<std::int64_t>(p.kv_end, seq_len);  // exclusive
  // With a window, keys in [num_sinks, earliest) are invisible to every row.
  const std::int64_t earliest = p.window > 0 ? seq_len - q_len - p.window + 1 : 0;
  const KVT* k_cache = static_cast<const KVT*>(p.k_cache);
  const KVT* v_cache = static_cast<const KVT*>(p.v_cache);
  for (std::int64_t start = first; start < last; start += kDecodeTile) {
    const int n = int(std::min<std::int64_t>(kDecodeTile, last - start));
    if (start >= p.num_sinks && start + n <= earliest) continue;
    for (int j = 0; j < n; ++j) {
      const std::int64_t slot = token_slot(pages, start + j, p.layout.page_shift);
      for (int h = 0; h < kv_heads; ++h) {
        const std::int64_t off = p.layout.slot_offset(slot, kv_head_begin + h);
        float* kd = k_tile + (std::size_t(j) * kv_heads + h) * head_dim;
        float* vd = v_tile + (std::size_t(j) * kv_heads + h) * v_dim;
        for (int d = 0; d < head_dim; ++d) kd[d] = to_float(k_cache[off + d]);
        for (int d = 0; d < v_dim; ++d) vd[d] = to_float(v_cache[off + d]);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const int kv_head = (r % q_heads) / group;  // relative to kv_head_begin
      const float* qr = q + std::size_t(r) * head_dim;
      float* sr = scores + std::size_t(r) * kDecodeTile;
      float block_max = -INFINITY;
      for (int j = 0; j < n; ++j) {
        if (!attention_visible(p, q_pos[r], start + j)) {
          sr[j] = -INFINITY;
          continue;
        }
        const float* kd = k_tile + (std::size_t(j) * kv_heads + kv_head) * head_dim;
        sr[j] = attention_logit(p, dot_product(qr, kd, head_dim));
        block_max = std::max(block_max, sr[j]);
      }
      if (block_max == -INFINITY) continue;
      float* ar = acc + std::size_t(r) * v_dim;
      const float factor = softmax[r].rescale_for(block_max);
      for (int d = 0; d < v_dim; ++d) ar[d] *= factor;
      for (int j = 0; j < n; ++j) {
        if (sr[j] == -INFINITY) continue;
        const float w = expf(sr[j] - softmax[r].max);
        softmax[r].sum += w;
        const float* vd = v_tile + (std::size_t(j) * kv_heads + kv_head) * v_dim;
        for (int d = 0; d < v_dim; ++d) ar[d] += w * vd[d];
      }
    }
  }

  QT* o_base = static_cast<QT*>(p.o);
  for (int r = 0; r < rows; ++r) {
    const std::int64_t t = q_begin + r / q_heads;
    const std::int64_t h = q_head0 + r % q_heads;
    QT* dst = o_base + t * p.o_stride_token + h * p.o_stride_head;
    const float inv = softmax[r].sum > 0.0f ? 1.0f / softmax[r].sum : 0.0f;
    for (int d = 0; d < v_dim; ++d) dst[d] = from_float<QT>(acc[std::size_t(r) * v_dim + d] * inv);
    if (p.lse != nullptr) p.lse[t * p.num_q_heads + h] = softmax[r].lse();
  }
}

#if KVKIT_X86_DISPATCH
/// The same work with 8-lane AVX2. No FMA: results are then the same on
/// every x86 CPU (the operations and their order do not change), which keeps
/// runs reproducible across machines.
template <class QT, class KVT>
__attribute__((target("avx2"))) void decode_one_sequence_avx2(
    const PagedDecodeParams& p, std::int64_t b, int kv_head_begin, int kv_head_end,
    std::vector<float>& scratch, std::vector<OnlineSoftmax>& softmax, std::vector<std::int64_t>& q_pos) {
  decode_one_sequence_body<QT, KVT>(p, b, kv_head_begin, kv_head_end, scratch, softmax, q_pos);
}
#endif

template <class QT, class KVT>
void decode_one_sequence(const PagedDecodeParams& p, std::int64_t b, int kv_head_begin, int kv_head_end,
                         std::vector<float>& scratch, std::vector<OnlineSoftmax>& softmax,
                         std::vector<std::int64_t>& q_pos) {
#if KVKIT_X86_DISPATCH
  if (x86_level() != X86Level::kBaseline) {
    decode_one_sequence_avx2<QT, KVT>(p, b, kv_head_begin, kv_head_end, scratch, softmax, q_pos);
    return;
  }
#endif
  decode_one_sequence_body<QT, KVT>(p, b, kv_head_begin, kv_head_end, scratch, softmax, q_pos);
}

}  // namespace detail

/// Decode attention on the CPU (see PagedDecodeParams). Writes o and, if
/// requested, lse for every query row; a row that sees no key (e.g. its keys
/// lie outside [kv_begin, kv_end)) gets o = 0 and lse = −inf, which
/// merge_states treats as empty. Throws kvkit::Error before writing anything
/// on bad input (shapes, strides, page table, dtypes).
inline void paged_decode_attention(const PagedDecodeParams& p) {
  constexpr const char* kWhere = "kvkit::paged_decode_attention";
  detail::validate_decode_params(p, kWhere);
  dispatch_dtype<FloatTypes>(p.q_dtype, kWhere, "q_dtype", [&](auto qtag) {
    dispatch_dtype<FloatTypes>(p.kv_dtype, kWhere, "kv_dtype", [&](auto kvtag) {
      using QT = typename decltype(qtag)::type;
      using KVT = typename decltype(kvtag)::type;
      // Work items: (sequence, group of kv heads). With few sequences the kv
      // heads are split so that every thread has work; each item reads its
      // heads' part of every key row once. Threads: OpenMP where the program
      // is built with it (kvkit adds no flags itself), else one.
      const std::int64_t batch = p.page_table.batch_size;
      const int kv_heads = int(p.layout.num_heads);
      int threads = 1;
#if defined(_OPENMP)
      threads = omp_get_max_threads();
#endif
      int head_groups = 1;
      while (batch * head_groups < threads && head_groups * 2 <= kv_heads) head_groups *= 2;
      const std::int64_t items = batch * head_groups;
#if defined(_OPENMP)
#pragma omp parallel if (items > 1 && threads > 1)
#endif
      {
        std::vector<float> scratch;
        std::vector<OnlineSoftmax> softmax;
        std::vector<std::int64_t> q_pos;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (std::int64_t item = 0; item < items; ++item) {
          const std::int64_t b = item / head_groups;
          const int g = int(item % head_groups);
          const int h0 = int(std::int64_t(kv_heads) * g / head_groups);
          const int h1 = int(std::int64_t(kv_heads) * (g + 1) / head_groups);
          detail::decode_one_sequence<QT, KVT>(p, b, h0, h1, scratch, softmax, q_pos);
        }
      }
    });
  });
}

}  // namespace kvkit
