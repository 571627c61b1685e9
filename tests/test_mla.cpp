// MLA: config and presets, cache sizes, W_UKV slicing, and the fused compress
// (RMSNorm of c_kv + decoupled RoPE of k_pe + append) against float64.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

#include "kvkit/ops/mla_compress.hpp"
#include "kvkit/ops/mla_config.hpp"
#include "kvkit/ops/mla_decode.hpp"
#include "kvkit/ops/merge_states.hpp"

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
    args.cache_rotary_dim = table->rotary_dim();
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
  SECTION("a rope table made for another width") {
    const kvkit::RopeCache narrow(kvkit::RopeConfig{16, 16, 10000.0, kvkit::RopeStyle::kGptJ, {}}, 5000);
    p.args.cos_sin_cache = narrow.data();  // rows of 16 floats, read as rows of 8 would be wrong angles
    p.args.cache_rotary_dim = narrow.rotary_dim();
    CHECK_THROWS_WITH(kvkit::mla_compress(p.layout, p.args),
                      Contains("'rotary_dim' = 8") && Contains("the attached RoPE table (16)"));
  }
  SECTION("config with a rope width that is not the table's") {
    MlaConfig c;
    c.qk_rope_head_dim = 32;
    CHECK_THROWS_WITH(c.validate(), Contains("'qk_rope_head_dim' = 32"));
  }
  CHECK(p.cache == before);
}

