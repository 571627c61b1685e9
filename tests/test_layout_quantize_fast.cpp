// The vectorized quantize-append (kvkit/ops/quantize_row.hpp and the
// per-ISA loops of kvkit/ops/quantize.hpp) produces exactly the bytes and
// scales of the scalar rules (quantize_value, fold_amax, dynamic_scale,
// the element types' conversions), on every ISA the CPU running the test has.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kvkit/layout/contiguous_kv_layout.hpp"
#include "kvkit/layout/paged_kv_layout.hpp"
#include "kvkit/ops/quantize.hpp"

using kvkit::DType;
using kvkit::PagedKVLayout;
using kvkit::ScaleGranularity;

namespace {

constexpr std::uint8_t kPoison = 0xA5;
constexpr float kPoisonScale = -7.0f;

float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

/// Float patterns to sweep: a stride through all 2^32, plus every pattern
/// within 64 ulp of each rounding boundary of the three formats (halfway
/// points, the subnormal/normal switches, the saturation thresholds).
std::vector<float> sweep_floats() {
  std::vector<float> v;
  for (std::uint64_t u = 0; u < (std::uint64_t(1) << 32); u += 4099) v.push_back(bits_float(std::uint32_t(u)));
  const float centers[] = {0.0f,           std::ldexp(1.0f, -6),  std::ldexp(1.0f, -10),
                           std::ldexp(1.0f, -14), std::ldexp(1.0f, -17), std::ldexp(1.5f, -9),
                           std::ldexp(1.0f, -9), std::ldexp(1.0f, -16), 448.0f,
                           464.0f,         480.0f,                57344.0f,
                           61440.0f,       126.5f,                127.0f,
                           127.5f,         2.5f,                  0.5f,
                           1.0625f,        1.125f,                std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min()};
  for (float c : centers) {
    std::uint32_t u;
    std::memcpy(&u, &c, 4);
    for (std::int64_t d = -64; d <= 64; ++d) {
      const std::int64_t p = std::int64_t(u) + d;
      if (p < 0 || p > 0x7fffffff) continue;
      v.push_back(bits_float(std::uint32_t(p)));
      v.push_back(-bits_float(std::uint32_t(p)));
    }
  }
  v.push_back(std::numeric_limits<float>::quiet_NaN());
  v.push_back(-std::numeric_limits<float>::quiet_NaN());
  v.push_back(std::numeric_limits<float>::signaling_NaN());
  return v;
}

/// Random source values of every kind: ordinary magnitudes spread over many
/// binades, subnormal-range values, ±0, ±inf, NaN, huge values.
std::vector<float> random_specials(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-24, 20), kind(0, 39);
  std::vector<float> v(n);
  for (auto& x : v) {
    switch (kind(rng)) {
      case 0: x = std::numeric_limits<float>::infinity(); break;
      case 1: x = -std::numeric_limits<float>::infinity(); break;
      case 2: x = std::numeric_limits<float>::quiet_NaN(); break;
      case 3: x = -0.0f; break;
      case 4: x = 0.0f; break;
      case 5: x = unit(rng) * 1e30f; break;
      default: x = unit(rng) * std::ldexp(1.0f, exponent(rng));
    }
  }
  return v;
}

/// Source tensor in `dtype`, with the float value each element holds.
struct Source {
  std::vector<unsigned char> bytes;
  std::vector<float> as_float;
};

Source make_source(const std::vector<float>& values, DType dtype) {
  Source s;
  const std::size_t es = kvkit::dtype_size(dtype);
  s.bytes.resize(values.size() * es);
  s.as_float.resize(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (dtype == DType::kFloat32) {
      std::memcpy(&s.bytes[i * 4], &values[i], 4);
      s.as_float[i] = values[i];
    } else if (dtype == DType::kFloat16) {
      const kvkit::half h(values[i]);
      std::memcpy(&s.bytes[i * 2], &h.bits, 2);
      s.as_float[i] = float(h);
    } else {
      const kvkit::bfloat16 b(values[i]);
      std::memcpy(&s.bytes[i * 2], &b.bits, 2);
      s.as_float[i] = float(b);
    }
  }
  return s;
}

