// Device copy baseline: a 16-byte-per-thread grid-stride copy kernel over
// buffers far larger than the H100's 50 MB L2, timed with CUDA events.
// Bytes read + written are counted, as in the host baseline.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>

#include "harness/cuda_timer.cuh"
#include "harness/harness.hpp"
#include "kvkit/cuda/device_buffer.hpp"

namespace kvkit::bench {
namespace {

__global__ void copy_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, std::size_t n) {
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    dst[i] = src[i];
  }
}

std::size_t baseline_bytes() {
  return full_or_smoke<std::size_t>(std::size_t(1) << 30, std::size_t(64) << 20);
}

void launch_copy(const void* src, void* dst, std::size_t bytes, cudaStream_t stream) {
  int sms = 0;
  KVKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const std::size_t n = bytes / sizeof(uint4);
  copy_kernel<<<unsigned(sms * 8), 512, 0, stream>>>(static_cast<const uint4*>(src),
                                                    static_cast<uint4*>(dst), n);
}

}  // namespace

double device_memcpy_bytes_per_second() {
  static const double measured = [] {
    const std::size_t bytes = baseline_bytes();
    cuda::DeviceBuffer src(bytes), dst(bytes);
    KVKIT_CUDA_CHECK(cudaMemset(src.data(), 1, bytes));
    cudaEvent_t start, stop;
    KVKIT_CUDA_CHECK(cudaEventCreate(&start));
    KVKIT_CUDA_CHECK(cudaEventCreate(&stop));
    launch_copy(src.data(), dst.data(), bytes, nullptr);  // warm-up
    double best = 0.0;
    for (int rep = 0; rep < 10; ++rep) {
      KVKIT_CUDA_CHECK(cudaEventRecord(start));
      launch_copy(src.data(), dst.data(), bytes, nullptr);
      KVKIT_CUDA_CHECK(cudaEventRecord(stop));
      KVKIT_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0.0f;
      KVKIT_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      best = std::max(best, 2.0 * double(bytes) / (double(ms) * 1e-3));
    }
    KVKIT_CUDA_CHECK(cudaEventDestroy(start));
    KVKIT_CUDA_CHECK(cudaEventDestroy(stop));
    return best;
  }();
  return measured;
}

/// The baseline itself, shown in every GPU binary's output.
void BM_device_memcpy(benchmark::State& state) {
  const std::size_t bytes = baseline_bytes();
  cuda::DeviceBuffer src(bytes), dst(bytes);
  time_on_gpu(state, nullptr, [&](cudaStream_t s) { launch_copy(src.data(), dst.data(), bytes, s); });
  report_device_bandwidth(state, 2.0 * double(bytes));
}
BENCHMARK(BM_device_memcpy)->Name("baseline/device_copy_kernel")->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace kvkit::bench
