#pragma once
/// @file attention_decode.cuh
/// Decode attention over a paged KV cache on the GPU: the CUDA twin of
/// kvkit::paged_decode_attention (ops/attention_decode.hpp), taking the same
/// PagedDecodeParams with device pointers and the same masking rule
/// (attention_visible) and score (attention_logit).
///
/// Two steps, so that the per-layer call can be captured in a CUDA graph:
///   DecodePlan plan = plan_decode(params, host_seq_lens, num_sms);   // host only
///   workspace of plan.workspace_bytes, allocated once by the caller
///   run_decode(params, plan, workspace, bytes, stream);              // no alloc, no sync
///
/// Kernel: one thread block per (sequence, kv head, row chunk, kv split).
/// All query rows of a kv head (q_len tokens x group heads, up to a per-block
/// capacity, see decode_rows_per_block) share each K/V row, which is read
/// from global memory once per block: the block streams tiles of K and V
/// into shared memory with 16-byte cp.async copies, three stages deep, while
/// its threads compute on the previous tile. Inside a block, groups of lanes
/// each own a K/V row's width (16 bytes per lane, 8 for 1-byte caches); a group holds up to four
/// query rows in registers, and groups that hold the same rows take
/// different keys of a tile, with their online-softmax states merged in
/// shared memory at the end. Accumulation is float32.
///
/// Split-KV (flash-decoding): when (sequences x kv heads) would not fill the
/// GPU, the plan cuts each sequence's keys into chunks of chunk_keys; every
/// chunk writes a partial (o, lse) into the workspace and a merge kernel
/// combines them with the rule of merge_states. A sequence that needs only
/// one chunk writes o directly.
///
/// Quantized caches (float8_e4m3, float8_e5m2, int8 from quantize_append_kv)
/// are copied to shared memory as bytes (half the bytes of bf16 per key, so
/// a tile holds twice the keys) and dequantized exactly in registers when a
/// lane converts its fragment; the key scale multiplies the score and the
/// value scale the key's weight in o. Static scales (per tensor, per head)
/// are read once per block; per-(token, head) scales are copied with their
/// tile, each key's from its slot.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/core/float8.hpp"
#include "kvkit/core/half.hpp"
#include "kvkit/cuda/check.hpp"
#include "kvkit/cuda/decode_plan.hpp"
#include "kvkit/cuda/merge_states.cuh"
#include "kvkit/cuda/vector_copy.cuh"
#include "kvkit/layout/page_table.hpp"
#include "kvkit/ops/attention_params.hpp"
#include "kvkit/ops/attention_state.hpp"

namespace kvkit::cuda {

namespace detail {

/// Shape constants of one kernel instance. Two granularities: a *copy unit*
/// is 16 bytes of a K/V row (one cp.async), a *fragment* is what one lane
/// converts to floats per row (decode_fragment_elems: the same 16 bytes for
/// float caches, 8 bytes of a 1-byte cache).
template <int kHeadDim, class KVT>
struct DecodeTraits {
  static constexpr int kElemBytes = int(sizeof(KVT));
  static constexpr bool kQuantized = kElemBytes == 1;  // fp8 e4m3 / e5m2 or int8, scaled
  static constexpr int kCopyVec = 16 / kElemBytes;         // elements per 16-byte copy unit
  static constexpr int kCopyUnits = kHeadDim / kCopyVec;   // copy units per K/V row
  static constexpr int kVec = decode_fragment_elems(kElemBytes);  // elements per fragment
  static constexpr int kUnits = kHeadDim / kVec;                  // fragments per K/V row
  static constexpr int kLanes = decode_lanes(kHeadDim, kElemBytes);
  static constexpr int kUnitsPerLane = (kUnits + kLanes - 1) / kLanes;
  static constexpr int kThreads = kDecodeThreads;
  static constexpr int kGroups = kThreads / kLanes;
  static constexpr int kRowsPerGroup = kDecodeRowsPerGroup;
  static constexpr int kMaxRows = decode_max_rows(kHeadDim, kElemBytes);
  static constexpr int kTile = decode_tile_keys(kHeadDim, kElemBytes);  // keys per tile
  static constexpr int kStages = kDecodeStages;
  static constexpr std::size_t kPipelineBytes = std::size_t(kStages) * 2 * kTile * kHeadDim * sizeof(KVT);
  // 1-byte caches: each stage's K and V scales, one per key ([kStages][K,
  // V][kTile] floats, copied per key or filled once for static scales),
  // follow the pipeline.
  static constexpr std::size_t kScaleBytes = kQuantized ? std::size_t(kStages) * 2 * kTile * sizeof(float) : 0;
  // Per (key group, row) slot: o[kHeadDim], max, sum, weight; plus one lse per row.
  static constexpr std::size_t kMergeBytes = std::size_t(kMaxRows) * (kHeadDim + 4) * sizeof(float);
  static constexpr std::size_t kSmemBytes =
      kPipelineBytes + kScaleBytes > kMergeBytes ? kPipelineBytes + kScaleBytes : kMergeBytes;

