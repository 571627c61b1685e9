// RoPE: frequency tables, apply, key shift and dimension reordering against
// float64 formulas.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kvkit/ops/rope.hpp"
#include "kvkit/ops/rope_append.hpp"
#include "kvkit/ops/rope_shift_cache.hpp"

using Catch::Matchers::Contains;
using kvkit::RopeConfig;
using kvkit::RopeParams;
using kvkit::RopeScalingType;
using kvkit::RopeStyle;

namespace {

// Straight from the definition: pair i of dims rotates by position * inv_freq[i].
std::vector<double> reference_rotate(const std::vector<double>& x, std::int64_t position,
                                     const std::vector<double>& inv_freq, int rotary_dim,
                                     RopeStyle style, double attention_factor = 1.0) {
  std::vector<double> out = x;
  for (int i = 0; i < rotary_dim / 2; ++i) {
    const int a = style == RopeStyle::kNeox ? i : 2 * i;
    const int b = style == RopeStyle::kNeox ? i + rotary_dim / 2 : 2 * i + 1;
    const double angle = std::fmod(double(position) * inv_freq[i], 2.0 * kvkit::kPi);
    const double c = std::cos(angle) * attention_factor, s = std::sin(angle) * attention_factor;
    out[a] = x[a] * c - x[b] * s;
    out[b] = x[b] * c + x[a] * s;
  }
  return out;
}

// Relative precision of a storage type (half an ulp at 1).
template <class T> double unit_roundoff();
template <> double unit_roundoff<float>() { return 0x1p-24; }
template <> double unit_roundoff<kvkit::half>() { return 0x1p-11; }
template <> double unit_roundoff<kvkit::bfloat16>() { return 0x1p-8; }

struct Case {
  RopeConfig config;
  int num_q_heads;
  int num_k_heads;
  std::int64_t num_tokens;
  bool on_the_fly;  // no cos/sin table: float64 angles
};

// Applies RoPE to strided q/k with poisoned padding and checks every element
// against the float64 reference: rotated dims within tolerance, the rest and
// the padding bit-exact.
template <class T>
void check_apply(const Case& c, std::uint64_t seed) {
  const RopeConfig& cfg = c.config;
  const int hd = cfg.head_dim;
  // Strides with gaps, as when q and k are slices of a fused qkv projection.
  const std::int64_t q_head_stride = hd + 3, q_token_stride = c.num_q_heads * q_head_stride + 5;
  const std::int64_t k_head_stride = hd + 1, k_token_stride = c.num_k_heads * k_head_stride + 2;
  const T poison = kvkit::from_float<T>(-12345.0f);
  std::vector<T> q(std::size_t(c.num_tokens * q_token_stride), poison);
  std::vector<T> k(std::size_t(c.num_tokens * k_token_stride), poison);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  const kvkit::RopeCache cache(cfg, 4096);
  std::uniform_int_distribution<std::int64_t> pos_dist(0, c.on_the_fly ? 3000000 : 4095);
  std::vector<std::int64_t> positions(std::size_t(c.num_tokens));
  for (std::int64_t t = 0; t < c.num_tokens; ++t) {
    positions[t] = t == 0 ? 0 : t == 1 ? 1 : (t == 2 && c.on_the_fly) ? 1000000 : pos_dist(rng);
    for (int h = 0; h < c.num_q_heads; ++h)
      for (int d = 0; d < hd; ++d) q[t * q_token_stride + h * q_head_stride + d] = kvkit::from_float<T>(normal(rng));
    for (int h = 0; h < c.num_k_heads; ++h)
      for (int d = 0; d < hd; ++d) k[t * k_token_stride + h * k_head_stride + d] = kvkit::from_float<T>(normal(rng));
  }
  const std::vector<T> q0 = q, k0 = k;

  RopeParams p;
  p.q = q.data(); p.q_token_stride = q_token_stride; p.q_head_stride = q_head_stride; p.num_q_heads = c.num_q_heads;
  p.k = k.data(); p.k_token_stride = k_token_stride; p.k_head_stride = k_head_stride; p.num_k_heads = c.num_k_heads;
  p.positions = positions.data(); p.num_tokens = c.num_tokens;
  p.head_dim = hd; p.rotary_dim = cfg.rotary_dim; p.style = cfg.style; p.dtype = kvkit::dtype_of<T>;
  cache.attach(p);
  if (c.on_the_fly) p.cos_sin_cache = nullptr;
  kvkit::apply_rope(p);

  const std::vector<double> inv = kvkit::rope_inv_freq(cfg);
  const double af = kvkit::rope_attention_factor(cfg);
  // Float rounding of cos/sin and of the products, plus one rounding to T.
  const double rel_tol = 8e-7 + 2.0 * unit_roundoff<T>();
  const auto check_tensor = [&](const std::vector<T>& got, const std::vector<T>& before,
                                std::int64_t token_stride, std::int64_t head_stride, int heads) {
    std::vector<bool> addressed(got.size(), false);
    for (std::int64_t t = 0; t < c.num_tokens; ++t) {
      for (int h = 0; h < heads; ++h) {
        const std::int64_t base = t * token_stride + h * head_stride;
        std::vector<double> x(hd);
        double norm = 0.0;
        for (int d = 0; d < hd; ++d) {
          x[d] = double(kvkit::to_float(before[base + d]));
          norm = std::max(norm, std::fabs(x[d]));
        }
        const auto ref = reference_rotate(x, positions[t], inv, cfg.rotary_dim, cfg.style, af);
        for (int d = 0; d < hd; ++d) {
          addressed[base + d] = true;
          const double g = double(kvkit::to_float(got[base + d]));
          if (d >= cfg.rotary_dim) {
            REQUIRE(std::memcmp(&got[base + d], &before[base + d], sizeof(T)) == 0);
          } else if (std::fabs(g - ref[d]) > rel_tol * std::max(norm, std::fabs(ref[d])) * 2.0) {
            FAIL("token " << t << " (position " << positions[t] << ") head " << h << " dim " << d
                          << ": got " << g << ", expected " << ref[d]);
          }
        }
      }
    }
    for (std::size_t i = 0; i < got.size(); ++i) {
      if (!addressed[i]) REQUIRE(std::memcmp(&got[i], &poison, sizeof(T)) == 0);
    }
  };
  check_tensor(q, q0, q_token_stride, q_head_stride, c.num_q_heads);
  check_tensor(k, k0, k_token_stride, k_head_stride, c.num_k_heads);
}

template <class T>
void check_all_cases() {
  RopeConfig partial = RopeConfig::llama3();
  partial.head_dim = 96;
  partial.rotary_dim = 32;  // partial rotary: the tail 64 dims must stay bit-exact
  RopeConfig gptj{64, 64, 10000.0, RopeStyle::kGptJ, {}};
  RopeConfig linear = RopeConfig::llama3();
  linear.scaling.type = RopeScalingType::kLinear;
  linear.scaling.factor = 4.0;
  RopeConfig yarn_plain{128, 128, 1000000.0, RopeStyle::kNeox, {}};
  yarn_plain.scaling.type = RopeScalingType::kYarn;
  yarn_plain.scaling.factor = 4.0;
  yarn_plain.scaling.original_max_position = 32768;  // attention_factor = 0.1 ln 4 + 1 scales cos/sin
  for (bool fly : {false, true}) {
    INFO("on the fly: " << fly);
    check_apply<T>({RopeConfig::llama3(), 32, 8, 33, fly}, 1);
    check_apply<T>({RopeConfig::llama3_1(), 7, 1, 17, fly}, 2);
    check_apply<T>({partial, 5, 5, 9, fly}, 3);
    check_apply<T>({gptj, 3, 1, 7, fly}, 4);
    check_apply<T>({RopeConfig::deepseek_yarn(), 16, 1, 11, fly}, 5);
    check_apply<T>({linear, 2, 2, 3, fly}, 6);
    check_apply<T>({yarn_plain, 4, 2, 5, fly}, 7);
    check_apply<T>({RopeConfig::llama3(), 1, 1, 1, fly}, 8);
  }
}

RopeParams dense_params(std::vector<float>& k, const std::vector<std::int64_t>& pos, int heads,
                        const RopeConfig& cfg, const kvkit::RopeCache& cache) {
  RopeParams p;
  p.k = k.data(); p.num_k_heads = heads; p.k_head_stride = cfg.head_dim; p.k_token_stride = heads * cfg.head_dim;
  p.positions = pos.data(); p.num_tokens = std::int64_t(pos.size());
  p.head_dim = cfg.head_dim; p.rotary_dim = cfg.rotary_dim; p.style = cfg.style;
  cache.attach(p);
  return p;
}

}  // namespace

