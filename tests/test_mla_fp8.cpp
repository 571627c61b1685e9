// The fp8 latent cache (FlashMLA's 656-byte rows): the row format pinned
// byte by byte, the quantization error bound against float64, append and
// gather (poisoned cache, padding slots, errors), and the CPU absorbed decode
// over it: equal to the float decode of the dequantized rows (1e-5 relative)
// and within a derived bound of the decode of the unquantized rows.
//
// Bound of fp8 decode vs the float32 path, per query row and output column:
//   |o_fp8 - o_f32| <= max|v^ - v| + (exp(2 D) - 1) max|v| + 1e-4 max(1, max|v|),
// D = the row's largest score error |s^_j - s_j| (scale and soft-cap included):
// every softmax weight moves by a factor within exp(±2 D), so the weights'
// L1 change is at most exp(2 D) - 1; the last term is float32 rounding.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "kvkit/ops/merge_states.hpp"
#include "kvkit/ops/mla_decode.hpp"
#include "kvkit/ops/mla_fp8.hpp"

using Catch::Matchers::Contains;
using kvkit::LatentFp8Layout;
using kvkit::MlaConfig;
using kvkit::MlaFp8Row;

namespace {

// A random latent row whose four c_kv groups have different magnitudes (so
// that per-group scales matter), with a few tiny values (subnormal e4m3).
std::vector<float> random_row(std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> x(576);
  const float group_scale[4] = {0.05f, 1.0f, 7.0f, 0.3f};
  for (int d = 0; d < 512; ++d) x[d] = group_scale[d / 128] * normal(rng) * (d % 37 == 3 ? 1e-4f : 1.0f);
  for (int d = 512; d < 576; ++d) x[d] = normal(rng);
  return x;
}

}  // namespace

TEST_CASE("fp8 latent row: 512 e4m3 bytes, 4 float32 scales at byte 512, 64 bf16 k_pe at byte 528") {
  std::vector<float> x(576, 0.0f);
  x[0] = 2.0f;      // group 0: amax 2 -> scale 2/448, 2 encodes as 448 (0x7E)
  x[1] = -1.0f;     // 224 = 1.75 * 2^7 -> e4m3 0xF6 with the sign
  x[200] = 448.0f;  // group 1: scale 1, exact
  x[201] = 3.0f;    // 3 = 1.5 * 2 -> 0x44
  // group 2 all zero: scale 0, bytes 0; group 3 one value
  x[400] = -0.5f;
  for (int d = 0; d < 64; ++d) x[512 + d] = float(d) - 31.5f;  // exact in bf16
  std::vector<std::uint8_t> row(656, 0xAB);
  kvkit::mla_fp8_quantize_row(x.data(), row.data());
  CHECK(row[0] == 0x7E);
  CHECK(row[1] == 0xF6);
  CHECK(row[2] == 0x00);
  CHECK(row[200] == 0x7E);
  CHECK(row[201] == 0x44);
  CHECK(row[300] == 0x00);
  CHECK(row[400] == 0xFE);  // -448
  float scales[4];
  std::memcpy(scales, row.data() + 512, 16);
  CHECK(scales[0] == 2.0f / 448.0f);
  CHECK(scales[1] == 1.0f);
  CHECK(scales[2] == 0.0f);
  CHECK(scales[3] == 0.5f / 448.0f);
  for (int d = 0; d < 64; ++d) {
    std::uint16_t b;
    std::memcpy(&b, row.data() + 528 + 2 * d, 2);
    REQUIRE(b == kvkit::bfloat16(x[512 + d]).bits);
    REQUIRE(kvkit::mla_fp8_value(row.data(), 512 + d) == x[512 + d]);
  }
  CHECK(kvkit::mla_fp8_value(row.data(), 0) == Approx(2.0f).epsilon(1e-6));
  CHECK(kvkit::mla_fp8_value(row.data(), 1) == Approx(-1.0f).epsilon(1e-6));
  CHECK(kvkit::mla_fp8_value(row.data(), 300) == 0.0f);
}

