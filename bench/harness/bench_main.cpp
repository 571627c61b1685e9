// main() shared by every benchmark binary: understands --smoke, and in GPU
// binaries exits with the skip code where no GPU is present.

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "harness/harness.hpp"

#if defined(KVKIT_BENCH_NEEDS_GPU)
#include "kvkit/cuda/check.hpp"
#endif

namespace kvkit::bench {
namespace {
bool g_smoke = false;
}
bool is_smoke() { return g_smoke; }
}  // namespace kvkit::bench

namespace {

// Console output as Google Benchmark's, except that percentage and ns-per-op
// counters (computed as rates so that they are divided by the elapsed time)
// are not shown with a misleading "/s" suffix.
class KvkitConsoleReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    std::vector<Run> shown = runs;
    for (Run& run : shown) {
      for (auto& [name, counter] : run.counters) {
        if (name.rfind("pct_", 0) == 0 || name.rfind("ns_", 0) == 0) {
          counter.flags = benchmark::Counter::kDefaults;
        }
      }
    }
    benchmark::ConsoleReporter::ReportRuns(shown);
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> args;
  static char min_time[] = "--benchmark_min_time=0.002";
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--smoke") == 0) {
      kvkit::bench::g_smoke = true;
    } else {
      args.push_back(argv[i]);
    }
  }
  if (kvkit::bench::g_smoke) args.push_back(min_time);
#if defined(KVKIT_BENCH_NEEDS_GPU)
  if (kvkit::cuda::device_count() == 0) {
    std::printf("SKIPPED: no CUDA device is present\n");
    return KVKIT_BENCH_SKIP_RETURN_CODE;
  }
#endif
  // Initialize consumes --benchmark_format, so look before it does.
  bool console_format = true;
  for (char* arg : args) {
    if (std::strncmp(arg, "--benchmark_format=", 19) == 0) {
      console_format = std::strcmp(arg + 19, "console") == 0;
    }
  }
  int count = int(args.size());
  benchmark::Initialize(&count, args.data());
  if (benchmark::ReportUnrecognizedArguments(count, args.data())) return 1;
  if (console_format) {
    KvkitConsoleReporter console;
    benchmark::RunSpecifiedBenchmarks(&console);
  } else {
    benchmark::RunSpecifiedBenchmarks();
  }
  benchmark::Shutdown();
  return 0;
}