  static_assert(kHeadDim % kCopyVec == 0, "head_dim must fill whole 16-byte units");
  static_assert(kHeadDim % kVec == 0, "head_dim must fill whole fragments");
  static_assert(kTile % kGroups == 0, "every key group must see the same number of keys per tile");
  // Above 48 KiB the launcher opts in (cudaFuncAttributeMaxDynamicSharedMemorySize);
  // two blocks per SM must still fit in an sm_80 / sm_90 SM.
  static_assert(kSmemBytes <= 96 * 1024, "two blocks per SM");
};

/// Launch-time values the kernels need besides PagedDecodeParams.
struct DecodeLaunch {
  float* partial_o = nullptr;    ///< [num_splits, rows_total, head_dim]
  float* partial_lse = nullptr;  ///< [num_splits, rows_total]
  std::int64_t rows_total = 0;   ///< batch * q_len * num_q_heads
  std::int64_t chunk_keys = 0;
  int num_splits = 1;
  int row_chunks = 1;
  int rows_per_chunk = 1;
  int group = 1;                 ///< q heads per kv head
  bool async_copy = true;        ///< cache pointers and strides are 16-byte aligned
  /// 1-byte caches: which format the bytes hold, and whether the scales are
  /// per (token, head) (read per key via its slot) or static (read once).
  DecodeKVFormat kv_format = DecodeKVFormat::kFloat;
  bool per_token_scales = false;
};

/// Throws kvkit::Error (naming `where`, the sizes and `remedy`) when the
/// current device cannot give one block `bytes` of dynamic shared memory:
/// the opt-in limit is 227 KiB on sm_90 but 163 KiB on sm_80 / sm_87 and
/// 99 KiB on sm_86 / sm_89, where the launch would otherwise fail with an
/// opaque "invalid argument" from cudaFuncSetAttribute.
inline void check_smem_optin(std::size_t bytes, const char* where, const char* remedy) {
  int device = 0, optin = 0;
  KVKIT_CUDA_CHECK(cudaGetDevice(&device));
  KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (std::size_t(optin) < bytes) {
    fail(where, "the kernel needs ", bytes, " bytes of shared memory per block; this GPU (device ", device,
         ") allows at most ", optin, ": ", remedy);
  }
}

__device__ KVKIT_FORCEINLINE void copy_unit_16(void* smem_dst, const void* global_src, bool async_copy,
                                               int elem_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (async_copy) {
    const unsigned dst = unsigned(__cvta_generic_to_shared(smem_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src));
    return;
  }
#else
  (void)async_copy;
#endif
  // Unaligned cache (odd strides): element-wide copies, synchronous.
  const char* src = static_cast<const char*>(global_src);
  char* dst = static_cast<char*>(smem_dst);
  if (elem_bytes == 4) {
    for (int e = 0; e < 16; e += 4) *reinterpret_cast<float*>(dst + e) = *reinterpret_cast<const float*>(src + e);
  } else if (elem_bytes == 1) {
    for (int e = 0; e < 16; ++e) dst[e] = src[e];
  } else {
    for (int e = 0; e < 16; e += 2) {
      *reinterpret_cast<unsigned short*>(dst + e) = *reinterpret_cast<const unsigned short*>(src + e);
    }
  }
}

/// One float from global to shared memory, asynchronously where cp.async
/// exists (joins the current commit group, like the K/V units).
__device__ KVKIT_FORCEINLINE void copy_float_4(float* smem_dst, const float* global_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = unsigned(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(global_src));
#else
  *smem_dst = *global_src;
#endif
}

__device__ KVKIT_FORCEINLINE void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kPending>
__device__ KVKIT_FORCEINLINE void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

/// Sum over the kLanes lanes of a group (aligned, power-of-two width); every lane gets it.
template <int kLanes>
__device__ KVKIT_FORCEINLINE float group_sum(float x) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

/// Four bytes of a 1-byte cache as floats, exactly (float(stored); the
/// scale is applied by the caller). e5m2 is the top byte of a binary16 and
/// e4m3 converts to binary16 exactly too (sm_89+: one cvt per pair), so
/// both go through cvt.f32.f16; int8 through a signed byte extract.
__device__ KVKIT_FORCEINLINE void dequantize_4(std::uint32_t word, DecodeKVFormat format, float* out) {
  if (format == DecodeKVFormat::kInt8) {
#pragma unroll
    for (int e = 0; e < 4; ++e) out[e] = float(std::int8_t(std::uint8_t(word >> (8 * e))));
    return;
  }
  std::uint32_t pairs[2];  // binary16 x2: bytes (0, 1), (2, 3)
  if (format == DecodeKVFormat::kE5M2) {
    pairs[0] = __byte_perm(word, 0u, 0x1404);  // [0, b0, 0, b1]
    pairs[1] = __byte_perm(word, 0u, 0x3424);  // [0, b2, 0, b3]
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(pairs[0]) : "h"(std::uint16_t(word & 0xffffu)));
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(pairs[1]) : "h"(std::uint16_t(word >> 16)));
#else
#pragma unroll
    for (int e = 0; e < 4; ++e) out[e] = e4m3_bits_to_float(std::uint8_t(word >> (8 * e)));
    return;
#endif
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    out[2 * i] = half_bits_to_float(std::uint16_t(pairs[i] & 0xffffu));
    out[2 * i + 1] = half_bits_to_float(std::uint16_t(pairs[i] >> 16));
  }
}

