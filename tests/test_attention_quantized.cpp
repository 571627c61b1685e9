// Decode attention reading fp8 (e4m3, e5m2) and int8 caches written by
// quantize_append_kv, with per-tensor, per-head and per-(token, head) scales.
//
// Two references in float64:
//  - attention over the dequantized cache (float(stored) * scale): the op must
//    match it like an fp32 cache does (1e-5 relative to the largest |v|, or
//    the q dtype's rounding), which shows the scales are applied per slot and head;
//  - attention over the original float values: the quantization error, which
//    must stay within a loose bound derived from quantize.hpp's error bounds.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kvkit/ops/attention_decode.hpp"
#include "kvkit/ops/quantize.hpp"
#include "support/paged_decode_problem.hpp"
#include "support/quantized_decode_problem.hpp"

using Catch::Matchers::Contains;
using kvkit::DType;
using kvkit::PagedDecodeParams;
using kvkit::ScaleGranularity;
using kvkit::testing::DecodeCase;

namespace {

using kvkit::testing::granularity_name;

// The quantized inputs plus the float64 references and the check of the CPU op.
template <class QT>
struct QuantizedProblem : kvkit::testing::QuantizedDecodeInputs<QT> {
  using Base = kvkit::testing::QuantizedDecodeInputs<QT>;
  using Base::Base;
  using Base::src;
  using Base::cache_dtype;
  using Base::granularity;
  using Base::k8;
  using Base::v8;
  using Base::k_scale;
  using Base::v_scale;
  using Base::o;
  using Base::lse;
  using Base::params;
  using Base::scale_at;

  // float64 attention of row (token t of sequence b, q head h); `dequantized`
  // picks the cache the reference reads.
  void reference(std::size_t b, int i, int h, const PagedDecodeParams& p, bool dequantized,
                 std::vector<double>& out, double& out_lse) const {
    const auto& c = src.c;
    const int group = c.q_heads / c.kv_heads;
    const std::int64_t t = std::int64_t(b) * c.q_len + i;
    const std::int64_t len = src.seq_lens[b];
    const std::int64_t q_pos = len - c.q_len + i;
    const auto kv = [&](bool is_v, std::int64_t slot, std::int64_t d) {
      const std::int64_t off = src.layout.slot_offset(slot, h / group) + d;
      if (!dequantized) return double(is_v ? src.v[std::size_t(off)] : src.k[std::size_t(off)]);
      const std::uint8_t stored = is_v ? v8[std::size_t(off)] : k8[std::size_t(off)];
      const float scale = float(scale_at(is_v ? v_scale : k_scale, slot, h / group));
      return double(kvkit::dequantize_value(stored, scale, cache_dtype));
    };
    std::vector<double> scores;
    std::vector<std::int64_t> key_slots;
    for (std::int64_t kp = 0; kp < len; ++kp) {
      if (!kvkit::attention_visible(p, q_pos, kp)) continue;
      const std::int64_t slot = src.slot(b, kp);
      double dot = 0.0;
      for (int d = 0; d < c.head_dim; ++d) {
        dot += double(kvkit::to_float(src.q[std::size_t((t * c.q_heads + h) * c.head_dim + d)])) * kv(false, slot, d);
      }
      scores.push_back(dot * double(p.sm_scale));
      key_slots.push_back(slot);
    }
    out.assign(std::size_t(c.head_dim), 0.0);
    const double m = *std::max_element(scores.begin(), scores.end());
    double sum = 0.0;
    for (double s : scores) sum += std::exp(s - m);
    for (std::size_t j = 0; j < scores.size(); ++j) {
      const double w = std::exp(scores[j] - m) / sum;
      for (int d = 0; d < c.head_dim; ++d) out[std::size_t(d)] += w * kv(true, key_slots[j], d);
    }
    out_lse = m + std::log(sum);
  }