using AppendFn = void (*)(const PagedKVLayout&, const kvkit::QuantizeAppendArgs&);

/// Runs `fn` on a random case and compares every cache byte and scale with
/// the scalar rules applied element by element.
void check_against_scalar(AppendFn fn, DType src_dtype, DType cache_dtype, ScaleGranularity g,
                          std::int64_t head_dim, bool hnd) {
  const std::int64_t heads = 3, page = 4, pages = 5, n = 9;
  const auto layout = hnd ? PagedKVLayout::hnd(pages, page, heads, head_dim)
                          : PagedKVLayout::nhd(pages, page, heads, head_dim);
  // Source rows padded by 5 elements per token: strided input.
  const std::int64_t stride_token = heads * head_dim + 5;
  const Source key = make_source(random_specials(std::size_t(n * stride_token), 11), src_dtype);
  const Source value = make_source(random_specials(std::size_t(n * stride_token), 12), src_dtype);
  const std::vector<std::int64_t> slots{13, 0, -1, 19, 7, 8, -3, 2, 17};
  std::vector<std::uint8_t> kc(std::size_t(layout.span_elements()), kPoison), vc(kc);
  std::vector<float> ks, vs;
  kvkit::QuantizeAppendArgs a;
  a.key = key.bytes.data();
  a.value = value.bytes.data();
  a.key_stride_token = a.value_stride_token = stride_token;
  a.key_stride_head = a.value_stride_head = head_dim;
  a.slot_mapping = slots.data();
  a.num_tokens = n;
  a.k_cache = kc.data();
  a.v_cache = vc.data();
  a.src_dtype = src_dtype;
  a.cache_dtype = cache_dtype;
  a.granularity = g;
  if (g == ScaleGranularity::kPerTokenHead) {
    ks.assign(std::size_t(layout.num_slots() * heads), kPoisonScale);
    vs = ks;
    a.k_scale_cache = ks.data();
    a.v_scale_cache = vs.data();
  } else {
    for (std::int64_t h = 0; h < (g == ScaleGranularity::kPerHead ? heads : 1); ++h) {
      ks.push_back(0.0371f * float(h + 1));
      vs.push_back(3.3f / float(h + 1));
    }
    a.k_scale = ks.data();
    a.v_scale = vs.data();
  }
  fn(layout, a);

  std::vector<std::uint8_t> expect_k(kc.size(), kPoison), expect_v(kc.size(), kPoison);
  for (std::int64_t t = 0; t < n; ++t) {
    const std::int64_t slot = slots[std::size_t(t)];
    if (slot < 0) continue;
    for (int which = 0; which < 2; ++which) {
      const Source& src = which ? value : key;
      auto& expect = which ? expect_v : expect_k;
      const std::vector<float>& scales = which ? vs : ks;
      for (std::int64_t h = 0; h < heads; ++h) {
        const float* row = src.as_float.data() + t * stride_token + h * head_dim;
        float scale;
        if (g == ScaleGranularity::kPerTokenHead) {
          float amax = 0.0f;
          for (std::int64_t d = 0; d < head_dim; ++d) amax = kvkit::fold_amax(amax, row[d]);
          scale = kvkit::dynamic_scale(amax, cache_dtype);
          REQUIRE(scales[std::size_t(slot * heads + h)] == scale);
        } else {
          scale = scales[std::size_t(kvkit::scale_index(g, slot, h, heads))];
        }
        for (std::int64_t d = 0; d < head_dim; ++d) {
          expect[std::size_t(layout.slot_offset(slot, h) + d)] =
              kvkit::quantize_value(row[d], scale, cache_dtype);
        }
      }
    }
  }
  CHECK(kc == expect_k);
  CHECK(vc == expect_v);
  if (g == ScaleGranularity::kPerTokenHead) {
    // Scales of slots nobody wrote keep their poison.
    std::size_t written = 0;
    for (float s : ks) written += s != kPoisonScale;
    CHECK(written == std::size_t(7 * heads));
  }
}

