// Uses the installed host headers; exits non-zero if anything is off.
#include <kvkit/kvkit.hpp>

#include <cstdio>
#include <vector>

int main() {
  std::vector<kvkit::bfloat16> cache(2 * 16 * 8 * 128);
  const kvkit::TensorView view(cache.data(), kvkit::DType::kBFloat16, {2, 16, 8, 128});
  const bool ok = view.numel() == 2 * 16 * 8 * 128 && float(kvkit::bfloat16(1.5f)) == 1.5f;
  std::printf("consumer: kvkit %d.%d.%d host headers %s\n", KVKIT_VERSION_MAJOR,
              KVKIT_VERSION_MINOR, KVKIT_VERSION_PATCH, ok ? "work" : "FAILED");
  return ok ? 0 : 1;
}
