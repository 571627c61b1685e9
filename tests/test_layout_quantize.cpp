// Quantize-on-append (fp8 e4m3 / e5m2, int8) and dequantize: the documented
// error bounds against a float64 reference, saturation, NaN, ±0, scale
// granularities, poisoned caches and bad input.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kvkit/core/bits.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"
#include "kvkit/ops/quantize.hpp"

using Catch::Matchers::Contains;
using kvkit::DType;
using kvkit::PagedKVLayout;
using kvkit::ScaleGranularity;

namespace {

constexpr std::uint8_t kPoison = 0xA5;

struct Bound {
  double rel, abs_in_scales;
};
Bound bound_of(DType t) {
  if (t == DType::kFloat8E4M3) return {std::ldexp(1.0, -4), std::ldexp(1.0, -10)};
  if (t == DType::kFloat8E5M2) return {std::ldexp(1.0, -3), std::ldexp(1.0, -17)};
  return {0.0, 0.5};
}

struct Case {
  PagedKVLayout layout;
  std::vector<float> key, value;
  std::vector<std::int64_t> slots;
  std::vector<std::uint8_t> kc, vc;
  std::vector<float> k_scale, v_scale;  // static scales, or the scale cache
  kvkit::QuantizeAppendArgs args;

  Case(PagedKVLayout l, std::int64_t n, DType cache, ScaleGranularity g, std::uint32_t seed)
      : layout(l) {
    const std::int64_t heads = l.num_heads, hd = l.head_dim;
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
    std::uniform_int_distribution<int> exponent(-8, 8);
    key.resize(std::size_t(n * heads * hd));
    value.resize(key.size());
    // Each head row gets its own magnitude, so per-(token, head) scales matter.
    for (std::size_t r = 0; r < key.size() / std::size_t(hd); ++r) {
      const float mk = std::ldexp(1.0f, exponent(rng)), mv = std::ldexp(1.0f, exponent(rng));
      for (std::size_t d = 0; d < std::size_t(hd); ++d) {
        key[r * std::size_t(hd) + d] = unit(rng) * mk;
        value[r * std::size_t(hd) + d] = unit(rng) * mv;
      }
    }
    for (std::int64_t t = 0; t < n; ++t) slots.push_back(t % 4 == 3 ? -1 : (7 * t + 3) % l.num_slots());
    std::sort(slots.begin(), slots.end());
    slots.erase(std::unique(slots.begin(), slots.end()), slots.end());
    kc.assign(std::size_t(l.span_elements()), kPoison);
    vc = kc;
    if (g == ScaleGranularity::kPerTokenHead) {
      k_scale.assign(std::size_t(l.num_slots() * heads), -1.0f);
      v_scale = k_scale;
    } else {
      // Static scales large enough that nothing saturates: 2^8 / max.
      const std::size_t count = g == ScaleGranularity::kPerHead ? std::size_t(heads) : 1;
      for (std::size_t i = 0; i < count; ++i) {
        k_scale.push_back(256.0f / kvkit::quantized_max(cache) * float(i + 1));
        v_scale.push_back(256.0f / kvkit::quantized_max(cache) * float(i + 2));
      }
    }
    args.key = key.data();
    args.value = value.data();
    args.key_stride_token = args.value_stride_token = heads * hd;
    args.key_stride_head = args.value_stride_head = hd;
    args.slot_mapping = slots.data();
    args.num_tokens = std::int64_t(slots.size());
    args.k_cache = kc.data();
    args.v_cache = vc.data();
    args.src_dtype = DType::kFloat32;
    args.cache_dtype = cache;
    args.granularity = g;
    if (g == ScaleGranularity::kPerTokenHead) {
      args.k_scale_cache = k_scale.data();
      args.v_scale_cache = v_scale.data();
    } else {
      args.k_scale = k_scale.data();
      args.v_scale = v_scale.data();
    }
  }
};

}  // namespace

