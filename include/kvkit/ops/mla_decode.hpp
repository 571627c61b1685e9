#pragma once
/// @file mla_decode.hpp
/// MLA absorbed decode on the CPU (DeepSeek-V2 section 2.1.3; FlashMLA's
/// formulation): with q_lat[h] = W_UK[h]ᵀ q_nope[h], attention over the latent
/// cache is one MQA problem whose keys are the 576-wide rows [c_kv | k_pe]
/// and whose values are their first 512 elements, c_kv, read from the same
/// storage; every cached token is read once for all heads. The output
/// o_lat[h] (512 wide) becomes the head's output through W_UV[h].
///
/// The attention itself is paged_decode_attention with the parameters from
/// mla_decode_params; the two projections are the engine's GEMMs (batched per
/// head). mla_absorb_query and mla_project_output are plain CPU loops for
/// tests and examples.
///
/// The fp8 latent cache (FlashMLA's 656-byte rows, layout/latent_fp8_layout.hpp)
/// is described by the same PagedDecodeParams (mla_decode_params_fp8:
/// kv_dtype = kFloat8E4M3, layout addressed in bytes); mla_decode_attention
/// runs either kind of cache on the CPU, dequantizing fp8 rows on the fly.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kvkit/layout/latent_fp8_layout.hpp"
#include "kvkit/layout/latent_kv_layout.hpp"
#include "kvkit/ops/attention_decode.hpp"
#include "kvkit/ops/attention_state.hpp"
#include "kvkit/ops/mla_config.hpp"