TEST_CASE("rope inverse frequencies follow base^(-2i/d), linear and NTK scaling") {
  RopeConfig c{64, 64, 10000.0, RopeStyle::kNeox, {}};
  auto inv = kvkit::rope_inv_freq(c);
  REQUIRE(inv.size() == 32);
  for (int i = 0; i < 32; ++i) CHECK(inv[i] == Approx(std::pow(10000.0, -2.0 * i / 64)).epsilon(1e-14));
  c.scaling.type = RopeScalingType::kLinear;
  c.scaling.factor = 2.0;
  inv = kvkit::rope_inv_freq(c);
  CHECK(inv[5] == Approx(std::pow(10000.0, -10.0 / 64) / 2.0).epsilon(1e-14));
  c.scaling.type = RopeScalingType::kNtkStatic;
  inv = kvkit::rope_inv_freq(c);
  const double ntk_base = 10000.0 * std::pow(2.0, 64.0 / 62.0);
  CHECK(inv[5] == Approx(std::pow(ntk_base, -10.0 / 64)).epsilon(1e-14));
  c.scaling.type = RopeScalingType::kNtkDynamic;
  c.scaling.original_max_position = 1000;
  CHECK(kvkit::rope_inv_freq(c, 800)[5] == Approx(std::pow(10000.0, -10.0 / 64)).epsilon(1e-14));
  const double grown = 10000.0 * std::pow(2.0 * 3000.0 / 1000.0 - 1.0, 64.0 / 62.0);
  CHECK(kvkit::rope_inv_freq(c, 3000)[5] == Approx(std::pow(grown, -10.0 / 64)).epsilon(1e-14));
}

