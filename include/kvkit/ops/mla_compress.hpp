#pragma once
/// @file mla_compress.hpp
/// MLA compress on the CPU, fused: from the engine's GEMM output
/// kv_a = h · W_DKV ([num_tokens, kv_lora_rank + rope_dim]), write to the
/// latent cache row of each token's slot
///   [ RMSNorm(kv_a[:, :rank]) * weight | RoPE(kv_a[:, rank:], position) ]
/// in one pass. k_pe is rotated with the pairing of the config's RoPE (DeepSeek's
/// official weights: interleaved, RopeStyle::kGptJ; see docs/rope.md).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kvkit/core/dispatch.hpp"
#include "kvkit/core/x86_dispatch.hpp"
#include "kvkit/layout/latent_kv_layout.hpp"
#include "kvkit/ops/append.hpp"
#include "kvkit/ops/rope.hpp"
#include "kvkit/ops/token_chunks.hpp"

namespace kvkit {

struct MlaCompressArgs {
  const void* kv_a = nullptr;                  ///< [num_tokens, kv_lora_rank + rope_dim] (strided rows)
  std::int64_t kv_a_stride_token = 0;          ///< elements between rows
  const float* norm_weight = nullptr;          ///< [kv_lora_rank] RMSNorm weight of c_kv
  float norm_eps = 1e-6f;
  const std::int64_t* positions = nullptr;     ///< [num_tokens]
  const std::int64_t* slot_mapping = nullptr;  ///< [num_tokens]; < 0: padding (skipped)
  std::int64_t num_tokens = 0;
  void* cache = nullptr;                       ///< latent cache, laid out by the LatentKVLayout
  DType dtype = DType::kBFloat16;              ///< of kv_a and the cache
  RopeStyle rope_style = RopeStyle::kGptJ;
  const float* cos_sin_cache = nullptr;        ///< [cache_positions, rope_dim] (RopeCache)
  std::int64_t cache_positions = 0;
  int cache_rotary_dim = 0;                    ///< RopeCache::rotary_dim(): checked against rope_dim when > 0
};

namespace detail {

/// The RoPE parameters that rotate k_pe of the latent row (one "head").
inline RopeParams mla_kpe_rope(const LatentKVLayout& layout, const MlaCompressArgs& a) {
  RopeParams r;
  r.k = a.cache;
  r.num_k_heads = 1;
  r.k_head_stride = layout.rope_dim;
  r.positions = a.positions;
  r.num_tokens = a.num_tokens;
  r.head_dim = int(layout.rope_dim);
  r.rotary_dim = int(layout.rope_dim);
  r.style = a.rope_style;
  r.dtype = a.dtype;
  r.cos_sin_cache = a.cos_sin_cache;
  r.cache_positions = a.cache_positions;
  r.cache_rotary_dim = a.cache_rotary_dim;
  return r;
}

/// Checks everything that does not need to read positions or slots.
inline void validate_mla_compress(const LatentKVLayout& layout, const MlaCompressArgs& a,
                                  const char* where) {
  layout.validate(where);
  check_argument(a.num_tokens >= 0, where, "num_tokens", a.num_tokens, ">= 0");
  check_argument(a.norm_eps > 0.0f, where, "norm_eps", a.norm_eps, "> 0");
  check_argument(a.kv_a_stride_token >= layout.row_elements() || a.num_tokens <= 1, where,
                 "kv_a_stride_token", a.kv_a_stride_token, ">= kv_lora_rank + rope_dim (",
                 layout.row_elements(), ")");
  check_argument(a.cos_sin_cache != nullptr, where, "cos_sin_cache", a.cos_sin_cache,
                 "a cos/sin table [positions, rope_dim] (RopeCache::data())");
  dispatch_dtype<FloatTypes>(a.dtype, where, "dtype", [](auto) {});
  if (a.num_tokens == 0) return;
  check_pointer(a.kv_a, true, a.dtype, where, "kv_a");
  check_pointer(a.cache, true, a.dtype, where, "cache");
  check_pointer(a.slot_mapping, true, DType::kInt64, where, "slot_mapping");
  check_argument(a.norm_weight != nullptr, where, "norm_weight", a.norm_weight, "a non-null pointer");
  validate_rope_params(mla_kpe_rope(layout, a), where, /*check_token_rows=*/false);
}

/// Compresses tokens [first, end): RMSNorm of c_kv, then k_pe copied and
/// rotated, into `scratch` (one row, in L1), which is then copied to the
/// slot's row, with streaming stores for a large cache (a row written in
/// place pays a read-for-ownership of every line; see streaming_copy.hpp).
/// Always inlined, so that each ISA variant below compiles it for its own
/// vectors. Every ISA gives the same bytes: the sum of squares keeps sixteen
/// lanes in a fixed order, and no variant may contract x * x + s into an FMA
/// (the AVX2 target has none).
template <class T, bool kStreaming>
KVKIT_FORCEINLINE void mla_compress_tokens(const LatentKVLayout& layout, const MlaCompressArgs& a,
                                           const RopeParams& rope, std::int64_t first, std::int64_t end,
                                           T* __restrict__ scratch, float* cos_row, float* sin_row) {
  const int rank = int(layout.kv_lora_rank), rope_dim = int(layout.rope_dim);
  T* cache = static_cast<T*>(a.cache);
  const float* __restrict__ weight = a.norm_weight;
  for (std::int64_t t = first; t < end; ++t) {
    const std::int64_t slot = a.slot_mapping[t];
    if (slot < 0) continue;
    const T* __restrict__ src = static_cast<const T*>(a.kv_a) + t * a.kv_a_stride_token;
    // Sixteen partial sums so the loop vectorizes (a single running sum is a
    // serial dependency compilers may not reorder), folded in a fixed order.
    float lanes[16] = {};
    int c0 = 0;
    for (; c0 + 16 <= rank; c0 += 16) {
      for (int l = 0; l < 16; ++l) {
        const float x = to_float(src[c0 + l]);
        lanes[l] += x * x;
      }
    }
    for (int l = 0; l < 8; ++l) lanes[l] += lanes[l + 8];
    float sum_sq = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for (; c0 < rank; ++c0) sum_sq += to_float(src[c0]) * to_float(src[c0]);
    const float inv_rms = 1.0f / std::sqrt(sum_sq / float(rank) + a.norm_eps);
    for (int c = 0; c < rank; ++c) scratch[c] = from_float<T>(to_float(src[c]) * inv_rms * weight[c]);
    std::memcpy(scratch + rank, src + rank, sizeof(T) * std::size_t(rope_dim));
    load_cos_sin_row(rope, a.positions[t], cos_row, sin_row);
    rotate_heads(scratch + rank, rope_dim, 1, rope, cos_row, sin_row);
    copy_row<kStreaming>(cache + layout.slot_offset(slot), scratch, sizeof(T) * std::size_t(rank + rope_dim));
  }
  if (kStreaming) streaming_store_fence();
}

template <class T>
KVKIT_FORCEINLINE void run_mla_compress_tokens(const LatentKVLayout& layout, const MlaCompressArgs& a,
                                               const RopeParams& rope, std::int64_t first, std::int64_t end,
                                               T* scratch, float* cos_row, float* sin_row, bool streaming) {
  if (streaming) {
    mla_compress_tokens<T, true>(layout, a, rope, first, end, scratch, cos_row, sin_row);
  } else {
    mla_compress_tokens<T, false>(layout, a, rope, first, end, scratch, cos_row, sin_row);
  }
}

/// Compresses tokens [first, end) with the widest ISA the CPU has, up to
/// AVX2 (8 lanes without FMA: bf16 and fp16 rows widen and narrow in vectors).
template <class T>
void mla_compress_range(const LatentKVLayout& layout, const MlaCompressArgs& a, const RopeParams& rope,
                        std::int64_t first, std::int64_t end, bool streaming) {
  std::vector<T> scratch(static_cast<std::size_t>(layout.row_elements()));
  std::vector<float> cos_sin(static_cast<std::size_t>(layout.rope_dim));
  run_loop_on_widest_isa<X86Level::kAvx2, &run_mla_compress_tokens<T>>(
      layout, a, rope, first, end, scratch.data(), cos_sin.data(), cos_sin.data() + layout.rope_dim / 2,
      streaming);
}

/// mla_compress with the stores chosen by `stores` (tests force each kind).
inline void mla_compress_with(const LatentKVLayout& layout, const MlaCompressArgs& a, StoreKind stores) {
  constexpr const char* kWhere = "kvkit::mla_compress";
  validate_mla_compress(layout, a, kWhere);
  if (a.num_tokens == 0) return;
  const RopeParams rope = mla_kpe_rope(layout, a);
  check_positions(rope, kWhere, /*allow_negative=*/false);
  check_slots(a.slot_mapping, a.num_tokens, layout.num_slots(), kWhere);
  dispatch_dtype<FloatTypes>(a.dtype, kWhere, "dtype", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const std::int64_t cache_bytes = layout.num_slots() * layout.row_elements() * std::int64_t(sizeof(T));
    const bool streaming = use_streaming_stores(stores, cache_bytes);
    for_each_token_chunk(a.num_tokens, /*chunk=*/64, /*min_tokens_to_thread=*/65,
                         [&](std::int64_t first, std::int64_t end) {
                           mla_compress_range<T>(layout, a, rope, first, end, streaming);
                         });
  });
}

}  // namespace detail

/// Fused MLA compress (see the file comment). Throws kvkit::Error before
/// writing anything on bad input, a negative position or one beyond the
/// table, or a slot >= the cache's slots. Tokens are shared among OpenMP
/// threads where the program enables OpenMP (with duplicate slots, which
/// token's row lands is unspecified, as on the GPU). A cache of at least
/// kStreamingStoreMinCacheBytes is written with streaming stores, as append_latent.
inline void mla_compress(const LatentKVLayout& layout, const MlaCompressArgs& a) {
  detail::mla_compress_with(layout, a, detail::StoreKind::kAuto);
}

}  // namespace kvkit