TEST_CASE("fp8 latent quantization stays within max(|x|/16, amax/458752) of float64, per value") {
  std::mt19937 rng(11);
  std::vector<std::uint8_t> row(656);
  for (int trial = 0; trial < 200; ++trial) {
    const std::vector<float> x = random_row(rng);
    kvkit::mla_fp8_quantize_row(x.data(), row.data());
    for (int g = 0; g < 4; ++g) {
      double amax = 0;
      for (int i = 0; i < 128; ++i) amax = std::max(amax, std::fabs(double(x[g * 128 + i])));
      for (int i = 0; i < 128; ++i) {
        const int d = g * 128 + i;
        const double err = std::fabs(double(kvkit::mla_fp8_value(row.data(), d)) - double(x[d]));
        // 1e-6 relative slack: the stored scale is amax/448 rounded to float.
        REQUIRE(err <= std::max(std::fabs(double(x[d])) / 16, amax / 458752) * (1 + 1e-6) + amax * 1e-7);
      }
    }
  }
}

namespace {

// An fp8 cache and the float32 cache of the same rows (before quantization),
// with sequences' pages scattered over a shuffled pool.
struct Fp8Problem {
  MlaConfig config;
  int page_size;
  std::vector<int> seq_lens;
  int q_len;
  LatentFp8Layout fp8_layout;
  kvkit::LatentKVLayout f32_layout;
  std::vector<std::uint8_t> fp8;
  std::vector<float> f32, deq;  // original rows; the fp8 rows dequantized, same slots
  std::vector<std::int32_t> table, lens;
  std::int64_t max_blocks = 0;
  std::vector<float> q;

  Fp8Problem(int heads, int page, std::vector<int> lengths, int qlen, std::uint64_t seed)
      : config(MlaConfig::deepseek_v2_lite()), page_size(page), seq_lens(std::move(lengths)), q_len(qlen) {
    config.n_heads = heads;
    std::mt19937 rng(static_cast<unsigned>(seed));
    std::normal_distribution<float> normal;
    std::int64_t pages = 2;
    for (int len : seq_lens) {
      max_blocks = std::max<std::int64_t>(max_blocks, (len + page - 1) / page);
      pages += (len + page - 1) / page;
    }
    fp8_layout = LatentFp8Layout::dense(pages, page);
    f32_layout = kvkit::LatentKVLayout::dense(pages, page, 512, 64);
    fp8.assign(std::size_t(fp8_layout.span_bytes()), 0xEE);
    f32.assign(std::size_t(pages * f32_layout.stride_page), 0.0f);
    std::vector<std::int32_t> pool(static_cast<std::size_t>(pages));
    std::iota(pool.begin(), pool.end(), 0);
    std::shuffle(pool.begin(), pool.end(), rng);
    table.assign(std::size_t(seq_lens.size() * std::max<std::int64_t>(max_blocks, 1)), 0);
    std::vector<float> rows;
    std::vector<std::int64_t> slots;
    std::size_t next = 0;
    for (std::size_t b = 0; b < seq_lens.size(); ++b) {
      lens.push_back(seq_lens[b]);
      for (int t = 0; t < seq_lens[b]; ++t) {
        if (t % page == 0) table[b * max_blocks + t / page] = pool[next++];
        const std::int64_t slot = std::int64_t(table[b * max_blocks + t / page]) * page + t % page;
        const std::vector<float> x = random_row(rng);
        std::copy(x.begin(), x.end(), f32.begin() + f32_layout.slot_offset(slot));
        rows.insert(rows.end(), x.begin(), x.end());
        slots.push_back(slot);
      }
    }
    kvkit::MlaFp8AppendArgs a;
    a.latent = rows.data();
    a.latent_stride_token = 576;
    a.dtype = kvkit::DType::kFloat32;
    a.slot_mapping = slots.data();
    a.num_tokens = std::int64_t(slots.size());
    a.cache = fp8.data();
    kvkit::mla_fp8_append(fp8_layout, a);
    deq.assign(f32.size(), 0.0f);
    std::vector<float> gathered(slots.size() * 576);
    kvkit::mla_fp8_gather(fp8_layout, fp8.data(), slots.data(), std::int64_t(slots.size()), gathered.data(),
                          kvkit::DType::kFloat32, 576);
    for (std::size_t i = 0; i < slots.size(); ++i) {
      std::copy(gathered.begin() + std::ptrdiff_t(i * 576), gathered.begin() + std::ptrdiff_t(i * 576 + 576),
                deq.begin() + f32_layout.slot_offset(slots[i]));
    }
    q.resize(seq_lens.size() * std::size_t(q_len) * heads * 576);
    for (auto& v : q) v = normal(rng);
  }