TEST_CASE("Llama-3.1 frequency table equals independently computed values") {
  // Computed separately with a transcription of HF transformers'
  // _compute_llama3_parameters in Python (float64).
  const auto inv = kvkit::rope_inv_freq(RopeConfig::llama3_1());
  REQUIRE(inv.size() == 64);
  const std::pair<int, double> expected[] = {{0, 1.0},
                                             {1, 0.8146172338565447},
                                             {20, 0.016560440080994446},
                                             {31, 0.0008567514129196321},
                                             {40, 3.428102195952591e-05},
                                             {45, 1.2297638677963614e-05},
                                             {63, 3.068925988914511e-07}};
  for (auto [i, v] : expected) CHECK(inv[i] == Approx(v).epsilon(1e-12));
}

TEST_CASE("DeepSeek YaRN frequency table and mscale equal independently computed values") {
  // Computed separately with a transcription of HF transformers'
  // _compute_yarn_parameters in Python (float64): correction range [10, 23].
  const RopeConfig c = RopeConfig::deepseek_yarn();
  const auto inv = kvkit::rope_inv_freq(c);
  REQUIRE(inv.size() == 32);
  const std::pair<int, double> expected[] = {{0, 1.0},
                                             {5, 0.23713737056616555},
                                             {10, 0.056234132519034905},
                                             {12, 0.026879360111431223},
                                             {16, 0.0055},
                                             {20, 0.0007905694150420945},
                                             {25, 1.8747355233311396e-05},
                                             {31, 3.33380358040831e-06}};
  for (auto [i, v] : expected) CHECK(inv[i] == Approx(v).epsilon(1e-12));
  CHECK(kvkit::rope_attention_factor(c) == 1.0);
  CHECK(kvkit::yarn_softmax_mscale(c) == Approx(1.3688879454113936).epsilon(1e-14));
  RopeConfig plain = c;
  plain.scaling.yarn_mscale = plain.scaling.yarn_mscale_all_dim = 0.0;
  CHECK(kvkit::rope_attention_factor(plain) == Approx(0.1 * std::log(40.0) + 1.0).epsilon(1e-14));
}

