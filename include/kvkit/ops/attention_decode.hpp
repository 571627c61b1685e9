#pragma once
/// @file attention_decode.hpp
/// Decode attention over a paged KV cache on the CPU: MHA, GQA and MQA,
/// q_len >= 1 with causal offsets, sliding window with sinks, logit soft-cap,
/// a key range for split-KV, and the log-sum-exp output that merge_states
/// combines. Each KV head is read once for all of its query heads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/core/x86_dispatch.hpp"
#include "kvkit/layout/latent_fp8_layout.hpp"
#include "kvkit/ops/attention_checks.hpp"
#include "kvkit/ops/attention_cpu_kernels.hpp"
#include "kvkit/ops/attention_params.hpp"
#include "kvkit/ops/attention_state.hpp"
#include "kvkit/ops/cpu_vec.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace kvkit {

namespace detail {

/// One work item of the CPU decode: sequence b, kv heads [kv_head_begin,
/// kv_head_end), and of each of their groups the q heads [group_begin,
/// group_end) (q head = kv head * group + index in the group).
struct DecodeWorkItem {
  std::int64_t b = 0;
  int kv_head_begin = 0, kv_head_end = 0;
  int group_begin = 0, group_end = 0;
};

/// Per-thread buffers of the CPU decode, reused across work items.
struct DecodeScratch {
  std::vector<float> floats;
  std::vector<OnlineSoftmax> softmax;
  std::vector<std::int64_t> token_pos;  ///< position of each query token
};


/// A q row (float32, float16 or bfloat16: validated before) as n floats, and
/// n floats back into an o row of the same dtype. Once per row and work item,
/// so the runtime switch costs nothing next to the keys, and the decode
/// bodies are not instantiated once per q dtype.
inline void q_row_to_float(DType dtype, const void* src, int n, float* dst) {
  dispatch_known_dtype(FloatTypes{}, dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (int d = 0; d < n; ++d) dst[d] = to_float(static_cast<const T*>(src)[d]);
  });
}
inline void float_to_o_row(DType dtype, const float* src, int n, void* dst) {
  dispatch_known_dtype(FloatTypes{}, dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (int d = 0; d < n; ++d) static_cast<T*>(dst)[d] = from_float<T>(src[d]);
  });
}

/// Where the decode body reads key and value rows: the cache in place (fp32
/// and bf16 with any ISA; fp16, fp8 and int8 with F16C, i.e. the AVX2 and
/// AVX-512 bodies), or float tiles converted (dequantized) from a cache of
/// any dtype.
enum class DecodeRows {
  kFloat32Cache,
  kBf16Cache,
  kFloat16Cache,
  kFloat8E4M3Cache,
  kFloat8E5M2Cache,
  kInt8Cache,
  kFloatTiles
};

/// The element type a body reads rows as (see load_chunk's overloads).
template <DecodeRows kRows>
struct DecodeElem {
  using type = float;
};
template <>
struct DecodeElem<DecodeRows::kBf16Cache> {
  using type = std::uint16_t;
};
template <>
struct DecodeElem<DecodeRows::kFloat16Cache> {
  using type = half;
};
template <>
struct DecodeElem<DecodeRows::kFloat8E4M3Cache> {
  using type = float8_e4m3;
};
template <>
struct DecodeElem<DecodeRows::kFloat8E5M2Cache> {
  using type = float8_e5m2;
};
template <>
struct DecodeElem<DecodeRows::kInt8Cache> {
  using type = std::int8_t;
};

/// Whether in-place rows carry a scale (1-byte dtypes), applied per key to
/// the scores and the weights.
constexpr bool decode_rows_scaled(DecodeRows rows) {
  return rows == DecodeRows::kFloat8E4M3Cache || rows == DecodeRows::kFloat8E5M2Cache ||
         rows == DecodeRows::kInt8Cache;
}
/// Whether rows of this kind are read in place only with F16C (the AVX2 and
/// AVX-512 bodies; the baseline body reads them through tiles).
constexpr bool decode_rows_need_f16c(DecodeRows rows) {
  return rows == DecodeRows::kFloat16Cache || decode_rows_scaled(rows);
}

