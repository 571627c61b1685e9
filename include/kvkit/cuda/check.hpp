#pragma once
/// @file check.hpp
/// CUDA runtime error checking and device discovery.
/// Needs the CUDA toolkit's headers and cudart (link kvkit::cuda), not nvcc.

#include <cuda_runtime_api.h>

#include <string>

#include "kvkit/core/error.hpp"

namespace kvkit::cuda {

/// Throws kvkit::Error if `status` is not cudaSuccess, naming the call and where it was made.
inline void check_cuda(cudaError_t status, const char* call, const char* file, int line) {
  if (status != cudaSuccess) {
    // Reset the runtime's last-error state (no effect on sticky errors), so
    // that a caller who catches this does not see it again at the next
    // cudaGetLastError() after an unrelated, valid launch.
    (void)cudaGetLastError();
    throw Error(detail::concat("kvkit: CUDA call '", call, "' failed at ", file, ":", line, ": ",
                               cudaGetErrorName(status), " (", cudaGetErrorString(status), ")"));
  }
}

/// Number of usable CUDA devices; 0 when there is no GPU or no driver
/// (never throws, so that tests and benchmarks can skip cleanly).
inline int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return count;
}

}  // namespace kvkit::cuda

/// Wraps a CUDA runtime call: throws kvkit::Error with the call's text,
/// file and line on failure.
#define KVKIT_CUDA_CHECK(call) ::kvkit::cuda::check_cuda((call), #call, __FILE__, __LINE__)
