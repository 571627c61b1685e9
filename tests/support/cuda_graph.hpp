#pragma once
// GPU tests: run a launch sequence captured in a CUDA graph, as an engine's
// decode step does, to show that it neither allocates nor synchronizes.

#include <cuda_runtime.h>

#include "kvkit/cuda/check.hpp"

namespace kvkit::testing {

/// Captures launch(stream) on a new non-blocking stream into a graph, replays
/// the graph `replays` times and waits for it. Capture fails (and this
/// throws) if the launch synchronizes, allocates or uses another stream.
template <class Launch>
void capture_and_replay(Launch&& launch, int replays = 2) {
  cudaStream_t stream;
  KVKIT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  KVKIT_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  launch(stream);
  KVKIT_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  KVKIT_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < replays; ++replay) KVKIT_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  KVKIT_CUDA_CHECK(cudaStreamSynchronize(stream));
  KVKIT_CUDA_CHECK(cudaGraphExecDestroy(exec));
  KVKIT_CUDA_CHECK(cudaGraphDestroy(graph));
  KVKIT_CUDA_CHECK(cudaStreamDestroy(stream));
}

}  // namespace kvkit::testing
