// MLA: config and presets, cache sizes, W_UKV slicing, and the fused compress
// (RMSNorm of c_kv + decoupled RoPE of k_pe + append) against float64.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "kvkit/ops/mla_compress.hpp"
#include "kvkit/ops/mla_config.hpp"

using Catch::Matchers::Contains;
using kvkit::MlaConfig;

TEST_CASE("MLA presets, softmax scale and cache size match DeepSeek's published shapes") {
  const MlaConfig v2 = MlaConfig::deepseek_v2();
  CHECK(v2.n_heads == 128);
  CHECK(v2.q_lora_rank == 1536);
  CHECK(v2.latent_dim() == 576);
  CHECK(v2.qk_head_dim() == 192);
  CHECK(MlaConfig::deepseek_v2_lite().n_heads == 16);
  CHECK(MlaConfig::deepseek_v2_lite().q_lora_rank == 0);
  const double m = 0.1 * std::log(40.0) + 1.0;  // YaRN mscale(40, mscale_all_dim = 1)
  CHECK(v2.softmax_scale() == Approx(m * m / std::sqrt(192.0)).epsilon(1e-6));
  const auto e = kvkit::mla_cache_elements(MlaConfig::deepseek_v3());
  CHECK(e.mla == 576);
  CHECK(e.mha == 2 * 128 * 128);
  CHECK(double(e.mla) / double(e.mha) == Approx(0.0176).epsilon(0.01));  // "about 1.8% of MHA"
  CHECK(e.mqa == 256);
}

TEST_CASE("mla_split_wkv_b slices the official wkv_b layout per head") {
  MlaConfig c;
  c.n_heads = 3;
  c.kv_lora_rank = 5;
  c.qk_nope_head_dim = 2;
  c.v_head_dim = 4;
  c.validate();
  const int per_head = 2 + 4;
  std::vector<float> wkv_b(std::size_t(3 * per_head * 5));
  for (std::size_t i = 0; i < wkv_b.size(); ++i) wkv_b[i] = float(i);
  std::vector<float> w_uk(3 * 2 * 5, -1.0f), w_uv(3 * 4 * 5, -1.0f);
  kvkit::mla_split_wkv_b(c, wkv_b.data(), w_uk.data(), w_uv.data());
  // Head 1, W_UK row 1, column 3 is wkv_b row 1 * 6 + 1.
  CHECK(w_uk[(1 * 2 + 1) * 5 + 3] == float((1 * per_head + 1) * 5 + 3));
  // Head 2, W_UV row 0, column 4 is wkv_b row 2 * 6 + 2 + 0.
  CHECK(w_uv[(2 * 4 + 0) * 5 + 4] == float((2 * per_head + 2) * 5 + 4));
  for (float x : w_uk) CHECK(x >= 0.0f);
  for (float x : w_uv) CHECK(x >= 0.0f);
}

namespace {

struct CompressProblem {
  kvkit::LatentKVLayout layout;
  kvkit::RopeConfig rope;
  std::vector<float> kv_a, weight, cache;
  std::vector<std::int64_t> positions, slots;
  kvkit::MlaCompressArgs args;
  std::unique_ptr<kvkit::RopeCache> table;

  CompressProblem(int rank, int rope_dim, int page_size, int tokens, std::uint64_t seed)
      : layout(kvkit::LatentKVLayout::dense(tokens / page_size + 3, page_size, rank, rope_dim)) {
    rope = kvkit::RopeConfig::deepseek_yarn();
    rope.head_dim = rope.rotary_dim = rope_dim;
    table = std::make_unique<kvkit::RopeCache>(rope, 5000);
    std::mt19937 rng(static_cast<unsigned>(seed));
    std::normal_distribution<float> normal;
    kv_a.resize(std::size_t(tokens) * (rank + rope_dim + 3));  // rows padded by 3
    for (float& x : kv_a) x = normal(rng);
    weight.resize(std::size_t(rank));
    for (float& x : weight) x = 1.0f + 0.1f * normal(rng);
    cache.assign(std::size_t(layout.num_pages * layout.stride_page), -999.0f);
    for (int t = 0; t < tokens; ++t) {
      positions.push_back(std::int64_t(rng() % 5000));
      slots.push_back(t % 7 == 5 ? -1 : std::int64_t(layout.num_slots() - 1 - t));
    }
    args.kv_a = kv_a.data();
    args.kv_a_stride_token = rank + rope_dim + 3;
    args.norm_weight = weight.data();
    args.positions = positions.data();
    args.slot_mapping = slots.data();
    args.num_tokens = tokens;
    args.cache = cache.data();
    args.dtype = kvkit::DType::kFloat32;
    args.cos_sin_cache = table->data();
    args.cache_positions = table->max_positions();
  }
};

}  // namespace