TEST_CASE("apply_rope matches the float64 formula for every style, scaling and storage type") {
  SECTION("float32") { check_all_cases<float>(); }
  SECTION("float16") { check_all_cases<kvkit::half>(); }
  SECTION("bfloat16") { check_all_cases<kvkit::bfloat16>(); }
}

TEST_CASE("rotation preserves vector norms") {
  const RopeConfig cfg = RopeConfig::llama3();
  const kvkit::RopeCache cache(cfg, 5000);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> k(std::size_t(64 * 128));
  for (float& x : k) x = normal(rng);
  std::vector<std::int64_t> pos(64);
  for (auto& v : pos) v = std::int64_t(rng() % 5000);
  const std::vector<float> before = k;
  kvkit::apply_rope(dense_params(k, pos, 1, cfg, cache));
  for (int t = 0; t < 64; ++t) {
    double n0 = 0, n1 = 0;
    for (int d = 0; d < 128; ++d) {
      n0 += double(before[t * 128 + d]) * before[t * 128 + d];
      n1 += double(k[t * 128 + d]) * k[t * 128 + d];
    }
    CHECK(std::sqrt(n1) == Approx(std::sqrt(n0)).epsilon(2e-6));
  }
}

TEST_CASE("shifting rotated keys by delta equals rotating them at position + delta") {
  for (RopeStyle style : {RopeStyle::kNeox, RopeStyle::kGptJ}) {
    RopeConfig cfg = RopeConfig::llama3_1();
    cfg.style = style;
    const kvkit::RopeCache cache(cfg, 8192);
    std::mt19937 rng(5);
    std::normal_distribution<float> normal;
    const int heads = 3, n = 40;
    std::vector<float> k(std::size_t(n * heads * 128));
    for (float& x : k) x = normal(rng);
    std::vector<float> direct = k;
    std::vector<std::int64_t> pos(n), delta(n), moved(n);
    for (int t = 0; t < n; ++t) {
      pos[t] = 1000 + std::int64_t(rng() % 3000);
      delta[t] = std::int64_t(rng() % 1999) - 999;  // context shift moves keys back, StreamingLLM too
      moved[t] = pos[t] + delta[t];
    }
    kvkit::apply_rope(dense_params(k, pos, heads, cfg, cache));
    kvkit::rope_shift_keys(dense_params(k, delta, heads, cfg, cache));
    kvkit::apply_rope(dense_params(direct, moved, heads, cfg, cache));
    for (std::size_t i = 0; i < k.size(); ++i) REQUIRE(k[i] == Approx(direct[i]).margin(2e-5));
  }
}

TEST_CASE("interleaved and rotate-half orders give the same attention scores") {
  // DeepSeek's official k_pe is interleaved (kGptJ); HF's port de-interleaves
  // and uses rotate-half (kNeox). Rotating then reordering equals reordering
  // then rotating in the other style, so q.k agrees.
  const RopeConfig gptj = RopeConfig::deepseek_yarn();
  RopeConfig neox = gptj;
  neox.style = RopeStyle::kNeox;
  const kvkit::RopeCache cache_g(gptj, 256), cache_n(neox, 256);
  std::mt19937 rng(9);
  std::normal_distribution<float> normal;
  std::vector<float> a(64 * 5);
  for (float& x : a) x = normal(rng);
  std::vector<float> b = a;
  const std::vector<std::int64_t> pos = {0, 3, 77, 128, 255};
  kvkit::apply_rope(dense_params(a, pos, 1, gptj, cache_g));
  kvkit::rope_reorder_dims(a.data(), 5, 64, 64, RopeStyle::kGptJ, RopeStyle::kNeox);
  kvkit::rope_reorder_dims(b.data(), 5, 64, 64, RopeStyle::kGptJ, RopeStyle::kNeox);
  kvkit::apply_rope(dense_params(b, pos, 1, neox, cache_n));
  for (std::size_t i = 0; i < a.size(); ++i) REQUIRE(a[i] == b[i]);
  // And the round trip is the identity.
  std::vector<float> c = a;
  kvkit::rope_reorder_dims(c.data(), 5, 64, 64, RopeStyle::kNeox, RopeStyle::kGptJ);
  kvkit::rope_reorder_dims(c.data(), 5, 64, 64, RopeStyle::kGptJ, RopeStyle::kNeox);
  CHECK(c == a);
  CHECK(a[1] != c[2]);  // the reorder really moves data
}