namespace {

// Random latent cache + queries; compares absorbed decode (kvkit) with the
// naive path (decompress K_nope and V per head, standard attention) in float64.
template <class KVT>
void check_absorbed_equals_naive(const MlaConfig& c, std::vector<int> seq_lens, int page_size,
                                 double tol, std::uint64_t seed, std::int64_t split = -1) {
  std::mt19937 rng(static_cast<unsigned>(seed));
  std::normal_distribution<float> normal;
  const int rank = c.kv_lora_rank, rope = c.qk_rope_head_dim, lat = c.latent_dim();
  const int batch = int(seq_lens.size());
  std::int64_t max_blocks = 0, pages = 0;
  for (int len : seq_lens) {
    max_blocks = std::max<std::int64_t>(max_blocks, (len + page_size - 1) / page_size);
    pages += (len + page_size - 1) / page_size;
  }
  const auto layout = kvkit::LatentKVLayout::dense(pages, page_size, rank, rope);
  std::vector<KVT> cache(std::size_t(pages * layout.stride_page));
  for (auto& x : cache) x = kvkit::from_float<KVT>(0.3f * normal(rng));
  std::vector<std::int32_t> table(std::size_t(batch * max_blocks), 0), lens(seq_lens.begin(), seq_lens.end());
  std::int32_t next = 0;
  for (int b = 0; b < batch; ++b)
    for (std::int64_t i = 0; i < (seq_lens[b] + page_size - 1) / page_size; ++i) table[b * max_blocks + i] = next++;
  std::vector<float> w_uk(std::size_t(c.n_heads) * c.qk_nope_head_dim * rank), w_uv(std::size_t(c.n_heads) * c.v_head_dim * rank);
  for (auto& x : w_uk) x = normal(rng) / std::sqrt(float(rank));
  for (auto& x : w_uv) x = normal(rng) / std::sqrt(float(rank));
  std::vector<float> q_nope(std::size_t(batch) * c.n_heads * c.qk_nope_head_dim), q_pe(std::size_t(batch) * c.n_heads * rope);
  for (auto& x : q_nope) x = normal(rng);
  for (auto& x : q_pe) x = normal(rng);

  // Absorbed: q = [W_UKᵀ q_nope | q_pe] per head, attention over the latent cache, then W_UV.
  std::vector<float> q(std::size_t(batch) * c.n_heads * lat);
  kvkit::mla_absorb_query(c, q_nope.data(), batch, w_uk.data(), q.data(), std::int64_t(c.n_heads) * lat, lat);
  for (int t = 0; t < batch; ++t)
    for (int h = 0; h < c.n_heads; ++h)
      for (int d = 0; d < rope; ++d) q[(std::size_t(t) * c.n_heads + h) * lat + rank + d] = q_pe[(std::size_t(t) * c.n_heads + h) * rope + d];
  std::vector<float> o_lat(std::size_t(batch) * c.n_heads * rank), lse(std::size_t(batch) * c.n_heads);
  kvkit::PagedDecodeParams p = kvkit::mla_decode_params(c, layout, cache.data(), kvkit::dtype_of<KVT>);
  p.q = q.data();
  p.q_stride_head = lat;
  p.q_stride_token = std::int64_t(c.n_heads) * lat;
  p.page_table = {table.data(), lens.data(), batch, max_blocks, max_blocks};
  p.o = o_lat.data();
  p.o_stride_head = rank;
  p.o_stride_token = std::int64_t(c.n_heads) * rank;
  p.lse = lse.data();
  p.q_dtype = kvkit::DType::kFloat32;
  if (split < 0) {
    kvkit::paged_decode_attention(p);
  } else {  // split-KV: [0, split) and [split, end), merged
    std::vector<float> o2(o_lat.size()), lse2(lse.size());
    p.kv_end = split;
    kvkit::paged_decode_attention(p);
    p.kv_begin = split;
    p.kv_end = INT64_MAX;
    p.o = o2.data();
    p.lse = lse2.data();
    kvkit::paged_decode_attention(p);
    kvkit::merge_states(o_lat.data(), lse.data(), o2.data(), lse2.data(), o_lat.data(), lse.data(),
                        std::int64_t(lse.size()), rank);
  }
  std::vector<float> out(std::size_t(batch) * c.n_heads * c.v_head_dim);
  kvkit::mla_project_output(c, o_lat.data(), std::int64_t(c.n_heads) * rank, rank, batch, w_uv.data(), out.data());

  // Naive, float64: decompress every cached token per head.
  const double scale = c.softmax_scale();
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < c.n_heads; ++h) {
      std::vector<double> s(static_cast<std::size_t>(seq_lens[b]));
      std::vector<std::vector<double>> v(s.size(), std::vector<double>(static_cast<std::size_t>(c.v_head_dim)));
      double m = -1e300;
      for (int t = 0; t < seq_lens[b]; ++t) {
        const std::int64_t row = layout.slot_offset(std::int64_t(table[b * max_blocks + t / page_size]) * page_size + t % page_size);
        auto ckv = [&](int k) { return double(kvkit::to_float(cache[row + k])); };
        double dot = 0;
        for (int d = 0; d < c.qk_nope_head_dim; ++d) {
          double k_nope = 0;
          for (int k = 0; k < rank; ++k) k_nope += double(w_uk[(std::size_t(h) * c.qk_nope_head_dim + d) * rank + k]) * ckv(k);
          dot += double(q_nope[(std::size_t(b) * c.n_heads + h) * c.qk_nope_head_dim + d]) * k_nope;
        }
        for (int d = 0; d < rope; ++d) dot += double(q_pe[(std::size_t(b) * c.n_heads + h) * rope + d]) * ckv(rank + d);
        for (int d = 0; d < c.v_head_dim; ++d) {
          double val = 0;
          for (int k = 0; k < rank; ++k) val += double(w_uv[(std::size_t(h) * c.v_head_dim + d) * rank + k]) * ckv(k);
          v[t][d] = val;
        }
        s[t] = dot * scale;
        m = std::max(m, s[t]);
      }
      double sum = 0;
      for (double& e : s) sum += (e = std::exp(e - m));
      double worst = 0, norm = 0;
      for (int d = 0; d < c.v_head_dim; ++d) {
        double want = 0;
        for (int t = 0; t < seq_lens[b]; ++t) want += s[t] / sum * v[t][d];
        norm = std::max(norm, std::fabs(want));
        worst = std::max(worst, std::fabs(double(out[(std::size_t(b) * c.n_heads + h) * c.v_head_dim + d]) - want));
      }
      if (!(worst <= tol * std::max(norm, 0.1))) FAIL("seq " << b << " head " << h << ": max |o - naive| = " << worst << " (scale " << norm << ")");
    }
  }
}

}  // namespace

TEST_CASE("absorbed MLA decode over the latent cache equals the naive decompress path") {
  SECTION("DeepSeek-V2-Lite dims, fp32 cache, page 64") {
    check_absorbed_equals_naive<float>(MlaConfig::deepseek_v2_lite(), {1, 65, 130}, 64, 1e-5, 1);
  }
  SECTION("V2-Lite dims, bf16 cache") {
    check_absorbed_equals_naive<kvkit::bfloat16>(MlaConfig::deepseek_v2_lite(), {3, 64, 200}, 64, 1e-2, 2);
  }
  SECTION("small random dims, page 1 and 16") {
    MlaConfig c;
    c.n_heads = 3;
    c.kv_lora_rank = 32;
    c.qk_nope_head_dim = 16;
    c.qk_rope_head_dim = 8;
    c.v_head_dim = 24;
    c.rope.head_dim = c.rope.rotary_dim = 8;
    check_absorbed_equals_naive<float>(c, {1, 2, 17, 300}, 1, 1e-5, 3);
    check_absorbed_equals_naive<float>(c, {1, 2, 17, 300}, 16, 1e-5, 4);
  }
  SECTION("split-KV equals unsplit") {
    check_absorbed_equals_naive<float>(MlaConfig::deepseek_v2_lite(), {1, 65, 130}, 64, 1e-5, 1, 64);
  }
}

