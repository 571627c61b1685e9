#pragma once
// Shared benchmark helpers.
//
// Memory-bound benchmarks report `bytes_per_second` and `pct_of_memcpy`: their
// bandwidth as a percentage of a memcpy measured in the same binary (bytes
// read + written, over buffers larger than the last-level cache). A kernel
// that only reads (decode attention) counts the bytes it reads; one that reads
// and writes (append, copy) counts both. Compute-bound benchmarks report FLOP/s
// with report_flops.
//
// `--smoke` runs every benchmark briefly on small sizes (CI uses it so that
// benchmarks keep compiling and running); its numbers mean nothing.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace kvkit::bench {

/// True when the binary was started with --smoke.
bool is_smoke();

/// Picks the full-size or the smoke-mode value of a benchmark parameter.
template <class T>
T full_or_smoke(T full, T smoke) {
  return is_smoke() ? smoke : full;
}

/// Host memcpy bandwidth, bytes read + written per second, measured once per
/// process over a buffer larger than the last-level cache (best of several).
double host_memcpy_bytes_per_second();

/// Device-to-device copy kernel bandwidth, bytes read + written per second,
/// measured once per process with CUDA events (GPU benchmark binaries only).
double device_memcpy_bytes_per_second();

/// A sequence's page list: `n` distinct random pages of [0, num_pages), in
/// random order (a shuffled cache, as after a while of serving).
inline std::vector<std::int32_t> random_page_list(std::int64_t n, std::int64_t num_pages, std::uint32_t seed) {
  std::vector<std::int32_t> pages(static_cast<std::size_t>(num_pages));
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(pages.begin(), pages.end(), std::mt19937(seed));
  pages.resize(static_cast<std::size_t>(n));
  return pages;
}

/// Sets bytes_per_second and pct_of_memcpy (against `baseline_bytes_per_second`)
/// for a benchmark that moves `bytes_per_iteration` bytes per iteration.
inline void report_bandwidth(benchmark::State& state, double bytes_per_iteration,
                             double baseline_bytes_per_second) {
  const double total = bytes_per_iteration * double(state.iterations());
  state.SetBytesProcessed(std::int64_t(total));
  state.counters["pct_of_memcpy"] =
      benchmark::Counter(100.0 * total / baseline_bytes_per_second, benchmark::Counter::kIsRate);
}

/// report_bandwidth against the host memcpy baseline.
inline void report_host_bandwidth(benchmark::State& state, double bytes_per_iteration) {
  report_bandwidth(state, bytes_per_iteration, host_memcpy_bytes_per_second());
}

/// report_bandwidth against the device copy baseline.
inline void report_device_bandwidth(benchmark::State& state, double bytes_per_iteration) {
  report_bandwidth(state, bytes_per_iteration, device_memcpy_bytes_per_second());
}

/// Sets a FLOP/s counter for a compute-bound benchmark.
inline void report_flops(benchmark::State& state, double flops_per_iteration) {
  state.counters["flop_per_second"] = benchmark::Counter(
      flops_per_iteration * double(state.iterations()), benchmark::Counter::kIsRate,
      benchmark::Counter::kIs1000);
}

/// Sets ns_per_op and ops_per_second for a bookkeeping benchmark doing
/// `ops_per_iteration` operations per iteration.
inline void report_ops(benchmark::State& state, double ops_per_iteration) {
  const double ops = ops_per_iteration * double(state.iterations());
  state.counters["ops_per_second"] = benchmark::Counter(ops, benchmark::Counter::kIsRate);
  state.counters["ns_per_op"] = benchmark::Counter(
      ops * 1e-9, benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

}  // namespace kvkit::bench
