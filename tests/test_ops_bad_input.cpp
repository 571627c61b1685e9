// Bad input to the CPU ops and layouts: each case is accepted-but-wrong input
// found by an audit. Every call must throw kvkit::Error naming the argument
// and its value, and leave its outputs (poisoned beforehand) untouched.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kvkit/layout/paged_kv_layout.hpp"
#include "kvkit/ops/attention_decode.hpp"
#include "kvkit/ops/gather.hpp"
#include "kvkit/ops/quantize.hpp"
#include "kvkit/ops/rope.hpp"
#include "kvkit/ops/rope_shift_cache.hpp"

using Catch::Matchers::Contains;
using kvkit::DType;
using kvkit::PagedKVLayout;

namespace {

constexpr float kPoison = -12345.0f;

// A float32 RoPE over head_dim = rotary_dim = 8 with a 16-position table.
kvkit::RopeConfig small_rope() {
  kvkit::RopeConfig c;
  c.head_dim = 8;
  c.rotary_dim = 8;
  return c;
}

// RoPE over `tokens` float32 rows of one head, `dim` wide and fully rotated:
// set q or k (and its strides) on the result.
kvkit::RopeParams one_head_rows(const std::int64_t* positions, std::int64_t tokens, int dim) {
  kvkit::RopeParams p;
  p.positions = positions;
  p.num_tokens = tokens;
  p.head_dim = dim;
  p.rotary_dim = dim;
  p.dtype = DType::kFloat32;
  return p;
}

}  // namespace

TEST_CASE("rope_shift_keys rejects a delta of INT64_MIN, whose magnitude is not an int64") {
  const kvkit::RopeCache table(small_rope(), 16);
  std::vector<float> k(2 * 8, kPoison);
  const std::vector<float> before = k;
  const std::int64_t deltas[2] = {1, std::numeric_limits<std::int64_t>::min()};
  kvkit::RopeParams p = one_head_rows(deltas, 2, 8);
  p.k = k.data();
  p.k_token_stride = 8;
  p.k_head_stride = 8;
  p.num_k_heads = 1;
  SECTION("with the cos/sin table") { table.attach(p); }
  SECTION("with on-the-fly angles") {
    table.attach(p);
    p.cos_sin_cache = nullptr;
  }
  REQUIRE_THROWS_WITH(kvkit::rope_shift_keys(p),
                      Contains("positions[1]' = -9223372036854775808") && Contains("2^63"));
  CHECK(k == before);
}

TEST_CASE("rope_shift_cache_keys rejects a NaN, infinite or non-positive static scale, changing nothing") {
  const kvkit::RopeCache table(small_rope(), 16);
  const PagedKVLayout layout = PagedKVLayout::nhd(2, 4, 2, 8);
  std::vector<std::uint8_t> cache(std::size_t(layout.num_slots() * 2 * 8), 0x38);  // e4m3 1.0
  const std::vector<std::uint8_t> before = cache;
  const std::int64_t slots[2] = {0, 5};
  const std::int64_t deltas[2] = {1, 2};
  kvkit::RopeParams rope;
  rope.positions = deltas;
  rope.num_tokens = 2;
  rope.head_dim = 8;
  rope.rotary_dim = 8;
  table.attach(rope);
  const float bad = GENERATE(std::numeric_limits<float>::quiet_NaN(), 0.0f, -1.0f,
                             std::numeric_limits<float>::infinity());
  float scales[2] = {1.0f, bad};  // per head: the second head's scale is bad
  kvkit::RopeShiftCacheArgs a;
  a.k_cache = cache.data();
  a.cache_dtype = DType::kFloat8E4M3;
  a.slots = slots;
  a.granularity = kvkit::ScaleGranularity::kPerHead;
  a.k_scale = scales;
  REQUIRE_THROWS_WITH(kvkit::rope_shift_cache_keys(rope, layout, a),
                      Contains("k_scale[1]") && Contains("expected a finite scale > 0"));
  CHECK(cache == before);
  SECTION("per tensor") {
    a.granularity = kvkit::ScaleGranularity::kPerTensor;
    a.k_scale = scales + 1;
    REQUIRE_THROWS_WITH(kvkit::rope_shift_cache_keys(rope, layout, a), Contains("k_scale[0]"));
    CHECK(cache == before);
  }
}

