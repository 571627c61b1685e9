// The AVX2 RoPE kernels for 16-bit rows (kvkit/ops/rope_x86.hpp: interleaved
// and rotate-half pairs on bfloat16 and float16) and
// apply_rope's dispatch give exactly the bits of the baseline loop
// (rotate_heads_body, what the CUDA kernels are compared with), on odd sizes,
// random and special values, both cos/sin sources and negative positions.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "kvkit/ops/rope.hpp"

using kvkit::RopeParams;
using kvkit::RopeStyle;

namespace {

template <class T>
using RotateFn = void (*)(T*, std::int64_t, int, const RopeParams&, const float*, const float*);

template <class T>
void baseline_rotate(T* base, std::int64_t head_stride, int heads, const RopeParams& p, const float* c,
                     const float* s) {
  kvkit::detail::rotate_heads_body(base, head_stride, heads, p, c, s);
}
#if KVKIT_X86_DISPATCH
template <class T>
void avx2_rotate(T* base, std::int64_t head_stride, int heads, const RopeParams& p, const float* c,
                 const float* s) {
  kvkit::detail::rotate_heads_interleaved_avx2(base, head_stride, heads, p.rotary_dim, c, s);
}
template <class T>
void avx2_rotate_neox(T* base, std::int64_t head_stride, int heads, const RopeParams& p, const float* c,
                      const float* s) {
  kvkit::detail::rotate_heads_neox_avx2(base, head_stride, heads, p.rotary_dim, c, s);
}
#endif

float float_of_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

std::uint32_t bits_of_float(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// A value of T: normal(0, 2) draws, or with `special` arbitrary bit patterns
// (subnormals, infinities, NaNs, huge values whose rotation overflows).
template <class T>
T draw(std::mt19937_64& rng, bool special) {
  if (!special) return kvkit::from_float<T>(std::normal_distribution<float>(0.0f, 2.0f)(rng));
  if constexpr (sizeof(T) == 2) {
    return T::from_bits(std::uint16_t(rng()));
  } else {
    return float_of_bits(std::uint32_t(rng()));
  }
}

// Bit equality; for float, two NaNs count as equal (which NaN an operation
// returns when two meet depends on operand order, which C++ leaves open;
// bfloat16 and half store every NaN as the canonical 0x7fff, so they are compared exactly).
template <class T>
bool same_bits(const T& a, const T& b) {
  if (std::memcmp(&a, &b, sizeof(T)) == 0) return true;
  if constexpr (std::is_same_v<T, float>) return std::isnan(a) && std::isnan(b);
  return false;
}

struct Shape {
  int head_dim;
  int rotary_dim;
  int heads;
  std::int64_t tokens;
};

// Rotates [tokens, heads, head_dim] rows (padded strides, poisoned gaps) with
// `fn` and with the baseline loop, and requires identical buffers: rotated
// dims, untouched tail dims and the poisoned gaps alike.
template <class T>
void check_against_baseline(RotateFn<T> fn, const Shape& sh, bool special, bool on_the_fly,
                            std::uint64_t seed, RopeStyle style) {
  CAPTURE(sh.head_dim, sh.rotary_dim, sh.heads, sh.tokens, special, on_the_fly, int(style));
  const std::int64_t head_stride = sh.head_dim + 3, token_stride = sh.heads * head_stride + 5;
  std::mt19937_64 rng(seed);
  std::vector<T> x(std::size_t(sh.tokens * token_stride + 1), kvkit::from_float<T>(-12345.0f));
  std::vector<std::int64_t> positions(static_cast<std::size_t>(sh.tokens));
  std::uniform_int_distribution<std::int64_t> pos_dist(-4095, 4095);
  for (std::int64_t t = 0; t < sh.tokens; ++t) {
    positions[std::size_t(t)] = t == 1 ? 0 : pos_dist(rng);  // position 0: sin is exactly 0
    for (int h = 0; h < sh.heads; ++h)
      for (int d = 0; d < sh.head_dim; ++d) x[std::size_t(t * token_stride + h * head_stride + d)] = draw<T>(rng, special);
  }
  kvkit::RopeConfig cfg{sh.head_dim, sh.rotary_dim, 10000.0, style, {}};
  const kvkit::RopeCache cache(cfg, 4096);
  RopeParams p;
  p.head_dim = sh.head_dim;
  p.rotary_dim = sh.rotary_dim;
  p.style = style;
  cache.attach(p);
  if (on_the_fly) p.cos_sin_cache = nullptr;

  // Rows start at an odd element offset too, so 16-byte accesses are unaligned.
  const auto run = [&](RotateFn<T> f, std::vector<T>& buf) {
    std::vector<float> c(std::size_t(sh.rotary_dim / 2)), s(c.size());
    for (std::int64_t t = 0; t < sh.tokens; ++t) {
      kvkit::detail::load_cos_sin_row(p, positions[std::size_t(t)], c.data(), s.data());
      f(buf.data() + 1 + t * token_stride, head_stride, sh.heads, p, c.data(), s.data());
    }
  };
  std::vector<T> expect = x, got = x;
  run(&baseline_rotate<T>, expect);
  run(fn, got);
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!same_bits(got[i], expect[i])) {
      FAIL("element " << i << ": got " << double(kvkit::to_float(got[i])) << ", baseline "
                      << double(kvkit::to_float(expect[i])) << " (input " << double(kvkit::to_float(x[i]))
                      << ")");
    }
  }
  // A rotation that changed nothing would make the comparison vacuous.
  std::size_t changed = 0;
  for (std::size_t i = 0; i < got.size(); ++i) changed += !same_bits(got[i], x[i]);
  CHECK(changed > 0);
}

