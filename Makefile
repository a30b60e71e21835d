# latentmoe: the two commands people run.
#   make test   set up .venv (torch 2.14.1 + test deps), build the extension (CUDA kernels for
#               TORCH_CUDA_ARCH_LIST, default 9.0, when nvcc is found), run pytest.
#   make bench  same setup, then the microbenchmarks on the default device (CSV in bench/results/).
# Other targets: make dev (in-tree build into python/latentmoe for PYTHONPATH=python work),
#                make sanitize (the CPU kernels under ASan + UBSan), make fuzz (a longer campaign of
#                new fuzz cases: FUZZ_SEED, FUZZ_SCALE), make info, make clean.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
# The transformers release the tests were last run against: pinned so a new upstream release cannot
# change what CI tests between two sessions (5.25 changed a Cache method's signature). Bump it on
# purpose, with a full test run.
TRANSFORMERS_VERSION ?= 5.25.0
MAX_JOBS ?= 2
export MAX_JOBS
TORCH_CUDA_ARCH_LIST ?= 9.0
export TORCH_CUDA_ARCH_LIST
GPU_PREBUILT_ARCH ?= 9.0a
export CMAKE_BUILD_PARALLEL_LEVEL := $(MAX_JOBS)

# The nvcc on PATH may be a wrapper script in another folder than its toolkit: ask nvcc itself
# where its toolkit lives (torch's cpp_extension and CMake otherwise guess the wrong root).
CUDA_HOME ?= $(shell nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$$ TOP=\(.*\)\/bin\/\.\.$$/\1/p' | head -n1)
ifneq ($(CUDA_HOME),)
export CUDA_HOME
endif

.PHONY: test bench venv build dev info clean gpu-wheels gpu-prebuilt sanitize fuzz

# torch's CUDA build takes about 5.5 GB in the venv: the free space is printed first, so a full disk
# reads as such in the log. --no-cache-dir: pip keeps no second copy of what it downloads.
$(VENV)/.deps-stamp: pyproject.toml Makefile
	@df -h . $${TMPDIR:-/tmp} | sed 's/^/latentmoe: disk: /' || true
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q --no-cache-dir setuptools scikit-build-core ninja "cmake>=3.24" numpy pytest hypothesis "transformers==$(TRANSFORMERS_VERSION)" tomesd
	touch $@

venv: $(VENV)/.deps-stamp

build: venv
	SKBUILD_BUILD_VERBOSE=true $(PY) -m pip install -v --no-build-isolation --no-deps . 2>&1 | tee build.log | grep -E "latentmoe:|Building wheel|Linking|error:|Error" || true
	@grep -q "Successfully installed latentmoe" build.log || (tail -50 build.log; echo "latentmoe: build failed, see build.log"; exit 1)
	@# Show the archs each .cu file was compiled for (from nvcc's command lines in the verbose log).
	@grep "bin/nvcc" build.log | grep -- " -c " | sed -E 's/.*(--generate-code=[^ ]+|-arch=[^ ]+).* -c ([^ ]+\.cu).*/latentmoe: nvcc \1 \2/' | sed 's|$(CURDIR)/||' | tr -d '"' || true

dev: venv
	$(VENV)/bin/cmake -S . -B build/dev -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release
	$(VENV)/bin/cmake --build build/dev
	cp build/dev/_C*.so python/latentmoe/

# The CPU kernels built with AddressSanitizer + UndefinedBehaviorSanitizer (CPU-only build in
# build/asan, a package copy in build/asan/pkg), then every test but the CUDA-emulation harnesses
# (they build their own: LATENTMOE_EMU_SANITIZE=1) with the runtime preloaded into python. Any
# report fails the run: ASan aborts on its first error, UBSan too (halt_on_error). pytest runs with
# -s so a report is printed, not swallowed by its output capture.
SAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer
SAN_PRELOAD = $(shell $(CXX) -print-file-name=libasan.so) $(shell $(CXX) -print-file-name=libstdc++.so.6)
sanitize: venv
	LATENTMOE_CUDA=0 $(VENV)/bin/cmake -S . -B build/asan -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS="$(SAN_FLAGS)" -DCMAKE_SHARED_LINKER_FLAGS="$(SAN_FLAGS)"
	$(VENV)/bin/cmake --build build/asan
	rm -rf build/asan/pkg && mkdir -p build/asan/pkg && cp -r python/latentmoe build/asan/pkg/
	rm -f build/asan/pkg/latentmoe/_C*.so && cp build/asan/_C*.so build/asan/pkg/latentmoe/
	cd tests && LD_PRELOAD="$(SAN_PRELOAD)" PYTHONPATH=$(abspath build/asan/pkg) \
	  ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0:allocator_may_return_null=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 LATENTMOE_EXPECT_CUDA=0 \
	  $(abspath $(PY)) -m pytest -s -q -p no:cacheprovider --ignore-glob='*cuda_emulation*' \
	  . ; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "latentmoe: pytest collected no tests"; exit 1; fi; exit $$rc

info: build
	cd /tmp && $(abspath $(PY)) -m latentmoe.info

test: build
	cd tests && $(abspath $(PY)) -m pytest -q -p no:cacheprovider . ; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "latentmoe: pytest collected no tests"; exit 1; fi; exit $$rc

bench: build
	$(PY) bench/run.py

# tests/test_fuzz_ops.py on new cases (not CI's fixed ones), FUZZ_SCALE times as many: a failure
# prints the case, and the same FUZZ_SEED draws the same cases again.
FUZZ_SEED ?= 1
FUZZ_SCALE ?= 10
fuzz: build
	cd tests && LATENTMOE_FUZZ_RANDOM=1 LATENTMOE_FUZZ_SCALE=$(FUZZ_SCALE) $(abspath $(PY)) -m pytest -q \
	  -p no:cacheprovider test_fuzz_ops.py --hypothesis-seed=$(FUZZ_SEED)

# Pure-Python test dependencies missing on the lent GPU machine, as wheels for bench/gpu_check.sh
# (carry .whl with the device call; installed there with --no-deps). transformers 5.24: the newest
# release whose dependencies the device image meets (5.25 needs huggingface_hub >= 2.4, the image
# has 1.33); the tests pass under 5.24 too (the continuous-batching ones skip).
GPU_TRANSFORMERS_VERSION ?= 5.24.0
gpu-wheels: venv
	rm -f .whl/transformers-*.whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .whl tomesd \
	  "transformers==$(GPU_TRANSFORMERS_VERSION)"

# The extension for the lent GPU machine (Python 3.12, torch 2.11), into .prebuilt/.
gpu-prebuilt: venv
	TORCH_CUDA_ARCH_LIST="$(GPU_PREBUILT_ARCH)" bash bench/build_prebuilt.sh

clean:
	rm -rf build build.log python/latentmoe/_C*.so