TEST_CASE("bad rope input raises a clear error and changes nothing") {
  RopeConfig cfg = RopeConfig::llama3();
  SECTION("config") {
    cfg.rotary_dim = 63;
    CHECK_THROWS_WITH(cfg.validate(), Contains("'rotary_dim' = 63: expected a positive even number"));
    cfg.rotary_dim = 256;
    CHECK_THROWS_WITH(kvkit::rope_inv_freq(cfg), Contains("'rotary_dim' = 256: expected <= head_dim (128)"));
    cfg = RopeConfig::llama3_1();
    cfg.scaling.original_max_position = 0;
    CHECK_THROWS_WITH(cfg.validate(), Contains("scaling.original_max_position"));
  }
  const kvkit::RopeCache cache(RopeConfig::llama3(), 100);
  std::vector<float> k(3 * 128, 0.5f);
  std::vector<std::int64_t> pos = {0, 5, 7};
  const std::vector<float> before = k;
  SECTION("negative position") {
    pos[1] = -5;
    CHECK_THROWS_WITH(kvkit::apply_rope(dense_params(k, pos, 1, RopeConfig::llama3(), cache)),
                      "kvkit::apply_rope: argument 'positions[1]' = -5: expected >= 0");
  }
  SECTION("position beyond the table") {
    pos[2] = 100;
    CHECK_THROWS_WITH(kvkit::apply_rope(dense_params(k, pos, 1, RopeConfig::llama3(), cache)),
                      Contains("'positions[2]' = 100: expected |position| < 100"));
  }
  SECTION("unsupported dtype") {
    auto p = dense_params(k, pos, 1, RopeConfig::llama3(), cache);
    p.dtype = kvkit::DType::kInt8;
    CHECK_THROWS_WITH(kvkit::apply_rope(p), Contains("'dtype' = int8: expected one of {float32, float16, bfloat16}"));
  }
  SECTION("null positions") {
    auto p = dense_params(k, pos, 1, RopeConfig::llama3(), cache);
    p.positions = nullptr;
    CHECK_THROWS_WITH(kvkit::apply_rope(p), Contains("'positions' = nullptr"));
  }
  SECTION("shift with a query") {
    auto p = dense_params(k, pos, 1, RopeConfig::llama3(), cache);
    p.q = k.data();
    p.num_q_heads = 1;
    CHECK_THROWS_WITH(kvkit::rope_shift_keys(p), Contains("only keys are shifted"));
  }
  CHECK(k == before);
}

