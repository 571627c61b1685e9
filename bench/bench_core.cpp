// Core numeric conversions on the CPU: float -> bfloat16 / fp8 and back,
// over arrays larger than the last-level cache. Memory-bound: reports
// bytes/s (read + written) and pct_of_memcpy.

#include <cstdint>
#include <random>
#include <vector>

#include "harness/harness.hpp"
#include "kvkit/core/dtype.hpp"

namespace {

using kvkit::bench::full_or_smoke;
using kvkit::bench::report_host_bandwidth;

std::vector<float> random_floats(std::size_t n) {
  std::vector<float> v(n);
  std::mt19937 rng(1);
  std::normal_distribution<float> dist(0.0f, 4.0f);
  for (auto& x : v) x = dist(rng);
  return v;
}

template <class T>
void BM_encode(benchmark::State& state) {
  const std::size_t n = full_or_smoke<std::size_t>(std::size_t(32) << 20, 1 << 16);
  const std::vector<float> in = random_floats(n);
  std::vector<T> out(n);
  for (auto _ : state) {
    for (std::size_t i = 0; i < n; ++i) out[i] = kvkit::from_float<T>(in[i]);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  report_host_bandwidth(state, double(n) * double(sizeof(float) + sizeof(T)));
}

template <class T>
void BM_decode(benchmark::State& state) {
  const std::size_t n = full_or_smoke<std::size_t>(std::size_t(32) << 20, 1 << 16);
  const std::vector<float> src = random_floats(n);
  std::vector<T> in(n);
  for (std::size_t i = 0; i < n; ++i) in[i] = kvkit::from_float<T>(src[i]);
  std::vector<float> out(n);
  for (auto _ : state) {
    for (std::size_t i = 0; i < n; ++i) out[i] = kvkit::to_float(in[i]);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  report_host_bandwidth(state, double(n) * double(sizeof(float) + sizeof(T)));
}

BENCHMARK_TEMPLATE(BM_encode, kvkit::half)->Name("convert/float_to_half")->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_encode, kvkit::bfloat16)->Name("convert/float_to_bfloat16")->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_encode, kvkit::float8_e4m3)->Name("convert/float_to_e4m3")->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_decode, kvkit::half)->Name("convert/half_to_float")->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_decode, kvkit::bfloat16)->Name("convert/bfloat16_to_float")->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_decode, kvkit::float8_e4m3)->Name("convert/e4m3_to_float")->Unit(benchmark::kMillisecond);

}  // namespace
