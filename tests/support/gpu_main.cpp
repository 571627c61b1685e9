// main() for GPU test binaries: where no CUDA device is present, running tests
// exits with KVKIT_SKIP_RETURN_CODE so that CTest reports them as skipped, never
// as passed. Listing tests (used by catch_discover_tests at build time) works
// without a GPU.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstring>

#include "kvkit/cuda/check.hpp"

int main(int argc, char* argv[]) {
  bool listing = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--list", 6) == 0 || std::strcmp(argv[i], "-l") == 0 ||
        std::strcmp(argv[i], "--help") == 0 || std::strcmp(argv[i], "-h") == 0) {
      listing = true;
    }
  }
  if (!listing && kvkit::cuda::device_count() == 0) {
    std::printf("SKIPPED: no CUDA device is present\n");
    return KVKIT_SKIP_RETURN_CODE;
  }
  return Catch::Session().run(argc, argv);
}