namespace {

/// A CompressProblem's rows and cache converted to T.
template <class T>
struct TypedCompress {
  CompressProblem p;
  std::vector<T> kv_a, cache;
  kvkit::MlaCompressArgs args;
  explicit TypedCompress(int tokens) : p(512, 64, 64, tokens, 11) {
    for (float x : p.kv_a) kv_a.push_back(kvkit::from_float<T>(x));
    cache.assign(p.cache.size(), kvkit::from_float<T>(-999.0f));
    args = p.args;
    args.kv_a = kv_a.data();
    args.cache = cache.data();
    args.dtype = kvkit::dtype_of<T>;
  }
};

template <class T>
void check_compress_store_kinds_and_chunks() {
  using kvkit::detail::StoreKind;
  const int tokens = 300;  // several chunks of 64 tokens, shared by OpenMP threads
  TypedCompress<T> whole(tokens), streaming(tokens), one_by_one(tokens);
  kvkit::mla_compress(whole.p.layout, whole.args);
  kvkit::detail::mla_compress_with(streaming.p.layout, streaming.args, StoreKind::kStreaming);
  for (int t = 0; t < tokens; ++t) {
    kvkit::MlaCompressArgs a = one_by_one.args;
    a.kv_a = one_by_one.kv_a.data() + std::size_t(t) * std::size_t(a.kv_a_stride_token);
    a.positions += t;
    a.slot_mapping += t;
    a.num_tokens = 1;
    kvkit::detail::mla_compress_with(one_by_one.p.layout, a, StoreKind::kOrdinary);
  }
  REQUIRE(std::memcmp(whole.cache.data(), one_by_one.cache.data(), whole.cache.size() * sizeof(T)) == 0);
  REQUIRE(std::memcmp(streaming.cache.data(), one_by_one.cache.data(), whole.cache.size() * sizeof(T)) == 0);
  // And the values, against float64 from the same (rounded) inputs: one
  // rounding to T of the float result, plus float32's own error.
  const auto inv = kvkit::rope_inv_freq(whole.p.rope);
  const double tol = std::is_same_v<T, kvkit::bfloat16> ? 1.0 / 128 : 1.0 / 1024;
  std::size_t written = 0;
  for (int t = 0; t < tokens; ++t) {
    const std::int64_t slot = whole.p.slots[std::size_t(t)];
    if (slot < 0) continue;
    const T* src = &whole.kv_a[std::size_t(t) * std::size_t(whole.args.kv_a_stride_token)];
    const T* row = &whole.cache[std::size_t(whole.p.layout.slot_offset(slot))];
    double ss = 0;
    for (int c = 0; c < 512; ++c) ss += double(kvkit::to_float(src[c])) * kvkit::to_float(src[c]);
    const double inv_rms = 1.0 / std::sqrt(ss / 512 + 1e-6);
    for (int c = 0; c < 512; ++c) {
      const double want = kvkit::to_float(src[c]) * inv_rms * whole.p.weight[std::size_t(c)];
      REQUIRE(std::fabs(kvkit::to_float(row[c]) - want) <= tol * std::fabs(want) + 1e-6);
    }
    for (int i = 0; i < 32; ++i) {
      const double angle = std::fmod(double(whole.p.positions[std::size_t(t)]) * inv[i], 2 * kvkit::kPi);
      const double x = kvkit::to_float(src[512 + 2 * i]), y = kvkit::to_float(src[512 + 2 * i + 1]);
      const double want_x = x * std::cos(angle) - y * std::sin(angle);
      const double want_y = y * std::cos(angle) + x * std::sin(angle);
      const double bound = tol * (std::fabs(x) + std::fabs(y)) + 1e-5;  // the pair's norm bounds both outputs
      REQUIRE(std::fabs(kvkit::to_float(row[512 + 2 * i]) - want_x) <= bound);
      REQUIRE(std::fabs(kvkit::to_float(row[512 + 2 * i + 1]) - want_y) <= bound);
    }
    ++written;
  }
  CHECK(written > 250);
}

}  // namespace

TEST_CASE("mla_compress writes the same bytes in one call (threads, streaming stores) as token by token") {
  SECTION("float32") { check_compress_store_kinds_and_chunks<float>(); }
  SECTION("bfloat16") { check_compress_store_kinds_and_chunks<kvkit::bfloat16>(); }
  SECTION("float16") { check_compress_store_kinds_and_chunks<kvkit::half>(); }
}
