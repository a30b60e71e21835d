"""The compiled library: what it reports, and the clear errors when it does not match torch."""

import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import latentmoe
from latentmoe import _build, info


def test_info_lists_ops_with_kernels():
    report = info.report()
    assert "rms_norm" in info.ops()
    keys = info.kernels("rms_norm")
    assert "CPU" in keys and "Meta" in keys and "Autograd" in keys
    if latentmoe._C.with_cuda:
        assert "CUDA" in keys
        assert latentmoe._C.cuda_archs
    assert f"torch {torch.__version__}" in report


@pytest.mark.skipif(os.environ.get("LATENTMOE_EXPECT_CUDA") != "1", reason="only where CUDA kernels are required")
def test_cuda_kernels_were_compiled():
    assert latentmoe._C.with_cuda == 1
    for op in info.ops():
        if op.startswith("_") or op in info.CPU_ONLY_OPS:
            continue
        assert "CUDA" in info.kernels(op), f"latentmoe::{op} has no CUDA kernel"
    for op in info.CPU_ONLY_OPS:
        assert "CPU" in info.kernels(op) and "CUDA" not in info.kernels(op)


def test_mismatched_torch_is_reported(monkeypatch):
    fake = types.SimpleNamespace(torch_version="1.0.0", with_cuda=0, cuda_archs="", cuda_version="")
    monkeypatch.setattr(latentmoe, "_C", fake)
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0 .*Rebuild latentmoe"):
        _build.load()


def test_missing_library_is_reported_plainly(monkeypatch, tmp_path):
    # No _C*.so in the package: Python's own text ("partially initialized module ... most likely
    # due to a circular import") pointed the wrong way.
    import sys

    monkeypatch.delattr(latentmoe, "_C")
    monkeypatch.delitem(sys.modules, "latentmoe._C")
    monkeypatch.setattr(latentmoe, "__path__", [str(tmp_path)])
    with pytest.raises(ImportError, match=r"missing or failed to load \(no compiled library \(_C\*\.so\) in ") as info:
        _build.load()
    assert "circular import" not in str(info.value) and str(tmp_path) in str(info.value)
    # One built for another Python (another ABI tag): named as such, not as missing.
    (tmp_path / "_C.cpython-399-x86_64-linux-gnu.so").write_bytes(b"")
    with pytest.raises(ImportError, match=r"_C\.cpython-399-x86_64-linux-gnu\.so in .*, but none for this Python"):
        _build.load()


def test_cpu_isa_switch_reaches_the_kernels(monkeypatch):
    # The "generic" variants of the CPU tests rely on LATENTMOE_CPU_ISA reaching vec8::use_avx2
    # (through the settings snapshot; conftest's monkeypatch reloads it).
    import latentmoe

    monkeypatch.delenv("LATENTMOE_CPU_ISA", raising=False)
    native = latentmoe._C.cpu_isa()
    assert native in ("avx2", "generic")
    monkeypatch.setenv("LATENTMOE_CPU_ISA", "generic")
    assert latentmoe._C.cpu_isa() == "generic"
    monkeypatch.delenv("LATENTMOE_CPU_ISA")
    assert latentmoe._C.cpu_isa() == native