template <class T>
std::vector<RotateFn<T>> fast_paths(RopeStyle style) {
  std::vector<RotateFn<T>> fns{&kvkit::detail::rotate_heads<T>};  // what apply_rope dispatches to
#if KVKIT_X86_DISPATCH
  if (kvkit::detail::x86_level() != kvkit::detail::X86Level::kBaseline) {
    if constexpr (sizeof(T) == 2) {  // the 16-bit types have an AVX2 kernel for each pairing
      fns.push_back(style == RopeStyle::kGptJ ? &avx2_rotate<T> : &avx2_rotate_neox<T>);
    }
  }
#endif
  return fns;
}

template <class T>
void check_all_shapes(RopeStyle style = RopeStyle::kGptJ) {
  // rotary_dim 64 (DeepSeek's q_pe / k_pe, also inside a 192-wide head),
  // tails of 1 and 3 pairs past a full 8-lane chunk, partial rotary, a single
  // pair, and more than one 256-dim block of the duplicated table.
  const std::vector<Shape> shapes = {
      {64, 64, 3, 7},  {192, 64, 16, 1}, {96, 32, 5, 33}, {14, 14, 2, 7},
      {22, 22, 1, 33}, {2, 2, 7, 1},     {530, 520, 1, 7}, {128, 64, 1, 33},
  };
  std::uint64_t seed = 1;
  for (RotateFn<T> fn : fast_paths<T>(style)) {
    for (const Shape& sh : shapes) {
      for (bool special : {false, true}) {
        for (bool fly : {false, true}) check_against_baseline<T>(fn, sh, special, fly, seed++, style);
      }
    }
  }
}

}  // namespace

TEST_CASE("interleaved rope AVX2 kernel and dispatch equal the baseline loop bit for bit (bfloat16)") {
  check_all_shapes<kvkit::bfloat16>();
}

TEST_CASE("interleaved rope AVX2 kernel and dispatch equal the baseline loop bit for bit (half)") {
  check_all_shapes<kvkit::half>();
}

TEST_CASE("interleaved rope dispatch equals the baseline loop bit for bit (float)") {
  check_all_shapes<float>();
}

