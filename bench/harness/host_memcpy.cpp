// Host memcpy baseline, measured once per benchmark binary.

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "harness/harness.hpp"

namespace kvkit::bench {

double host_memcpy_bytes_per_second() {
  static const double measured = [] {
    // 256 MiB: eight times this machine's 32 MiB L3, so memory is measured.
    const std::size_t bytes = full_or_smoke<std::size_t>(std::size_t(256) << 20, std::size_t(8) << 20);
    std::vector<unsigned char> src(bytes, 1), dst(bytes, 0);
    double best = 0.0;
    for (int rep = 0; rep < full_or_smoke(6, 2); ++rep) {
      const auto start = std::chrono::steady_clock::now();
      std::memcpy(dst.data(), src.data(), bytes);
      benchmark::ClobberMemory();
      const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
      best = std::max(best, 2.0 * double(bytes) / took.count());
    }
    benchmark::DoNotOptimize(dst.data());
    return best;
  }();
  return measured;
}

/// The baseline itself, shown in every binary's output.
void BM_host_memcpy(benchmark::State& state) {
  const std::size_t bytes = full_or_smoke<std::size_t>(std::size_t(256) << 20, std::size_t(8) << 20);
  std::vector<unsigned char> src(bytes, 1), dst(bytes, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::ClobberMemory();
  }
  report_host_bandwidth(state, 2.0 * double(bytes));
}
BENCHMARK(BM_host_memcpy)->Name("baseline/host_memcpy")->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace kvkit::bench