/// This lane's part of a K or V row in shared memory, as floats (unscaled
/// for a 1-byte cache: the kernel applies the scale per row or per key).
template <class Tr, class KVT>
__device__ KVKIT_FORCEINLINE void load_fragment(const KVT* row, int lane, DecodeKVFormat format,
                                                float (&out)[Tr::kUnitsPerLane][Tr::kVec]) {
#pragma unroll
  for (int u = 0; u < Tr::kUnitsPerLane; ++u) {
    const int unit = lane + u * Tr::kLanes;
    if (unit < Tr::kUnits) {
      if constexpr (Tr::kQuantized) {
        static_assert(Tr::kVec == 8, "a 1-byte fragment is 8 bytes");
        const uint2 raw = reinterpret_cast<const uint2*>(row)[unit];
        dequantize_4(raw.x, format, &out[u][0]);
        dequantize_4(raw.y, format, &out[u][4]);
      } else {
        (void)format;
        union {
          uint4 raw;
          KVT values[Tr::kVec];
        } buf;
        buf.raw = reinterpret_cast<const uint4*>(row)[unit];
#pragma unroll
        for (int e = 0; e < Tr::kVec; ++e) out[u][e] = to_float(buf.values[e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < Tr::kVec; ++e) out[u][e] = 0.0f;
    }
  }
}

template <int kHeadDim, class QT, class KVT>
__global__ void __launch_bounds__(kDecodeThreads, 2)
    paged_decode_kernel(const PagedDecodeParams p, const DecodeLaunch L) {
  using Tr = DecodeTraits<kHeadDim, KVT>;
  constexpr int kVec = Tr::kVec;
  constexpr int kUnits = Tr::kUnits;
  constexpr int kCopyVec = Tr::kCopyVec;
  constexpr int kCopyUnits = Tr::kCopyUnits;
  constexpr int kLanes = Tr::kLanes;
  constexpr int kUPL = Tr::kUnitsPerLane;
  constexpr int kRows = Tr::kRowsPerGroup;
  constexpr int kTile = Tr::kTile;
  constexpr int kStages = Tr::kStages;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kGroups = Tr::kGroups;
  extern __shared__ uint4 smem[];

  // Block -> (sequence, kv head, row chunk, split); splits innermost so that
  // the chunks of one (sequence, kv head) run side by side.
  std::int64_t block = blockIdx.x;
  const int split = int(block % L.num_splits);
  block /= L.num_splits;
  const int row_chunk = int(block % L.row_chunks);
  block /= L.row_chunks;
  const std::int64_t kv_head = block % p.layout.num_heads;
  const std::int64_t b = block / p.layout.num_heads;

  const std::int64_t seq_len = p.page_table.seq_len(b);
  const AttentionKeySpan span = attention_key_span(p, seq_len);
  const std::int64_t span_keys = span.size();
  const int chunks = decode_num_chunks(span_keys, L.chunk_keys, L.num_splits);
  if (split >= chunks) return;
  const std::int64_t key_begin = std::int64_t(split) * L.chunk_keys;  // virtual key index in the span
  const std::int64_t key_end = split == chunks - 1 ? span_keys : key_begin + L.chunk_keys;

  // Query rows of this block: row r is token r / group, q head kv_head * group + r % group.
  const int group = L.group;
  const int row_begin = row_chunk * L.rows_per_chunk;
  const int all_rows = p.q_len * group;
  const int rows = L.rows_per_chunk < all_rows - row_begin ? L.rows_per_chunk : all_rows - row_begin;
  int row_groups = 1;  // lane groups that split the rows; the others split the keys
  while (row_groups * kRows < rows) row_groups *= 2;
  const int key_groups = kGroups / row_groups;
  const int rows_per_group = (rows + row_groups - 1) / row_groups;
  const int tid = threadIdx.x;
  const int lane = tid % kLanes;
  const int grp = tid / kLanes;
  const int rg = grp % row_groups;
  const int kg = grp / row_groups;

  float q[kRows][kUPL][kVec];
  float acc[kRows][kUPL][kVec];
  OnlineSoftmax softmax[kRows];
  std::int64_t q_pos[kRows];
  bool active[kRows];
  const QT* q_base = static_cast<const QT*>(p.q);
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int local = rg + i * row_groups;
    active[i] = i < rows_per_group && local < rows;
    const int r = row_begin + (active[i] ? local : 0);
    const std::int64_t token = r / group;
    const std::int64_t head = kv_head * group + r % group;
    q_pos[i] = seq_len - p.q_len + token;
    const QT* src = q_base + (b * p.q_len + token) * p.q_stride_token + head * p.q_stride_head;
#pragma unroll
    for (int u = 0; u < kUPL; ++u) {
      const int unit = lane + u * kLanes;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        q[i][u][e] = active[i] && unit < kUnits ? to_float(src[unit * kVec + e]) : 0.0f;
        acc[i][u][e] = 0.0f;
      }
    }
  }
  // Causal and window limits of the whole block, for the all-visible test of a tile.
  const std::int64_t q_pos_lo = seq_len - p.q_len + row_begin / group;
  const std::int64_t q_pos_hi = seq_len - p.q_len + (row_begin + rows - 1) / group;

  const std::int32_t* pages = p.page_table.pages(b);
  const KVT* k_cache = static_cast<const KVT*>(p.k_cache);
  const KVT* v_cache = static_cast<const KVT*>(p.v_cache);
  KVT* stages = reinterpret_cast<KVT*>(smem);  // [kStages][K, V][kTile][kHeadDim]
  // 1-byte caches: value = float(stored) * scale, the scales of each key in
  // tile_scales [kStages][K, V][kTile]. Per-(token, head) scales travel with
  // their tile (found through each key's slot); static ones (per tensor, per
  // head) fill every entry once here, so that the key loop reads both kinds
  // the same way and keeps no scale in registers. The pipeline's first
  // __syncthreads orders these stores before any read.
  float* tile_scales = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + Tr::kPipelineBytes);
  if constexpr (Tr::kQuantized) {
    if (!L.per_token_scales) {
      const std::int64_t si = scale_index(p.kv_scale_granularity, 0, kv_head, p.layout.num_heads);
      const float ks = p.k_scale[si];
      const float vs = p.v_scale[si];
      for (int x = tid; x < kStages * 2 * kTile; x += kThreads) tile_scales[x] = (x / kTile) % 2 == 0 ? ks : vs;
    }
  }
  const std::int64_t num_tiles = (key_end - key_begin + kTile - 1) / kTile;

  const auto load_tile = [&](std::int64_t tile) {
    const std::int64_t first = key_begin + tile * kTile;
    const int n = key_end - first < kTile ? int(key_end - first) : kTile;
    KVT* dst_k = stages + std::size_t(tile % kStages) * 2 * kTile * kHeadDim;
    KVT* dst_v = dst_k + kTile * kHeadDim;
    constexpr int kWork = 2 * kTile * kCopyUnits;  // K units, then V units
#pragma unroll
    for (int it = 0; it < (kWork + kThreads - 1) / kThreads; ++it) {
      const int u = tid + it * kThreads;
      const bool is_v = u >= kTile * kCopyUnits;
      const int w = is_v ? u - kTile * kCopyUnits : u;
      const int j = w / kCopyUnits;
      const int unit = w - j * kCopyUnits;
      if (u < kWork && j < n) {
        const std::int64_t pos = span.position(first + j);
        const std::int64_t slot = token_slot(pages, pos, p.layout.page_shift);
        const std::int64_t off = p.layout.slot_offset(slot, kv_head) + unit * kCopyVec;
        copy_unit_16((is_v ? dst_v : dst_k) + j * kHeadDim + unit * kCopyVec, (is_v ? v_cache : k_cache) + off,
                     L.async_copy, int(sizeof(KVT)));
        if constexpr (Tr::kQuantized) {
          if (L.per_token_scales && unit == 0) {
            float* dst_s = tile_scales + (std::size_t(tile % kStages) * 2 + (is_v ? 1 : 0)) * kTile + j;
            copy_float_4(dst_s, (is_v ? p.v_scale : p.k_scale) + slot * p.layout.num_heads + kv_head);
          }
        }
      }
    }
  };

  const auto compute_tile = [&](std::int64_t tile) {
    const std::int64_t first = key_begin + tile * kTile;
    const int n = key_end - first < kTile ? int(key_end - first) : kTile;
    const KVT* tk = stages + std::size_t(tile % kStages) * 2 * kTile * kHeadDim;
    const KVT* tv = tk + kTile * kHeadDim;
    const float* tks = tile_scales + std::size_t(tile % kStages) * 2 * kTile;
    const float* tvs = tks + kTile;
    const std::int64_t pos_first = span.position(first);
    const std::int64_t pos_last = span.position(first + n - 1);
    // Most tiles are visible to every row: skip the per-row mask there.
    const bool all_visible = attention_keys_all_visible(p, q_pos_lo, q_pos_hi, pos_first, pos_last);
    // Every key group runs kTile / key_groups iterations, so the shuffles
    // below see whole warps even when the tile is partly empty.
    for (int j = kg; j < kTile; j += key_groups) {
      float kf[kUPL][kVec];
      load_fragment<Tr>(tk + j * kHeadDim, lane, L.kv_format, kf);
      float s[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        s[i] = 0.0f;
        if (i < rows_per_group) {
#pragma unroll
          for (int u = 0; u < kUPL; ++u) {
#pragma unroll
            for (int e = 0; e < kVec; ++e) s[i] = fmaf(q[i][u][e], kf[u][e], s[i]);
          }
          s[i] = group_sum<kLanes>(s[i]);
        }
      }
      if (j >= n) continue;  // no shuffles below
      const std::int64_t pos = span.position(first + j);
      float vf[kUPL][kVec];
      load_fragment<Tr>(tv + j * kHeadDim, lane, L.kv_format, vf);
      // The key's scale multiplies its score, the value's its weight in o
      // (not the softmax sum): one product per row instead of per element.
      float ks = 1.0f, vs = 1.0f;
      if constexpr (Tr::kQuantized) {
        ks = tks[j];
        vs = tvs[j];
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        if (!active[i] || !(all_visible || attention_visible(p, q_pos[i], pos))) continue;
        const float logit = attention_logit(p, Tr::kQuantized ? s[i] * ks : s[i]);
        const float factor = softmax[i].rescale_for(logit);
        const float w = expf(logit - softmax[i].max);
        softmax[i].sum += w;
        const float wv = Tr::kQuantized ? w * vs : w;
#pragma unroll
        for (int u = 0; u < kUPL; ++u) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[i][u][e] = fmaf(acc[i][u][e], factor, wv * vf[u][e]);
        }
      }
    }
  };

  // Three-stage pipeline: tiles t+1 and t+2 are in flight while t is used.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) load_tile(s);
    cp_async_commit();
  }
  for (std::int64_t tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile is in shared memory, and every thread is done with tile - 1's stage
    if (tile + kStages - 1 < num_tiles) load_tile(tile + kStages - 1);
    cp_async_commit();
    compute_tile(tile);
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages become the merge scratch

  // Merge the key groups' states of each row.
  float* slot_o = reinterpret_cast<float*>(smem);              // [key_groups * rows][kHeadDim]
  float* slot_max = slot_o + std::size_t(key_groups) * rows * kHeadDim;  // [key_groups * rows]
  float* slot_sum = slot_max + key_groups * rows;
  float* slot_w = slot_sum + key_groups * rows;
  float* row_lse = slot_w + key_groups * rows;                 // [rows]
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    if (!active[i]) continue;
    const int slot = kg * rows + rg + i * row_groups;
#pragma unroll
    for (int u = 0; u < kUPL; ++u) {
      const int unit = lane + u * kLanes;
      if (unit >= kUnits) continue;
#pragma unroll
      for (int e = 0; e < kVec; ++e) slot_o[std::size_t(slot) * kHeadDim + unit * kVec + e] = acc[i][u][e];
    }
    if (lane == 0) {
      slot_max[slot] = softmax[i].max;
      slot_sum[slot] = softmax[i].sum;
    }
  }
  __syncthreads();
  for (int r = tid; r < rows; r += kThreads) {
    float m = -INFINITY;
    for (int g = 0; g < key_groups; ++g) {
      if (slot_sum[g * rows + r] > 0.0f) m = fmaxf(m, slot_max[g * rows + r]);
    }
    OnlineSoftmax total;
    total.max = m;
    for (int g = 0; g < key_groups; ++g) {
      const float sum = slot_sum[g * rows + r];
      const float scale = sum > 0.0f ? expf(slot_max[g * rows + r] - m) : 0.0f;
      slot_w[g * rows + r] = scale;
      total.sum += scale * sum;
    }
    const float inv = total.sum > 0.0f ? 1.0f / total.sum : 0.0f;
    for (int g = 0; g < key_groups; ++g) slot_w[g * rows + r] *= inv;
    row_lse[r] = total.lse();
  }
  __syncthreads();
  const bool final_output = chunks == 1;
  QT* o_base = static_cast<QT*>(p.o);
  for (int x = tid; x < rows * kHeadDim; x += kThreads) {
    const int r = x / kHeadDim;
    const int d = x - r * kHeadDim;
    float value = 0.0f;
    for (int g = 0; g < key_groups; ++g) {
      value += slot_w[g * rows + r] * slot_o[std::size_t(g * rows + r) * kHeadDim + d];
    }
    const int row = row_begin + r;
    const std::int64_t t = b * p.q_len + row / group;
    const std::int64_t head = kv_head * group + row % group;
    const std::int64_t row_id = t * p.num_q_heads + head;
    if (final_output) {
      o_base[t * p.o_stride_token + head * p.o_stride_head + d] = from_float<QT>(value);
      if (d == 0 && p.lse != nullptr) p.lse[row_id] = row_lse[r];
    } else {
      const std::int64_t state = std::int64_t(split) * L.rows_total + row_id;
      L.partial_o[state * kHeadDim + d] = value;
      if (d == 0) L.partial_lse[state] = row_lse[r];
    }
  }
}