  kvkit::PagedDecodeParams finish(kvkit::PagedDecodeParams p, float* o, float* lse) {
    p.q = q.data();
    p.q_stride_head = 576;
    p.q_stride_token = std::int64_t(config.n_heads) * 576;
    p.q_len = q_len;
    p.page_table = {table.data(), lens.data(), std::int64_t(seq_lens.size()), max_blocks, max_blocks};
    p.o = o;
    p.o_stride_head = 512;
    p.o_stride_token = std::int64_t(config.n_heads) * 512;
    p.lse = lse;
    p.q_dtype = kvkit::DType::kFloat32;
    return p;
  }
  kvkit::PagedDecodeParams fp8_params(float* o, float* lse) {
    return finish(kvkit::mla_decode_params_fp8(config, fp8_layout, fp8.data()), o, lse);
  }
  kvkit::PagedDecodeParams float_params(const std::vector<float>& cache, float* o, float* lse) {
    return finish(kvkit::mla_decode_params(config, f32_layout, cache.data(), kvkit::DType::kFloat32), o, lse);
  }
  std::size_t rows() const { return seq_lens.size() * std::size_t(q_len) * config.n_heads; }
};

}  // namespace

TEST_CASE("fp8 append writes only the addressed rows, keeps bf16 k_pe bit for bit, and gathers back") {
  const auto layout = LatentFp8Layout::strided(5, 4, 4 * 672, 672);  // padded rows
  std::vector<std::uint8_t> cache(std::size_t(layout.span_bytes()), 0xEE);
  std::mt19937 rng(5);
  const int tokens = 7;
  std::vector<kvkit::bfloat16> rows(std::size_t(tokens) * 580);  // stride 580
  for (int t = 0; t < tokens; ++t) {
    const std::vector<float> x = random_row(rng);
    for (int d = 0; d < 576; ++d) rows[std::size_t(t) * 580 + d] = kvkit::bfloat16(x[d]);
  }
  const std::vector<std::int64_t> slots{19, 0, -1, 7, 8, 3, 12};
  kvkit::MlaFp8AppendArgs a;
  a.latent = rows.data();
  a.latent_stride_token = 580;
  a.dtype = kvkit::DType::kBFloat16;
  a.slot_mapping = slots.data();
  a.num_tokens = tokens;
  a.cache = cache.data();
  const std::vector<std::uint8_t> before = cache;

  SECTION("rows land in their slots; the rest is untouched") {
    kvkit::mla_fp8_append(layout, a);
    std::vector<bool> written(cache.size(), false);
    for (int t = 0; t < tokens; ++t) {
      if (slots[t] < 0) continue;
      const std::int64_t off = layout.slot_offset(slots[t]);
      for (int i = 0; i < 656; ++i) written[off + i] = true;
      for (int d = 0; d < 64; ++d) {  // k_pe: exact round trip of bf16 input
        std::uint16_t b;
        std::memcpy(&b, &cache[off + 528 + 2 * d], 2);
        REQUIRE(b == rows[std::size_t(t) * 580 + 512 + d].bits);
      }
    }
    for (std::size_t i = 0; i < cache.size(); ++i) {
      if (!written[i]) REQUIRE(cache[i] == 0xEE);
    }
    const std::vector<std::int64_t> back{19, 0, 7, 8, 3, 12};
    std::vector<float> out(back.size() * 600, -5.0f);
    kvkit::mla_fp8_gather(layout, cache.data(), back.data(), 6, out.data(), kvkit::DType::kFloat32, 600);
    const int src_token[6] = {0, 1, 3, 4, 5, 6};
    for (int i = 0; i < 6; ++i) {
      const kvkit::bfloat16* src = &rows[std::size_t(src_token[i]) * 580];
      for (int d = 0; d < 576; ++d) {
        const float want = kvkit::to_float(src[d]);
        const float got = out[std::size_t(i) * 600 + d];
        if (d >= 512) {
          REQUIRE(got == want);
        } else {
          float amax = 0.0f;
          for (int k = d / 128 * 128; k < d / 128 * 128 + 128; ++k) amax = std::max(amax, std::fabs(kvkit::to_float(src[k])));
          REQUIRE(std::fabs(got - want) <= (std::fabs(want) / 16 + amax / 458752) * 1.00001f);
        }
      }
      for (int d = 576; d < 600; ++d) REQUIRE(out[std::size_t(i) * 600 + d] == -5.0f);
    }
  }
  SECTION("a slot beyond the cache throws and writes nothing") {
    const std::vector<std::int64_t> bad{19, 0, -1, 7, 20, 3, 12};
    a.slot_mapping = bad.data();
    CHECK_THROWS_WITH(kvkit::mla_fp8_append(layout, a), Contains("'slot_mapping[4]' = 20"));
    CHECK(cache == before);
  }
  SECTION("a non-finite value throws and writes nothing") {
    rows[3 * 580 + 100] = kvkit::bfloat16(INFINITY);
    CHECK_THROWS_WITH(kvkit::mla_fp8_append(layout, a), Contains("latent row 3 has a non-finite value"));
    CHECK(cache == before);
  }
  SECTION("rows narrower than 576 and bad layouts throw") {
    a.latent_stride_token = 575;
    CHECK_THROWS_WITH(kvkit::mla_fp8_append(layout, a), Contains("'latent_stride_token' = 575"));
    CHECK_THROWS_WITH(LatentFp8Layout::strided(2, 4, 4 * 656, 650), Contains("'stride_slot' = 650"));
    CHECK_THROWS_WITH(LatentFp8Layout::strided(2, 4, 4 * 658, 658), Contains("multiples of 4"));
    CHECK_THROWS_WITH(LatentFp8Layout::dense(2, 3), Contains("page_size"));
    const std::int64_t outside = 20;
    std::vector<float> out(576);
    CHECK_THROWS_WITH(kvkit::mla_fp8_gather(layout, cache.data(), &outside, 1, out.data(), kvkit::DType::kFloat32, 576),
                      Contains("'slots[0]' = 20"));
    CHECK(cache == before);
  }
}