/// The in-place kind for a cache dtype the CPU decode reads
/// (dispatch_kv_cache_dtype's).
constexpr DecodeRows decode_rows_in_place(DType kv_dtype) {
  return kv_dtype == DType::kFloat32      ? DecodeRows::kFloat32Cache
         : kv_dtype == DType::kBFloat16   ? DecodeRows::kBf16Cache
         : kv_dtype == DType::kFloat16    ? DecodeRows::kFloat16Cache
         : kv_dtype == DType::kFloat8E4M3 ? DecodeRows::kFloat8E4M3Cache
         : kv_dtype == DType::kFloat8E5M2 ? DecodeRows::kFloat8E5M2Cache
                                          : DecodeRows::kInt8Cache;
}

/// All query rows of one sequence for kv heads [kv_head_begin, kv_head_end).
/// Rows are ordered (kv head, token, q head in the group), so that a kv
/// head's rows are contiguous. Per tile of keys and per kv head: scores of
/// the head's rows, one online-softmax step per row, then the weighted sum of
/// the values.
///
/// Caches are read in place, converted in registers (load_chunk), with the
/// next tile's rows prefetched as the current ones are read: fp32 and bf16
/// with every ISA, fp16 and the 1-byte dtypes with AVX2 or AVX-512 (their
/// scales applied per key to the scores and weights). The baseline ISA's
/// fp16 and 1-byte rows, FlashMLA's fp8 latent rows and head sizes that are
/// not a multiple of two vectors are first converted (dequantized) into a
/// float tile, one kv head at a time so that the tile
/// stays in L1, with the next tile's rows of that head prefetched. The tile
/// path converts rows through a runtime switch on the cache dtype
/// (load_cache_row): it is one body per ISA for every dtype, and a switch per
/// row costs nothing next to the row. Scratch rows are zero-padded to a
/// multiple of 32 floats so that the vector loops need no tails.
///
/// kBf16Pairs (bf16 q, bf16 cache in place, a CPU with AVX512-BF16): q rows
/// keep their bf16 bits and the scores come from decode_scores_bf16_rows.
/// latent_rows: FlashMLA's fp8 latent rows (tiles only).
template <DecodeRows kRows, bool kF16C, class V, bool kBf16Pairs>
KVKIT_FORCEINLINE void decode_one_sequence_rows(const PagedDecodeParams& p, const DecodeWorkItem& item,
                                                bool latent_rows, DecodeScratch& scratch) {
  // What a row is read as: the cache's bf16 bits or floats in place, or the
  // floats of a tile.
  constexpr bool in_place = kRows != DecodeRows::kFloatTiles;
  constexpr bool scaled = decode_rows_scaled(kRows);
  using Elem = typename DecodeElem<kRows>::type;
  const std::int64_t b = item.b;
  const int kv_head_begin = item.kv_head_begin, kv_head_end = item.kv_head_end;
  const int head_dim = int(p.layout.head_dim);
  const int v_dim = attention_v_dim(p);
  const int k_width = round_up_to_chunk(head_dim);
  const int v_width = round_up_to_chunk(v_dim);
  const int kv_heads = kv_head_end - kv_head_begin;
  // This item's q heads of each kv head: [group_begin, group_begin + group)
  // of the kv head's group_all.
  const int group_all = p.num_q_heads / int(p.layout.num_heads);
  const int group = item.group_end - item.group_begin;
  const int q_len = int(attention_q_count(p, b));
  const int head_rows = q_len * group;
  const int rows = kv_heads * head_rows;
  if (rows == 0) return;
  const std::int64_t q_begin = attention_q_begin(p, b);
  const std::int64_t seq_len = p.page_table.seq_len(b);
  const std::int32_t* pages = p.page_table.pages(b);

  const int k_len = in_place ? head_dim : k_width;  // elements the loops read per row
  const int v_len = in_place ? v_dim : v_width;

  const std::size_t q_floats = std::size_t(rows) * k_width;
  const std::size_t acc_floats = std::size_t(rows) * v_width;
  const std::size_t k_tile_floats = in_place ? 0 : std::size_t(kDecodeTile) * k_width;
  const std::size_t v_tile_floats = in_place ? 0 : std::size_t(kDecodeTile) * v_width;
  const std::size_t score_floats = std::size_t(rows) * kDecodeTile;
  scratch.floats.assign(q_floats + acc_floats + k_tile_floats + v_tile_floats + score_floats +
                            std::size_t(std::max(head_dim, v_dim)),
                        0.0f);
  float* q = scratch.floats.data();       // [rows, k_width]
  float* acc = q + q_floats;              // [rows, v_width]
  float* k_tile = acc + acc_floats;       // [tile, k_width]: one kv head's keys
  float* v_tile = k_tile + k_tile_floats; // [tile, v_width]
  float* scores = v_tile + v_tile_floats; // [rows, tile]: scores, then softmax weights
  float* row = scores + score_floats;     // one q or o row in its own order
  scratch.softmax.assign(std::size_t(rows), OnlineSoftmax{});
  OnlineSoftmax* softmax = scratch.softmax.data();
  scratch.token_pos.resize(std::size_t(q_len));
  std::int64_t* token_pos = scratch.token_pos.data();

  // Row r = (h * q_len + t) * group + g is token q_begin + t, q head
  // (kv_head_begin + h) * group_all + group_begin + g. q and the
  // accumulators hold a row's elements in the order load_chunk reads them.
  const std::size_t q_elem_bytes = dtype_size(p.q_dtype);
  const auto* q_base = static_cast<const unsigned char*>(p.q);
  for (int t = 0; t < q_len; ++t) token_pos[t] = seq_len - q_len + t;
  for (int r = 0; r < rows; ++r) {
    const int h = r / head_rows, t = (r % head_rows) / group, g = r % group;
    const std::int64_t q_head = std::int64_t(kv_head_begin + h) * group_all + item.group_begin + g;
    const void* src = q_base + std::size_t((q_begin + t) * p.q_stride_token + q_head * p.q_stride_head) * q_elem_bytes;
    if constexpr (kBf16Pairs) {
      static_assert(kRows == DecodeRows::kBf16Cache, "bf16 q and cache");
      std::memcpy(q + std::size_t(r) * k_width, src, sizeof(bfloat16) * std::size_t(head_dim));
    } else {
      q_row_to_float(p.q_dtype, src, head_dim, row);
      for (int d = 0; d < head_dim; ++d) q[std::size_t(r) * k_width + chunk_position<Elem, V>(d)] = row[d];
    }
  }

  // Row pointers of the tile's keys and the next tile's (prefetched), for
  // head 0 of the cache, or of the float tile; a head adds its offset.
  const Elem* k_rows[kDecodeTile];
  const Elem* v_rows[kDecodeTile];
  const Elem* k_next[kDecodeTile];
  const Elem* v_next[kDecodeTile];
  const std::int64_t stride_head = p.layout.stride_head;
  std::int64_t tile_slots[kDecodeTile];  // the current tile's cache slots (in place)
  const auto cache_rows = [&](std::int64_t tile_first, int count, const Elem** k_out, const Elem** v_out,
                              std::int64_t* slots_out) {
    for (int j = 0; j < count; ++j) {
      const std::int64_t slot = token_slot(pages, tile_first + j, p.layout.page_shift);
      if (slots_out != nullptr) slots_out[j] = slot;
      const std::int64_t off = p.layout.slot_offset(slot, 0);
      k_out[j] = static_cast<const Elem*>(p.k_cache) + off;
      v_out[j] = static_cast<const Elem*>(p.v_cache) + off;
    }
  };
  // 1-byte caches read in place: each key's K and V scale, applied to its
  // scores and to its weights, after what load_chunk leaves out (e4m3's
  // 2^8, first, so that no product overflows where the true one does not).
  // Exact dequantization would scale each element; scaling the sums instead
  // rounds differently in the last bits (the tests hold it to fp32's
  // tolerances).
  constexpr float factor = kRows == DecodeRows::kFloat8E4M3Cache ? kE4m3InPlaceFactor : 1.0f;
  float key_k_scale[kDecodeTile], key_v_scale[kDecodeTile];
  const auto key_scales = [&](int count, int head) {
    for (int j = 0; j < count; ++j) {
      key_k_scale[j] = kv_scale_at(p, p.k_scale, tile_slots[j], head);
      key_v_scale[j] = kv_scale_at(p, p.v_scale, tile_slots[j], head);
    }
  };
  // Bytes of a K and a V row that the tile path reads (and prefetches).
  const std::int64_t k_row_bytes = latent_rows ? MlaFp8Row::kBytes : head_dim * dtype_size(p.kv_dtype);
  const std::int64_t v_row_bytes = std::int64_t(v_dim) * dtype_size(p.kv_dtype);
  if constexpr (!in_place) {
    for (int j = 0; j < kDecodeTile; ++j) {
      k_rows[j] = reinterpret_cast<const Elem*>(k_tile + std::size_t(j) * k_width);
      v_rows[j] = reinterpret_cast<const Elem*>(v_tile + std::size_t(j) * v_width);
    }
  }
  // The keys some row may see (the window's gap between sinks and window is
  // skipped), a tile at a time.
  const AttentionKeySpan span = attention_key_span(p, seq_len, seq_len - q_len, seq_len - 1);
  const std::int64_t ranges[2][2] = {{span.begin, span.first_end}, {span.second_begin, span.end}};
  for (const auto& range : ranges) {
    for (std::int64_t first = range[0]; first < range[1]; first += kDecodeTile) {
      const int n = int(std::min<std::int64_t>(kDecodeTile, range[1] - first));
      const std::int64_t next = first + n;
      const int next_n = int(std::min<std::int64_t>(kDecodeTile, range[1] - next));
      // Prefetches of the next tile's rows: in place, key by key as the
      // current rows are read; for tiles, a head's rows once its tile is
      // converted.
      const Elem* const* k_prefetch = nullptr;
      const Elem* const* v_prefetch = nullptr;
      if constexpr (in_place) {
        cache_rows(first, n, k_rows, v_rows, tile_slots);
        if (next_n == n) {
          cache_rows(next, next_n, k_next, v_next, nullptr);
          k_prefetch = k_next;
          v_prefetch = v_next;
        }
      }
      // A head at a time, scores then weights then values, so that the rows
      // read and prefetched stay in L1 (all heads' K rows of this tile and
      // the next, then all V rows, overflowed it: measured 25% slower).
      for (int h = 0; h < kv_heads; ++h) {
        std::int64_t k_offset = 0, v_offset = 0;
        const int head = kv_head_begin + h;
        if constexpr (in_place) {
          k_offset = v_offset = head * stride_head;
          if constexpr (scaled) key_scales(n, head);
        } else {
          load_kv_head_tile<kF16C>(p, p.k_cache, p.k_scale, latent_rows, pages, first, n, head, head_dim, k_tile,
                                   k_width);
          if (next_n > 0) prefetch_kv_tile(p, p.k_cache, pages, next, next_n, head, k_row_bytes);
        }
        const std::size_t row0 = std::size_t(h) * head_rows;
#if KVKIT_X86_DISPATCH
        if constexpr (kBf16Pairs) {
          // A q row of k_width floats holds 2 * k_width bf16.
          decode_scores_bf16_rows(reinterpret_cast<const std::uint16_t*>(q + row0 * k_width), 2 * k_width, k_rows,
                                  k_prefetch, k_offset, n, k_len, scores + row0 * kDecodeTile, head_rows);
        } else
#endif
        {
          decode_scores_rows<V>(q + row0 * k_width, k_width, k_rows, k_prefetch, k_offset, n, k_len,
                                scores + row0 * kDecodeTile, head_rows);
        }
        if constexpr (scaled) {
          for (int i = 0; i < head_rows; ++i) {
            float* s = scores + (row0 + i) * kDecodeTile;
            for (int j = 0; j < n; ++j) s[j] = s[j] * factor * key_k_scale[j];
          }
        }
        bool any_weight = false;
        std::size_t r = row0;
        for (int t = 0; t < q_len; ++t) {
          for (int g = 0; g < group; ++g, ++r) {
            any_weight |= decode_softmax_step<V>(p, token_pos[t], first, n, scores + r * kDecodeTile, softmax[r],
                                                 acc + r * v_width, v_width);
          }
        }
        if (!any_weight) continue;
        if constexpr (scaled) {
          // After the softmax step: its sums are of the unscaled weights.
          for (int i = 0; i < head_rows; ++i) {
            float* w = scores + (row0 + i) * kDecodeTile;
            for (int j = 0; j < n; ++j) w[j] = w[j] * factor * key_v_scale[j];
          }
        }
        if constexpr (!in_place) {
          load_kv_head_tile<kF16C>(p, p.v_cache, p.v_scale, latent_rows, pages, first, n, head, v_dim, v_tile,
                                   v_width);
          if (next_n > 0) prefetch_kv_tile(p, p.v_cache, pages, next, next_n, head, v_row_bytes);
        }
        decode_accumulate_rows<V>(scores + row0 * kDecodeTile, v_rows, v_prefetch, v_offset, n, v_len,
                                  acc + row0 * v_width, v_width, head_rows);
      }
    }
  }

  auto* o_base = static_cast<unsigned char*>(p.o);
  for (int r = 0; r < rows; ++r) {
    const int h = r / head_rows, t = (r % head_rows) / group, g = r % group;
    const std::int64_t token = q_begin + t;
    const std::int64_t q_head = std::int64_t(kv_head_begin + h) * group_all + item.group_begin + g;
    void* dst = o_base + std::size_t(token * p.o_stride_token + q_head * p.o_stride_head) * q_elem_bytes;
    const float inv = softmax[r].sum > 0.0f ? 1.0f / softmax[r].sum : 0.0f;
    const float* acc_row = acc + std::size_t(r) * v_width;
    for (int d = 0; d < v_dim; ++d) row[d] = acc_row[chunk_position<Elem, V>(d)] * inv;
    float_to_o_row(p.q_dtype, row, v_dim, dst);
    if (p.lse != nullptr) p.lse[token * p.num_q_heads + q_head] = softmax[r].lse();
  }
}