TEST_CASE("rotate-half rope AVX2 kernel and dispatch equal the baseline loop bit for bit (bfloat16)") {
  check_all_shapes<kvkit::bfloat16>(RopeStyle::kNeox);
}

TEST_CASE("rotate-half rope AVX2 kernel and dispatch equal the baseline loop bit for bit (half)") {
  check_all_shapes<kvkit::half>(RopeStyle::kNeox);
}

TEST_CASE("rotate-half rope dispatch equals the baseline loop bit for bit (float)") {
  check_all_shapes<float>(RopeStyle::kNeox);
}

TEST_CASE("apply_rope with interleaved pairs equals the baseline loop bit for bit") {
  // The public op (dispatch, OpenMP token split) on DeepSeek's q_pe / k_pe
  // shapes: 64-d rope inside 192-wide q heads, one shared 64-d k_pe.
  using T = kvkit::bfloat16;
  const std::int64_t tokens = GENERATE(1, 7, 33, 130);
  CAPTURE(tokens);
  const int q_heads = 16, q_stride = 192, rd = 64;
  std::mt19937_64 rng(42);
  std::vector<T> q(std::size_t(tokens * q_heads * q_stride)), k(std::size_t(tokens * rd));
  for (auto& v : q) v = draw<T>(rng, false);
  for (auto& v : k) v = draw<T>(rng, false);
  std::vector<std::int64_t> positions(static_cast<std::size_t>(tokens));
  std::uniform_int_distribution<std::int64_t> pos_dist(0, 4095);
  for (auto& pos : positions) pos = pos_dist(rng);
  const kvkit::RopeCache cache(kvkit::RopeConfig::deepseek_yarn(), 4096);
  RopeParams p;
  p.q = q.data(); p.q_head_stride = q_stride; p.q_token_stride = q_heads * q_stride; p.num_q_heads = q_heads;
  p.k = k.data(); p.k_head_stride = rd; p.k_token_stride = rd; p.num_k_heads = 1;
  p.positions = positions.data(); p.num_tokens = tokens;
  p.head_dim = rd; p.rotary_dim = rd; p.style = RopeStyle::kGptJ; p.dtype = kvkit::DType::kBFloat16;
  cache.attach(p);

  std::vector<T> q_expect = q, k_expect = k;
  std::vector<float> c(rd / 2), s(rd / 2);
  for (std::int64_t t = 0; t < tokens; ++t) {
    kvkit::detail::load_cos_sin_row(p, positions[std::size_t(t)], c.data(), s.data());
    kvkit::detail::rotate_heads_body(q_expect.data() + t * p.q_token_stride, q_stride, q_heads, p, c.data(), s.data());
    kvkit::detail::rotate_heads_body(k_expect.data() + t * rd, rd, 1, p, c.data(), s.data());
  }
  kvkit::apply_rope(p);
  CHECK(std::memcmp(q.data(), q_expect.data(), q.size() * sizeof(T)) == 0);
  CHECK(std::memcmp(k.data(), k_expect.data(), k.size() * sizeof(T)) == 0);
}