def test_settings_snapshot_is_taken_at_import():
    # Taken when latentmoe._C is imported (holding the GIL): at the first op call it ran getenv
    # with the GIL released, racing other threads' os.environ assignments. A variable changed
    # later takes effect at reload_settings() only (os.environ directly: conftest reloads after
    # monkeypatch's changes).
    import subprocess
    import sys

    # (Nothing reads a setting between the import and the change: no _C call, no op.)
    code = (
        "import os, torch, latentmoe\n"
        "os.environ['LATENTMOE_CPU_ISA'] = 'generic'\n"
        "latentmoe.ops.rms_norm(torch.randn(2, 8), torch.ones(8))\n"  # the first op call
        "first = latentmoe._C.cpu_isa()\n"
        "latentmoe.reload_settings()\n"
        "assert latentmoe._C.cpu_isa() == 'generic'\n"
        "del os.environ['LATENTMOE_CPU_ISA']\n"
        "latentmoe.reload_settings()\n"
        "print(first, latentmoe._C.cpu_isa())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LATENTMOE_CPU_ISA"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    first, native = res.stdout.split()
    if native == "generic":
        pytest.skip("the CPU runs the portable code anyway: the two settings cannot be told apart")
    assert first == native, "the setting was read after import"


def test_bench_env_setting_reaches_the_kernels():
    # bench/common.py's env_setting switches a kernel path for one block of a benchmark (e.g. the
    # loop backward row): the kernels read a snapshot, so it must retake it on entry and exit.
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        from bench.common import env_setting
    finally:
        sys.path.pop(0)
    before = latentmoe._C.cpu_isa()
    with env_setting("LATENTMOE_CPU_ISA", "generic"):
        assert latentmoe._C.cpu_isa() == "generic"
    assert latentmoe._C.cpu_isa() == before


def test_bench_cold_routings_share_no_expert():
    # bench_moe's T = 1 cycle: no token's experts among those of the two before it, wrap-around
    # included (else a call finds weights the last calls left in the L3, which the floor never does).
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        from bench import bench_moe
    finally:
        sys.path.pop(0)
    hf = bench_moe._hf_moe(bench_moe._config(hidden=64, inter=32), torch.float32, "cpu")
    xs, routes = bench_moe._cold_routings(hf, 64, "cpu", torch.float32)
    sets = [set(idx.flatten().tolist()) for _, idx in routes]
    n = len(sets)
    assert n == bench_moe.COLD_ROUTINGS and len(xs) == n
    assert all(len(s) == bench_moe.TOP_K for s in sets)
    for i in range(n):
        assert not sets[i] & sets[(i + 1) % n] and not sets[i] & sets[(i + 2) % n], i
    with pytest.raises(ValueError, match="no cycle"):
        bench_moe._cold_routings(hf, 64, "cpu", torch.float32, gap=11)  # 12 x 6 > 64 experts


def test_bench_records_the_machine():
    # bench/run.py writes machine_info next to each CSV: figures from different CPUs (AVX2-only,
    # AVX-512, AMX) are not comparable, so each run says what it ran on.
    import json
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        from bench.common import machine_info
    finally:
        sys.path.pop(0)
    info = machine_info("cpu")
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cores"] == os.cpu_count() and info["torch_threads"] == torch.get_num_threads()
    assert isinstance(info["isa_flags"], list) and isinstance(info["caches"], dict)
    json.dumps(info)  # what run.py writes


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _configure(build_dir, env: dict) -> subprocess.CompletedProcess:
    """CMake's configure of this project into ``build_dir`` with ``env`` added (Ninja where pip's
    or PATH's is found, as the build uses); skips without cmake. Without LD_PRELOAD: under make
    sanitize it preloads ASan into this process, and nvcc's cicc, run by enable_language,
    segfaulted under it."""
    cmake = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")
    if cmake is None:
        pytest.skip("needs cmake")
    ninja = shutil.which("ninja", path=os.path.dirname(sys.executable)) or shutil.which("ninja")
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    return subprocess.run(
        [cmake, "-S", _ROOT, "-B", str(build_dir), *gen, f"-DPython3_EXECUTABLE={sys.executable}"],
        env={**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, **env},
        capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize(
    "env,message",
    [
        ({"LATENTMOE_CUDA": "OFF"}, "LATENTMOE_CUDA must be 0"),  # was "auto": CUDA on where nvcc is
        ({"CUDA_HOME": "/nonexistent-cuda-home"}, "has no bin/nvcc"),  # was ignored (PATH's nvcc used)
        ({"MAX_JOBS": "0"}, "MAX_JOBS must be a positive integer"),  # was an unlimited pool
        # Was a failed compiler test deep in CMake's log.
        ({"LATENTMOE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0;3.5"}, "asks for sm_35; the CUDA kernels need sm_80"),
        ({"LATENTMOE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.9"}, "asks for sm_99, which"),
        # Suffixed archs: were stripped to sm_80 / sm_90 by the check and failed deep in the log.
        ({"LATENTMOE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0;8.0a"}, "asks for sm_80a, which"),
        ({"LATENTMOE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0f+PTX"}, "asks for sm_90f, which"),
    ],
)
def test_bad_build_knobs_fail_the_configure(tmp_path, env, message):
    if "TORCH_CUDA_ARCH_LIST" in env and not (shutil.which("nvcc") or os.environ.get("CUDA_HOME")):
        pytest.skip("needs nvcc")
    if "TORCH_CUDA_ARCH_LIST" in env and not torch.version.cuda:
        pytest.skip("needs a CUDA build of torch")
    res = _configure(tmp_path, env)
    assert res.returncode != 0 and message in res.stderr.replace("\n  ", " "), res.stderr[-2000:]


def test_suffixed_archs_pass_the_configure(tmp_path):
    # The arch check compiles suffixed archs once; one nvcc has (make gpu-prebuilt's 9.0a) must
    # still configure.
    if not (shutil.which("nvcc") or os.environ.get("CUDA_HOME")) or not torch.version.cuda:
        pytest.skip("needs nvcc and a CUDA build of torch")
    res = _configure(tmp_path, {"LATENTMOE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "8.0;9.0a"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "archs 80-real;90a-real," in res.stdout, res.stdout[-2000:]


def test_wheel_is_built_against_the_installed_torch():
    # An isolated build (pip install . without --no-build-isolation) fetched torch from the build
    # requirements, built against it, and installed a package that could not import with the user's
    # torch; and the wheel was tagged abi3 (any CPython >= 3.10) for a module built for one Python.
    text = open(os.path.join(_ROOT, "pyproject.toml")).read()
    requires = text.split("[build-system]")[1].split("[project]")[0]
    assert "torch" not in requires.split("requires =")[1].split("\n")[0]
    assert "py-api" not in text