template <class Src, DType kCache>
void baseline_entry(const PagedKVLayout& l, const kvkit::QuantizeAppendArgs& a) {
  kvkit::detail::run_loop_baseline<&kvkit::detail::quantize_append_loop<Src, kCache, PagedKVLayout>>(l, a);
}
#if KVKIT_QUANTIZE_X86_DISPATCH
template <class Src, DType kCache>
void avx2_entry(const PagedKVLayout& l, const kvkit::QuantizeAppendArgs& a) {
  // The AVX2 copy's rows are quantize_row_avx2 (kAvx2Rows = true).
  kvkit::detail::run_loop_avx2<&kvkit::detail::quantize_append_loop<Src, kCache, PagedKVLayout, true>>(l, a);
}
template <class Src, DType kCache>
void avx512_entry(const PagedKVLayout& l, const kvkit::QuantizeAppendArgs& a) {
  kvkit::detail::run_loop_avx512<&kvkit::detail::quantize_append_loop<Src, kCache, PagedKVLayout>>(l, a);
}
#endif

/// The per-ISA entry points for a (source, cache) pair that this CPU can run.
template <class Src, DType kCache>
std::vector<AppendFn> entries() {
  std::vector<AppendFn> fns{&kvkit::quantize_append_kv<PagedKVLayout>, &baseline_entry<Src, kCache>};
#if KVKIT_QUANTIZE_X86_DISPATCH
  const auto level = kvkit::detail::x86_level();
  if (level != kvkit::detail::X86Level::kBaseline) fns.push_back(&avx2_entry<Src, kCache>);
  if (level >= kvkit::detail::X86Level::kAvx512) fns.push_back(&avx512_entry<Src, kCache>);
#endif
  return fns;
}

template <class Src>
void check_all_caches(DType src_dtype) {
  const ScaleGranularity g = GENERATE(ScaleGranularity::kPerTensor, ScaleGranularity::kPerHead,
                                      ScaleGranularity::kPerTokenHead);
  const std::int64_t head_dim = GENERATE(1, 7, 33, 128);
  const bool hnd = GENERATE(false, true);
  CAPTURE(int(g), head_dim, hnd);
  for (AppendFn fn : entries<Src, DType::kFloat8E4M3>()) check_against_scalar(fn, src_dtype, DType::kFloat8E4M3, g, head_dim, hnd);
  for (AppendFn fn : entries<Src, DType::kFloat8E5M2>()) check_against_scalar(fn, src_dtype, DType::kFloat8E5M2, g, head_dim, hnd);
  for (AppendFn fn : entries<Src, DType::kInt8>()) check_against_scalar(fn, src_dtype, DType::kInt8, g, head_dim, hnd);
}

}  // namespace

TEST_CASE("the branch-free encoders equal quantize_value on a sweep of float patterns") {
  const std::vector<float> values = sweep_floats();
  std::size_t mismatches = 0;
  for (float v : values) {
    const auto e4 = std::uint8_t(kvkit::detail::encode_e4m3(v));
    const auto e5 = std::uint8_t(kvkit::detail::encode_e5m2(v));
    const auto i8 = std::uint8_t(kvkit::detail::encode_int8(v));
    if (e4 != kvkit::quantize_value(v, 1.0f, DType::kFloat8E4M3) ||
        e5 != kvkit::quantize_value(v, 1.0f, DType::kFloat8E5M2) ||
        i8 != kvkit::quantize_value(v, 1.0f, DType::kInt8)) {
      if (++mismatches < 10) {
        UNSCOPED_INFO("x = " << v << ": e4m3 " << int(e4) << ", e5m2 " << int(e5) << ", int8 " << int(i8));
      }
    }
  }
  CHECK(values.size() > 1000000);
  CHECK(mismatches == 0);
}