TEST_CASE("fused rope + append equals apply_rope then append_kv bit for bit") {
  for (bool hnd : {false, true}) {
    for (int page_size : {1, 16}) {
      const RopeConfig cfg = RopeConfig::llama3_1();
      const int q_heads = 8, kv_heads = 2, hd = cfg.head_dim, n = 37;
      const kvkit::RopeCache cache(cfg, 4096);
      const std::int64_t pages = 128 / page_size + 8;
      const auto layout = hnd ? kvkit::PagedKVLayout::hnd(pages, page_size, kv_heads, hd)
                              : kvkit::PagedKVLayout::nhd(pages, page_size, kv_heads, hd);
      std::mt19937 rng(17);
      std::normal_distribution<float> normal;
      std::vector<kvkit::bfloat16> q(std::size_t(n * q_heads * hd)), key(std::size_t(n * kv_heads * hd)),
          value(key.size());
      for (auto* vec : {&q, &key, &value})
        for (auto& x : *vec) x = kvkit::bfloat16(normal(rng));
      std::vector<std::int64_t> positions(n), slots(n);
      for (int t = 0; t < n; ++t) {
        positions[t] = std::int64_t(rng() % 4096);
        slots[t] = t % 5 == 3 ? -1 : std::int64_t(t * 2 + 1);  // some padding tokens
      }
      const kvkit::bfloat16 poison = kvkit::bfloat16::from_bits(0x7fc1);
      std::vector<kvkit::bfloat16> kc_fused(std::size_t(pages * layout.page_elements()), poison), vc_fused(kc_fused);
      std::vector<kvkit::bfloat16> kc_ref(kc_fused), vc_ref(kc_fused);

      RopeParams rope;
      rope.q = q.data(); rope.q_token_stride = q_heads * hd; rope.q_head_stride = hd; rope.num_q_heads = q_heads;
      rope.positions = positions.data(); rope.num_tokens = n;
      rope.head_dim = hd; rope.rotary_dim = cfg.rotary_dim; rope.style = cfg.style;
      rope.dtype = kvkit::DType::kBFloat16;
      cache.attach(rope);
      std::vector<kvkit::bfloat16> q_ref = q, key_ref = key;
      const std::vector<kvkit::bfloat16> key_before = key;

      auto fused = kvkit::AppendKVArgs::dense(key.data(), value.data(), slots.data(), n, kv_heads, hd,
                                              kc_fused.data(), vc_fused.data(), kvkit::DType::kBFloat16);
      kvkit::rope_append_kv(rope, layout, fused);

      RopeParams apart = rope;
      apart.q = q_ref.data();
      apart.k = key_ref.data(); apart.k_token_stride = kv_heads * hd; apart.k_head_stride = hd; apart.num_k_heads = kv_heads;
      kvkit::apply_rope(apart);
      kvkit::append_kv(layout, kvkit::AppendKVArgs::dense(key_ref.data(), value.data(), slots.data(), n, kv_heads, hd,
                                                          kc_ref.data(), vc_ref.data(), kvkit::DType::kBFloat16));
      const auto same = [](const std::vector<kvkit::bfloat16>& a, const std::vector<kvkit::bfloat16>& b) {
        return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 2) == 0;
      };
      CHECK(same(q, q_ref));
      CHECK(same(kc_fused, kc_ref));
      CHECK(same(vc_fused, vc_ref));
      CHECK(same(key, key_before));  // the key source is not modified
    }
  }
}

namespace {

// Keys of `n` tokens rotated at `pos` and written into a paged cache at `slots`
// (float math; returned as float rows [n, heads, hd]).
std::vector<float> rotated_keys(const std::vector<float>& raw, const std::vector<std::int64_t>& pos, int heads,
                                const RopeConfig& cfg, const kvkit::RopeCache& cache) {
  std::vector<float> k = raw;
  RopeParams p;
  p.k = k.data(); p.num_k_heads = heads; p.k_head_stride = cfg.head_dim; p.k_token_stride = heads * cfg.head_dim;
  p.positions = pos.data(); p.num_tokens = std::int64_t(pos.size());
  p.head_dim = cfg.head_dim; p.rotary_dim = cfg.rotary_dim; p.style = cfg.style;
  cache.attach(p);
  kvkit::apply_rope(p);
  return k;
}

RopeParams shift_params(const std::vector<std::int64_t>& deltas, const RopeConfig& cfg, const kvkit::RopeCache& cache) {
  RopeParams p;
  p.positions = deltas.data(); p.num_tokens = std::int64_t(deltas.size());
  p.head_dim = cfg.head_dim; p.rotary_dim = cfg.rotary_dim; p.style = cfg.style;
  cache.attach(p);
  return p;
}

}  // namespace