namespace {

/// The host append of float32 / float16 / bfloat16 rows (threads over chunks
/// of tokens, the ISA picked at run time, streaming or ordinary stores)
/// writes, for every row, the bytes of mla_fp8_quantize_row: the scalar rule
/// the CUDA kernel follows.
template <class T>
void check_append_equals_scalar_rule() {
  using kvkit::detail::StoreKind;
  std::mt19937 rng(21);
  const int tokens = 333;  // chunks of 64 tokens, the last one partial
  const auto layout = LatentFp8Layout::dense(8, 64);
  std::vector<T> rows(std::size_t(tokens) * 577);  // stride 577: odd, unaligned rows
  std::vector<std::int64_t> slots;
  for (int t = 0; t < tokens; ++t) {
    std::vector<float> x = random_row(rng);
    if (t % 50 == 7) std::fill(x.begin() + 128, x.begin() + 256, 0.0f);  // an all-zero group: scale 0
    for (int d = 0; d < 576; ++d) rows[std::size_t(t) * 577 + d] = kvkit::from_float<T>(x[std::size_t(d)]);
    slots.push_back(t % 11 == 4 ? -1 : std::int64_t((t * 37) % layout.num_slots()));  // distinct, scattered
  }
  kvkit::MlaFp8AppendArgs a;
  a.latent = rows.data();
  a.latent_stride_token = 577;
  a.dtype = kvkit::dtype_of<T>;
  a.slot_mapping = slots.data();
  a.num_tokens = tokens;
  for (StoreKind kind : {StoreKind::kOrdinary, StoreKind::kStreaming}) {
    std::vector<std::uint8_t> cache(std::size_t(layout.span_bytes()), 0xEE);
    a.cache = cache.data();
    kvkit::detail::mla_fp8_append_with(layout, a, kind);
    for (int t = 0; t < tokens; ++t) {
      if (slots[std::size_t(t)] < 0) continue;
      std::vector<float> x(576);
      for (int d = 0; d < 576; ++d) x[std::size_t(d)] = kvkit::to_float(rows[std::size_t(t) * 577 + d]);
      std::uint8_t want[MlaFp8Row::kBytes];
      kvkit::mla_fp8_quantize_row(x.data(), want);
      REQUIRE(std::memcmp(&cache[std::size_t(layout.slot_offset(slots[std::size_t(t)]))], want, sizeof(want)) == 0);
    }
  }
}

}  // namespace