#if KVKIT_X86_DISPATCH
/// quantize_row_avx2 over `values` (as Src) against quantize_value, element
/// by element, with the rows cut at odd lengths so that NaNs and the
/// 32-value blocks' tails fall everywhere. Returns the mismatch count.
template <class Src, DType kCache>
std::size_t avx2_row_mismatches(const std::vector<Src>& values, float scale) {
  std::vector<std::uint8_t> out(values.size() + 1, kPoison);
  for (std::size_t at = 0, n = 1; at < values.size(); at += n, n = n % 300 + 61) {
    const std::size_t len = std::min(n, values.size() - at);
    kvkit::detail::quantize_row_avx2<Src, kCache>(values.data() + at, std::int64_t(len), scale, out.data() + at);
  }
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < values.size(); ++i) {
    const std::uint8_t expect = kvkit::quantize_value(kvkit::detail::load_source(values[i]), scale, kCache);
    if (out[i] != expect && ++mismatches < 5) {
      UNSCOPED_INFO("element " << i << " = " << kvkit::detail::load_source(values[i]) << ", scale " << scale
                               << ": " << int(out[i]) << " != " << int(expect));
    }
  }
  CHECK(out.back() == kPoison);
  return mismatches;
}

template <DType kCache>
void check_avx2_rows() {
  std::vector<float> floats = sweep_floats();
  std::shuffle(floats.begin(), floats.end(), std::mt19937(11));
  std::vector<kvkit::bfloat16> b(65536);
  std::vector<kvkit::half> h(65536);
  for (std::uint32_t i = 0; i < 65536; ++i) {
    b[i] = kvkit::bfloat16::from_bits(std::uint16_t(i));
    h[i] = kvkit::half::from_bits(std::uint16_t(i));
  }
  std::shuffle(b.begin(), b.end(), std::mt19937(12));
  std::shuffle(h.begin(), h.end(), std::mt19937(13));
  for (const float scale : {1.0f, 0.0371f, 3.3f, 1.0f / 448.0f}) {
    CAPTURE(scale);
    CHECK(avx2_row_mismatches<float, kCache>(floats, scale) == 0);
    CHECK(avx2_row_mismatches<kvkit::bfloat16, kCache>(b, scale) == 0);
    CHECK(avx2_row_mismatches<kvkit::half, kCache>(h, scale) == 0);
  }
}

TEST_CASE("quantize_row_avx2 equals quantize_value on sweeps of source patterns") {
  if (kvkit::detail::x86_level() < kvkit::detail::X86Level::kAvx2) {
    WARN("not run: this CPU (or KVKIT_CPU_ISA) has no AVX2");
    return;
  }
  check_avx2_rows<DType::kFloat8E4M3>();
  check_avx2_rows<DType::kFloat8E5M2>();
  check_avx2_rows<DType::kInt8>();
}
#endif

TEST_CASE("the branch-free float16 load equals half_bits_to_float for every pattern") {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const float fast = kvkit::detail::load_source(kvkit::half::from_bits(std::uint16_t(b)));
    const float exact = kvkit::half_bits_to_float(std::uint16_t(b));
    std::uint32_t fu, eu;
    std::memcpy(&fu, &fast, 4);
    std::memcpy(&eu, &exact, 4);
    if (fu != eu) FAIL("half bits " << b << ": " << fu << " != " << eu);
  }
}

TEST_CASE("row_amax equals fold_amax over the row, non-finite values ignored") {
  const std::vector<float> v = random_specials(1000, 3);
  for (std::int64_t n : {0, 1, 7, 15, 16, 17, 33, 1000}) {
    float expect = 0.0f;
    for (std::int64_t i = 0; i < n; ++i) expect = kvkit::fold_amax(expect, v[std::size_t(i)]);
    CHECK(kvkit::detail::row_amax(v.data(), n) == expect);
  }
}