TEST_CASE("quantize-append then dequantize stays within the documented error bound") {
  const DType cache = GENERATE(DType::kFloat8E4M3, DType::kFloat8E5M2, DType::kInt8);
  const ScaleGranularity g = GENERATE(ScaleGranularity::kPerTensor, ScaleGranularity::kPerHead,
                                      ScaleGranularity::kPerTokenHead);
  const auto layout = PagedKVLayout::nhd(5, 16, 7, 96);
  Case c(layout, 33, cache, g, 5);
  kvkit::quantize_append_kv(layout, c.args);
  const Bound b = bound_of(cache);
  const std::int64_t heads = 7, hd = 96;
  for (std::size_t t = 0; t < c.slots.size(); ++t) {
    const std::int64_t slot = c.slots[t];
    if (slot < 0) continue;
    for (std::int64_t h = 0; h < heads; ++h) {
      for (int which = 0; which < 2; ++which) {
        const auto& src = which ? c.value : c.key;
        const auto& cache_bytes = which ? c.vc : c.kc;
        const auto& scales = which ? c.v_scale : c.k_scale;
        const float scale = scales[std::size_t(kvkit::scale_index(g, slot, h, heads))];
        if (g == ScaleGranularity::kPerTokenHead) {
          double amax = 0;
          for (std::int64_t d = 0; d < hd; ++d)
            amax = std::max(amax, std::fabs(double(src[std::size_t((std::int64_t(t) * heads + h) * hd + d)])));
          CHECK(scale == float(float(amax) / kvkit::quantized_max(cache)));
        }
        for (std::int64_t d = 0; d < hd; ++d) {
          const double x = src[std::size_t((std::int64_t(t) * heads + h) * hd + d)];
          const std::uint8_t q = cache_bytes[std::size_t(layout.slot_offset(slot, h) + d)];
          const double deq = kvkit::dequantize_value(q, scale, cache);
          const double allowed = std::max(b.rel * std::fabs(x), b.abs_in_scales * scale) * (1 + 1e-6);
          if (std::fabs(deq - x) > allowed) {
            FAIL("x " << x << " stored " << int(q) << " dequantized " << deq << " scale " << scale
                      << " allowed error " << allowed);
          }
        }
      }
    }
  }
  // Only the addressed rows changed.
  std::size_t changed = 0;
  for (std::uint8_t v : c.kc) changed += v != kPoison;
  std::size_t real = 0;
  for (auto s : c.slots) real += s >= 0;
  CHECK(changed <= real * 7 * 96);
  CHECK(changed >= real * 7 * 96 * 9 / 10);
}

TEST_CASE("dequantize_gather_kv returns what dequantize_value gives for each stored byte") {
  const DType cache = GENERATE(DType::kFloat8E4M3, DType::kInt8);
  const ScaleGranularity g = GENERATE(ScaleGranularity::kPerHead, ScaleGranularity::kPerTokenHead);
  const auto layout = PagedKVLayout::hnd(4, 8, 3, 64);
  Case c(layout, 4 * 8, cache, g, 9);
  // One sequence using pages 2, 0, 3, in order: slots 16.., 0.., 24...
  const std::vector<std::int32_t> pages{2, 0, 3};
  std::vector<std::int64_t> slots;
  for (std::int64_t t = 0; t < 19; ++t) slots.push_back(kvkit::token_slot(pages.data(), t, 3));
  c.args.slot_mapping = slots.data();
  c.args.num_tokens = 19;
  kvkit::quantize_append_kv(layout, c.args);
  std::vector<float> ko(19 * 3 * 64, -7.0f), vo(ko.size(), -7.0f);
  kvkit::DequantizeGatherArgs d{c.kc.data(), c.vc.data(), pages.data(), 19, ko.data(), vo.data(),
                                3 * 64, 64, cache, g, c.k_scale.data(), c.v_scale.data()};
  kvkit::dequantize_gather_kv(layout, d);
  for (std::int64_t t = 0; t < 19; ++t)
    for (std::int64_t h = 0; h < 3; ++h)
      for (std::int64_t e = 0; e < 64; ++e) {
        const float s = c.k_scale[std::size_t(kvkit::scale_index(g, slots[std::size_t(t)], h, 3))];
        const float expect = kvkit::dequantize_value(
            c.kc[std::size_t(layout.slot_offset(slots[std::size_t(t)], h) + e)], s, cache);
        REQUIRE(ko[std::size_t((t * 3 + h) * 64 + e)] == expect);
        const double x = c.key[std::size_t((t * 3 + h) * 64 + e)];
        REQUIRE(std::fabs(ko[std::size_t((t * 3 + h) * 64 + e)] - x) <=
                std::max(bound_of(cache).rel * std::fabs(x), bound_of(cache).abs_in_scales * s) * 1.000001);
      }
}

