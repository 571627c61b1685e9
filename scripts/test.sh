#!/usr/bin/env bash
# Builds everything and runs every test. This is the README's test command and
# what CI (.ci/run) runs. Steps:
#   1. Release build of the library's tests, benchmarks and examples (CUDA
#      sources too where nvcc exists); CTest runs the host tests, the GPU tests
#      (reported as skipped without a GPU) and every benchmark in --smoke mode.
#   2. The host tests again, built with AddressSanitizer + UBSan.
#   3. The consumer test: install to a temporary prefix and build a tiny
#      out-of-tree program against it with find_package(kvkit).
#   4. The CPU tests of the vector kernels (decode, MLA fp8, RoPE,
#      conversions) built with Clang, with OpenMP: Clang differs from GCC in
#      how it treats our vector types and target attributes.
#   5. The decode kernels' tests in a plain GCC Debug build (-O0, no
#      sanitizer): GCC at -O0 emitted aligned vector moves on unaligned
#      scratch that no other step saw (ASan's allocator aligns the buffers).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
jobs=$(nproc)
# Each step's start, with the seconds since this script began: CI's budget is
# 25 minutes, and its log shows where they go.
step() { echo "== $1 (at ${SECONDS} s, $(date -u +%H:%M:%S) UTC)"; }
scripts/install-deps.sh

step "1/5 build and test (Release)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DKVKIT_BUILD_TESTS=ON \
  -DKVKIT_BUILD_BENCHMARKS=ON -DKVKIT_BUILD_EXAMPLES=ON >/dev/null
cmake --build build -j"$jobs"
(cd build && ctest -j"$jobs" --output-on-failure)

step "2/5 host tests under AddressSanitizer + UndefinedBehaviorSanitizer"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DKVKIT_SANITIZE=ON -DKVKIT_ENABLE_CUDA=OFF \
  -DKVKIT_BUILD_BENCHMARKS=OFF -DKVKIT_BUILD_EXAMPLES=OFF >/dev/null
cmake --build build-asan -j"$jobs"
(cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest -j"$jobs" --output-on-failure -L host)

step "3/5 consumer test: find_package(kvkit) from an installed prefix, and add_subdirectory"
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install build --prefix "$prefix/install" >/dev/null
cmake -S tests/consumer -B "$prefix/build" -DCMAKE_PREFIX_PATH="$prefix/install" >/dev/null
cmake --build "$prefix/build" -j"$jobs"
"$prefix/build/consumer"
"$prefix/build/consumer_prefix"
if [ -x "$prefix/build/consumer_cuda" ]; then "$prefix/build/consumer_cuda"; fi
cmake -S tests/consumer -B "$prefix/build-subdir" -DKVKIT_SOURCE_DIR="$root" >/dev/null
cmake --build "$prefix/build-subdir" -j"$jobs" --target consumer
"$prefix/build-subdir/consumer"

step "4/5 vector-kernel CPU tests built with Clang"
# The tests whose kernels Clang treated differently (unaligned vector structs,
# F16C, AVX-512 target attributes), the hand-written AVX2 quantize rows and
# the conversions; kept short: CI's budget is 25 minutes.
clang_tests=(test_core_types test_attention test_mla_fp8 test_rope_x86 test_layout_quantize_fast)
cmake -S . -B build-clang -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++ -DKVKIT_ENABLE_CUDA=OFF \
  -DKVKIT_BUILD_BENCHMARKS=OFF -DKVKIT_BUILD_EXAMPLES=OFF >/dev/null
cmake --build build-clang -j"$jobs" --target "${clang_tests[@]}"
(cd build-clang && ctest -j"$jobs" --output-on-failure -L host \
  -R "^($(IFS='|'; echo "${clang_tests[*]}"))[: ]")
step "5/5 decode kernel tests in a GCC Debug build (-O0, no sanitizer)"
debug_tests=(test_attention test_mla_fp8)
cmake -S . -B build-debug -DCMAKE_BUILD_TYPE=Debug -DKVKIT_ENABLE_CUDA=OFF \
  -DKVKIT_BUILD_BENCHMARKS=OFF -DKVKIT_BUILD_EXAMPLES=OFF >/dev/null
cmake --build build-debug -j"$jobs" --target "${debug_tests[@]}"
(cd build-debug && ctest -j"$jobs" --output-on-failure -L host \
  -R "^($(IFS='|'; echo "${debug_tests[*]}"))[: ]")
echo "kvkit: all tests passed ($root) in ${SECONDS} s"
