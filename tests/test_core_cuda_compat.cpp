// Bit-compatibility of kvkit's conversions with CUDA's own (host-side code of
// cuda_fp16.h, cuda_bf16.h and cuda_fp8.h, which mirrors the device
// instructions). Needs the CUDA toolkit's headers only: runs without a GPU.
// The GPU test test_core_gpu checks kvkit's device-side conversions as well.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kvkit/core/dtype.hpp"

namespace {

std::vector<float> probe_floats() {
  std::vector<float> xs;
  // Every float whose low 13 bits are one of a few patterns around the
  // rounding points of all four formats, across the whole exponent range.
  for (std::uint32_t hi = 0; hi < (1u << 19); ++hi) {
    for (std::uint32_t lo : {0x0000u, 0x0fffu, 0x1000u, 0x1001u, 0x7fffu, 0x8000u, 0x8001u}) {
      xs.push_back(kvkit::bits_to_float((hi << 13) | (lo & 0x1fffu)));
    }
  }
  std::mt19937 rng(7);
  for (int i = 0; i < 1000000; ++i) xs.push_back(kvkit::bits_to_float(rng()));
  return xs;
}

std::uint16_t bits_of(__half h) {
  std::uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
std::uint16_t bits_of(__nv_bfloat16 h) {
  std::uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

bool same_float(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || kvkit::float_to_bits(a) == kvkit::float_to_bits(b);
}

}  // namespace

TEST_CASE("float to half/bfloat16/fp8 equals CUDA's host conversion bit for bit") {
  const std::vector<float> xs = probe_floats();
  std::size_t mismatches = 0;
  for (float x : xs) {
    const bool ok =
        kvkit::half(x).bits == bits_of(__float2half_rn(x)) &&
        kvkit::bfloat16(x).bits == bits_of(__float2bfloat16_rn(x)) &&
        kvkit::float_to_e4m3_bits(x) == __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3) &&
        kvkit::float_to_e5m2_bits(x) == __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2) &&
        kvkit::float_to_e4m3_bits(x, kvkit::Saturation::kNone) ==
            __nv_cvt_float_to_fp8(x, __NV_NOSAT, __NV_E4M3) &&
        kvkit::float_to_e5m2_bits(x, kvkit::Saturation::kNone) ==
            __nv_cvt_float_to_fp8(x, __NV_NOSAT, __NV_E5M2) &&
        kvkit::float8_e4m3(x).bits == __nv_fp8_e4m3(x).__x &&
        kvkit::float8_e5m2(x).bits == __nv_fp8_e5m2(x).__x;
    if (!ok && ++mismatches <= 5) {
      UNSCOPED_INFO("mismatch at float bits 0x" << std::hex << kvkit::float_to_bits(x));
    }
  }
  CHECK(mismatches == 0);
}

TEST_CASE("half/bfloat16/fp8 to float equals CUDA's host conversion for every bit pattern") {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    __half_raw hr;
    hr.x = std::uint16_t(b);
    __nv_bfloat16_raw br;
    br.x = std::uint16_t(b);
    INFO("bits 0x" << std::hex << b);
    REQUIRE(same_float(float(kvkit::half::from_bits(std::uint16_t(b))), __half2float(__half(hr))));
    REQUIRE(same_float(float(kvkit::bfloat16::from_bits(std::uint16_t(b))),
                       __bfloat162float(__nv_bfloat16(br))));
  }
  for (std::uint32_t b = 0; b < 256; ++b) {
    __nv_fp8_e4m3 e4;
    e4.__x = std::uint8_t(b);
    __nv_fp8_e5m2 e5;
    e5.__x = std::uint8_t(b);
    INFO("bits 0x" << std::hex << b);
    REQUIRE(same_float(float(kvkit::float8_e4m3::from_bits(std::uint8_t(b))), float(e4)));
    REQUIRE(same_float(float(kvkit::float8_e5m2::from_bits(std::uint8_t(b))), float(e5)));
  }
}
