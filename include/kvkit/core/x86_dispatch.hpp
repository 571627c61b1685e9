#pragma once
/// @file x86_dispatch.hpp
/// Run-time choice of the widest x86 vector ISA for the CPU ops' hot loops.
///
/// A header-only library cannot choose compiler flags for its users, and the
/// default x86-64 target is SSE2 (4 float lanes). Where KVKIT_X86_DISPATCH is
/// 1, hot loops are also compiled with __attribute__((target("avx2"))) (and
/// AVX-512 where an op says so) and picked once per process from the CPU's
/// features. Ops whose bytes must not depend on the machine (quantize, RoPE,
/// conversions) build their AVX2 variants without FMA, so every ISA rounds
/// the same IEEE operations the same way and results stay bit-identical (and
/// equal to the CUDA kernels, which also avoid contraction). The CPU decode
/// attention (ops/attention_decode.hpp) uses FMA and the vector width to
/// order its sums: deterministic per ISA, equal across ISAs to fp32 rounding.
/// An op with one plain loop calls `run_loop_on_widest_isa<kWidest,
/// &loop>(args...)` below; decode and RoPE, with hand-written kernels per
/// ISA, pick theirs from `x86_level()` themselves.
///
/// KVKIT_X86_DISPATCH is 1 with GCC or Clang on x86-64, when not already built
/// for AVX-512 and not inside nvcc (which compiles the CPU ops only as test
/// references); define it to 0 to disable.

#ifndef KVKIT_X86_DISPATCH
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__AVX512BW__) && \
    !defined(__CUDACC__)
#define KVKIT_X86_DISPATCH 1
#else
#define KVKIT_X86_DISPATCH 0
#endif
#endif

#include <cstdlib>
#include <string_view>

#include "kvkit/core/config.hpp"

#if KVKIT_X86_DISPATCH
#include <cpuid.h>
#endif

namespace kvkit::detail {

/// The widest vector ISA of the CPU running us that the dispatched loops use.
/// kAvx512Bf16 adds AVX512-BF16's dot products of bfloat16 pairs (Cooper
/// Lake, Sapphire Rapids, Zen 4 and later), used where both operands already
/// are bfloat16; everything else treats it as kAvx512.
enum class X86Level { kBaseline, kAvx2, kAvx512, kAvx512Bf16 };

#if KVKIT_X86_DISPATCH
/// F16C (CPUID leaf 1, ECX bit 29), asked with cpuid: Clang before 16 has no
/// "f16c" for __builtin_cpu_supports and rejects the string at compile time.
inline bool cpu_has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && ((ecx >> 29) & 1u) != 0;
}

/// Asked once per process. The environment variable KVKIT_CPU_ISA
/// (`baseline`, `avx2`, `avx512` or `avx512bf16`) lowers it, never raises it:
/// the tests run every variant on one machine that way, and a user can
/// compare them.
inline X86Level x86_level() {
  static const X86Level level = [] {
    __builtin_cpu_init();
    X86Level detected = X86Level::kBaseline;
    // The AVX2 variants also use FMA and F16C (every AVX2 CPU has them, but a
    // VM can hide features one by one), the AVX-512 ones all of AVX2's.
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      detected = __builtin_cpu_supports("avx512bf16") ? X86Level::kAvx512Bf16 : X86Level::kAvx512;
    } else if (avx2) {
      detected = X86Level::kAvx2;
    }
    const char* asked = std::getenv("KVKIT_CPU_ISA");
    if (asked == nullptr) return detected;
    const std::string_view name(asked);
    const X86Level cap = name == "baseline" ? X86Level::kBaseline
                         : name == "avx2"   ? X86Level::kAvx2
                         : name == "avx512" ? X86Level::kAvx512
                                            : X86Level::kAvx512Bf16;
    return cap < detected ? cap : detected;
  }();
  return level;
}
#endif

// One copy of `kLoop` per ISA. kLoop is a compile-time constant, so each copy
// inlines it (kLoop should be KVKIT_FORCEINLINE) and compiles its loops with
// that copy's target. The targets name no FMA: ops dispatched here must give
// the same bits on every ISA, so their loops must not hold a multiply-add the
// compiler could contract (AVX-512F has FMA instructions of its own). The
// AVX2 copy names F16C (the kAvx2 level requires it; its conversions are
// exact or IEEE-rounded), so that row kernels built with
// target("avx2,f16c") inline into it.
template <auto kLoop, class... Args>
KVKIT_VECTORIZE void run_loop_baseline(const Args&... args) {
  kLoop(args...);
}
#if KVKIT_X86_DISPATCH
template <auto kLoop, class... Args>
__attribute__((target("avx2,f16c"))) KVKIT_VECTORIZE void run_loop_avx2(const Args&... args) {
  kLoop(args...);
}
template <auto kLoop, class... Args>
__attribute__((target("avx512f,avx512bw,avx512vl"))) KVKIT_VECTORIZE void run_loop_avx512(const Args&... args) {
  kLoop(args...);
}
#endif

/// Calls one of the loops, compiled for the widest ISA the CPU has up to
/// kWidest: kAvx512Loop in the AVX-512 copy, kAvx2Loop in the AVX2 one (it
/// may call functions built with target("avx2,f16c"): it runs only there),
/// kBaselineLoop in the build's own target.
template <X86Level kWidest, auto kBaselineLoop, auto kAvx2Loop, auto kAvx512Loop, class... Args>
void run_loops_on_widest_isa(const Args&... args) {
#if KVKIT_X86_DISPATCH
  if constexpr (kWidest >= X86Level::kAvx2) {
    const X86Level level = x86_level();
    if constexpr (kWidest >= X86Level::kAvx512) {
      if (level >= X86Level::kAvx512) return run_loop_avx512<kAvx512Loop>(args...);
    }
    if (level >= X86Level::kAvx2) return run_loop_avx2<kAvx2Loop>(args...);
  }
#endif
  run_loop_baseline<kBaselineLoop>(args...);
}

/// Calls kLoop(args...) compiled for the widest ISA the CPU has, up to
/// kWidest (kBaseline: the build's own target, e.g. SSE2). Where the 512-bit
/// variant gains nothing over AVX2, kWidest = kAvx2 saves its compile time.
template <X86Level kWidest, auto kLoop, class... Args>
void run_loop_on_widest_isa(const Args&... args) {
  run_loops_on_widest_isa<kWidest, kLoop, kLoop, kLoop>(args...);
}

}  // namespace kvkit::detail