/// Whether rows of p can be read in place with vectors V (GCC or Clang, head
/// sizes a multiple of kChunk); otherwise the in-place bodies hand the call
/// to the tile body of the same ISA.
template <class V>
inline bool decode_reads_in_place(const PagedDecodeParams& p) {
  return KVKIT_CPU_DECODE_READS_IN_PLACE && p.layout.head_dim % kChunk<V> == 0 &&
         attention_v_dim(p) % kChunk<V> == 0;
}

/// One ISA's decode of a work item. `tile_body` is the same ISA's tile body
/// (its decode_one_sequence_<isa><DecodeRows::kFloatTiles>), called rather
/// than inlined when rows cannot be read in place, so that each ISA compiles
/// the tile body once.
template <DecodeRows kRows, bool kF16C, class V, bool kBf16Pairs, class TileBody>
KVKIT_FORCEINLINE void decode_one_sequence_body(const PagedDecodeParams& p, const DecodeWorkItem& item,
                                                bool latent_rows, DecodeScratch& scratch, TileBody tile_body) {
  if constexpr (decode_rows_need_f16c(kRows) && !kF16C) {
    return tile_body(p, item, latent_rows, scratch);
  } else if constexpr (kRows != DecodeRows::kFloatTiles) {
#if KVKIT_CPU_DECODE_READS_IN_PLACE
    if (decode_reads_in_place<V>(p)) {
      return decode_one_sequence_rows<kRows, kF16C, V, kBf16Pairs>(p, item, latent_rows, scratch);
    }
#endif
    return tile_body(p, item, latent_rows, scratch);
  } else {
    (void)tile_body;
    decode_one_sequence_rows<kRows, kF16C, V, false>(p, item, latent_rows, scratch);
  }
}