namespace kvkit {

/// Decode parameters over a latent cache: one kv head of latent_dim (576)
/// for the keys, values = the first kv_lora_rank (512) elements of each row,
/// softmax scale from the config. The caller sets q ([rows, n_heads, 576]:
/// q_lat | rotated q_pe per head), o ([rows, n_heads, 512]), the page table,
/// q_len, and optionally lse, kv_begin/kv_end (split-KV).
inline PagedDecodeParams mla_decode_params(const MlaConfig& config, const LatentKVLayout& layout,
                                           const void* cache, DType cache_dtype) {
  constexpr const char* kWhere = "kvkit::mla_decode_params";
  config.validate(kWhere);
  layout.validate(kWhere);
  check_argument(layout.kv_lora_rank == config.kv_lora_rank, kWhere, "layout.kv_lora_rank",
                 layout.kv_lora_rank, "the config's kv_lora_rank (", config.kv_lora_rank, ")");
  check_argument(layout.rope_dim == config.qk_rope_head_dim, kWhere, "layout.rope_dim", layout.rope_dim,
                 "the config's qk_rope_head_dim (", config.qk_rope_head_dim, ")");
  PagedDecodeParams p;
  p.layout = layout.as_paged();
  p.k_cache = cache;
  p.v_cache = cache;
  p.v_head_dim = config.kv_lora_rank;
  p.kv_dtype = cache_dtype;
  p.num_q_heads = config.n_heads;
  p.sm_scale = config.softmax_scale();
  return p;
}

/// Decode parameters over an fp8 latent cache (656-byte rows): as
/// mla_decode_params, with kv_dtype = DType::kFloat8E4M3 meaning "FlashMLA's
/// row format" and layout = fp8_layout.as_decode_keys() (one kv head of 576,
/// strides in bytes). Only mla_decode_attention (CPU) and
/// cuda::run_mla_decode accept these params; paged_decode_attention does not.
/// Throws kvkit::Error unless the config is kv_lora_rank 512 + rope 64.
inline PagedDecodeParams mla_decode_params_fp8(const MlaConfig& config, const LatentFp8Layout& layout,
                                               const std::uint8_t* cache) {
  constexpr const char* kWhere = "kvkit::mla_decode_params_fp8";
  config.validate(kWhere);
  layout.validate(kWhere);
  check_argument(config.kv_lora_rank == MlaFp8Row::kRank && config.qk_rope_head_dim == MlaFp8Row::kRopeDim,
                 kWhere, "config.kv_lora_rank", config.kv_lora_rank,
                 "512 with qk_rope_head_dim 64 (the fp8 row format; got rope ", config.qk_rope_head_dim, ")");
  PagedDecodeParams p;
  p.layout = layout.as_decode_keys();
  p.k_cache = cache;
  p.v_cache = cache;
  p.v_head_dim = MlaFp8Row::kRank;
  p.kv_dtype = DType::kFloat8E4M3;
  p.num_q_heads = config.n_heads;
  p.sm_scale = config.softmax_scale();
  return p;
}

namespace detail {

/// Checks of an fp8-latent decode call beyond the generic ones (which it runs
/// with the cache dtype masked, since paged_decode_attention has no fp8
/// rows): one kv head of 576, values 512 wide, rows of >= 656 bytes, 4-byte
/// aligned. `check_lengths`: also read the page table (host memory).
inline void validate_mla_fp8_decode(const PagedDecodeParams& p, const char* where, bool check_lengths) {
  reject_ragged_queries(p, where);
  PagedDecodeParams generic = p;
  generic.kv_dtype = DType::kBFloat16;
  if (check_lengths) {
    validate_decode_params(generic, where);
  } else {
    validate_decode_shapes(generic, where);
  }
  check_argument(p.layout.num_heads == 1 && p.layout.head_dim == MlaFp8Row::kLatentDim, where, "layout.head_dim",
                 p.layout.head_dim, "576 with one kv head for an fp8 latent cache (got ", p.layout.num_heads,
                 " heads)");
  check_argument(p.v_head_dim == MlaFp8Row::kRank, where, "v_head_dim", p.v_head_dim,
                 "512 (c_kv) for an fp8 latent cache");
  check_argument(p.layout.stride_slot >= MlaFp8Row::kBytes && p.layout.stride_slot % 4 == 0 &&
                     p.layout.stride_page % 4 == 0,
                 where, "layout.stride_slot", p.layout.stride_slot,
                 ">= 656 bytes and, like stride_page (", p.layout.stride_page, "), a multiple of 4 (fp8 rows)");
}

}  // namespace detail

/// Absorbed MLA decode attention on the CPU over a latent cache of either
/// kind: kv_dtype float32/float16/bfloat16 (params from mla_decode_params;
/// the same as paged_decode_attention) or kFloat8E4M3 (params from
/// mla_decode_params_fp8; rows dequantized on the fly, every other feature
/// — q_len, masks, soft-cap, kv_begin/kv_end, lse — as paged_decode_attention).
/// Throws kvkit::Error before writing anything on bad input.
inline void mla_decode_attention(const PagedDecodeParams& p) {
  constexpr const char* kWhere = "kvkit::mla_decode_attention";
  if (p.kv_dtype != DType::kFloat8E4M3) {
    paged_decode_attention(p);
    return;
  }
  detail::validate_mla_fp8_decode(p, kWhere, true);
  // The generic CPU decode with a tile loader for the 656-byte rows: the
  // same vector kernels, ISA dispatch and threads.
  detail::decode_all_sequences<detail::DecodeRows::kFloatTiles>(p, true);
}

/// q_lat[t, h, :] = W_UK[h]ᵀ q_nope[t, h, :]: [tokens, n_heads, qk_nope] ->
/// [tokens, n_heads, kv_lora_rank] (written with row stride out_stride_token).
/// w_uk: [n_heads, qk_nope, kv_lora_rank] (see mla_split_wkv_b). Reference loops.
inline void mla_absorb_query(const MlaConfig& c, const float* q_nope, std::int64_t tokens,
                             const float* w_uk, float* q_lat, std::int64_t out_stride_token,
                             std::int64_t out_stride_head) {
  for (std::int64_t t = 0; t < tokens; ++t)
    for (int h = 0; h < c.n_heads; ++h) {
      float* out = q_lat + t * out_stride_token + h * out_stride_head;
      for (int k = 0; k < c.kv_lora_rank; ++k) out[k] = 0.0f;
      const float* qn = q_nope + (t * c.n_heads + h) * c.qk_nope_head_dim;
      for (int d = 0; d < c.qk_nope_head_dim; ++d) {
        const float* w = w_uk + (std::int64_t(h) * c.qk_nope_head_dim + d) * c.kv_lora_rank;
        for (int k = 0; k < c.kv_lora_rank; ++k) out[k] += qn[d] * w[k];
      }
    }
}

/// o[t, h, :] = W_UV[h] o_lat[t, h, :]: [tokens, n_heads, kv_lora_rank] ->
/// [tokens, n_heads, v_head_dim]. w_uv: [n_heads, v_head_dim, kv_lora_rank]. Reference loops.
inline void mla_project_output(const MlaConfig& c, const float* o_lat, std::int64_t lat_stride_token,
                               std::int64_t lat_stride_head, std::int64_t tokens, const float* w_uv,
                               float* o) {
  for (std::int64_t t = 0; t < tokens; ++t)
    for (int h = 0; h < c.n_heads; ++h) {
      const float* x = o_lat + t * lat_stride_token + h * lat_stride_head;
      for (int d = 0; d < c.v_head_dim; ++d) {
        const float* w = w_uv + (std::int64_t(h) * c.v_head_dim + d) * c.kv_lora_rank;
        float sum = 0.0f;
        for (int k = 0; k < c.kv_lora_rank; ++k) sum += w[k] * x[k];
        o[(t * c.n_heads + h) * c.v_head_dim + d] = sum;
      }
    }
}

}  // namespace kvkit