namespace {

/// An fp8 append of 5 rows of T, one of which (row 2) holds `special` at
/// `column`: throws naming that row and column, and writes nothing. The
/// largest finite value of T in the same place is accepted.
template <class T>
void check_nonfinite_rejected(float special, int column, float largest_finite) {
  const auto layout = LatentFp8Layout::dense(2, 4);
  std::vector<std::uint8_t> cache(std::size_t(layout.span_bytes()), 0xEE);
  std::mt19937 rng(9);
  std::vector<T> rows(5 * 576);
  for (int t = 0; t < 5; ++t) {
    const std::vector<float> x = random_row(rng);
    for (int d = 0; d < 576; ++d) rows[std::size_t(t) * 576 + d] = T(x[d]);
  }
  const std::vector<std::int64_t> slots{4, 0, 6, -1, 1};
  kvkit::MlaFp8AppendArgs a;
  a.latent = rows.data();
  a.latent_stride_token = 576;
  a.dtype = kvkit::dtype_of<T>;
  a.slot_mapping = slots.data();
  a.num_tokens = 5;
  a.cache = cache.data();
  const std::vector<std::uint8_t> before = cache;
  rows[2 * 576 + std::size_t(column)] = T(special);
  CHECK_THROWS_WITH(kvkit::mla_fp8_append(layout, a),
                    Contains("latent row 2 has a non-finite value at column " + std::to_string(column)));
  CHECK(cache == before);
  // The same value in a padding row (slot -1) is not read.
  rows[2 * 576 + std::size_t(column)] = T(largest_finite);
  rows[3 * 576 + std::size_t(column)] = T(special);
  CHECK_NOTHROW(kvkit::mla_fp8_append(layout, a));
}

template <class T>
void check_nonfinite_rejected_everywhere(float largest_finite) {
  for (const float special : {INFINITY, -INFINITY, NAN, -NAN}) {
    for (const int column : {0, 127, 300, 511, 512, 575}) {
      CAPTURE(special, column);
      check_nonfinite_rejected<T>(special, column, largest_finite);
    }
  }
}

}  // namespace

TEST_CASE("fp8 append rejects inf and NaN in any column, for every source type") {
  check_nonfinite_rejected_everywhere<float>(3.4028235e38f);
  check_nonfinite_rejected_everywhere<kvkit::half>(65504.0f);
  check_nonfinite_rejected_everywhere<kvkit::bfloat16>(3.3895314e38f);
}

