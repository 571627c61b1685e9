#!/usr/bin/env bash
# Builds and runs kvkit's main example. Usage: scripts/run-example.sh [example args...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DKVKIT_BUILD_EXAMPLES=ON >/dev/null
cmake --build build -j"$(nproc)" --target gpt_decode
./build/examples/gpt_decode "$@"