TEST_CASE("K-shift inside a paged cache equals rotating at the shifted positions") {
  RopeConfig cfg = RopeConfig::llama3();
  cfg.head_dim = 96;
  cfg.rotary_dim = 64;  // partial rotary: the tail must survive the shift
  const int heads = 3, n = 40, page = 16;
  const kvkit::RopeCache table(cfg, 8192);
  std::mt19937 rng(41);
  std::normal_distribution<float> normal;
  std::vector<float> raw(std::size_t(n * heads * cfg.head_dim));
  for (float& x : raw) x = normal(rng);
  std::vector<std::int64_t> pos(n), delta(n), moved(n), slots(n);
  for (int t = 0; t < n; ++t) {
    pos[t] = 2000 + t;
    delta[t] = -1000 - std::int64_t(rng() % 500);  // context shift moves keys back
    moved[t] = pos[t] + delta[t];
    slots[t] = t == 7 ? -1 : std::int64_t((t * 37) % (8 * page));  // scattered over 8 pages, one padding token
  }
  const std::vector<float> at_pos = rotated_keys(raw, pos, heads, cfg, table);
  const std::vector<float> at_moved = rotated_keys(raw, moved, heads, cfg, table);
  for (bool hnd : {false, true}) {
    const auto layout = hnd ? kvkit::PagedKVLayout::hnd(8, page, heads, cfg.head_dim)
                            : kvkit::PagedKVLayout::nhd(8, page, heads, cfg.head_dim);
    const float poison = -555.0f;
    SECTION(hnd ? "float32 HND" : "float32 NHD") {
      std::vector<float> kc(std::size_t(8 * layout.page_elements()), poison), vc = kc;
      kvkit::append_kv(layout, kvkit::AppendKVArgs::dense(at_pos.data(), at_pos.data(), slots.data(), n, heads,
                                                          cfg.head_dim, kc.data(), vc.data(), kvkit::DType::kFloat32));
      kvkit::RopeShiftCacheArgs a;
      a.k_cache = kc.data();
      a.cache_dtype = kvkit::DType::kFloat32;
      a.slots = slots.data();
      kvkit::rope_shift_cache_keys(shift_params(delta, cfg, table), layout, a);
      std::vector<bool> seen(kc.size(), false);
      for (int t = 0; t < n; ++t) {
        if (slots[t] < 0) continue;
        for (int h = 0; h < heads; ++h)
          for (int d = 0; d < cfg.head_dim; ++d) {
            const std::int64_t i = layout.slot_offset(slots[t], h) + d;
            seen[std::size_t(i)] = true;
            const float want = at_moved[(std::size_t(t) * heads + h) * cfg.head_dim + d];
            if (d >= cfg.rotary_dim) {
              REQUIRE(kc[std::size_t(i)] == want);  // the unrotated tail is bit-exact
            } else {
              REQUIRE(kc[std::size_t(i)] == Approx(want).margin(3e-5));
            }
          }
      }
      for (std::size_t i = 0; i < kc.size(); ++i) {
        if (!seen[i]) REQUIRE(kc[i] == poison);
      }
    }
  }
}