#if KVKIT_X86_DISPATCH
namespace {
// 8 floats through the kernel's 16-bit stores (vector types stay inside AVX2 code).
__attribute__((target("avx2"))) void round_trip_avx2(const float* in, kvkit::bfloat16* out) {
  kvkit::detail::rope_store8(out, _mm256_loadu_ps(in));
}
__attribute__((target("avx2,f16c"))) void round_trip_avx2(const float* in, kvkit::half* out) {
  kvkit::detail::rope_store8(out, _mm256_loadu_ps(in));
}

// Every float pattern in `patterns` through the kernel's store, against the
// scalar conversion `expect`.
template <class T, class Expect>
void check_store(const std::vector<std::uint32_t>& patterns, Expect expect) {
  for (std::size_t i = 0; i + 8 <= patterns.size(); i += 8) {
    alignas(32) float in[8];
    for (int l = 0; l < 8; ++l) in[l] = float_of_bits(patterns[i + std::size_t(l)]);
    T out[9];
    out[8] = T::from_bits(0x1234);  // just past the 16 bytes: must stay
    round_trip_avx2(in, out);
    for (int l = 0; l < 8; ++l) {
      INFO("float bits 0x" << std::hex << bits_of_float(in[l]));
      REQUIRE(out[l].bits == expect(in[l]));
    }
    REQUIRE(out[8].bits == 0x1234);
  }
}

// `patterns` after zeros, infinities, NaNs of every kind and the extreme
// subnormals, padded with random ones to a whole number of 8-lane groups of
// at least 2^16.
std::vector<std::uint32_t> with_special_and_random(const std::vector<std::uint32_t>& own) {
  std::vector<std::uint32_t> patterns = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u,
                                         0xffc00001u, 0x7f800001u, 0x7fbfffffu, 0x00000001u, 0x807fffffu};
  patterns.insert(patterns.end(), own.begin(), own.end());
  std::mt19937_64 rng(7);
  while (patterns.size() % 8 != 0 || patterns.size() < (1u << 16)) patterns.push_back(std::uint32_t(rng()));
  return patterns;
}
// Whether the dispatch would use the AVX2 kernels here (warns if not).
bool avx2_kernels_run() {
  if (kvkit::detail::x86_level() != kvkit::detail::X86Level::kBaseline) return true;
  WARN("this CPU has no AVX2/FMA/F16C; the AVX2 kernels are not exercised");
  return false;
}
}  // namespace

TEST_CASE("the AVX2 bfloat16 store rounds like float_to_bfloat16_bits") {
  if (!avx2_kernels_run()) return;
  // Ties (low half exactly 0x8000) with even and odd kept bits, one ulp either
  // side of them, carries into the exponent and up to infinity, subnormals.
  std::vector<std::uint32_t> patterns = {0x7f7fffffu, 0x7f7f8000u, 0xff7f8000u, 0x00008000u, 0x00018000u,
                                         0x0000ffffu};
  for (std::uint32_t hi : {0x3f80u, 0x3f81u, 0x4049u, 0xc2f7u, 0x0001u, 0x7f7eu}) {
    for (std::uint32_t lo : {0x7fffu, 0x8000u, 0x8001u, 0xffffu, 0x0000u, 0x0001u})
      patterns.push_back((hi << 16) | lo);
  }
  check_store<kvkit::bfloat16>(with_special_and_random(patterns),
                               [](float f) { return kvkit::float_to_bfloat16_bits(f); });
}

TEST_CASE("the AVX2 (F16C) float16 store rounds like float_to_half_bits") {
  if (!avx2_kernels_run()) return;
  // Around every place float_to_half_bits decides something: ties at each
  // exponent (13 dropped bits, 0x1000 exactly half), 65504 and the 65520
  // overflow edge, the smallest normal 2^-14, subnormal results with ties at
  // every shift, 2^-25 (rounds to 0) and just above it.
  std::vector<std::uint32_t> patterns = {0x477fe000u, 0x477fefffu, 0x477ff000u, 0xc77ff000u, 0x38800000u,
                                         0x387fffffu, 0x33000000u, 0x33000001u, 0xb3000001u, 0x337fffffu};
  for (std::uint32_t exponent = 100; exponent <= 143; ++exponent) {
    for (std::uint32_t mantissa : {0x000000u, 0x001000u, 0x003000u, 0x000fffu, 0x001001u, 0x7ff000u,
                                   0x7fefffu, 0x400000u, 0x402000u, 0x7fffffu}) {
      patterns.push_back((exponent << 23) | mantissa);
      patterns.push_back(0x80000000u | (exponent << 23) | mantissa);
    }
  }
  check_store<kvkit::half>(with_special_and_random(patterns), [](float f) { return kvkit::float_to_half_bits(f); });
}
#endif
