#!/usr/bin/env bash
# Installs the Debian packages kvkit's build, tests and benchmarks need, if missing.
# The CUDA toolkit (nvcc) is optional: without it the host parts build and test.
set -euo pipefail

# clang and libomp-dev: test.sh also builds the vector-kernel tests with Clang.
packages=(cmake g++ make catch2 libbenchmark-dev libxxhash-dev python3 clang libomp-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "kvkit: installing ${missing[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