  // Runs the op; returns the largest |o - original-float reference|.
  double run_and_check(double tolerance) {
    const PagedDecodeParams p = params();
    kvkit::paged_decode_attention(p);
    const auto& c = src.c;
    double quantization_error = 0.0;
    std::vector<double> ref, orig;
    double ref_lse = 0.0, orig_lse = 0.0;
    for (std::size_t b = 0; b < src.seq_lens.size(); ++b) {
      for (int i = 0; i < c.q_len; ++i) {
        for (int h = 0; h < c.q_heads; ++h) {
          reference(b, i, h, p, true, ref, ref_lse);
          reference(b, i, h, p, false, orig, orig_lse);
          const std::int64_t t = std::int64_t(b) * c.q_len + i;
          const QT* row = o.data() + t * p.o_stride_token + h * p.o_stride_head;
          double worst = 0.0;
          for (int d = 0; d < c.head_dim; ++d) {
            const double got = double(kvkit::to_float(row[d]));
            worst = std::max(worst, std::fabs(got - ref[std::size_t(d)]));
            quantization_error = std::max(quantization_error, std::fabs(got - orig[std::size_t(d)]));
          }
          if (!(worst <= tolerance * 5.0)) {  // |v| ~ N(0, 1): about 5 at most
            FAIL("seq " << b << " (len " << src.seq_lens[b] << ") token " << i << " head " << h
                        << ": max |o - dequantized ref| = " << worst);
          }
          const float got_lse = lse[std::size_t(t * c.q_heads + h)];
          REQUIRE(std::fabs(got_lse - ref_lse) <= 1e-4 * std::max(1.0, std::fabs(ref_lse)));
          for (int d = c.head_dim; d < c.head_dim + src.kPad; ++d) {
            REQUIRE(kvkit::to_float(row[d]) == kvkit::to_float(kvkit::from_float<QT>(-777.0f)));
          }
        }
      }
    }
    return quantization_error;
  }
};

// Loose bound on |o - attention over the original floats| for N(0, 1) data:
// value errors are at most the relative step times |v| <= ~5, key errors
// shift the weights a little (quantize.hpp: e4m3 2^-4, e5m2 2^-3 relative;
// int8 scale / 2 with scale = amax / 127).
double quantization_bound(DType t) {
  return t == DType::kFloat8E4M3 ? 0.6 : t == DType::kFloat8E5M2 ? 1.2 : 0.3;
}

template <class QT>
void check_quantized_matrix(DType dtype, double tolerance) {
  std::uint64_t seed = 500;
  for (ScaleGranularity g : {ScaleGranularity::kPerTensor, ScaleGranularity::kPerHead, ScaleGranularity::kPerTokenHead}) {
    for (int head_dim : {64, 128}) {
      for (int group : {1, 4, 8}) {
        for (int page_size : {1, 16}) {
          DecodeCase c;
          c.head_dim = head_dim;
          c.kv_heads = 2;
          c.q_heads = 2 * group;
          c.page_size = page_size;
          c.q_len = group == 4 ? 2 : 1;
          c.seq_lens = {c.q_len, 17, 300};
          c.hnd = (seed % 2) == 0;
          INFO(kvkit::dtype_name(dtype) << ", " << granularity_name(g) << ", head_dim " << head_dim << " group "
                                        << group << " page_size " << page_size << (c.hnd ? " HND" : " NHD"));
          QuantizedProblem<QT> prob(c, seed++, dtype, g);
          const double error = prob.run_and_check(tolerance);
          CHECK(error <= quantization_bound(dtype));
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("decode attention reads fp8 and int8 caches with the scales of quantize-on-append") {
  SECTION("float8 e4m3, fp32 q") { check_quantized_matrix<float>(DType::kFloat8E4M3, 1e-5); }
  SECTION("float8 e5m2, fp32 q") { check_quantized_matrix<float>(DType::kFloat8E5M2, 1e-5); }
  SECTION("int8, fp32 q") { check_quantized_matrix<float>(DType::kInt8, 1e-5); }
  SECTION("float8 e4m3, bf16 q") { check_quantized_matrix<kvkit::bfloat16>(DType::kFloat8E4M3, 1e-2); }
}

TEST_CASE("quantized decode with a window, sinks and split key ranges follows the masking rule") {
  DecodeCase c;
  c.q_heads = 8;
  c.kv_heads = 2;
  c.page_size = 16;
  c.seq_lens = {40, 129, 300};
  c.q_len = 3;
  c.window = 50;
  c.sinks = 4;
  QuantizedProblem<float>(c, 7, DType::kFloat8E4M3, ScaleGranularity::kPerTokenHead).run_and_check(1e-5);
  c.window = 0;
  c.sinks = 0;
  c.kv_begin = 33;
  c.kv_end = 200;
  c.seq_lens = {40, 129, 300};
  QuantizedProblem<float>(c, 8, DType::kInt8, ScaleGranularity::kPerHead).run_and_check(1e-5);
}

TEST_CASE("quantized decode input errors name the missing or misplaced scales") {
  DecodeCase c;
  c.seq_lens = {5, 9};
  QuantizedProblem<float> prob(c, 1, DType::kFloat8E4M3, ScaleGranularity::kPerTensor);
  PagedDecodeParams p = prob.params();
  const std::vector<float> before = prob.o;
  SECTION("fp8 cache without k scales") {
    p.k_scale = nullptr;
    CHECK_THROWS_WITH(kvkit::paged_decode_attention(p),
                      Contains("'k_scale' = nullptr: expected a non-null pointer for a float8_e4m3 cache"));
  }
  SECTION("int8 cache without v scales") {
    p.kv_dtype = DType::kInt8;
    p.v_scale = nullptr;
    CHECK_THROWS_WITH(kvkit::paged_decode_attention(p), Contains("'v_scale' = nullptr"));
  }
  SECTION("scales with a float cache") {
    p.kv_dtype = DType::kBFloat16;
    CHECK_THROWS_WITH(kvkit::paged_decode_attention(p), Contains("scales belong to float8 / int8 caches"));
  }
  CHECK(std::memcmp(prob.o.data(), before.data(), before.size() * sizeof(float)) == 0);
}

namespace {
// A NaN code in a 1-byte cache: the decode must read it as NaN, as
// dequantizing it first would. One sequence of 40 tokens, 2 kv heads of 64
// (a whole number of chunks, so AVX2 and AVX-512 read the rows in place),
// 4 q heads per kv head. K of (token 5, kv head 0, dim 3) is NaN: every
// output of kv head 0's q heads is NaN. V of (token 20, kv head 1, dim 10)
// is NaN: kv head 1's q heads are NaN in dim 10 only.
void check_nan_codes_propagate(DType kv_dtype, std::uint8_t k_nan, std::uint8_t v_nan) {
  DecodeCase c;
  c.head_dim = 64;
  c.q_heads = 8;
  c.kv_heads = 2;
  c.seq_lens = {40};
  const int group = c.q_heads / c.kv_heads, head_dim = c.head_dim, q_heads = c.q_heads;
  kvkit::testing::QuantizedDecodeInputs<float> prob(c, 5, kv_dtype, ScaleGranularity::kPerTensor);
  const auto& layout = prob.src.layout;
  prob.k8[std::size_t(layout.slot_offset(prob.src.slot(0, 5), 0) + 3)] = k_nan;
  prob.v8[std::size_t(layout.slot_offset(prob.src.slot(0, 20), 1) + 10)] = v_nan;
  kvkit::paged_decode_attention(prob.params());
  const std::vector<float>& o = prob.o;
  const int o_stride_head = head_dim + prob.src.kPad;
  for (int h = 0; h < q_heads; ++h) {
    for (int d = 0; d < head_dim; ++d) {
      const float x = o[std::size_t(h * o_stride_head + d)];
      INFO("q head " << h << ", dim " << d);
      if (h < group || d == 10) {
        CHECK(std::isnan(x));
      } else {
        CHECK(std::isfinite(x));
      }
    }
  }
}
}  // namespace

TEST_CASE("NaN codes in fp8 caches read as NaN: a K code makes the head's outputs NaN, a V code its dimension") {
  SECTION("e4m3 (s.1111.111)") { check_nan_codes_propagate(DType::kFloat8E4M3, 0x7f, 0xff); }
  SECTION("e5m2 (s.11111.mm, mm != 0)") { check_nan_codes_propagate(DType::kFloat8E5M2, 0xfe, 0x7d); }
}

#if KVKIT_X86_DISPATCH
namespace {
// Every code of a cache dtype, read in place by the AVX2 (V = Vec8) or
// AVX-512 (Vec16) loader, against the scalar conversion (times e4m3's 2^-8).
template <class V, class Elem, class Reference>
void check_every_code_in_place(int codes, float factor, Reference reference) {
  constexpr int kChunk = kvkit::detail::kChunk<V>;
  std::vector<Elem> row(static_cast<std::size_t>(codes));
  for (int c = 0; c < codes; ++c) {
    if constexpr (sizeof(Elem) == 1) {
      std::memcpy(&row[std::size_t(c)], &c, 1);  // little endian: the low byte
    } else {
      const std::uint16_t bits = std::uint16_t(c);
      std::memcpy(&row[std::size_t(c)], &bits, 2);
    }
  }
  for (int c0 = 0; c0 < codes; c0 += kChunk) {
    V lo, hi;
    kvkit::detail::load_chunk(row.data() + c0, lo, hi);
    float got[kChunk];
    std::memcpy(got, &lo, sizeof(lo));
    std::memcpy(got + kChunk / 2, &hi, sizeof(hi));
    for (int i = 0; i < kChunk; ++i) {
      const float want = reference(c0 + i);
      INFO("code " << c0 + i << ", lanes " << kChunk / 2);
      if (std::isnan(want)) {
        CHECK(std::isnan(got[i]));
      } else {
        CHECK(got[i] * factor == want);
      }
    }
  }
}

template <class V>
void check_every_code_in_place_all_dtypes() {
  using namespace kvkit;
  check_every_code_in_place<V, float8_e4m3>(256, detail::kE4m3InPlaceFactor,
                                            [](int c) { return e4m3_bits_to_float(std::uint8_t(c)); });
  check_every_code_in_place<V, float8_e5m2>(256, 1.0f, [](int c) { return e5m2_bits_to_float(std::uint8_t(c)); });
  check_every_code_in_place<V, std::int8_t>(256, 1.0f, [](int c) { return float(std::int8_t(std::uint8_t(c))); });
  check_every_code_in_place<V, half>(65536, 1.0f, [](int c) { return half_bits_to_float(std::uint16_t(c)); });
}
}  // namespace

TEST_CASE("the AVX2 and AVX-512 decode read every fp8, int8 and fp16 code in place as its value") {
  using kvkit::detail::X86Level;
  const X86Level level = kvkit::detail::x86_level();
  if (level < X86Level::kAvx2) {
    WARN("this CPU (or KVKIT_CPU_ISA) has no AVX2: nothing to check");
    return;
  }
  check_every_code_in_place_all_dtypes<kvkit::detail::Vec8>();
  if (level >= X86Level::kAvx512) check_every_code_in_place_all_dtypes<kvkit::detail::Vec16>();
}
#endif
