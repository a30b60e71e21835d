#!/usr/bin/env bash
# Build the extension here for the lent GPU machine's Python and torch (bench/gpu_check.sh loads
# it from .prebuilt/ and skips its own build; it builds from source if this one does not import).
#
#   bash bench/build_prebuilt.sh        (after `make venv`; needs python3.12 on PATH and nvcc)
#
# The device image has Python 3.12 and torch 2.11.0+cu130. This creates .prebuilt-venv with that
# torch (no dependencies: its CUDA libraries are taken from the project venv's torch, same CUDA
# major), builds with CMake into build/prebuilt, and copies _C*.so to .prebuilt/. Both folders are
# git-ignored; carry .prebuilt with the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
TORCH_DEVICE_VERSION="${TORCH_DEVICE_VERSION:-2.11.0}"
PY312="${PY312:-python3.12}"
VENV=.prebuilt-venv
"$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
  || { echo "build_prebuilt: no working Python 3.12 as '$PY312' (set PY312=/path/to/python3.12)"; exit 1; }
test -x .venv/bin/python || { echo "build_prebuilt: run 'make venv' first (the project venv provides cmake, ninja and the CUDA libraries)"; exit 1; }
if ! test -x "$VENV/bin/python"; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --no-deps "torch==$TORCH_DEVICE_VERSION"
  # torch's own dependency list names its CUDA wheels, deliberately not installed: pip's
  # "requires ..., which is not installed" lines about them are expected.
  "$VENV/bin/python" -m pip install -q typing_extensions filelock sympy networkx jinja2 fsspec numpy "setuptools<82" 2>&1 \
    | grep -v "which is not installed\|dependency resolver\|dependency conflicts" || true
fi
# CUDA runtime libraries and headers of the project venv's torch wheels (nvidia/*/lib, include).
NV="$(.venv/bin/python -c 'import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia"))')"
export LD_LIBRARY_PATH="$(ls -d "$NV"/*/lib 2>/dev/null | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
INC="$(ls -d "$NV"/*/include 2>/dev/null | sed 's/^/-isystem /' | paste -sd' ')"
"$VENV/bin/python" -c "import torch; print('build_prebuilt: torch', torch.__version__, 'CUDA', torch.version.cuda)"
LATENTMOE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" .venv/bin/cmake -S . -B build/prebuilt -G Ninja \
  -DCMAKE_MAKE_PROGRAM="$ROOT/.venv/bin/ninja" -DPython3_EXECUTABLE="$ROOT/$VENV/bin/python" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS="$INC" -DCMAKE_CUDA_FLAGS="$INC" >/dev/null
.venv/bin/cmake --build build/prebuilt
mkdir -p .prebuilt && rm -f .prebuilt/_C*.so && cp build/prebuilt/_C*.so .prebuilt/
# The sources it was built from: gpu_check.sh builds from source instead when they differ.
bash bench/source_hash.sh > .prebuilt/SOURCES.sha256
# A smoke import with the device's torch (CPU here): the ops register and report their kernels.
tmp="$(mktemp -d)"; cp -r python/latentmoe "$tmp/"; rm -f "$tmp"/latentmoe/_C*.so; cp .prebuilt/_C*.so "$tmp/latentmoe/"
# (into a file, then its head: `| head` closed the pipe early, and pipefail failed the build)
(cd "$tmp" && PYTHONPATH="$tmp" "$ROOT/$VENV/bin/python" -m latentmoe.info > "$tmp/info.txt") && head -4 "$tmp/info.txt"
rm -rf "$tmp"
ls -la .prebuilt
