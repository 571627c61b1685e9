// Numeric types: half, bfloat16, float8_e4m3, float8_e5m2 against a float64
// reference built from each format's definition (support/float_reference.hpp).

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "kvkit/core/dtype.hpp"
#include "support/float_reference.hpp"

using kvkit::Saturation;
using kvkit::testing::RoundingReference;
using kvkit::testing::SmallFloatFormat;

namespace {

// One small-float type under test: its format and its encode/decode functions.
struct TypeUnderTest {
  const SmallFloatFormat& format;
  std::uint32_t (*encode)(float, bool saturate);
  float (*decode)(std::uint32_t bits);
  bool has_no_saturation_mode;  // fp8 only; half/bfloat16 always overflow to inf
};

const TypeUnderTest kHalf{kvkit::testing::kHalfFormat,
                          [](float f, bool) -> std::uint32_t { return kvkit::half(f).bits; },
                          [](std::uint32_t b) {
                            return float(kvkit::half::from_bits(std::uint16_t(b)));
                          },
                          false};
const TypeUnderTest kBFloat16{kvkit::testing::kBFloat16Format,
                              [](float f, bool) -> std::uint32_t { return kvkit::bfloat16(f).bits; },
                              [](std::uint32_t b) {
                                return float(kvkit::bfloat16::from_bits(std::uint16_t(b)));
                              },
                              false};
const TypeUnderTest kE4M3{kvkit::testing::kE4M3Format,
                          [](float f, bool sat) -> std::uint32_t {
                            return kvkit::float_to_e4m3_bits(
                                f, sat ? Saturation::kFinite : Saturation::kNone);
                          },
                          [](std::uint32_t b) {
                            return float(kvkit::float8_e4m3::from_bits(std::uint8_t(b)));
                          },
                          true};
const TypeUnderTest kE5M2{kvkit::testing::kE5M2Format,
                          [](float f, bool sat) -> std::uint32_t {
                            return kvkit::float_to_e5m2_bits(
                                f, sat ? Saturation::kFinite : Saturation::kNone);
                          },
                          [](std::uint32_t b) {
                            return float(kvkit::float8_e5m2::from_bits(std::uint8_t(b)));
                          },
                          true};

bool same_value(float got, double expected) {
  if (std::isnan(expected)) return std::isnan(got);
  return double(got) == expected && std::signbit(got) == std::signbit(expected);
}

// Every bit pattern decodes to the format's definition and, unless NaN,
// encodes back to itself; NaN encodes to the canonical NaN.
void check_all_patterns(const TypeUnderTest& t) {
  INFO(t.format.name);
  for (std::uint32_t code = 0; code < t.format.code_count(); ++code) {
    const double expected = t.format.decode(code);
    const float value = t.decode(code);
    INFO("code 0x" << std::hex << code);
    REQUIRE(same_value(value, expected));
    const std::uint32_t back = t.encode(value, true);
    if (std::isnan(expected)) {
      REQUIRE(back == t.format.canonical_nan);
    } else if (std::isinf(expected)) {
      // Saturating fp8 clamps inf; half/bfloat16 keep it.
      const std::uint32_t sign = code & t.format.sign_bit();
      REQUIRE(back == (t.has_no_saturation_mode ? (sign | t.format.max_finite_code()) : code));
    } else {
      REQUIRE(back == code);
    }
  }
}

// Rounds `inputs` with the type and with the reference; all must agree bit for bit.
void check_against_reference(const TypeUnderTest& t, const std::vector<float>& inputs) {
  const RoundingReference reference(t.format);
  // half and bfloat16 have one mode (overflow to inf); fp8 has both.
  for (bool saturate : {true, false}) {
    if (!saturate && !t.has_no_saturation_mode) continue;
    for (float x : inputs) {
      const std::uint32_t expected = reference.round(double(x), t.has_no_saturation_mode && saturate);
      const std::uint32_t got = t.encode(x, saturate);
      if (got != expected) {
        FAIL(t.format.name << ": " << (saturate ? "saturating" : "non-saturating") << " conversion of "
                           << std::hexfloat << x << " gave 0x" << std::hex << got << ", expected 0x"
                           << expected);
      }
    }
  }
}

// Inputs that probe rounding: every tie between representable values and its
// two float neighbours, both signs; edge values; random floats of every kind.
std::vector<float> rounding_inputs(const SmallFloatFormat& format, std::uint64_t seed) {
  std::vector<float> inputs;
  const RoundingReference reference(format);
  for (double mid : reference.midpoints()) {
    const float m = float(mid);
    REQUIRE(double(m) == mid);  // ties of these formats are exact in float
    for (float v : {m, std::nextafter(m, 0.0f), std::nextafter(m, INFINITY)}) {
      inputs.push_back(v);
      inputs.push_back(-v);
    }
  }
  const float specials[] = {0.0f,
                            -0.0f,
                            INFINITY,
                            -INFINITY,
                            std::numeric_limits<float>::quiet_NaN(),
                            -std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::signaling_NaN(),
                            std::numeric_limits<float>::max(),
                            -std::numeric_limits<float>::max(),
                            std::numeric_limits<float>::min(),
                            std::numeric_limits<float>::denorm_min(),
                            -std::numeric_limits<float>::denorm_min(),
                            1.0f,
                            -1.0f,
                            448.0f,
                            464.0f,
                            480.0f,
                            57344.0f,
                            61440.0f,
                            65504.0f,
                            65520.0f,
                            1e-30f,
                            3e38f};
  inputs.insert(inputs.end(), std::begin(specials), std::end(specials));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::uint32_t> any_bits;
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-30, 20);
  for (int i = 0; i < 200000; ++i) {
    inputs.push_back(kvkit::bits_to_float(any_bits(rng)));         // any pattern, NaNs included
    inputs.push_back(std::ldexp(unit(rng), exponent(rng)));      // the formats' working range
  }
  return inputs;
}

}  // namespace

