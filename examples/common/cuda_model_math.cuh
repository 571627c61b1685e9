#pragma once
// The GPU twins of model_math.hpp that the examples' CUDA builds share
// (gpt_decode_cuda, deepseek_decode_cuda): embedding gather, RMSNorm, SwiGLU,
// residual add, and y = x Wᵀ through cuBLAS. The model's own math, not
// kvkit's: kvkit does the cache work, the engine owns its GEMMs and
// elementwise kernels. All float32, on the default stream.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <kvkit/core/error.hpp>
#include <kvkit/cuda/check.hpp>

#include <algorithm>
#include <cstdint>

namespace examples::gpu {

inline void check_cublas(cublasStatus_t status, const char* call, const char* program) {
  kvkit::check(status == CUBLAS_STATUS_SUCCESS, program, "cuBLAS call '", call, "' failed with status ", int(status));
}

constexpr int kThreads = 256;

// x[r] = embedding[tokens[r]]. grid: rows.
__global__ inline void embed_kernel(float* x, const float* embedding, const std::int32_t* tokens, int dim) {
  const float* src = embedding + std::int64_t(tokens[blockIdx.x]) * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) x[std::int64_t(blockIdx.x) * dim + i] = src[i];
}

// out[r] = weight * x[src_rows[r]] / rms(x[src_rows[r]]), as examples::rmsnorm
// (sum of squares in float64). src_rows == nullptr: row r. grid: rows.
__global__ inline void __launch_bounds__(kThreads)
    rmsnorm_kernel(float* out, const float* x, const std::int32_t* src_rows, const float* weight, int dim) {
  __shared__ double partial[kThreads];
  const std::int64_t src = src_rows != nullptr ? src_rows[blockIdx.x] : blockIdx.x;
  const float* row = x + src * dim;
  double ss = 0.0;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += double(row[i]) * row[i];
  partial[threadIdx.x] = ss;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (int(threadIdx.x) < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  const float inv = 1.0f / sqrtf(float(partial[0] / dim) + 1e-5f);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) out[std::int64_t(blockIdx.x) * dim + i] = weight[i] * (row[i] * inv);
}

// x += y (the residual connection).
__global__ inline void add_kernel(float* x, const float* y, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x)
    x[i] += y[i];
}

// a = silu(a) * b (SwiGLU).
__global__ inline void swiglu_kernel(float* a, const float* b, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n; i += std::int64_t(gridDim.x) * blockDim.x)
    a[i] = a[i] / (1.0f + expf(-a[i])) * b[i];
}

inline unsigned grid_for(std::int64_t n) { return unsigned(std::max<std::int64_t>(1, std::min<std::int64_t>((n + kThreads - 1) / kThreads, 4096))); }

inline void embed(float* x, const float* embedding, const std::int32_t* tokens, std::int64_t rows, int dim) {
  if (rows == 0) return;
  embed_kernel<<<unsigned(rows), kThreads>>>(x, embedding, tokens, dim);
  KVKIT_CUDA_CHECK(cudaGetLastError());
}
inline void rmsnorm(float* out, const float* x, const std::int32_t* src_rows, const float* weight, std::int64_t rows,
                    int dim) {
  if (rows == 0) return;
  rmsnorm_kernel<<<unsigned(rows), kThreads>>>(out, x, src_rows, weight, dim);
  KVKIT_CUDA_CHECK(cudaGetLastError());
}
inline void add(float* x, const float* y, std::int64_t n) {
  add_kernel<<<grid_for(n), kThreads>>>(x, y, n);
  KVKIT_CUDA_CHECK(cudaGetLastError());
}
inline void swiglu(float* a, const float* b, std::int64_t n) {
  swiglu_kernel<<<grid_for(n), kThreads>>>(a, b, n);
  KVKIT_CUDA_CHECK(cudaGetLastError());
}

// y[rows, out] = x[rows, in] Wᵀ for W row-major [out, in]. cuBLAS is
// column-major: there y is [out, rows] = (W stored as [in, out])ᵀ x.
inline void gemm(cublasHandle_t cublas, float* y, const float* w, const float* x, std::int64_t rows, int out, int in,
                 const char* program) {
  if (rows == 0) return;
  const float one = 1.0f, zero = 0.0f;
  check_cublas(cublasSgemm(cublas, CUBLAS_OP_T, CUBLAS_OP_N, out, int(rows), in, &one, w, in, x, in, &zero, y, out),
               "cublasSgemm", program);
}

}  // namespace examples::gpu