TEST_CASE("K-shift of an fp8/int8 cache re-quantizes within one extra rounding") {
  const RopeConfig cfg = RopeConfig::llama3();
  const int heads = 2, n = 33, hd = cfg.head_dim;
  const kvkit::RopeCache table(cfg, 8192);
  std::mt19937 rng(43);
  std::normal_distribution<float> normal;
  std::vector<float> raw(std::size_t(n * heads * hd));
  for (float& x : raw) x = 3.0f * normal(rng);
  std::vector<std::int64_t> pos(n), delta(n), moved(n), slots(n);
  for (int t = 0; t < n; ++t) {
    pos[t] = 5000 + 3 * t;
    delta[t] = std::int64_t(rng() % 3000) - 1500;
    moved[t] = pos[t] + delta[t];
    slots[t] = n - 1 - t;
  }
  const auto at_pos = rotated_keys(raw, pos, heads, cfg, table);
  const auto at_moved = rotated_keys(raw, moved, heads, cfg, table);
  const auto layout = kvkit::PagedKVLayout::nhd(4, 16, heads, hd);
  struct Format { kvkit::DType dtype; double half_ulp; };  // relative half-ulp (int8: of the scale)
  for (Format f : {Format{kvkit::DType::kFloat8E4M3, 0x1p-4}, Format{kvkit::DType::kFloat8E5M2, 0x1p-3},
                   Format{kvkit::DType::kInt8, 0.5}}) {
    for (auto g : {kvkit::ScaleGranularity::kPerTensor, kvkit::ScaleGranularity::kPerTokenHead}) {
      INFO("dtype " << kvkit::dtype_name(f.dtype) << " granularity " << int(g));
      std::vector<std::uint8_t> kc(std::size_t(4 * layout.page_elements()), 0xAB), vc = kc;
      const float static_scale = 16.0f / kvkit::quantized_max(f.dtype);  // room above |k| ~ 3 sigma
      std::vector<float> scale_cache(std::size_t(layout.num_slots() * heads), -1.0f), v_scale_cache = scale_cache;
      kvkit::QuantizeAppendArgs q;
      q.key = at_pos.data(); q.value = at_pos.data();
      q.key_stride_token = q.value_stride_token = heads * hd;
      q.key_stride_head = q.value_stride_head = hd;
      q.slot_mapping = slots.data(); q.num_tokens = n;
      q.k_cache = kc.data(); q.v_cache = vc.data();
      q.src_dtype = kvkit::DType::kFloat32; q.cache_dtype = f.dtype; q.granularity = g;
      q.k_scale = q.v_scale = &static_scale;
      q.k_scale_cache = scale_cache.data(); q.v_scale_cache = v_scale_cache.data();
      kvkit::quantize_append_kv(layout, q);
      // What one more quantization of the rotated stored values gives, per row.
      std::vector<float> before_scale = scale_cache;
      kvkit::RopeShiftCacheArgs a;
      a.k_cache = kc.data(); a.cache_dtype = f.dtype; a.slots = slots.data(); a.granularity = g;
      a.k_scale = &static_scale; a.k_scale_cache = scale_cache.data();
      kvkit::rope_shift_cache_keys(shift_params(delta, cfg, table), layout, a);
      for (int t = 0; t < n; ++t)
        for (int h = 0; h < heads; ++h) {
          const std::int64_t off = layout.slot_offset(slots[t], h);
          const std::int64_t si = kvkit::scale_index(g, slots[t], h, heads);
          const float s_old = g == kvkit::ScaleGranularity::kPerTensor ? static_scale : before_scale[std::size_t(si)];
          const float s_new = g == kvkit::ScaleGranularity::kPerTensor ? static_scale : scale_cache[std::size_t(si)];
          double row_max = 0;
          for (int d = 0; d < hd; ++d) row_max = std::max(row_max, std::fabs(double(at_moved[(std::size_t(t) * heads + h) * hd + d])));
          for (int d = 0; d < hd; ++d) {
            const double got = kvkit::dequantize_value(kc[std::size_t(off + d)], s_new, f.dtype);
            const double want = at_moved[(std::size_t(t) * heads + h) * hd + d];
            // Stored error (one rounding at s_old) rotated (a pair's error grows by at most sqrt 2)
            // plus the new rounding at s_new; fp8 rounding is relative to the value, int8 to the scale.
            const double u_old = f.dtype == kvkit::DType::kInt8 ? 0.5 * s_old : f.half_ulp * row_max;
            const double u_new = f.dtype == kvkit::DType::kInt8 ? 0.5 * s_new : f.half_ulp * row_max;
            REQUIRE(std::fabs(got - want) <= std::sqrt(2.0) * u_old + u_new + 1e-6);
          }
        }
    }
  }
}

TEST_CASE("bad K-shift input raises a clear error and changes nothing") {
  const RopeConfig cfg = RopeConfig::llama3();
  const kvkit::RopeCache table(cfg, 100);
  const auto layout = kvkit::PagedKVLayout::nhd(2, 16, 1, 128);
  std::vector<float> kc(std::size_t(2 * layout.page_elements()), 1.0f);
  const std::vector<float> before = kc;
  std::vector<std::int64_t> delta = {5, -7}, slots = {0, 31};
  kvkit::RopeShiftCacheArgs a;
  a.k_cache = kc.data();
  a.cache_dtype = kvkit::DType::kFloat32;
  a.slots = slots.data();
  SECTION("slot beyond the cache") {
    slots[1] = 32;
    CHECK_THROWS_WITH(kvkit::rope_shift_cache_keys(shift_params(delta, cfg, table), layout, a), Contains("slot_mapping[1] = 32"));
  }
  SECTION("delta beyond the table") {
    delta[0] = -100;
    CHECK_THROWS_WITH(kvkit::rope_shift_cache_keys(shift_params(delta, cfg, table), layout, a), Contains("'positions[0]' = -100"));
  }
  SECTION("quantized cache without a scale") {
    a.cache_dtype = kvkit::DType::kFloat8E4M3;
    CHECK_THROWS_WITH(kvkit::rope_shift_cache_keys(shift_params(delta, cfg, table), layout, a), Contains("'k_scale' = nullptr"));
  }
  SECTION("head_dim mismatch") {
    const auto other = kvkit::PagedKVLayout::nhd(2, 16, 1, 64);
    CHECK_THROWS_WITH(kvkit::rope_shift_cache_keys(shift_params(delta, cfg, table), other, a), Contains("'rope.head_dim' = 128"));
  }
  CHECK(kc == before);
}