TEST_CASE("host fp8 append writes the scalar rule's bytes for every source type and store kind") {
  SECTION("float32") { check_append_equals_scalar_rule<float>(); }
  SECTION("float16") { check_append_equals_scalar_rule<kvkit::half>(); }
  SECTION("bfloat16") { check_append_equals_scalar_rule<kvkit::bfloat16>(); }
}

TEST_CASE("CPU absorbed decode over the fp8 cache equals float decode of the dequantized rows") {
  for (int page : {1, 64}) {
    Fp8Problem pr(16, page, {1, 63, 64, 65, 300}, 1, 21 + page);
    std::vector<float> o8(pr.rows() * 512, -7.0f), l8(pr.rows()), of(o8.size()), lf(l8.size());
    kvkit::mla_decode_attention(pr.fp8_params(o8.data(), l8.data()));
    kvkit::mla_decode_attention(pr.float_params(pr.deq, of.data(), lf.data()));
    // Two fp32 evaluations in different orders (the float path sums in vector
    // lanes with FMA and a polynomial exp); scores reach tens, so their
    // fp32 rounding moves the weights by ~1e-4 relative. Quantization noise
    // is ~1e-2: this still tells the two apart.
    for (std::size_t i = 0; i < o8.size(); ++i) REQUIRE(o8[i] == Approx(of[i]).epsilon(5e-4).margin(5e-5));
    for (std::size_t i = 0; i < l8.size(); ++i) REQUIRE(l8[i] == Approx(lf[i]).epsilon(2e-5).margin(1e-5));
  }
  SECTION("q_len 2 with a window, sinks and a soft-cap") {
    Fp8Problem pr(4, 16, {2, 40, 129}, 2, 9);
    std::vector<float> o8(pr.rows() * 512), l8(pr.rows()), of(o8.size()), lf(l8.size());
    auto p8 = pr.fp8_params(o8.data(), l8.data());
    auto pf = pr.float_params(pr.deq, of.data(), lf.data());
    for (auto* p : {&p8, &pf}) {
      p->window = 50;
      p->num_sinks = 3;
      p->logit_softcap = 5.0f;
    }
    kvkit::mla_decode_attention(p8);
    kvkit::mla_decode_attention(pf);
    // Two fp32 evaluations in different orders (the float path sums in vector
    // lanes with FMA and a polynomial exp); scores reach tens, so their
    // fp32 rounding moves the weights by ~1e-4 relative. Quantization noise
    // is ~1e-2: this still tells the two apart.
    for (std::size_t i = 0; i < o8.size(); ++i) REQUIRE(o8[i] == Approx(of[i]).epsilon(5e-4).margin(5e-5));
    for (std::size_t i = 0; i < l8.size(); ++i) REQUIRE(l8[i] == Approx(lf[i]).epsilon(2e-5).margin(1e-5));
  }
}

TEST_CASE("CPU fp8 decode split at any key equals unsplit after merge_states") {
  Fp8Problem pr(8, 64, {1, 130, 200}, 1, 4);
  std::vector<float> o(pr.rows() * 512), l(pr.rows()), oa(o.size()), la(l.size()), ob(o.size()), lb(l.size());
  kvkit::mla_decode_attention(pr.fp8_params(o.data(), l.data()));
  auto pa = pr.fp8_params(oa.data(), la.data());
  pa.kv_end = 77;
  kvkit::mla_decode_attention(pa);
  auto pb = pr.fp8_params(ob.data(), lb.data());
  pb.kv_begin = 77;
  kvkit::mla_decode_attention(pb);
  kvkit::merge_states(oa.data(), la.data(), ob.data(), lb.data(), oa.data(), la.data(), std::int64_t(l.size()), 512);
  // The merge rescales in float32: 1e-4 relative.
  for (std::size_t i = 0; i < o.size(); ++i) REQUIRE(oa[i] == Approx(o[i]).epsilon(1e-4).margin(1e-5));
  for (std::size_t i = 0; i < l.size(); ++i) REQUIRE(la[i] == Approx(l[i]).epsilon(1e-6));
}