/// Merges the chunks of each split row into o/lse; rows of sequences that
/// needed one chunk were written by the decode kernel and are skipped.
template <class QT>
__global__ void __launch_bounds__(kMergeThreads)
    decode_merge_kernel(const PagedDecodeParams p, const DecodeLaunch L) {
  const std::int64_t row_id = std::int64_t(blockIdx.x) * kMergeRowsPerBlock + threadIdx.x / 32;
  if (row_id >= L.rows_total) return;
  const std::int64_t t = row_id / p.num_q_heads;
  const std::int64_t head = row_id - t * p.num_q_heads;
  const std::int64_t b = t / p.q_len;
  const AttentionKeySpan span = attention_key_span(p, p.page_table.seq_len(b));
  const int chunks = decode_num_chunks(span.size(), L.chunk_keys, L.num_splits);
  if (chunks == 1) return;
  const int head_dim = int(p.layout.head_dim);
  QT* out = static_cast<QT*>(p.o) + t * p.o_stride_token + head * p.o_stride_head;
  const float lse = merge_row(L.partial_o + row_id * head_dim, L.rows_total * head_dim,
                              L.partial_lse + row_id, L.rows_total, chunks, head_dim,
                              [&](int d, float v) { out[d] = from_float<QT>(v); });
  if ((threadIdx.x & 31) == 0 && p.lse != nullptr) p.lse[row_id] = lse;
}

}  // namespace detail