TEST_CASE("mla_compress writes RMSNorm(c_kv) then interleaved-RoPE(k_pe) at each slot, as float64 says") {
  for (int page_size : {1, 64}) {
    CompressProblem p(512, 64, page_size, 130, 3);
    kvkit::mla_compress(p.layout, p.args);
    const auto inv = kvkit::rope_inv_freq(p.rope);
    std::vector<bool> written(p.cache.size(), false);
    for (std::size_t t = 0; t < p.slots.size(); ++t) {
      if (p.slots[t] < 0) continue;
      const float* src = &p.kv_a[t * std::size_t(p.args.kv_a_stride_token)];
      const std::int64_t row = p.layout.slot_offset(p.slots[t]);
      double ss = 0;
      for (int c = 0; c < 512; ++c) ss += double(src[c]) * src[c];
      const double inv_rms = 1.0 / std::sqrt(ss / 512 + 1e-6);
      for (int c = 0; c < 512; ++c) {
        REQUIRE(p.cache[row + c] == Approx(src[c] * inv_rms * p.weight[c]).epsilon(2e-6).margin(1e-6));
        written[row + c] = true;
      }
      for (int i = 0; i < 32; ++i) {  // interleaved pairs (2i, 2i+1)
        const double angle = std::fmod(double(p.positions[t]) * inv[i], 2 * kvkit::kPi);
        const double x = src[512 + 2 * i], y = src[512 + 2 * i + 1];
        REQUIRE(p.cache[row + 512 + 2 * i] == Approx(x * std::cos(angle) - y * std::sin(angle)).margin(2e-6));
        REQUIRE(p.cache[row + 512 + 2 * i + 1] == Approx(y * std::cos(angle) + x * std::sin(angle)).margin(2e-6));
        written[row + 512 + 2 * i] = written[row + 512 + 2 * i + 1] = true;
      }
    }
    for (std::size_t i = 0; i < p.cache.size(); ++i) {
      if (!written[i]) REQUIRE(p.cache[i] == -999.0f);  // padding tokens and other slots untouched
    }
  }
}

TEST_CASE("mla_compress rotates k_pe in DeepSeek's interleaved pairing (pinned example)") {
  // rope_dim 4, base 10000: inv_freq = {1, 0.01}. At position 1 the pairs
  // (0,1) and (2,3) turn by 1 and 0.01 rad. NeoX pairing ((0,2), (1,3)) would
  // give a different row, which is how a wrong pairing silently corrupts scores.
  CompressProblem p(2, 4, 1, 1, 1);
  p.rope.base = 10000.0;
  p.rope.scaling = {};
  p.table = std::make_unique<kvkit::RopeCache>(p.rope, 8);
  p.args.cos_sin_cache = p.table->data();
  p.args.cache_positions = 8;
  const float row[6] = {3.0f, 4.0f, 1.0f, 0.0f, 0.0f, 1.0f};  // c_kv = (3, 4), k_pe = (1, 0, 0, 1)
  std::memcpy(p.kv_a.data(), row, sizeof(row));
  p.positions[0] = 1;
  p.slots[0] = 0;
  const float w[2] = {1.0f, 1.0f};
  p.args.norm_weight = w;
  kvkit::mla_compress(p.layout, p.args);
  const double rms = std::sqrt((9.0 + 16.0) / 2.0 + 1e-6);
  CHECK(p.cache[0] == Approx(3.0 / rms));
  CHECK(p.cache[1] == Approx(4.0 / rms));
  CHECK(p.cache[2] == Approx(std::cos(1.0)));
  CHECK(p.cache[3] == Approx(std::sin(1.0)));
  CHECK(p.cache[4] == Approx(-std::sin(0.01)));
  CHECK(p.cache[5] == Approx(std::cos(0.01)));
}

TEST_CASE("bad mla input raises a clear error and writes nothing") {
  CompressProblem p(16, 8, 4, 9, 2);
  const std::vector<float> before = p.cache;
  SECTION("slot beyond the cache") {
    p.slots[3] = p.layout.num_slots();
    CHECK_THROWS_WITH(kvkit::mla_compress(p.layout, p.args), Contains("slot_mapping[3]"));
  }
  SECTION("negative position") {
    p.positions[2] = -1;
    CHECK_THROWS_WITH(kvkit::mla_compress(p.layout, p.args), Contains("'positions[2]' = -1"));
  }
  SECTION("rows narrower than a latent row") {
    p.args.kv_a_stride_token = 20;
    CHECK_THROWS_WITH(kvkit::mla_compress(p.layout, p.args), Contains("'kv_a_stride_token' = 20"));
  }
  SECTION("no rope table") {
    p.args.cos_sin_cache = nullptr;
    CHECK_THROWS_WITH(kvkit::mla_compress(p.layout, p.args), Contains("cos_sin_cache"));
  }
  SECTION("config with a rope width that is not the table's") {
    MlaConfig c;
    c.qk_rope_head_dim = 32;
    CHECK_THROWS_WITH(c.validate(), Contains("'qk_rope_head_dim' = 32"));
  }
  CHECK(p.cache == before);
}