namespace {

using GatherFn = void (*)(const PagedKVLayout&, const kvkit::DequantizeGatherArgs&);

template <auto kLoop>
void baseline_gather(const PagedKVLayout& l, const kvkit::DequantizeGatherArgs& a) {
  kvkit::detail::run_loop_baseline<kLoop>(l, a, std::int64_t(0), a.num_tokens);
}
#if KVKIT_QUANTIZE_X86_DISPATCH
template <auto kLoop>
void avx2_gather(const PagedKVLayout& l, const kvkit::DequantizeGatherArgs& a) {
  kvkit::detail::run_loop_avx2<kLoop>(l, a, std::int64_t(0), a.num_tokens);
}
template <auto kLoop>
void avx512_gather(const PagedKVLayout& l, const kvkit::DequantizeGatherArgs& a) {
  kvkit::detail::run_loop_avx512<kLoop>(l, a, std::int64_t(0), a.num_tokens);
}
#endif

/// The public op and each ISA's copy of the token loop this CPU can run.
template <DType kCache>
std::vector<GatherFn> gather_entries() {
  constexpr auto kLoop = &kvkit::detail::dequantize_gather_tokens<kCache>;
  std::vector<GatherFn> fns{&kvkit::dequantize_gather_kv, &baseline_gather<kLoop>};
#if KVKIT_QUANTIZE_X86_DISPATCH
  const auto level = kvkit::detail::x86_level();
  if (level >= kvkit::detail::X86Level::kAvx2) fns.push_back(&avx2_gather<kLoop>);
  if (level >= kvkit::detail::X86Level::kAvx512) fns.push_back(&avx512_gather<kLoop>);
#endif
  return fns;
}

/// Every stored byte (NaN codes included) of a 1,100-token sequence
/// (threads share its chunks where OpenMP is on) dequantizes to
/// dequantize_value's float, bit for bit, and nothing else is written.
template <DType kCache>
void check_dequantize_gather(ScaleGranularity g) {
  const std::int64_t ps = 16, heads = 3, hd = 40, n = 1100, pages = 80;
  const auto layout = PagedKVLayout::nhd(pages, ps, heads, hd);
  std::vector<std::int32_t> seq_pages(static_cast<std::size_t>(pages));
  std::iota(seq_pages.begin(), seq_pages.end(), 0);
  std::shuffle(seq_pages.begin(), seq_pages.end(), std::mt19937(7));
  std::mt19937 rng(8);
  std::vector<std::uint8_t> kc(std::size_t(layout.span_elements())), vc(kc.size());
  for (auto& b : kc) b = std::uint8_t(rng());
  for (auto& b : vc) b = std::uint8_t(rng());
  const std::int64_t n_scales = g == ScaleGranularity::kPerTensor ? 1
                                : g == ScaleGranularity::kPerHead ? heads
                                                                  : layout.num_slots() * heads;
  std::uniform_real_distribution<float> dist(0.001f, 5.0f);
  std::vector<float> ks(static_cast<std::size_t>(n_scales)), vs(ks.size());
  for (auto& x : ks) x = dist(rng);
  for (auto& x : vs) x = dist(rng);
  const std::int64_t token_stride = heads * 41 + 2;
  for (GatherFn fn : gather_entries<kCache>()) {
    std::vector<float> ko(std::size_t(n * token_stride), -7.0f), vo(ko.size(), -7.0f);
    kvkit::DequantizeGatherArgs d{kc.data(), vc.data(), seq_pages.data(), n, ko.data(), vo.data(),
                                  token_stride, 41, kCache, g, ks.data(), vs.data()};
    fn(layout, d);
    std::size_t mismatches = 0;
    for (std::int64_t t = 0; t < n; ++t) {
      const std::int64_t slot = kvkit::token_slot(seq_pages.data(), t, 4);
      for (std::int64_t e = 0; e < token_stride; ++e) {
        const std::int64_t h = e / 41, dim = e % 41;
        const bool in_row = h < heads && dim < hd;
        const std::size_t at = std::size_t(t * token_stride + e);
        float want_k = -7.0f, want_v = -7.0f;
        if (in_row) {
          const std::size_t c = std::size_t(layout.slot_offset(slot, h) + dim);
          const std::size_t si = std::size_t(kvkit::scale_index(g, slot, h, heads));
          want_k = kvkit::dequantize_value(kc[c], ks[si], kCache);
          want_v = kvkit::dequantize_value(vc[c], vs[si], kCache);
        }
        mismatches += kvkit::float_to_bits(ko[at]) != kvkit::float_to_bits(want_k) ||
                      kvkit::float_to_bits(vo[at]) != kvkit::float_to_bits(want_v);
      }
    }
    CHECK(mismatches == 0);
  }
}

}  // namespace