/// Runs decode attention on `stream` as planned: writes o (and lse if
/// requested) for every query row, like kvkit::paged_decode_attention. All
/// pointers in `p` are device pointers; `workspace` (device memory, at least
/// plan.workspace_bytes, 4-byte aligned; may be null when that is 0) holds
/// the split partial states. Neither allocates nor synchronizes, so it can
/// be captured in a CUDA graph. Throws kvkit::Error (launching nothing) on
/// invalid params, a plan made for another shape, or a missing or too small
/// workspace; or a failed launch.
inline void run_decode(const PagedDecodeParams& p, const DecodePlan& plan, void* workspace,
                              std::size_t workspace_bytes, cudaStream_t stream = nullptr) {
  constexpr const char* kWhere = "kvkit::cuda::run_decode";
  detail::validate_cuda_decode_shapes(p, kWhere);
  const bool same_shape = plan.batch_size == p.page_table.batch_size && plan.q_len == p.q_len &&
                          plan.num_q_heads == p.num_q_heads && plan.num_kv_heads == p.layout.num_heads &&
                          plan.head_dim == p.layout.head_dim && plan.q_dtype == p.q_dtype &&
                          plan.kv_dtype == p.kv_dtype;
  if (!same_shape) {
    fail(kWhere, "the plan was made for batch ", plan.batch_size, ", q_len ", plan.q_len, ", ",
         plan.num_q_heads, "/", plan.num_kv_heads, " heads, head_dim ", plan.head_dim, ", ", plan.q_dtype,
         "/", plan.kv_dtype, "; expected the same as params (batch ", p.page_table.batch_size, ", q_len ",
         p.q_len, ", ", p.num_q_heads, "/", p.layout.num_heads, " heads, head_dim ", p.layout.head_dim,
         ", ", p.q_dtype, "/", p.kv_dtype, "): call plan_decode again");
  }
  check_argument(plan.num_splits >= 1 && plan.num_splits <= kMaxDecodeSplits &&
                     (plan.num_splits == 1 || plan.chunk_keys > 0) && plan.row_chunks >= 1 &&
                     std::int64_t(plan.row_chunks) * plan.rows_per_chunk >=
                         std::int64_t(p.q_len) * (p.num_q_heads / p.layout.num_heads) &&
                     plan.rows_per_chunk <= detail::decode_rows_per_block(p.layout.head_dim, p.kv_dtype),
                 kWhere, "plan.num_splits", plan.num_splits, "a plan made by plan_decode");
  const std::int64_t rows_total = p.page_table.batch_size * p.q_len * p.num_q_heads;
  if (plan.num_splits > 1) detail::check_workspace(workspace, workspace_bytes, plan.workspace_bytes, kWhere);
  if (rows_total == 0) return;

  detail::DecodeLaunch L;
  L.rows_total = rows_total;
  L.chunk_keys = plan.num_splits > 1 ? plan.chunk_keys : 0;
  L.num_splits = plan.num_splits;
  L.row_chunks = plan.row_chunks;
  L.rows_per_chunk = plan.rows_per_chunk;
  L.group = p.num_q_heads / int(p.layout.num_heads);
  if (plan.num_splits > 1) {
    L.partial_o = static_cast<float*>(workspace);
    L.partial_lse = L.partial_o + std::size_t(plan.num_splits) * std::size_t(rows_total) * std::size_t(plan.head_dim);
  }
  const std::uint64_t es = dtype_size(p.kv_dtype);
  L.kv_format = detail::decode_kv_format(p.kv_dtype);
  L.per_token_scales = L.kv_format != detail::DecodeKVFormat::kFloat &&
                       p.kv_scale_granularity == ScaleGranularity::kPerTokenHead;
  L.async_copy = detail::copy_unit_bytes({detail::address_of(p.k_cache), detail::address_of(p.v_cache),
                                          std::uint64_t(p.layout.stride_page) * es,
                                          std::uint64_t(p.layout.stride_slot) * es,
                                          std::uint64_t(p.layout.stride_head) * es}) == 16;
  const std::int64_t blocks = p.page_table.batch_size * p.layout.num_heads * plan.row_chunks * plan.num_splits;
  detail::dispatch_decode(p.layout.head_dim, p.q_dtype, p.kv_dtype, kWhere, [&](auto dim, auto qtag, auto kvtag) {
    using QT = typename decltype(qtag)::type;
    using KVT = typename decltype(kvtag)::type;
    using Tr = detail::DecodeTraits<decltype(dim)::value, KVT>;
    const auto kernel = detail::paged_decode_kernel<decltype(dim)::value, QT, KVT>;
    if constexpr (Tr::kSmemBytes > 48 * 1024) {
      // Not a stream operation: allowed while a graph is being captured.
      KVKIT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            int(Tr::kSmemBytes)));
    }
    kernel<<<unsigned(blocks), Tr::kThreads, Tr::kSmemBytes, stream>>>(p, L);
    if (plan.num_splits > 1) {
      detail::decode_merge_kernel<QT>
          <<<detail::merge_blocks(rows_total), detail::kMergeThreads, 0, stream>>>(p, L);
    }
  });
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace kvkit::cuda
