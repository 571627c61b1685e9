// Core numeric conversions on the GPU: float -> bfloat16 / fp8, over arrays
// larger than the L2. Memory-bound: bytes/s (read + written) and pct_of_memcpy
// against the device copy kernel measured in this binary.

#include <cstdint>
#include <vector>

#include "harness/cuda_timer.cuh"
#include "harness/harness.hpp"
#include "kvkit/core/dtype.hpp"
#include "kvkit/cuda/device_buffer.hpp"

namespace {

using kvkit::bench::full_or_smoke;

template <class T>
__global__ void encode_kernel(const float4* __restrict__ in, T* __restrict__ out, std::int64_t n4) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const float4 v = in[i];
    T* o = out + 4 * i;
    o[0] = T(v.x);
    o[1] = T(v.y);
    o[2] = T(v.z);
    o[3] = T(v.w);
  }
}

template <class T>
void BM_encode_gpu(benchmark::State& state) {
  const std::int64_t n = full_or_smoke<std::int64_t>(std::int64_t(1) << 28, 1 << 20);
  std::vector<float> host(std::size_t(n), 1.25f);
  auto in = kvkit::cuda::DeviceBuffer::from_host(host);
  kvkit::cuda::DeviceBuffer out(std::size_t(n) * sizeof(T));
  kvkit::bench::time_on_gpu(state, nullptr, [&](cudaStream_t s) {
    encode_kernel<T><<<1024, 256, 0, s>>>(in.as<float4>(), out.as<T>(), n / 4);
  });
  kvkit::bench::report_device_bandwidth(state, double(n) * double(sizeof(float) + sizeof(T)));
}

BENCHMARK_TEMPLATE(BM_encode_gpu, kvkit::bfloat16)->Name("convert_gpu/float_to_bfloat16")->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK_TEMPLATE(BM_encode_gpu, kvkit::float8_e4m3)->Name("convert_gpu/float_to_e4m3")->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace
