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
#include <vector>

#include "kvkit/core/dispatch.hpp"
#include "kvkit/layout/latent_kv_layout.hpp"
#include "kvkit/ops/append.hpp"
#include "kvkit/ops/rope.hpp"

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
  validate_rope_params(mla_kpe_rope(layout, a), where);
}

}  // namespace detail

/// Fused MLA compress (see the file comment). Throws kvkit::Error before
/// writing anything on bad input, a negative position or one beyond the
/// table, or a slot >= the cache's slots.
inline void mla_compress(const LatentKVLayout& layout, const MlaCompressArgs& a) {
  constexpr const char* kWhere = "kvkit::mla_compress";
  detail::validate_mla_compress(layout, a, kWhere);
  if (a.num_tokens == 0) return;
  const RopeParams rope = detail::mla_kpe_rope(layout, a);
  detail::check_positions(rope, kWhere, /*allow_negative=*/false);
  detail::check_slots(a.slot_mapping, a.num_tokens, layout.num_slots(), kWhere);
  dispatch_dtype<FloatTypes>(a.dtype, kWhere, "dtype", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int rank = int(layout.kv_lora_rank), rope_dim = int(layout.rope_dim);
    std::vector<float> cos_row(static_cast<std::size_t>(rope_dim / 2)), sin_row(cos_row.size());
    T* cache = static_cast<T*>(a.cache);
    for (std::int64_t t = 0; t < a.num_tokens; ++t) {
      const std::int64_t slot = a.slot_mapping[t];
      if (slot < 0) continue;
      const T* src = static_cast<const T*>(a.kv_a) + t * a.kv_a_stride_token;
      T* row = cache + layout.slot_offset(slot);
      // Eight partial sums so the loop vectorizes (a single running sum is a
      // serial dependency compilers may not reorder).
      float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int c0 = 0;
      for (; c0 + 8 <= rank; c0 += 8) {
        for (int l = 0; l < 8; ++l) {
          const float x = to_float(src[c0 + l]);
          lanes[l] += x * x;
        }
      }
      float sum_sq = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
      for (; c0 < rank; ++c0) sum_sq += to_float(src[c0]) * to_float(src[c0]);
      const float inv_rms = 1.0f / std::sqrt(sum_sq / float(rank) + a.norm_eps);
      for (int c = 0; c < rank; ++c) row[c] = from_float<T>(to_float(src[c]) * inv_rms * a.norm_weight[c]);
      for (int c = 0; c < rope_dim; ++c) row[rank + c] = src[rank + c];
      detail::load_cos_sin_row(rope, a.positions[t], cos_row.data(), sin_row.data());
      detail::rotate_heads(row + rank, rope_dim, 1, rope, cos_row.data(), sin_row.data());
    }
  });
}

}  // namespace kvkit
