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
