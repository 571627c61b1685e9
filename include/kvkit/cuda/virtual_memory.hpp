#pragma once
/// @file virtual_memory.hpp
/// kvkit::cuda::DeviceVirtualMemory: the CUDA backend of
/// kvkit::VirtualKVCache (kvkit/layout/virtual_kv_cache.hpp), on the driver's
/// virtual memory management API:
///   reserve: cuMemAddressReserve (device address space, no memory);
///   map:     per chunk cuMemCreate (physical memory on the device) +
///            cuMemMap + cuMemSetAccess (read/write from that device), then
///            cuMemRelease of the handle, so that unmapping frees the memory;
///   unmap:   cuMemUnmap;
///   release: cuMemAddressFree.
/// Chunks are multiples of cuMemGetAllocationGranularity (2 MiB on current
/// GPUs).
///
/// kvkit does not link the driver library (libcuda): a binary linked
/// against it cannot start where there is no NVIDIA driver (CI), so it could
/// not report "no GPU, skipped". The driver entry points are obtained at run
/// time from the CUDA runtime (cudaGetDriverEntryPointByVersion, CUDA 12.5+,
/// else cudaGetDriverEntryPoint); <cuda.h> and <cudaTypedefs.h> provide only
/// types. Needs the CUDA toolkit's headers and cudart, not nvcc.

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kvkit/core/error.hpp"
#include "kvkit/cuda/check.hpp"

