#!/usr/bin/env bash
# For a machine with an NVIDIA GPU: builds with CUDA, runs the gpu-labelled
# tests and the GPU benchmarks (full size), and prints a short table last.
# Usage: scripts/gpu-check.sh [out_dir]   (JSON results and logs go to out_dir)
# CUDA_ARCHS overrides the architectures (default 90).
# Needs CMake, Catch2 and Google Benchmark on the GPU machine; where those are
# missing, build here and carry the binaries: scripts/gpu-bundle.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-build-gpu/results}
mkdir -p "$out"
archs=${CUDA_ARCHS:-90}
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DKVKIT_ENABLE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$archs" -DKVKIT_BUILD_TESTS=ON -DKVKIT_BUILD_BENCHMARKS=ON \
  -DKVKIT_BUILD_EXAMPLES=ON >/dev/null || exit 1
cmake --build build-gpu -j"$(nproc)" 2>&1 | tail -3 || exit 1

echo "== GPU tests"
(cd build-gpu && ctest -L gpu -LE bench --output-on-failure) 2>&1 | tee "$out/gpu-tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== GPU benchmarks"
for b in build-gpu/bench/bench_*_gpu; do
  [ -x "$b" ] || continue
  name=$(basename "$b")
  "$b" --benchmark_out="$out/$name.json" --benchmark_out_format=json 2>&1 | tee "$out/$name.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

echo "== summary"
grep -E "tests passed|tests failed" "$out/gpu-tests.log" || true
python3 scripts/bench-report --print "$out"/bench_*_gpu.json || true
exit $status