TEST_CASE("rope_reorder_dims rejects rows closer than rotary_dim, changing nothing") {
  std::vector<float> data(32);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = float(i);
  const std::vector<float> before = data;
  const std::int64_t stride = GENERATE(0, 4, 7);
  REQUIRE_THROWS_WITH(
      kvkit::rope_reorder_dims(data.data(), 3, stride, 8, kvkit::RopeStyle::kGptJ, kvkit::RopeStyle::kNeox),
      Contains("'row_stride' = " + std::to_string(stride)) && Contains(">= rotary_dim (8)"));
  CHECK(data == before);
  // One row needs no stride; rows exactly rotary_dim apart are fine.
  kvkit::rope_reorder_dims(data.data(), 1, 0, 8, kvkit::RopeStyle::kGptJ, kvkit::RopeStyle::kNeox);
  kvkit::rope_reorder_dims(data.data(), 4, 8, 8, kvkit::RopeStyle::kNeox, kvkit::RopeStyle::kGptJ);
}

TEST_CASE("quantize_append_kv names the bad scale array, K's or V's") {
  const PagedKVLayout layout = PagedKVLayout::nhd(2, 4, 1, 8);
  std::vector<float> key(8, 1.0f), value(8, 1.0f);
  std::vector<std::uint8_t> k_cache(std::size_t(layout.num_slots() * 8), 0xAB), v_cache = k_cache;
  const std::vector<std::uint8_t> before = k_cache;
  const std::int64_t slot = 3;
  float k_scale = 1.0f, v_scale = 1.0f;
  kvkit::QuantizeAppendArgs a;
  a.key = key.data();
  a.value = value.data();
  a.key_stride_token = a.value_stride_token = 8;
  a.key_stride_head = a.value_stride_head = 8;
  a.slot_mapping = &slot;
  a.num_tokens = 1;
  a.k_cache = k_cache.data();
  a.v_cache = v_cache.data();
  a.src_dtype = DType::kFloat32;
  a.k_scale = &k_scale;
  a.v_scale = &v_scale;
  SECTION("K") {
    k_scale = std::numeric_limits<float>::quiet_NaN();
    REQUIRE_THROWS_WITH(kvkit::quantize_append_kv(layout, a), Contains("k_scale[0] = nan"));
  }
  SECTION("V") {
    v_scale = 0.0f;
    REQUIRE_THROWS_WITH(kvkit::quantize_append_kv(layout, a), Contains("v_scale[0] = 0"));
  }
  SECTION("a negative token stride (append_kv refuses it too)") {
    a.key_stride_token = -8;
    REQUIRE_THROWS_WITH(kvkit::quantize_append_kv(layout, a), Contains("'key_stride_token' = -8"));
  }
  CHECK(k_cache == before);
  CHECK(v_cache == before);
}

TEST_CASE("PagedKVLayout rejects strides whose cache extent overflows int64") {
  const std::int64_t big = std::int64_t(1) << 40;
  REQUIRE_THROWS_WITH(PagedKVLayout::nhd(big, 1 << 20, 1 << 10, 1 << 10),
                      Contains("'stride_page'") && Contains("2^63 - 1 elements"));
  REQUIRE_THROWS_WITH(PagedKVLayout::strided(4, 1, 1, 8, std::numeric_limits<std::int64_t>::max() / 2, 8, 8),
                      Contains("'stride_page' = 4611686018427387903 with 4 entries"));
  // The largest extents that fit are still accepted.
  CHECK(PagedKVLayout::strided(2, 1, 1, 1, std::numeric_limits<std::int64_t>::max() - 1, 1, 1).num_pages == 2);
}