namespace kvkit::cuda {

/// CUDA virtual memory backend for VirtualKVCache (see the file comment).
/// Copyable: it holds the device ordinal, the granularity and the driver
/// function pointers, no memory.
class DeviceVirtualMemory {
 public:
  /// Loads the driver entry points and queries the granularity for
  /// `device`. Throws kvkit::Error when there is no driver or device, or
  /// the device lacks virtual memory management.
  explicit DeviceVirtualMemory(int device = 0) : device_(device) {
    constexpr const char* kWhere = "kvkit::cuda::DeviceVirtualMemory";
    load(reserve_, "cuMemAddressReserve", kWhere);
    load(free_, "cuMemAddressFree", kWhere);
    load(create_, "cuMemCreate", kWhere);
    load(release_handle_, "cuMemRelease", kWhere);
    load(map_, "cuMemMap", kWhere);
    load(unmap_, "cuMemUnmap", kWhere);
    load(set_access_, "cuMemSetAccess", kWhere);
    load(granularity_query_, "cuMemGetAllocationGranularity", kWhere);
    load(error_name_, "cuGetErrorName", kWhere);
    // The driver calls need an initialized driver and device context: make
    // sure the runtime's primary context of `device` exists, leaving the
    // caller's current device as it was.
    int current = 0;
    KVKIT_CUDA_CHECK(cudaGetDevice(&current));
    KVKIT_CUDA_CHECK(cudaSetDevice(device_));
    const cudaError_t init = cudaFree(nullptr);
    KVKIT_CUDA_CHECK(cudaSetDevice(current));
    KVKIT_CUDA_CHECK(init);
    PFN_cuDeviceGet_v2000 device_get = nullptr;
    PFN_cuDeviceGetAttribute_v2000 device_attribute = nullptr;
    load(device_get, "cuDeviceGet", kWhere);
    load(device_attribute, "cuDeviceGetAttribute", kWhere);
    CUdevice handle = 0;
    driver_check(device_get(&handle, device_), "cuDeviceGet");
    int supported = 0;
    driver_check(device_attribute(&supported, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, handle),
                 "cuDeviceGetAttribute");
    check(supported != 0, kWhere, "device ", device_, " does not support virtual memory management");
    const CUmemAllocationProp prop = properties();
    std::size_t g = 0;
    driver_check(granularity_query_(&g, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
                 "cuMemGetAllocationGranularity");
    granularity_ = std::int64_t(g);
  }

  /// Allocation granularity of the device in bytes (typically 2 MiB).
  std::int64_t granularity() const { return granularity_; }
  int device() const { return device_; }

  /// Reserves `bytes` of device address space. Throws kvkit::Error on failure.
  void* reserve(std::int64_t bytes) {
    CUdeviceptr p = 0;
    driver_check(reserve_(&p, std::size_t(bytes), std::size_t(granularity_), 0, 0),
                 "cuMemAddressReserve");
    return reinterpret_cast<void*>(static_cast<std::uintptr_t>(p));
  }

  /// Backs [addr, addr + bytes) with device memory, one granularity-sized
  /// allocation per chunk so that each can be unmapped on its own. False,
  /// with everything this call mapped undone, when the device is out of
  /// memory; other failures throw kvkit::Error.
  bool map(void* addr, std::int64_t bytes) {
    const CUmemAllocationProp prop = properties();
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = device_;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    const CUdeviceptr base = to_device_ptr(addr);
    const std::size_t g = std::size_t(granularity_);
    for (std::int64_t off = 0; off < bytes; off += granularity_) {
      const CUdeviceptr at = base + CUdeviceptr(off);
      CUmemGenericAllocationHandle handle{};
      CUresult result = create_(&handle, g, &prop, 0);
      const char* call = "cuMemCreate";
      if (result == CUDA_SUCCESS) {
        result = map_(at, g, 0, handle, 0);
        call = "cuMemMap";
        // The mapping keeps the memory alive; dropping the handle now means
        // that cuMemUnmap frees it.
        (void)release_handle_(handle);
        if (result == CUDA_SUCCESS) {
          result = set_access_(at, g, &access, 1);
          call = "cuMemSetAccess";
          if (result != CUDA_SUCCESS) (void)unmap_(at, g);
        }
      }
      if (result != CUDA_SUCCESS) {
        if (off > 0) unmap(addr, off);  // undo this call's earlier chunks
        if (result == CUDA_ERROR_OUT_OF_MEMORY) return false;
        driver_check(result, call);
      }
    }
    return true;
  }

  /// Unmaps [addr, addr + bytes) chunk by chunk (each was its own mapping),
  /// freeing the memory. Throws kvkit::Error on failure.
  void unmap(void* addr, std::int64_t bytes) {
    const CUdeviceptr base = to_device_ptr(addr);
    for (std::int64_t off = 0; off < bytes; off += granularity_) {
      driver_check(unmap_(base + CUdeviceptr(off), std::size_t(granularity_)), "cuMemUnmap");
    }
  }

  /// Frees the address range of a reservation.
  void release(void* base, std::int64_t bytes) noexcept {
    (void)free_(to_device_ptr(base), std::size_t(bytes));
  }

 private:
  static CUdeviceptr to_device_ptr(void* p) {
    return static_cast<CUdeviceptr>(reinterpret_cast<std::uintptr_t>(p));
  }

  CUmemAllocationProp properties() const {
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device_;
    return prop;
  }

  template <class Fn>
  static void load(Fn& fn, const char* symbol, const char* where) {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    // Ask for the ABI of CUDA 12.0, the one the PFN_*_v10020 / _v6000
    // typedefs below describe.
    const cudaError_t status = cudaGetDriverEntryPointByVersion(symbol, &p, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t status = cudaGetDriverEntryPoint(symbol, &p, cudaEnableDefault, &found);
#endif
    if (status != cudaSuccess || found != cudaDriverEntryPointSuccess || p == nullptr) {
      (void)cudaGetLastError();
      fail(where, "driver entry point '", symbol, "' is unavailable (",
           cudaGetErrorName(status), "); is the NVIDIA driver installed?");
    }
    fn = reinterpret_cast<Fn>(p);
  }

  void driver_check(CUresult result, const char* call) const {
    if (result == CUDA_SUCCESS) return;
    const char* name = nullptr;
    if (error_name_ == nullptr || error_name_(result, &name) != CUDA_SUCCESS) name = "unknown error";
    fail("kvkit::cuda::DeviceVirtualMemory", "driver call ", call, " failed: ", name, " (",
         int(result), ")");
  }

  int device_ = 0;
  std::int64_t granularity_ = 0;
  PFN_cuMemAddressReserve_v10020 reserve_ = nullptr;
  PFN_cuMemAddressFree_v10020 free_ = nullptr;
  PFN_cuMemCreate_v10020 create_ = nullptr;
  PFN_cuMemRelease_v10020 release_handle_ = nullptr;
  PFN_cuMemMap_v10020 map_ = nullptr;
  PFN_cuMemUnmap_v10020 unmap_ = nullptr;
  PFN_cuMemSetAccess_v10020 set_access_ = nullptr;
  PFN_cuMemGetAllocationGranularity_v10020 granularity_query_ = nullptr;
  PFN_cuGetErrorName_v6000 error_name_ = nullptr;
};

}  // namespace kvkit::cuda