#if KVKIT_X86_DISPATCH
/// The same work with AVX2 (8 lanes) or AVX-512 (16 lanes), FMA, and F16C for
/// float16 caches. The lane count sets the order of the float additions, so
/// results differ between ISAs in the last bits (the tests compare every
/// path against float64 with the same tolerances).
template <DecodeRows kRows>
__attribute__((target("avx2,fma,f16c"))) KVKIT_VECTORIZE void decode_one_sequence_avx2(
    const PagedDecodeParams& p, const DecodeWorkItem& item, bool latent_rows, DecodeScratch& scratch) {
  decode_one_sequence_body<kRows, true, Vec8, false>(p, item, latent_rows, scratch,
                                                     &decode_one_sequence_avx2<DecodeRows::kFloatTiles>);
}
template <DecodeRows kRows>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) KVKIT_VECTORIZE void decode_one_sequence_avx512(
    const PagedDecodeParams& p, const DecodeWorkItem& item, bool latent_rows, DecodeScratch& scratch) {
  decode_one_sequence_body<kRows, true, Vec16, false>(p, item, latent_rows, scratch,
                                                      &decode_one_sequence_avx512<DecodeRows::kFloatTiles>);
}

/// bf16 q against a bf16 cache with AVX512-BF16's pair dot products for
/// the scores (decode_scores_bf16_rows); the rest as decode_one_sequence_avx512.
__attribute__((target(KVKIT_AVX512_BF16_TARGET))) KVKIT_VECTORIZE inline void decode_one_sequence_avx512_bf16(
    const PagedDecodeParams& p, const DecodeWorkItem& item, DecodeScratch& scratch) {
  decode_one_sequence_body<DecodeRows::kBf16Cache, true, Vec16, true>(
      p, item, false, scratch, &decode_one_sequence_avx512<DecodeRows::kFloatTiles>);
}
#endif