TEST_CASE("dequantize_gather_kv equals dequantize_value bit for bit: every dtype, granularity and ISA") {
  const ScaleGranularity g =
      GENERATE(ScaleGranularity::kPerTensor, ScaleGranularity::kPerHead, ScaleGranularity::kPerTokenHead);
  CAPTURE(int(g));
  check_dequantize_gather<DType::kFloat8E4M3>(g);
  check_dequantize_gather<DType::kFloat8E5M2>(g);
  check_dequantize_gather<DType::kInt8>(g);
}

TEST_CASE("dequantize_gather_kv rejects bad arguments before writing anything") {
  const auto layout = PagedKVLayout::nhd(4, 8, 2, 16);
  std::vector<std::uint8_t> kc(std::size_t(layout.span_elements()), 0x31), vc(kc);
  std::vector<std::int32_t> pages{2, 0};
  std::vector<float> ko(12 * 2 * 16, -7.0f), vo(ko);
  const float ks = 0.5f, vs = 0.25f;
  kvkit::DequantizeGatherArgs a{kc.data(), vc.data(), pages.data(), 12, ko.data(), vo.data(), 32, 16,
                                DType::kFloat8E4M3, ScaleGranularity::kPerTensor, &ks, &vs};
  constexpr const char* kWhere = "kvkit::dequantize_gather_kv";
  SECTION("a page id outside the cache") {
    pages[1] = 4;
    CHECK_THROWS_WITH(kvkit::dequantize_gather_kv(layout, a),
                      Contains(kWhere) && Contains("pages[1] = 4: expected a page id in [0, 4)"));
  }
  SECTION("a cache dtype that is not quantized") {
    a.cache_dtype = DType::kBFloat16;
    CHECK_THROWS_WITH(kvkit::dequantize_gather_kv(layout, a), Contains("'cache_dtype'") && Contains("int8"));
  }
  SECTION("a null output") {
    a.value_out = nullptr;
    CHECK_THROWS_WITH(kvkit::dequantize_gather_kv(layout, a), Contains("'value_out'"));
  }
  SECTION("heads of the output overlapping") {
    a.out_stride_head = 15;
    CHECK_THROWS_WITH(kvkit::dequantize_gather_kv(layout, a), Contains("'out_stride_head' = 15"));
  }
  CHECK(std::all_of(ko.begin(), ko.end(), [](float x) { return x == -7.0f; }));
  CHECK(std::all_of(vo.begin(), vo.end(), [](float x) { return x == -7.0f; }));
}

TEST_CASE("quantization saturates out-of-range values, maps NaN and keeps the sign of zero") {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  SECTION("e4m3") {
    CHECK(kvkit::quantize_value(1000.0f, 1.0f, DType::kFloat8E4M3) == 0x7E);  // 448
    CHECK(kvkit::quantize_value(-1e30f, 1.0f, DType::kFloat8E4M3) == 0xFE);   // -448
    CHECK(kvkit::quantize_value(inf, 1.0f, DType::kFloat8E4M3) == 0x7E);
    CHECK(kvkit::dequantize_value(0x7E, 2.0f, DType::kFloat8E4M3) == 896.0f);
    CHECK(kvkit::quantize_value(nan, 1.0f, DType::kFloat8E4M3) == 0x7F);
    CHECK(std::isnan(kvkit::dequantize_value(0x7F, 1.0f, DType::kFloat8E4M3)));
    CHECK(kvkit::quantize_value(-0.0f, 3.0f, DType::kFloat8E4M3) == 0x80);
    CHECK(std::signbit(kvkit::dequantize_value(0x80, 3.0f, DType::kFloat8E4M3)));
    CHECK(kvkit::quantize_value(0.0f, 3.0f, DType::kFloat8E4M3) == 0x00);
  }
  SECTION("e5m2") {
    CHECK(kvkit::quantize_value(1e6f, 1.0f, DType::kFloat8E5M2) == 0x7B);  // 57344
    CHECK(kvkit::quantize_value(-inf, 1.0f, DType::kFloat8E5M2) == 0xFB);
    CHECK(kvkit::dequantize_value(0xFB, 1.0f, DType::kFloat8E5M2) == -57344.0f);
    CHECK(std::isnan(kvkit::dequantize_value(kvkit::quantize_value(nan, 1.0f, DType::kFloat8E5M2),
                                             1.0f, DType::kFloat8E5M2)));
    CHECK(kvkit::quantize_value(-0.0f, 1.0f, DType::kFloat8E5M2) == 0x80);
  }
  SECTION("int8") {
    CHECK(std::int8_t(kvkit::quantize_value(1000.0f, 1.0f, DType::kInt8)) == 127);
    CHECK(std::int8_t(kvkit::quantize_value(-inf, 1.0f, DType::kInt8)) == -127);
    CHECK(kvkit::quantize_value(nan, 1.0f, DType::kInt8) == 0);
    CHECK(kvkit::quantize_value(-0.0f, 1.0f, DType::kInt8) == 0);
    CHECK(std::int8_t(kvkit::quantize_value(2.5f, 1.0f, DType::kInt8)) == 2);   // ties to even
    CHECK(std::int8_t(kvkit::quantize_value(-3.5f, 1.0f, DType::kInt8)) == -4);
    CHECK(kvkit::dequantize_value(std::uint8_t(std::int8_t(-127)), 0.5f, DType::kInt8) == -63.5f);
  }
  SECTION("dynamic scales ignore non-finite values and keep zeros exact") {
    CHECK(kvkit::fold_amax(kvkit::fold_amax(kvkit::fold_amax(0.0f, -3.0f), inf), nan) == 3.0f);
    CHECK(kvkit::dynamic_scale(0.0f, DType::kFloat8E4M3) == 1.0f);
    CHECK(kvkit::dynamic_scale(448.0f, DType::kFloat8E4M3) == 1.0f);
  }
}