TEST_CASE("every half bit pattern round-trips through float and matches IEEE binary16") {
  check_all_patterns(kHalf);
}

TEST_CASE("every bfloat16 bit pattern round-trips through float and matches its definition") {
  check_all_patterns(kBFloat16);
}

TEST_CASE("every float8_e4m3 bit pattern round-trips through float and matches OCP E4M3") {
  check_all_patterns(kE4M3);
}

TEST_CASE("every float8_e5m2 bit pattern round-trips through float and matches OCP E5M2") {
  check_all_patterns(kE5M2);
}

TEST_CASE("float to half rounds to nearest even like a float64 reference") {
  check_against_reference(kHalf, rounding_inputs(kHalf.format, 1));
}

TEST_CASE("float to bfloat16 rounds to nearest even like a float64 reference") {
  check_against_reference(kBFloat16, rounding_inputs(kBFloat16.format, 2));
}

TEST_CASE("float to float8_e4m3 rounds to nearest even, saturating or not, like a float64 reference") {
  check_against_reference(kE4M3, rounding_inputs(kE4M3.format, 3));
}

TEST_CASE("float to float8_e5m2 rounds to nearest even, saturating or not, like a float64 reference") {
  check_against_reference(kE5M2, rounding_inputs(kE5M2.format, 4));
}

TEST_CASE("documented edge values of the small float types") {
  using kvkit::float8_e4m3;
  using kvkit::float8_e5m2;
  // Saturation (CUDA's __NV_SATFINITE is the default of the constructors).
  CHECK(float(float8_e4m3(1e6f)) == 448.0f);
  CHECK(float(float8_e4m3(-INFINITY)) == -448.0f);
  CHECK(float(float8_e5m2(1e6f)) == 57344.0f);
  CHECK(kvkit::float_to_e4m3_bits(1e6f, Saturation::kNone) == 0x7f);
  CHECK(kvkit::float_to_e4m3_bits(-1e6f, Saturation::kNone) == 0xff);
  CHECK(kvkit::float_to_e5m2_bits(-1e6f, Saturation::kNone) == 0xfc);  // -inf
  // 464 is the tie between 448 and the NaN slot: it rounds to even, 448.
  CHECK(float(float8_e4m3(464.0f)) == 448.0f);
  CHECK(kvkit::float_to_e4m3_bits(464.0f, Saturation::kNone) == 0x7e);
  // NaN of either sign becomes the canonical 0x7F.
  CHECK(float8_e4m3(-std::numeric_limits<float>::quiet_NaN()).bits == 0x7f);
  CHECK(float8_e5m2(std::numeric_limits<float>::quiet_NaN()).bits == 0x7f);
  // Signed zero survives, also when a tiny value rounds to zero.
  CHECK(float8_e4m3(-0.0f).bits == 0x80);
  CHECK(float8_e4m3(-1e-10f).bits == 0x80);
  CHECK(kvkit::half(-1e-10f).bits == 0x8000);
  // Subnormals: smallest of each format.
  CHECK(float(float8_e4m3::from_bits(0x01)) == std::ldexp(1.0f, -9));
  CHECK(float(float8_e5m2::from_bits(0x01)) == std::ldexp(1.0f, -16));
  CHECK(float(kvkit::half::from_bits(0x0001)) == std::ldexp(1.0f, -24));
  // Half overflow: 65519 rounds down to 65504, 65520 (the tie) up to inf.
  CHECK(kvkit::half(65519.0f).bits == 0x7bff);
  CHECK(kvkit::half(65520.0f).bits == 0x7c00);
  CHECK(kvkit::bfloat16(std::numeric_limits<float>::max()).bits == 0x7f80);  // rounds to inf
  CHECK(kvkit::bfloat16(-std::numeric_limits<float>::quiet_NaN()).bits == 0x7fff);
}

TEST_CASE("dtype sizes, names and the C++ type mapping agree") {
  using kvkit::DType;
  CHECK(kvkit::dtype_size(DType::kFloat32) == 4);
  CHECK(kvkit::dtype_size(DType::kBFloat16) == 2);
  CHECK(kvkit::dtype_size(DType::kFloat8E4M3) == 1);
  CHECK(kvkit::dtype_size(DType::kInt64) == 8);
  CHECK(std::string(kvkit::dtype_name(DType::kFloat8E5M2)) == "float8_e5m2");
  STATIC_REQUIRE(kvkit::dtype_of<kvkit::half> == DType::kFloat16);
  STATIC_REQUIRE(kvkit::dtype_of<const kvkit::float8_e4m3> == DType::kFloat8E4M3);
  STATIC_REQUIRE(std::is_trivially_copyable_v<kvkit::half>);
  STATIC_REQUIRE(std::is_trivially_copyable_v<kvkit::bfloat16>);
  STATIC_REQUIRE(std::is_trivially_copyable_v<kvkit::float8_e4m3>);
  STATIC_REQUIRE(std::is_trivially_copyable_v<kvkit::float8_e5m2>);
  CHECK(kvkit::from_float<kvkit::bfloat16>(1.5f).bits == 0x3fc0);
  CHECK(kvkit::to_float(kvkit::half::from_bits(0x3c00)) == 1.0f);
}
