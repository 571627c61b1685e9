#pragma once
/// @file device_buffer.hpp
/// kvkit::cuda::DeviceBuffer: a small RAII owner of cudaMalloc'd memory, for
/// tests, examples and benchmarks. kvkit's ops never allocate: they take
/// pointers and views that the caller owns.

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>
#include <vector>

#include "kvkit/cuda/check.hpp"

namespace kvkit::cuda {

/// Owns `bytes` of device memory. Move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes) : bytes_(bytes) {
    if (bytes_ > 0) KVKIT_CUDA_CHECK(cudaMalloc(&data_, bytes_));
  }
  ~DeviceBuffer() { reset(); }

  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = std::exchange(other.data_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
    }
    return *this;
  }

  /// Frees the memory (errors on free are ignored: this runs in destructors).
  void reset() noexcept {
    if (data_ != nullptr) (void)cudaFree(data_);
    data_ = nullptr;
    bytes_ = 0;
  }

  void* data() const { return data_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  std::size_t bytes() const { return bytes_; }

  /// Synchronous copies, for tests and set-up code.
  void copy_from_host(const void* src, std::size_t bytes) {
    check_argument(bytes <= bytes_, "kvkit::cuda::DeviceBuffer::copy_from_host", "bytes", bytes,
                   "at most the buffer size ", bytes_);
    KVKIT_CUDA_CHECK(cudaMemcpy(data_, src, bytes, cudaMemcpyHostToDevice));
  }
  void copy_to_host(void* dst, std::size_t bytes) const {
    check_argument(bytes <= bytes_, "kvkit::cuda::DeviceBuffer::copy_to_host", "bytes", bytes,
                   "at most the buffer size ", bytes_);
    KVKIT_CUDA_CHECK(cudaMemcpy(dst, data_, bytes, cudaMemcpyDeviceToHost));
  }

  /// Allocates and fills from a host vector.
  template <class T>
  static DeviceBuffer from_host(const std::vector<T>& values) {
    DeviceBuffer buffer(values.size() * sizeof(T));
    buffer.copy_from_host(values.data(), buffer.bytes());
    return buffer;
  }
  /// Copies the whole buffer back into a vector of T.
  template <class T>
  std::vector<T> to_host() const {
    std::vector<T> values(bytes_ / sizeof(T));
    copy_to_host(values.data(), values.size() * sizeof(T));
    return values;
  }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

}  // namespace kvkit::cuda
