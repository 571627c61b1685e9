// Capacity planning: bytes per block and what fits in a budget.

#include <catch2/catch.hpp>

#include <cstdint>
#include <vector>

#include "kvkit/memory/capacity_planner.hpp"

using Catch::Matchers::Contains;
using kvkit::DType;
using kvkit::KVLayerGroup;

TEST_CASE("bytes per block count K and V of every layer, head and token in the cache dtype") {
  // Llama-3-8B: 32 layers, 8 kv heads (GQA), head_dim 128.
  const auto bf16 = KVLayerGroup::attention(32, 8, 128, DType::kBFloat16);
  CHECK(kvkit::kv_bytes_per_token(bf16) == 32 * 8 * 2 * 128 * 2);
  CHECK(kvkit::kv_bytes_per_block({bf16}, 16) == 16 * 131072);
  // fp8 and int8 caches take half; per-token-head scales are added.
  const auto fp8 = KVLayerGroup::attention(32, 8, 128, DType::kFloat8E4M3);
  CHECK(kvkit::kv_bytes_per_token(fp8) == 65536);
  auto int8 = KVLayerGroup::attention(32, 8, 128, DType::kInt8);
  int8.scale_bytes_per_token_head = 8;  // one fp32 scale for K and one for V
  CHECK(kvkit::kv_bytes_per_token(int8) == 32 * 8 * (256 + 8));
  // MHA (kv heads = q heads) and MQA (1 kv head).
  CHECK(kvkit::kv_bytes_per_token(KVLayerGroup::attention(7, 33, 64, DType::kFloat16)) == 7 * 33 * 128 * 2);
  CHECK(kvkit::kv_bytes_per_token(KVLayerGroup::attention(7, 1, 64, DType::kFloat32)) == 7 * 128 * 4);
  // DeepSeek-V2 MLA: 60 layers, one 512 + 64 latent per token.
  CHECK(kvkit::kv_bytes_per_token(KVLayerGroup::mla(60, 576, DType::kBFloat16)) == 60 * 576 * 2);
  // Layer groups with different shapes and dtypes add up.
  const std::vector<KVLayerGroup> mixed = {KVLayerGroup::attention(2, 8, 128, DType::kBFloat16),
                                           KVLayerGroup::attention(30, 8, 128, DType::kFloat8E5M2)};
  CHECK(kvkit::kv_bytes_per_block(mixed, 32) == 32 * (2 * 8 * 256 * 2 + 30 * 8 * 256));
}

TEST_CASE("blocks, tokens and the longest batch context that fit in a budget") {
  const std::vector<KVLayerGroup> model = {KVLayerGroup::attention(32, 8, 128, DType::kBFloat16)};
  const std::int64_t per_block = 16 * 131072;  // 2 MiB
  const auto c = kvkit::kv_capacity(model, 16, 10 * per_block + per_block - 1);
  CHECK(c.bytes_per_block == per_block);
  CHECK(c.num_blocks == 10);
  CHECK(c.num_tokens == 160);
  // 10 blocks, 1 null block: 9 blocks for 4 sequences -> 2 blocks = 32 tokens each.
  CHECK(kvkit::kv_max_context_for_batch(model, 16, 10 * per_block, 4) == 32);
  CHECK(kvkit::kv_max_context_for_batch(model, 16, 10 * per_block, 1, 0) == 160);
  CHECK(kvkit::kv_max_context_for_batch(model, 16, 0, 3) == 0);
  // The same budget holds twice the tokens in fp8.
  const std::vector<KVLayerGroup> fp8 = {KVLayerGroup::attention(32, 8, 128, DType::kFloat8E4M3)};
  CHECK(kvkit::kv_capacity(fp8, 16, 10 * per_block).num_tokens == 320);
}

TEST_CASE("capacity planning rejects impossible shapes") {
  CHECK_THROWS_WITH(kvkit::kv_bytes_per_block({}, 16), Contains("'groups' = 0"));
  CHECK_THROWS_WITH(kvkit::kv_bytes_per_token(KVLayerGroup::attention(0, 8, 128, DType::kInt8)),
                    Contains("'num_layers' = 0"));
  CHECK_THROWS_WITH(kvkit::kv_bytes_per_token(KVLayerGroup::attention(1, 0, 128, DType::kInt8)),
                    Contains("'num_kv_heads' = 0"));
  const std::vector<KVLayerGroup> m = {KVLayerGroup::mla(1, 576, DType::kBFloat16)};
  CHECK_THROWS_WITH(kvkit::kv_bytes_per_block(m, 0), Contains("'block_size' = 0"));
  CHECK_THROWS_WITH(kvkit::kv_capacity(m, 16, -1), Contains("'budget_bytes' = -1"));
  CHECK_THROWS_WITH(kvkit::kv_max_context_for_batch(m, 16, 100, 0), Contains("'batch_size' = 0"));
}
