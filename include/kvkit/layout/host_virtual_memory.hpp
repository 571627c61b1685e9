#pragma once
/// @file host_virtual_memory.hpp
/// kvkit::HostVirtualMemory: the POSIX backend of kvkit::VirtualKVCache
/// (kvkit/layout/virtual_kv_cache.hpp), for CPU inference and for testing
/// the virtual cache where there is no GPU.
///   reserve: mmap(PROT_NONE, MAP_NORESERVE): address space only;
///   map:     mprotect(PROT_READ | PROT_WRITE): pages are backed on first touch;
///   unmap:   madvise(MADV_DONTNEED) (gives the pages back; they read as
///            zeros if mapped again) + mprotect(PROT_NONE), so that a stray
///            access faults instead of silently reallocating;
///   release: munmap.
/// Available where <sys/mman.h> is (Linux, macOS, BSD).

#if !(defined(__unix__) || defined(__APPLE__))
#error "kvkit/layout/host_virtual_memory.hpp needs POSIX mmap"
#endif

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>

#include "kvkit/core/error.hpp"

namespace kvkit {

/// POSIX virtual memory backend (see the file comment). Stateless apart
/// from the page size.
class HostVirtualMemory {
 public:
  HostVirtualMemory() : page_bytes_(std::int64_t(sysconf(_SC_PAGESIZE))) {}

  /// The OS page size (4 KiB on most systems).
  std::int64_t granularity() const { return page_bytes_; }

  /// Reserves `bytes` of address space. Throws kvkit::Error when mmap fails.
  void* reserve(std::int64_t bytes) {
    void* p = mmap(nullptr, std::size_t(bytes), PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      fail("kvkit::HostVirtualMemory::reserve", "mmap of ", bytes,
           " bytes of address space failed: ", std::strerror(errno));
    }
    return p;
  }

  /// Makes [addr, addr + bytes) readable and writable. False (nothing
  /// changed) when the kernel refuses for lack of memory; other failures
  /// throw kvkit::Error.
  bool map(void* addr, std::int64_t bytes) {
    if (mprotect(addr, std::size_t(bytes), PROT_READ | PROT_WRITE) == 0) return true;
    if (errno == ENOMEM || errno == EAGAIN) return false;
    fail("kvkit::HostVirtualMemory::map", "mprotect(", addr, ", ", bytes,
         ") failed: ", std::strerror(errno));
  }

  /// Gives the pages of [addr, addr + bytes) back and makes the range
  /// inaccessible again. Throws kvkit::Error if the OS refuses.
  void unmap(void* addr, std::int64_t bytes) {
    if (madvise(addr, std::size_t(bytes), MADV_DONTNEED) != 0 ||
        mprotect(addr, std::size_t(bytes), PROT_NONE) != 0) {
      fail("kvkit::HostVirtualMemory::unmap", "madvise/mprotect(", addr, ", ", bytes,
           ") failed: ", std::strerror(errno));
    }
  }

  /// Releases a whole reservation.
  void release(void* base, std::int64_t bytes) noexcept { (void)munmap(base, std::size_t(bytes)); }

 private:
  std::int64_t page_bytes_;
};

}  // namespace kvkit
