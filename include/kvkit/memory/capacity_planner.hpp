#pragma once
/// @file capacity_planner.hpp
/// Capacity planning (the per-layer, per-layout byte counts are in
/// layout/capacity.hpp): bytes per KV-cache block for a model's layer groups,
/// and how many blocks, tokens and context fit in a memory budget.
///
/// A model is a list of layer groups, each with its own shape and cache dtype
/// (e.g. most layers fp8, a few first/last layers bf16; or different kv-head
/// counts). MHA, GQA and MQA differ only in num_kv_heads; MLA caches one
/// latent vector per token (value_head_dim = 0, num_kv_heads = 1, head_dim =
/// kv_lora_rank + rope dim, e.g. 512 + 64). The cache dtype is always taken
/// into account (vLLM's estimate once ignored it: vllm issue 25350).

#include <cstdint>
#include <vector>

#include "kvkit/core/dtype.hpp"
#include "kvkit/core/error.hpp"

namespace kvkit {

/// Shape of the KV cache of a group of identical layers.
struct KVLayerGroup {
  std::int64_t num_layers = 0;
  std::int64_t num_kv_heads = 0;    ///< MHA: = query heads; GQA: fewer; MQA and MLA: 1
  std::int64_t head_dim = 0;        ///< key head dim (MLA: latent width incl. rope part)
  std::int64_t value_head_dim = -1; ///< -1: same as head_dim; 0: no separate V (MLA)
  DType dtype = DType::kBFloat16;   ///< cache element type (fp8 / int8 for quantized caches)
  std::int64_t scale_bytes_per_token_head = 0;  ///< per-token-per-head scales of a quantized cache

  /// Standard attention (MHA / GQA / MQA) with equal K and V head dims.
  static KVLayerGroup attention(std::int64_t layers, std::int64_t kv_heads, std::int64_t head_dim,
                                DType dtype) {
    return KVLayerGroup{layers, kv_heads, head_dim, -1, dtype, 0};
  }
  /// MLA: one latent vector of `latent_dim` elements per token and layer.
  static KVLayerGroup mla(std::int64_t layers, std::int64_t latent_dim, DType dtype) {
    return KVLayerGroup{layers, 1, latent_dim, 0, dtype, 0};
  }
};

/// Bytes of KV cache one token needs in one layer group (all its layers).
/// Throws kvkit::Error for negative or zero sizes.
inline std::int64_t kv_bytes_per_token(const KVLayerGroup& g) {
  const char* where = "kvkit::kv_bytes_per_token";
  check_argument(g.num_layers >= 1, where, "num_layers", g.num_layers, ">= 1");
  check_argument(g.num_kv_heads >= 1, where, "num_kv_heads", g.num_kv_heads, ">= 1");
  check_argument(g.head_dim >= 1, where, "head_dim", g.head_dim, ">= 1");
  check_argument(g.value_head_dim >= -1, where, "value_head_dim", g.value_head_dim,
                 ">= 0, or -1 for head_dim");
  check_argument(g.scale_bytes_per_token_head >= 0, where, "scale_bytes_per_token_head",
                 g.scale_bytes_per_token_head, ">= 0");
  const std::int64_t v = g.value_head_dim < 0 ? g.head_dim : g.value_head_dim;
  const std::int64_t per_head = (g.head_dim + v) * static_cast<std::int64_t>(dtype_size(g.dtype)) +
                                g.scale_bytes_per_token_head;
  return g.num_layers * g.num_kv_heads * per_head;
}

/// Bytes of one block of `block_size` tokens across all layer groups.
/// Throws kvkit::Error for an empty group list, block_size < 1 or a bad group.
inline std::int64_t kv_bytes_per_block(const std::vector<KVLayerGroup>& groups, std::int64_t block_size) {
  check_argument(!groups.empty(), "kvkit::kv_bytes_per_block", "groups", groups.size(),
                 "at least one layer group");
  check_argument(block_size >= 1, "kvkit::kv_bytes_per_block", "block_size", block_size, ">= 1");
  std::int64_t per_token = 0;
  for (const KVLayerGroup& g : groups) per_token += kv_bytes_per_token(g);
  return per_token * block_size;
}

/// What fits in a memory budget.
struct KVCapacity {
  std::int64_t bytes_per_block = 0;
  std::int64_t num_blocks = 0;   ///< whole blocks in the budget
  std::int64_t num_tokens = 0;   ///< num_blocks * block_size
};

/// Whole blocks and tokens of `groups` that fit in `budget_bytes`.
/// Throws kvkit::Error for budget_bytes < 0 or bad groups / block size.
inline KVCapacity kv_capacity(const std::vector<KVLayerGroup>& groups, std::int64_t block_size,
                              std::int64_t budget_bytes) {
  check_argument(budget_bytes >= 0, "kvkit::kv_capacity", "budget_bytes", budget_bytes, ">= 0");
  KVCapacity c;
  c.bytes_per_block = kv_bytes_per_block(groups, block_size);
  c.num_blocks = budget_bytes / c.bytes_per_block;
  c.num_tokens = c.num_blocks * block_size;
  return c;
}

/// The longest context each of `batch_size` sequences can have at once in
/// `budget_bytes` (every sequence rounds up to whole blocks; the null block,
/// if reserved, is subtracted via `reserved_blocks`). Throws kvkit::Error for
/// batch_size < 1, reserved_blocks < 0 or bad groups.
inline std::int64_t kv_max_context_for_batch(const std::vector<KVLayerGroup>& groups,
                                             std::int64_t block_size, std::int64_t budget_bytes,
                                             std::int64_t batch_size, std::int64_t reserved_blocks = 1) {
  check_argument(batch_size >= 1, "kvkit::kv_max_context_for_batch", "batch_size", batch_size, ">= 1");
  check_argument(reserved_blocks >= 0, "kvkit::kv_max_context_for_batch", "reserved_blocks",
                 reserved_blocks, ">= 0");
  const KVCapacity c = kv_capacity(groups, block_size, budget_bytes);
  const std::int64_t usable = c.num_blocks > reserved_blocks ? c.num_blocks - reserved_blocks : 0;
  return (usable / batch_size) * block_size;
}

}  // namespace kvkit