TEST_CASE("CPU fp8 decode stays within the derived bound of the unquantized float32 decode") {
  Fp8Problem pr(16, 64, {1, 65, 500}, 1, 13);
  std::vector<float> o8(pr.rows() * 512), l8(pr.rows()), of(o8.size()), lf(l8.size());
  const auto p8 = pr.fp8_params(o8.data(), l8.data());
  kvkit::mla_decode_attention(p8);
  kvkit::mla_decode_attention(pr.float_params(pr.f32, of.data(), lf.data()));
  double worst_ratio = 0;
  for (std::size_t b = 0; b < pr.seq_lens.size(); ++b) {
    for (int h = 0; h < pr.config.n_heads; ++h) {
      const std::size_t r = b * pr.config.n_heads + std::size_t(h);
      const float* qr = &pr.q[r * 576];
      double ds = 0, dv = 0, vmax = 0;
      for (int t = 0; t < pr.seq_lens[b]; ++t) {
        const std::int64_t off = pr.f32_layout.slot_offset(std::int64_t(pr.table[b * pr.max_blocks + t / 64]) * 64 + t % 64);
        double dot = 0;
        for (int d = 0; d < 576; ++d) dot += double(qr[d]) * (double(pr.deq[off + d]) - pr.f32[off + d]);
        ds = std::max(ds, std::fabs(dot) * p8.sm_scale);
        for (int d = 0; d < 512; ++d) {
          dv = std::max(dv, std::fabs(double(pr.deq[off + d]) - pr.f32[off + d]));
          vmax = std::max(vmax, std::fabs(double(pr.f32[off + d])));
        }
      }
      const double bound = dv + std::expm1(2 * ds) * vmax + 1e-4 * std::max(1.0, vmax);
      double worst = 0;
      for (int d = 0; d < 512; ++d) worst = std::max(worst, std::fabs(double(o8[r * 512 + d]) - of[r * 512 + d]));
      REQUIRE(worst <= bound);
      REQUIRE(std::fabs(double(l8[r]) - lf[r]) <= ds + 1e-5 * std::max(1.0, std::fabs(double(lf[r]))));
      worst_ratio = std::max(worst_ratio, worst / vmax);
    }
  }
  // The quantization noise is visible: the comparison is not vacuous.
  CHECK(worst_ratio > 1e-4);
}

TEST_CASE("fp8 decode params are rejected where they do not fit") {
  Fp8Problem pr(4, 16, {5}, 1, 3);
  std::vector<float> o(pr.rows() * 512), l(pr.rows());
  auto p = pr.fp8_params(o.data(), l.data());
  SECTION("the generic decode reads plain fp8 caches with scales, not 656-byte rows") {
    CHECK_THROWS_WITH(kvkit::paged_decode_attention(p), Contains("'k_scale' = nullptr") && Contains("mla_decode_attention"));
  }
  SECTION("values must be the 512 c_kv columns") {
    p.v_head_dim = 576;
    p.o_stride_head = 576;
    p.o_stride_token = 4 * 576;
    CHECK_THROWS_WITH(kvkit::mla_decode_attention(p), Contains("'v_head_dim' = 576"));
  }
  SECTION("rows must be 656 bytes or more") {
    p.layout.stride_slot = 576;
    p.layout.stride_page = 16 * 576;
    CHECK_THROWS_WITH(kvkit::mla_decode_attention(p), Contains("'layout.stride_slot' = 576"));
  }
  SECTION("configs other than 512 + 64") {
    MlaConfig c = pr.config;
    c.kv_lora_rank = 256;
    CHECK_THROWS_WITH(kvkit::mla_decode_params_fp8(c, pr.fp8_layout, pr.fp8.data()),
                      Contains("'config.kv_lora_rank' = 256"));
  }
  CHECK(std::all_of(o.begin(), o.end(), [](float x) { return x == 0.0f; }));
}
