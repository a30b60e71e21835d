#!/usr/bin/env bash
# One prepared command for the sometimes-lent H200 (the `device` tool): build from source against
# that machine's torch (2.11, offline, --no-build-isolation, sm_90a), run the CUDA tests,
# compute-sanitizer memcheck over every CUDA op once, then the benchmarks. Logs and CSV go to $OUT
# (default ./gpu-out). Budget: about 8 minutes.
#
#   device run:  bash bench/gpu_check.sh            (timeout_s 540; run `make gpu-wheels` here first
#                                                   and carry .whl: tomesd is not on the device image)
#   optional:    LATENTMOE_GPU_CHECK_SKIP=bench     skip a stage (build|tests|sanitizer|bench)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export LATENTMOE_CUDA=1
export CMAKE_BUILD_PARALLEL_LEVEL="${MAX_JOBS:-16}"
skip="${LATENTMOE_GPU_CHECK_SKIP:-}"
status=0
stage() { echo "== $1 ($(date +%T))" | tee -a "$OUT/summary.txt"; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$PY" -c "import torch;print('torch', torch.__version__, torch.version.cuda)"; } \
  2>&1 | tee "$OUT/env.txt"

# Pure-Python test deps missing on the device image travel as wheels in .whl/ (see README).
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi

if [[ "$skip" != *build* ]]; then
  stage "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  if ! SKBUILD_BUILD_VERBOSE=true "$PY" -m pip install -v --no-build-isolation --no-deps --no-index . >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; echo "BUILD FAILED" | tee -a "$OUT/summary.txt"; exit 1
  fi
  grep "nvcc" "$OUT/build.log" | grep -oE "(--generate-code=[^ ]+|-c [^ ]+\.cu)" | paste -sd' ' | tee -a "$OUT/summary.txt"
  (cd /tmp && "$PY" -m latentmoe.info) 2>&1 | tee "$OUT/info.txt"
fi

if [[ "$skip" != *tests* ]]; then
  stage "CUDA tests"
  # Every CUDA case (no -x: one run should list all failures); a test file whose import fails
  # (e.g. a package missing there) is reported without hiding the others.
  (cd tests && timeout 240 "$PY" -m pytest -q -k cuda -p no:cacheprovider --continue-on-collection-errors . ) \
    >"$OUT/tests.log" 2>&1 || status=1
  tail -5 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
fi

if [[ "$skip" != *sanitizer* ]]; then
  stage "compute-sanitizer memcheck"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" bench/gpu_smoke.py >"$OUT/sanitizer.log" 2>&1 || status=1
  tail -5 "$OUT/sanitizer.log" | tee -a "$OUT/summary.txt"
fi

if [[ "$skip" != *bench* ]]; then
  stage "benchmarks"
  timeout 200 "$PY" bench/run.py --device cuda --full --out "$OUT" >"$OUT/bench.log" 2>&1 || status=1
  tail -40 "$OUT/bench.log"
fi

stage "done, status $status"
exit $status
