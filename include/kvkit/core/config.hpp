#pragma once
/// @file config.hpp
/// Compiler and platform macros shared by host and device code.
///
/// - `KVKIT_HOST_DEVICE`: marks functions callable from host and device code
///   (expands to nothing when compiled by a host compiler).
/// - `KVKIT_DEVICE`: device-only functions (nvcc only).
/// - `KVKIT_FORCEINLINE`: strong inlining hint for small hot helpers.
/// - `KVKIT_HAS_CUDA`: 1 when the CUDA runtime headers are usable (compiled by
///   nvcc, or the target links kvkit::cuda), else 0.
/// - `KVKIT_DEVICE_CODE`: 1 inside the device pass of nvcc (`__CUDA_ARCH__`).
/// - `KVKIT_VECTORIZE`: marks a host function whose loops must be vectorized
///   whatever the user's optimization level (see below).

#if defined(__CUDACC__)
#define KVKIT_HOST_DEVICE __host__ __device__
#define KVKIT_DEVICE __device__
#define KVKIT_FORCEINLINE __forceinline__
#else
#define KVKIT_HOST_DEVICE
#define KVKIT_DEVICE
#if defined(__GNUC__) || defined(__clang__)
#define KVKIT_FORCEINLINE inline __attribute__((always_inline))
#else
#define KVKIT_FORCEINLINE inline
#endif
#endif

#ifndef KVKIT_HAS_CUDA
#if defined(__CUDACC__)
#define KVKIT_HAS_CUDA 1
#else
#define KVKIT_HAS_CUDA 0
#endif
#endif

#if defined(__CUDA_ARCH__)
#define KVKIT_DEVICE_CODE 1
#else
#define KVKIT_DEVICE_CODE 0
#endif

#define KVKIT_VERSION_MAJOR 0
#define KVKIT_VERSION_MINOR 1
#define KVKIT_VERSION_PATCH 0

/// KVKIT_VECTORIZE: the CPU ops' hot loops are plain C++ that the compiler
/// vectorizes, and the header-only library is compiled with its user's
/// flags. GCC vectorizes at -O3, but at -O2 (and CMake's RelWithDebInfo) it
/// uses a "very cheap" cost model that gives up on loops needing an epilogue
/// or a runtime check: measured with GCC 12 on the development VM, a
/// RelWithDebInfo build ran quantize_append_kv 11.5x and RoPE 6.6x slower than
/// Release. The functions that run those loops (one per ISA, see
/// x86_dispatch.hpp) are therefore compiled as at -O3, as in the Release
/// builds the tests and benchmarks use, whenever the user optimizes at all
/// (an unoptimized -O0 build stays debuggable). Clang vectorizes at -O2
/// already and gets nothing. Sanitized builds (AddressSanitizer,
/// ThreadSanitizer) keep their own level: GCC compiles the instrumented
/// per-ISA kernels at -O3 slowly (see docs/architecture.md). Define
/// KVKIT_VECTORIZE (to nothing) before including kvkit to let your own flags
/// rule (e.g. with only -fsanitize=undefined, which GCC does not announce).
#ifndef KVKIT_VECTORIZE
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && !defined(__INTEL_LLVM_COMPILER) && \
    defined(__OPTIMIZE__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define KVKIT_VECTORIZE __attribute__((optimize("O3")))
#else
#define KVKIT_VECTORIZE
#endif
#endif
