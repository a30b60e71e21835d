#!/usr/bin/env bash
# One hash of everything the compiled extension is built from (csrc/ and CMakeLists.txt), for
# telling whether .prebuilt/ matches the tree (bench/build_prebuilt.sh, bench/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
find csrc CMakeLists.txt -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
