#!/usr/bin/env bash
# One prepared command for the sometimes-lent H200 (the `device` tool): build against that
# machine's torch (2.11, offline, --no-build-isolation, sm_90a), run the CUDA tests,
# compute-sanitizer memcheck over every CUDA op once, then the benchmarks. Logs and CSV go to $OUT
# (default ./gpu-out). Budget: 540 s in all (LATENTMOE_GPU_CHECK_BUDGET_S), a build from source included.
#
#   here first:  make gpu-wheels     (tomesd and transformers 5.24 as wheels in .whl/: the device
#                                     image has no tomesd and an older transformers; 5.25 would
#                                     need a newer huggingface_hub than it has)
#   optional:    make gpu-prebuilt   (.prebuilt/_C.cpython-312-x86_64-linux-gnu.so: the extension built
#                                     here against torch 2.11.0+cu130 for Python 3.12, so the device
#                                     skips the build; if it does not import there, the script
#                                     builds from source)
#   device run:  bash bench/gpu_check.sh   carry [".whl", ".prebuilt"], timeout_s 560
#   optional:    LATENTMOE_GPU_CHECK_SKIP=bench     skip stages (build|tests|sanitizer|racecheck|bench|breakdown|ncu)
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
# One wall-clock budget for the whole script (default 540 s: under the device call's timeout_s 560
# with a margin to copy $OUT back). Each stage's timeout is its own cap or what is left of the
# budget, whichever is less; a stage with under 15 s left is skipped and says so, so the stages
# that follow a slow build still end before the device call is killed and $OUT is kept.
budget_end=$(( $(date +%s) + ${LATENTMOE_GPU_CHECK_BUDGET_S:-540} - 10 ))  # - timeout's -k 10
cap() {  # cap SECONDS NAME: prints the timeout for stage NAME, or nothing when it must be skipped
  local left=$(( budget_end - $(date +%s) ))
  if (( left < 15 )); then echo "== $2 skipped: the budget is spent" | tee -a "$OUT/summary.txt" >&2; return 1; fi
  echo $(( $1 < left ? $1 : left ))
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$PY" -c "import torch;print('torch', torch.__version__, torch.version.cuda)"; } \
  2>&1 | tee "$OUT/env.txt"

# Pure-Python test deps missing on the device image travel as wheels in .whl/ (see README).
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi

built=0
if [[ "$skip" != *build* ]] && ls .prebuilt/_C*.so >/dev/null 2>&1 \
   && [[ "$(cat .prebuilt/SOURCES.sha256 2>/dev/null)" != "$(bash bench/source_hash.sh)" ]]; then
  echo "prebuilt extension was built from other sources than these (make gpu-prebuilt); building from source" \
    | tee -a "$OUT/summary.txt"
  rm -f .prebuilt/_C*.so
fi
if [[ "$skip" != *build* ]] && ls .prebuilt/_C*.so >/dev/null 2>&1; then
  stage "prebuilt extension from .prebuilt/"
  cp .prebuilt/_C*.so python/latentmoe/
  if (cd /tmp && PYTHONPATH="$OLDPWD/python:${PYTHONPATH:-}" "$PY" -m latentmoe.info) >/tmp/lmoe-info.txt 2>&1; then
    export PYTHONPATH="$PWD/python:${PYTHONPATH:-}"; built=1
    tee -a "$OUT/env.txt" </tmp/lmoe-info.txt
  else
    tail -5 /tmp/lmoe-info.txt; echo "prebuilt extension does not load here; building from source" | tee -a "$OUT/summary.txt"
    rm -f python/latentmoe/_C*.so
  fi
fi

if [[ "$skip" != *build* && $built == 0 ]]; then
  stage "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  if ! t=$(cap 420 build) || ! SKBUILD_BUILD_VERBOSE=true timeout -k 10 "$t" "$PY" -m pip install -v --no-build-isolation \
       --no-deps --no-index . >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log" 2>/dev/null; echo "BUILD FAILED" | tee -a "$OUT/summary.txt"; exit 1
  fi
  grep "nvcc" "$OUT/build.log" | grep -oE "(--generate-code=[^ ]+|-c [^ ]+\.cu)" | paste -sd' ' | tee -a "$OUT/summary.txt"
  (cd /tmp && "$PY" -m latentmoe.info) 2>&1 | tee -a "$OUT/env.txt"
fi

if [[ "$skip" != *tests* ]]; then
  stage "CUDA tests"
  # Every CUDA case (no -x: one run should list all failures); a test file whose import fails
  # (e.g. a package missing there) is reported without hiding the others.
  # The *_cuda_emulation tests run CUDA sources on the host (CPU), and test_bad_build_knobs configures builds
  # (its ids name LATENTMOE_CUDA); CI runs both, so they are left out.
  # LATENTMOE_REQUIRE_GPU=1: the run fails (conftest) if torch sees no usable GPU, instead of
  # skipping every CUDA case; LATENTMOE_EXPECT_CUDA=1: every op must have a CUDA kernel.
  xdist=""; "$PY" -c "import xdist" 2>/dev/null && xdist="-n 8"
  t=$(cap 180 tests) && (cd tests && LATENTMOE_REQUIRE_GPU=1 LATENTMOE_EXPECT_CUDA=1 timeout -k 10 "$t" "$PY" -m pytest -q -k "cuda and not emulation and not test_bad_build_knobs" $xdist -rfE --tb=short \
     --durations=10 -p no:cacheprovider --continue-on-collection-errors . ) >"$OUT/tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30 | tee -a "$OUT/summary.txt"
  tail -3 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
fi

if [[ "$skip" != *sanitizer* ]]; then
  stage "compute-sanitizer memcheck"
  # (Each tool its own log, tailed only when it ran: a stage skipped for the budget printed the
  # previous stage's tail as its own.)
  if t=$(cap 90 memcheck); then
    timeout -k 10 "$t" compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" bench/gpu_smoke.py >"$OUT/memcheck.log" 2>&1 || status=1
    tail -5 "$OUT/memcheck.log" | sed 's/^/memcheck: /' | tee -a "$OUT/summary.txt"
  else
    status=1
  fi
fi

if [[ "$skip" != *racecheck* ]]; then
  stage "compute-sanitizer racecheck (shared-memory hazards)"
  if t=$(cap 90 racecheck); then
    timeout -k 10 "$t" compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 3 "$PY" bench/gpu_smoke.py \
      >"$OUT/racecheck.log" 2>&1 || status=1
    tail -3 "$OUT/racecheck.log" | sed 's/^/racecheck: /' | tee -a "$OUT/summary.txt"
  else
    status=1
  fi
fi

if [[ "$skip" != *bench* ]]; then
  stage "benchmarks"
  t=$(cap 220 bench) && timeout -k 10 "$t" "$PY" bench/run.py --device cuda --full --out "$OUT" >"$OUT/bench.log" 2>&1 || status=1
  tail -40 "$OUT/bench.log" 2>/dev/null
fi

if [[ "$skip" != *breakdown* ]]; then
  stage "breakdown (torch.profiler tables of bench/gpu_breakdown.py)"
  # (A failed case prints FAILED in its table but does not fail the run: these are diagnostics.)
  t=$(cap 60 breakdown) && timeout -k 10 "$t" "$PY" bench/gpu_breakdown.py >"$OUT/breakdown.txt" 2>&1
  grep "^### " "$OUT/breakdown.txt" 2>/dev/null | tee -a "$OUT/summary.txt"
fi

if [[ "$skip" != *ncu* ]] && command -v ncu >/dev/null; then
  stage "Nsight Compute (latentmoe kernels of bench/gpu_profile.py)"
  # --clock-control none: leave the card's clocks as they are (see the device notes).
  # --launch-skip 0: every matching launch from the first, both calls of each op (gpu_profile.py).
  # (A failed or timed-out profile is reported but does not fail the run; a stage skipped for the
  # budget does, as the others.)
  if ! t=$(cap 60 ncu); then
    status=1
  elif ! timeout -k 10 "$t" ncu --clock-control none --kernel-name-base demangled \
    --kernel-name regex:"mla_decode|grouped|combine" --launch-skip 0 --launch-count 24 \
    --section SpeedOfLight --section Occupancy --section LaunchStats \
    "$PY" bench/gpu_profile.py >"$OUT/ncu.txt" 2>&1; then
    echo "ncu failed or timed out (see ncu.txt)" | tee -a "$OUT/summary.txt"
  fi
  grep -E "^  [a-z_].*\(|Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per" "$OUT/ncu.txt" \
    2>/dev/null | head -80 >>"$OUT/summary.txt"
fi

stage "done, status $status"
# The device call brings back at most 8 files from $OUT: the logs beyond summary.txt, tests.log,
# bench.log and breakdown.txt travel packed in logs.tgz (every file, those four included).
(cd "$OUT" && tar -czf /tmp/logs.tgz . && mv /tmp/logs.tgz . \
  && find . -maxdepth 1 -type f ! -name logs.tgz ! -name summary.txt ! -name tests.log ! -name bench.log ! -name breakdown.txt -delete)
exit $status
