#pragma once
// Pseudo-random device buffers for the GPU benchmarks: values from a hash of
// the index, so gigabytes are filled on the device without a host copy.

#include <cstdint>

#include "kvkit/core/bfloat16.hpp"
#include "kvkit/cuda/check.hpp"
#include "kvkit/cuda/device_buffer.hpp"

namespace kvkit::bench {
// Internal linkage: kernels defined in a header must not collide when two
// translation units of one binary include it.
namespace {

__device__ __forceinline__ std::uint32_t index_hash(std::int64_t i, std::uint32_t seed) {
  std::uint32_t h = std::uint32_t(i) * 0x9e3779b9u ^ seed ^ std::uint32_t(i >> 32) * 0x85ebca6bu;
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  return h;
}

// Values in [-2, 2).
__global__ void fill_random_bf16(kvkit::bfloat16* x, std::int64_t n, std::uint32_t seed) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    x[i] = kvkit::bfloat16(float(index_hash(i, seed) >> 8) * (4.0f / 16777216.0f) - 2.0f);
  }
}

// Random e4m3 bytes, NaN (0x7F / 0xFF) replaced by its neighbour 0x7E / 0xFE.
__global__ void fill_random_e4m3(std::uint8_t* x, std::int64_t n, std::uint32_t seed) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::uint32_t b = index_hash(i, seed) >> 24;
    x[i] = std::uint8_t((b & 0x7fu) == 0x7fu ? b - 1u : b);
  }
}

}  // namespace

inline kvkit::cuda::DeviceBuffer random_device_bf16(std::int64_t n, std::uint32_t seed) {
  kvkit::cuda::DeviceBuffer buffer(std::size_t(n) * sizeof(kvkit::bfloat16));
  fill_random_bf16<<<1024, 256>>>(buffer.as<kvkit::bfloat16>(), n, seed);
  KVKIT_CUDA_CHECK(cudaGetLastError());
  return buffer;
}

inline kvkit::cuda::DeviceBuffer random_device_e4m3(std::int64_t n, std::uint32_t seed) {
  kvkit::cuda::DeviceBuffer buffer(static_cast<std::size_t>(n));
  fill_random_e4m3<<<1024, 256>>>(buffer.as<std::uint8_t>(), n, seed);
  KVKIT_CUDA_CHECK(cudaGetLastError());
  return buffer;
}

}  // namespace kvkit::bench
