// Device-side conversions equal host-side conversions bit for bit.
// Skipped (exit code 77) where no GPU is present.

#include <catch2/catch.hpp>

#include <cstdint>
#include <random>
#include <vector>

#include "kvkit/core/dtype.hpp"
#include "kvkit/cuda/device_buffer.hpp"

namespace {

struct EncodedBits {
  std::uint16_t half_bits;
  std::uint16_t bfloat16_bits;
  std::uint8_t e4m3_sat;
  std::uint8_t e5m2_sat;
  std::uint8_t e4m3_nosat;
  std::uint8_t e5m2_nosat;
};

__global__ void encode_kernel(const float* in, EncodedBits* out, std::int64_t n) {
  const std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float x = in[i];
  out[i] = {kvkit::half(x).bits,
            kvkit::bfloat16(x).bits,
            kvkit::float_to_e4m3_bits(x),
            kvkit::float_to_e5m2_bits(x),
            kvkit::float_to_e4m3_bits(x, kvkit::Saturation::kNone),
            kvkit::float_to_e5m2_bits(x, kvkit::Saturation::kNone)};
}

// Decodes pattern i (0..65535) as half and bfloat16, and i & 0xff as fp8.
__global__ void decode_kernel(float* out_half, float* out_bf16, float* out_e4m3, float* out_e5m2) {
  const std::uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= 65536) return;
  out_half[i] = float(kvkit::half::from_bits(std::uint16_t(i)));
  out_bf16[i] = float(kvkit::bfloat16::from_bits(std::uint16_t(i)));
  out_e4m3[i] = float(kvkit::float8_e4m3::from_bits(std::uint8_t(i)));
  out_e5m2[i] = float(kvkit::float8_e5m2::from_bits(std::uint8_t(i)));
}

bool same_float(float a, float b) {
  return (a != a && b != b) || kvkit::float_to_bits(a) == kvkit::float_to_bits(b);
}

}  // namespace

TEST_CASE("device float to half/bfloat16/fp8 equals the host conversion bit for bit") {
  std::vector<float> xs;
  for (std::uint32_t hi = 0; hi < (1u << 19); ++hi) {
    for (std::uint32_t lo : {0x0000u, 0x0fffu, 0x1000u, 0x1001u, 0x1fffu}) {
      xs.push_back(kvkit::bits_to_float((hi << 13) | lo));
    }
  }
  std::mt19937 rng(11);
  for (int i = 0; i < 1 << 20; ++i) xs.push_back(kvkit::bits_to_float(rng()));

  auto in = kvkit::cuda::DeviceBuffer::from_host(xs);
  kvkit::cuda::DeviceBuffer out(xs.size() * sizeof(EncodedBits));
  const std::int64_t n = std::int64_t(xs.size());
  encode_kernel<<<unsigned((n + 255) / 256), 256>>>(in.as<float>(), out.as<EncodedBits>(), n);
  KVKIT_CUDA_CHECK(cudaGetLastError());
  const auto got = out.to_host<EncodedBits>();

  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const float x = xs[i];
    const EncodedBits& g = got[i];
    const bool ok = g.half_bits == kvkit::half(x).bits && g.bfloat16_bits == kvkit::bfloat16(x).bits &&
                    g.e4m3_sat == kvkit::float_to_e4m3_bits(x) &&
                    g.e5m2_sat == kvkit::float_to_e5m2_bits(x) &&
                    g.e4m3_nosat == kvkit::float_to_e4m3_bits(x, kvkit::Saturation::kNone) &&
                    g.e5m2_nosat == kvkit::float_to_e5m2_bits(x, kvkit::Saturation::kNone);
    if (!ok && ++mismatches <= 5) {
      UNSCOPED_INFO("mismatch at float bits 0x" << std::hex << kvkit::float_to_bits(x));
    }
  }
  CHECK(mismatches == 0);
}

TEST_CASE("device half/bfloat16/fp8 to float equals the host conversion for every bit pattern") {
  kvkit::cuda::DeviceBuffer h(65536 * 4), b(65536 * 4), e4(65536 * 4), e5(65536 * 4);
  decode_kernel<<<256, 256>>>(h.as<float>(), b.as<float>(), e4.as<float>(), e5.as<float>());
  KVKIT_CUDA_CHECK(cudaGetLastError());
  const auto gh = h.to_host<float>();
  const auto gb = b.to_host<float>();
  const auto g4 = e4.to_host<float>();
  const auto g5 = e5.to_host<float>();
  for (std::uint32_t i = 0; i < 65536; ++i) {
    INFO("bits 0x" << std::hex << i);
    REQUIRE(same_float(gh[i], float(kvkit::half::from_bits(std::uint16_t(i)))));
    REQUIRE(same_float(gb[i], float(kvkit::bfloat16::from_bits(std::uint16_t(i)))));
    REQUIRE(same_float(g4[i], float(kvkit::float8_e4m3::from_bits(std::uint8_t(i)))));
    REQUIRE(same_float(g5[i], float(kvkit::float8_e5m2::from_bits(std::uint8_t(i)))));
  }
}