/// The same work with the compiler's baseline ISA. Without AVX, 8-lane
/// vectors would be pairs of SSE registers that GCC spills; 4 lanes fit the
/// 16 SSE registers.
template <DecodeRows kRows>
KVKIT_VECTORIZE void decode_one_sequence_baseline(const PagedDecodeParams& p, const DecodeWorkItem& item,
                                                  bool latent_rows, DecodeScratch& scratch) {
#if defined(__GNUC__) || defined(__clang__)
  using BaselineVec = Vec4;
#else
  using BaselineVec = Vec8;
#endif
  decode_one_sequence_body<kRows, false, BaselineVec, false>(p, item, latent_rows, scratch,
                                                             &decode_one_sequence_baseline<DecodeRows::kFloatTiles>);
}

template <DecodeRows kRows>
void decode_one_sequence(const PagedDecodeParams& p, const DecodeWorkItem& item, bool latent_rows,
                         DecodeScratch& scratch) {
#if KVKIT_X86_DISPATCH
  const X86Level level = x86_level();
  if constexpr (kRows == DecodeRows::kBf16Cache) {
    if (level == X86Level::kAvx512Bf16 && p.q_dtype == DType::kBFloat16) {
      return decode_one_sequence_avx512_bf16(p, item, scratch);
    }
  }
  if (level >= X86Level::kAvx512) return decode_one_sequence_avx512<kRows>(p, item, latent_rows, scratch);
  if (level == X86Level::kAvx2) return decode_one_sequence_avx2<kRows>(p, item, latent_rows, scratch);
#endif
  decode_one_sequence_baseline<kRows>(p, item, latent_rows, scratch);
}

