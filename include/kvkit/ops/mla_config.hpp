#pragma once
/// @file mla_config.hpp
/// DeepSeek multi-head latent attention (MLA): the model dimensions, presets,
/// the softmax scale, the slicing of the up-projection W_UKV into W_UK and
/// W_UV, and the cache-size comparison with MHA/GQA/MQA.
///
/// Per token and layer the cache holds only c_kv (kv_lora_rank values, after
/// its RMSNorm) and one RoPE key k_pe (qk_rope_head_dim values) shared by all
/// heads (DeepSeek-V2, arXiv 2405.04434, section 2.1).

#include <cmath>
#include <cstdint>
#include <vector>

#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"
#include "kvkit/ops/rope_config.hpp"

namespace kvkit {

struct MlaConfig {
  int n_heads = 128;
  int q_lora_rank = 1536;  ///< 0: no query compression (V2-Lite)
  int kv_lora_rank = 512;
  int qk_nope_head_dim = 128;
  int qk_rope_head_dim = 64;
  int v_head_dim = 128;
  RopeConfig rope = RopeConfig::deepseek_yarn();  ///< decoupled RoPE of q_pe / k_pe

  /// Width of a cached latent row: kv_lora_rank + qk_rope_head_dim (576).
  int latent_dim() const { return kv_lora_rank + qk_rope_head_dim; }
  /// Query/key head width of the naive path: qk_nope + qk_rope (192).
  int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }

  /// (qk_nope + qk_rope)^-0.5, times YaRN's mscale² where configured
  /// (official inference/model.py: softmax_scale * mscale * mscale).
  float softmax_scale() const {
    const double m = yarn_softmax_mscale(rope);
    return float(m * m / std::sqrt(double(qk_head_dim())));
  }

  void validate(const char* where = "kvkit::MlaConfig") const {
    check_argument(n_heads > 0, where, "n_heads", n_heads, "> 0");
    check_argument(q_lora_rank >= 0, where, "q_lora_rank", q_lora_rank, ">= 0 (0: none)");
    check_argument(kv_lora_rank > 0, where, "kv_lora_rank", kv_lora_rank, "> 0");
    check_argument(qk_nope_head_dim > 0, where, "qk_nope_head_dim", qk_nope_head_dim, "> 0");
    check_argument(v_head_dim > 0, where, "v_head_dim", v_head_dim, "> 0");
    check_argument(qk_rope_head_dim == rope.rotary_dim && rope.rotary_dim == rope.head_dim, where,
                   "qk_rope_head_dim", qk_rope_head_dim, "rope.rotary_dim = rope.head_dim (",
                   rope.rotary_dim, ", ", rope.head_dim, ")");
    rope.validate(where);
  }

  /// DeepSeek-V2 (236B): 128 heads, q_lora 1536, kv_lora 512, 128/64/128.
  static MlaConfig deepseek_v2() { return {}; }
  /// DeepSeek-V2-Lite (16B): 16 heads, no query compression.
  static MlaConfig deepseek_v2_lite() {
    MlaConfig c;
    c.n_heads = 16;
    c.q_lora_rank = 0;
    return c;
  }
  /// DeepSeek-V3 / R1 (671B): the V2 attention shape (128 heads, 1536/512/128/64/128).
  static MlaConfig deepseek_v3() { return {}; }
};

/// Cached elements per token per layer of MLA and of the attention variants
/// it replaces (heads of v_head_dim for K and V; DeepSeek-V2 paper, table 1).
struct KVCacheElements {
  std::int64_t mla;  ///< kv_lora_rank + qk_rope_head_dim
  std::int64_t mha;  ///< 2 * n_heads * v_head_dim
  std::int64_t gqa;  ///< 2 * gqa_groups * v_head_dim
  std::int64_t mqa;  ///< 2 * v_head_dim
};

inline KVCacheElements mla_cache_elements(const MlaConfig& c, int gqa_groups = 8) {
  check_argument(gqa_groups > 0, "kvkit::mla_cache_elements", "gqa_groups", gqa_groups, "> 0");
  return {c.latent_dim(), 2LL * c.n_heads * c.v_head_dim, 2LL * gqa_groups * c.v_head_dim,
          2LL * c.v_head_dim};
}

/// Slices the up-projection W_UKV, as DeepSeek's official checkpoints store it
/// (`wkv_b`: [n_heads * (qk_nope + v_head_dim), kv_lora_rank], row-major;
/// per head, qk_nope rows of W_UK then v_head_dim rows of W_UV), into
/// w_uk [n_heads, qk_nope, kv_lora_rank] and w_uv [n_heads, v_head_dim, kv_lora_rank].
template <class T>
void mla_split_wkv_b(const MlaConfig& c, const T* wkv_b, T* w_uk, T* w_uv) {
  constexpr const char* kWhere = "kvkit::mla_split_wkv_b";
  c.validate(kWhere);
  check(wkv_b != nullptr && w_uk != nullptr && w_uv != nullptr, kWhere,
        "a null pointer among wkv_b, w_uk, w_uv");
  const std::int64_t rank = c.kv_lora_rank;
  const std::int64_t per_head = c.qk_nope_head_dim + c.v_head_dim;
  for (std::int64_t h = 0; h < c.n_heads; ++h) {
    const T* head = wkv_b + h * per_head * rank;
    for (std::int64_t r = 0; r < c.qk_nope_head_dim; ++r)
      for (std::int64_t k = 0; k < rank; ++k) w_uk[(h * c.qk_nope_head_dim + r) * rank + k] = head[r * rank + k];
    for (std::int64_t r = 0; r < c.v_head_dim; ++r)
      for (std::int64_t k = 0; k < rank; ++k)
        w_uv[(h * c.v_head_dim + r) * rank + k] = head[(c.qk_nope_head_dim + r) * rank + k];
  }
}

}  // namespace kvkit
