#pragma once
// Times GPU work with CUDA events for Google Benchmark's manual timing.

#include <cuda_runtime.h>

#include "harness/harness.hpp"
#include "kvkit/cuda/check.hpp"

namespace kvkit::bench {

/// Runs `launch(stream)` once per benchmark iteration and records the GPU time
/// of each with CUDA events (use ->UseManualTime()).
template <class Launch>
void time_on_gpu(benchmark::State& state, cudaStream_t stream, Launch&& launch) {
  cudaEvent_t start, stop;
  KVKIT_CUDA_CHECK(cudaEventCreate(&start));
  KVKIT_CUDA_CHECK(cudaEventCreate(&stop));
  launch(stream);  // warm-up
  KVKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (auto _ : state) {
    KVKIT_CUDA_CHECK(cudaEventRecord(start, stream));
    launch(stream);
    KVKIT_CUDA_CHECK(cudaEventRecord(stop, stream));
    KVKIT_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    KVKIT_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(double(ms) * 1e-3);
  }
  KVKIT_CUDA_CHECK(cudaGetLastError());
  KVKIT_CUDA_CHECK(cudaEventDestroy(start));
  KVKIT_CUDA_CHECK(cudaEventDestroy(stop));
}

}  // namespace kvkit::bench
