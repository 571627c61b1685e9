// Uses the installed CUDA-side headers; runs a kernel where a GPU is present.
#include <kvkit/core/float8.hpp>
#include <kvkit/cuda/device_buffer.hpp>

#include <cstdio>
#include <vector>

__global__ void to_e4m3(const float* in, kvkit::float8_e4m3* out) { out[threadIdx.x] = kvkit::float8_e4m3(in[threadIdx.x]); }

int main() {
  if (kvkit::cuda::device_count() == 0) {
    std::printf("consumer_cuda: built against kvkit::cuda; no GPU here, kernel not run\n");
    return 0;
  }
  const std::vector<float> in = {1.0f, -2.5f, 1000.0f};
  auto d_in = kvkit::cuda::DeviceBuffer::from_host(in);
  kvkit::cuda::DeviceBuffer d_out(in.size());
  to_e4m3<<<1, unsigned(in.size())>>>(d_in.as<float>(), d_out.as<kvkit::float8_e4m3>());
  KVKIT_CUDA_CHECK(cudaGetLastError());
  const auto out = d_out.to_host<kvkit::float8_e4m3>();
  const bool ok = float(out[0]) == 1.0f && float(out[1]) == -2.5f && float(out[2]) == 448.0f;
  std::printf("consumer_cuda: kernel %s\n", ok ? "works" : "FAILED");
  return ok ? 0 : 1;
}