TEST_CASE("paged_decode_attention rejects an infinite logit_softcap, writing nothing") {
  const PagedKVLayout layout = PagedKVLayout::nhd(2, 4, 1, 8);
  std::vector<float> k_cache(std::size_t(layout.num_slots() * 8), 0.5f), v_cache = k_cache;
  std::vector<float> q(8, 1.0f), o(8, kPoison);
  const std::int32_t block_table[2] = {0, 1};
  const std::int32_t seq_lens[1] = {5};
  kvkit::PagedDecodeParams p;
  p.q = q.data();
  p.q_stride_token = 8;
  p.q_stride_head = 8;
  p.k_cache = k_cache.data();
  p.v_cache = v_cache.data();
  p.layout = layout;
  p.page_table = {block_table, seq_lens, 1, 2, 2};
  p.num_q_heads = 1;
  p.sm_scale = 0.35f;
  p.o = o.data();
  p.o_stride_token = 8;
  p.o_stride_head = 8;
  p.logit_softcap = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(kvkit::paged_decode_attention(p), Contains("'logit_softcap' = inf"));
  for (float x : o) CHECK(x == kPoison);
  p.logit_softcap = 30.0f;  // a finite cap passes the checks (test_attention runs it)
  CHECK_NOTHROW(kvkit::detail::validate_decode_params(p, "test"));

  SECTION("quantized cache: NaN, infinite or non-positive static scales") {
    // Regression: only null scales were refused; a NaN k_scale gave o = 0,
    // an infinite one o = NaN.
    p.logit_softcap = 0.0f;
    std::vector<std::uint8_t> k8(k_cache.size(), 0x38), v8(k8.size(), 0x30);  // e4m3 1.0 and 0.5
    p.k_cache = k8.data();
    p.v_cache = v8.data();
    p.kv_dtype = DType::kFloat8E4M3;
    float k_scale = 1.0f, v_scale = 1.0f;
    p.k_scale = &k_scale;
    p.v_scale = &v_scale;
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), 0.0f, -2.0f}) {
      k_scale = bad;
      CHECK_THROWS_WITH(kvkit::paged_decode_attention(p), Contains("k_scale[0] = "));
      k_scale = 1.0f;
      v_scale = bad;
      CHECK_THROWS_WITH(kvkit::paged_decode_attention(p), Contains("v_scale[0] = "));
      v_scale = 1.0f;
    }
    for (float x : o) CHECK(x == kPoison);
    kvkit::paged_decode_attention(p);
    CHECK(o[0] == 0.5f);  // every value row is 0.5
  }
}

TEST_CASE("apply_rope refuses a table attached for another rotary_dim, changing nothing") {
  // Regression: RopeCache::attach did not record the table's width, so
  // rotary_dim 16 over an 8-wide table read past each row (and past the table).
  const kvkit::RopeCache table(small_rope(), 16);
  std::vector<float> q(2 * 16, kPoison);
  const std::vector<float> before = q;
  const std::int64_t positions[2] = {3, 15};
  kvkit::RopeParams p = one_head_rows(positions, 2, 16);
  p.q = q.data();
  p.q_token_stride = 16;
  p.q_head_stride = 16;
  p.num_q_heads = 1;
  table.attach(p);
  CHECK(p.cache_rotary_dim == 8);
  REQUIRE_THROWS_WITH(kvkit::apply_rope(p), Contains("'rotary_dim' = 16") && Contains("RoPE table (8)"));
  CHECK(q == before);
  p.rotary_dim = 8;  // the table's width: accepted
  kvkit::apply_rope(p);
  CHECK(q != before);
}