/// Runs every work item of a validated call: (sequence, kv heads, q heads
/// of their groups). With fewer sequences than threads the kv heads are split
/// first (each item still reads its heads' part of every key row once), then
/// the q heads of each group (MQA / MLA: one kv head, many q heads; those
/// items read the same keys, which suits their compute-bound case). Threads:
/// OpenMP where the program is built with it (kvkit adds no flags itself),
/// else one.
template <DecodeRows kRows>
void decode_all_sequences(const PagedDecodeParams& p, bool latent_rows) {
  const std::int64_t batch = p.page_table.batch_size;
  const int kv_heads = int(p.layout.num_heads);
  const int group = p.num_q_heads / kv_heads;
  int threads = 1;
#if defined(_OPENMP)
  threads = omp_get_max_threads();
#endif
  int head_splits = 1, group_splits = 1;
  while (batch * head_splits < threads && head_splits * 2 <= kv_heads) head_splits *= 2;
  while (batch * head_splits * group_splits < threads && group_splits * 2 <= group / 4) group_splits *= 2;
  const std::int64_t splits = std::int64_t(head_splits) * group_splits;
  const std::int64_t items = batch * splits;
#if defined(_OPENMP)
#pragma omp parallel if (items > 1 && threads > 1)
#endif
  {
    DecodeScratch scratch;
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
    for (std::int64_t i = 0; i < items; ++i) {
      DecodeWorkItem item;
      item.b = i / splits;
      const int hs = int((i % splits) / group_splits), gs = int(i % group_splits);
      item.kv_head_begin = int(std::int64_t(kv_heads) * hs / head_splits);
      item.kv_head_end = int(std::int64_t(kv_heads) * (hs + 1) / head_splits);
      item.group_begin = int(std::int64_t(group) * gs / group_splits);
      item.group_end = int(std::int64_t(group) * (gs + 1) / group_splits);
      decode_one_sequence<kRows>(p, item, latent_rows, scratch);
    }
  }
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
  detail::check_static_kv_scales(p, kWhere);
  detail::dispatch_kv_cache_dtype(p.kv_dtype, kWhere, [&](auto kv_dtype) {
    detail::decode_all_sequences<detail::decode_rows_in_place(decltype(kv_dtype)::value)>(p, false);
  });
}

}  // namespace kvkit