TEST_CASE("row_amax of bfloat16 and half rows (compared on 16-bit patterns) equals fold_amax") {
  // Every 16-bit pattern (inf, NaN, subnormals, both zeros included), shuffled
  // and cut into rows of odd lengths, for both types.
  std::vector<std::uint16_t> all(65536);
  std::iota(all.begin(), all.end(), std::uint16_t(0));
  std::shuffle(all.begin(), all.end(), std::mt19937(4));
  std::vector<kvkit::bfloat16> b(all.size());
  std::vector<kvkit::half> h(all.size());
  for (std::size_t i = 0; i < all.size(); ++i) {
    b[i] = kvkit::bfloat16::from_bits(all[i]);
    h[i] = kvkit::half::from_bits(all[i]);
  }
  std::size_t rows = 0;
  for (std::size_t at = 0, n = 1; at < all.size(); at += n, n = n % 257 + 33) {
    const std::size_t len = std::min(n, all.size() - at);
    float eb = 0.0f, eh = 0.0f;
    for (std::size_t i = at; i < at + len; ++i) {
      eb = kvkit::fold_amax(eb, float(b[i]));
      eh = kvkit::fold_amax(eh, kvkit::half_bits_to_float(all[i]));
    }
    REQUIRE(kvkit::detail::row_amax(b.data() + at, std::int64_t(len)) == eb);
    REQUIRE(kvkit::detail::row_amax(h.data() + at, std::int64_t(len)) == eh);
    ++rows;
  }
  CHECK(rows > 200);
}

TEST_CASE("quantize_append_kv from float32 equals the scalar rules on every ISA") {
  check_all_caches<float>(DType::kFloat32);
}

TEST_CASE("quantize_append_kv from float16 equals the scalar rules on every ISA") {
  check_all_caches<kvkit::half>(DType::kFloat16);
}

TEST_CASE("quantize_append_kv from bfloat16 equals the scalar rules on every ISA") {
  check_all_caches<kvkit::bfloat16>(DType::kBFloat16);
}

TEST_CASE("quantize_append_kv into a contiguous cache equals the scalar rules") {
  const auto layout = kvkit::ContiguousKVLayout::token_major(2, 5, 3, 33);
  const std::vector<float> key = random_specials(4 * 3 * 33, 21), value = random_specials(4 * 3 * 33, 22);
  const std::vector<std::int64_t> slots{9, 0, 5, 4};
  std::vector<std::uint8_t> kc(2 * 5 * 3 * 33, kPoison), vc(kc);
  kvkit::QuantizeAppendArgs a;
  a.key = key.data();
  a.value = value.data();
  a.key_stride_token = a.value_stride_token = 3 * 33;
  a.key_stride_head = a.value_stride_head = 33;
  a.slot_mapping = slots.data();
  a.num_tokens = 4;
  a.k_cache = kc.data();
  a.v_cache = vc.data();
  a.src_dtype = DType::kFloat32;
  a.cache_dtype = DType::kFloat8E5M2;
  a.granularity = ScaleGranularity::kPerTensor;
  const float ks = 0.25f, vs = 1.5f;
  a.k_scale = &ks;
  a.v_scale = &vs;
  kvkit::quantize_append_kv(layout, a);
  std::vector<std::uint8_t> ek(kc.size(), kPoison), ev(kc.size(), kPoison);
  for (std::size_t t = 0; t < 4; ++t)
    for (std::int64_t h = 0; h < 3; ++h)
      for (std::int64_t d = 0; d < 33; ++d) {
        const std::size_t src = t * 99 + std::size_t(h * 33 + d);
        const auto dst = std::size_t(layout.slot_offset(slots[t], h) + d);
        ek[dst] = kvkit::quantize_value(key[src], ks, DType::kFloat8E5M2);
        ev[dst] = kvkit::quantize_value(value[src], vs, DType::kFloat8E5M2);
      }
  CHECK(kc == ek);
  CHECK(vc == ev);
}