TEST_CASE("apply_rope refuses heads whose rotated dims overlap, changing nothing") {
  // Regression: q_head_stride 4 with rotary_dim 8 rotated dims 4..7 twice, in
  // an order the CPU loop and the CUDA threads do not share.
  const kvkit::RopeCache table(small_rope(), 16);
  std::vector<float> q(3 * 16, kPoison);
  const std::vector<float> before = q;
  const std::int64_t positions[3] = {1, 2, 3};
  kvkit::RopeParams p = one_head_rows(positions, 3, 8);
  p.q = q.data();
  p.q_token_stride = 16;
  p.num_q_heads = 2;
  table.attach(p);
  SECTION("query heads") {
    p.q_head_stride = GENERATE(4, 0, -7);
    REQUIRE_THROWS_WITH(kvkit::apply_rope(p), Contains("'q_head_stride' = ") && Contains("rotary_dim (8)"));
  }
  SECTION("key heads") {
    p.q = nullptr;
    p.k = q.data();
    p.k_token_stride = 16;
    p.k_head_stride = 7;
    p.num_k_heads = 2;
    REQUIRE_THROWS_WITH(kvkit::apply_rope(p), Contains("'k_head_stride' = 7"));
  }
  CHECK(q == before);
}

TEST_CASE("apply_rope takes heads exactly rotary_dim apart, either way, and one head at any stride") {
  const kvkit::RopeCache table(small_rope(), 16);
  std::vector<float> q(3 * 16, 0.25f);
  const std::int64_t positions[3] = {1, 2, 3};
  kvkit::RopeParams p = one_head_rows(positions, 3, 8);
  p.q_token_stride = 16;
  p.num_q_heads = 2;
  table.attach(p);
  SECTION("stride +8") {
    p.q = q.data();
    p.q_head_stride = 8;
  }
  SECTION("stride -8 from the second head") {
    p.q = q.data() + 8;
    p.q_head_stride = -8;
  }
  SECTION("one head, stride 0") {
    p.q = q.data();
    p.num_q_heads = 1;
    p.q_head_stride = 0;
  }
  const std::vector<float> before = q;
  kvkit::apply_rope(p);
  CHECK(q != before);
}

TEST_CASE("gathers refuse output rows of different tokens that overlap, writing nothing") {
  const PagedKVLayout layout = PagedKVLayout::nhd(2, 4, 2, 8);
  std::vector<float> k_cache(std::size_t(layout.num_slots() * 16), 1.5f), v_cache = k_cache;
  const std::int32_t pages[1] = {1};
  std::vector<float> key_out(64, kPoison), value_out(64, kPoison);
  kvkit::GatherKVArgs a{k_cache.data(), v_cache.data(), pages, 3, key_out.data(), value_out.data(),
                        /*out_stride_token=*/8, /*out_stride_head=*/8, DType::kFloat32};
  CHECK_THROWS_WITH(kvkit::gather_kv(layout, a),
                    Contains("'out_stride_token' = 8") && Contains("(16) so that the tokens' rows do not overlap"));
  a.out_stride_token = 0;
  CHECK_THROWS_WITH(kvkit::gather_kv(layout, a), Contains("'out_stride_token' = 0"));
  CHECK(key_out == std::vector<float>(64, kPoison));
  CHECK(value_out == std::vector<float>(64, kPoison));
  a.num_tokens = 1;  // one token: its stride is never used
  kvkit::gather_kv(layout, a);
  CHECK(key_out[0] == 1.5f);
  a.num_tokens = 3;
  a.out_stride_token = 16;
  kvkit::gather_kv(layout, a);
}

TEST_CASE("apply_rope refuses tokens whose rotated rows overlap, changing nothing") {
  const kvkit::RopeCache table(small_rope(), 16);
  std::vector<float> q(3 * 16, kPoison);
  const std::vector<float> before = q;
  const std::int64_t positions[3] = {1, 2, 3};
  kvkit::RopeParams p = one_head_rows(positions, 3, 8);
  p.q = q.data();
  table.attach(p);
  SECTION("one head, tokens closer than rotary_dim") {
    p.num_q_heads = 1;
    p.q_token_stride = GENERATE(0, 4, -7);
  }
  SECTION("token t's second head is token t+1's first") {
    p.num_q_heads = 2;
    p.q_head_stride = 8;
    p.q_token_stride = 8;
  }
  REQUIRE_THROWS_WITH(kvkit::apply_rope(p), Contains("'q_token_stride' = ") && Contains("rotary_dim (8)"));
  CHECK(q == before);
}