TEST_CASE("a row with inf and NaN quantized with a per-(token, head) scale") {
  const auto layout = PagedKVLayout::nhd(1, 1, 1, 4);
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> k{1.0f, -inf, std::nanf(""), -2.0f}, v{0.0f, -0.0f, 0.0f, 0.0f};
  const std::int64_t slot = 0;
  std::vector<std::uint8_t> kc(4, kPoison), vc(4, kPoison);
  std::vector<float> ks(1), vs(1);
  kvkit::QuantizeAppendArgs a;
  a.key = k.data();
  a.value = v.data();
  a.key_stride_token = a.value_stride_token = 4;
  a.key_stride_head = a.value_stride_head = 4;
  a.slot_mapping = &slot;
  a.num_tokens = 1;
  a.k_cache = kc.data();
  a.v_cache = vc.data();
  a.src_dtype = DType::kFloat32;
  a.cache_dtype = DType::kFloat8E4M3;
  a.granularity = ScaleGranularity::kPerTokenHead;
  a.k_scale_cache = ks.data();
  a.v_scale_cache = vs.data();
  kvkit::quantize_append_kv(layout, a);
  CHECK(ks[0] == 2.0f / 448.0f);
  CHECK(kc == std::vector<std::uint8_t>{0x76, 0xFE, 0x7F, 0xFE});  // 224, -448 (sat), NaN, -448
  CHECK(vs[0] == 1.0f);
  CHECK(vc == std::vector<std::uint8_t>{0x00, 0x80, 0x00, 0x00});
}

TEST_CASE("quantize_append_kv rejects bad dtypes, scales and slots before writing") {
  const auto layout = PagedKVLayout::nhd(2, 4, 7, 96);
  Case c(layout, 5, DType::kFloat8E4M3, ScaleGranularity::kPerTensor, 3);
  auto a = c.args;
  a.cache_dtype = DType::kBFloat16;
  CHECK_THROWS_WITH(kvkit::quantize_append_kv(layout, a),
                    Contains("'cache_dtype' = bfloat16: expected float8_e4m3, float8_e5m2 or int8"));
  a = c.args;
  a.src_dtype = DType::kInt8;
  CHECK_THROWS_WITH(kvkit::quantize_append_kv(layout, a), Contains("'src_dtype' = int8"));
  a = c.args;
  a.k_scale = nullptr;
  CHECK_THROWS_WITH(kvkit::quantize_append_kv(layout, a), Contains("'k_scale' = nullptr"));
  a = c.args;
  a.granularity = ScaleGranularity::kPerTokenHead;
  CHECK_THROWS_WITH(kvkit::quantize_append_kv(layout, a), Contains("'k_scale_cache' = nullptr"));
  a = c.args;
  c.v_scale[0] = 0.0f;
  CHECK_THROWS_WITH(kvkit::quantize_append_kv(layout, a),
                    Contains("scale[0] = 0: expected a finite scale > 0"));
  c.v_scale[0] = 1.0f;
  std::vector<std::int64_t> bad{0, 9};
  a.slot_mapping = bad.data();
  a.num_tokens = 2;
  CHECK_THROWS_WITH(kvkit::quantize_append_kv(layout, a), Contains("slot_mapping[1] = 9"));
  CHECK(std::all_of(c.kc.begin(), c.kc.end(), [](std::uint8_t x) { return x == kPoison; }));
}
