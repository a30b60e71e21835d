"""The MoE routing CUDA kernel (csrc/cuda/moe/moe_route_kernels.cu) run on the host.

tests/moe_route_emulation/harness.cpp compiles the real .cu file (kernels and launcher) as C++
against the CUDA stand-in of tests/mla_decode_emulation/emu.h (every CUDA thread a fiber, real
warp-shuffle / __syncwarp barriers, threads run between barriers in forward, reverse or random
order, shared memory poisoned), with only the shared-memory declarations and <<<>>> launches
rewritten. Results must equal the CPU op (latentmoe.ops.moe_route, itself tested against the
reference and HF in test_moe_route.py): same experts in the same order, the same weights and
scores bit for bit (both sides run the same float operations in the same order). Covers the
warp-per-token kernel for every experts-per-lane width and the one-thread-per-token kernel beyond
1024 experts. Not covered: timing, device-only fast math.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cuda_emulation import as_host_code, host_compiler, skip_unless_required
from latentmoe.ops import moe_route

_ROOT = Path(__file__).resolve().parents[1]
_EMU = Path(__file__).resolve().parent / "mla_decode_emulation"
_HARNESS = Path(__file__).resolve().parent / "moe_route_emulation" / "harness.cpp"
_KERNELS = _ROOT / "csrc" / "cuda" / "moe" / "moe_route_kernels.cu"


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = host_compiler()
    work = tmp_path_factory.mktemp("moe_route_emulation")
    src, _, _, n_launch = as_host_code(_KERNELS.read_text())
    assert n_launch >= 3, n_launch  # the warp kernel, the per-token kernel, the backward
    (work / "moe_route_host.inc").write_text(src)
    exe = work / "harness"
    res = subprocess.run(
        [cxx, "-std=c++20", "-O2", "-Wall", "-Wno-unknown-pragmas", f"-I{_ROOT / 'csrc'}",
         f"-I{_EMU / 'cuda_headers'}", f"-I{_EMU}", f"-I{work}", str(_HARNESS), "-o", str(exe)],
        check=False, capture_output=True, text=True,
    )
    if res.returncode != 0 and "ucontext" in res.stderr:
        skip_unless_required("the C++ compiler lacks <ucontext.h>")
    assert res.returncode == 0, res.stderr[-4000:]
    return exe


def emulated_route(exe, tmp_path, logits, bias, top_k, n_group, topk_group, score_func, norm, scale, order=0):
    T, E = logits.shape
    head = np.array([T, E, top_k, n_group, topk_group, 0 if score_func == "sigmoid" else 1, int(norm),
                     int(bias is not None)], dtype=np.int64)
    payload = head.tobytes() + np.float32(scale).tobytes() + logits.numpy().astype(np.float32).tobytes()
    if bias is not None:
        payload += bias.numpy().astype(np.float32).tobytes()
    (tmp_path / "in.bin").write_bytes(payload)
    res = subprocess.run([str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin"), str(order)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    launches = [tuple(int(v) for v in ln.split()[1:]) for ln in res.stdout.splitlines() if ln.startswith("launch")]
    buf = (tmp_path / "out.bin").read_bytes()
    w = torch.from_numpy(np.frombuffer(buf[: T * top_k * 4], dtype=np.float32).copy()).view(T, top_k)
    i = torch.from_numpy(np.frombuffer(buf[T * top_k * 4 : T * top_k * 12], dtype=np.int64).copy()).view(T, top_k)
    s = torch.from_numpy(np.frombuffer(buf[T * top_k * 12 :], dtype=np.float32).copy()).view(T, E)
    return w, i, s, launches


# (T, E, top_k, n_group, topk_group, score_func, norm_topk_prob, bias, scale)
CASES = {
    "v3_e256_groups": (9, 256, 8, 8, 4, "sigmoid", True, True, 2.5),
    "e32_one_lane_each": (5, 32, 4, 4, 2, "sigmoid", True, True, 1.0),
    "e7_softmax_partial_lanes": (6, 7, 2, 1, 1, "softmax", False, False, 1.0),
    "e64_softmax_groups": (3, 64, 6, 8, 3, "softmax", True, True, 1.3),
    "e100_odd_groups_of_25": (4, 100, 5, 4, 2, "sigmoid", False, True, 0.7),
    "e512_no_groups": (3, 512, 8, 1, 1, "sigmoid", True, False, 1.0),
    "e1024_groups64": (2, 1024, 6, 64, 5, "sigmoid", True, True, 2.0),
    "e1040_per_token_kernel": (2, 1040, 3, 8, 2, "softmax", True, True, 1.0),
    "topk_all_kept": (3, 16, 8, 2, 1, "sigmoid", True, True, 1.0),
    "group_size_one": (4, 8, 3, 8, 5, "sigmoid", True, True, 1.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_route_kernel_matches_cpu_op(harness, tmp_path, name):
    T, E, K, ng, tg, sf, norm, has_bias, scale = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    logits = torch.randn(T, E, generator=g) * 2
    bias = torch.randn(E, generator=g) * 0.1 if has_bias else None
    order = [0, 1, 7 + len(name)][list(CASES).index(name) % 3]
    w, i, s, launches = emulated_route(harness, tmp_path, logits, bias, K, ng, tg, sf, norm, scale, order)
    ww, wi, ws = moe_route(logits, e_score_correction_bias=bias, top_k=K, n_group=ng, topk_group=tg,
                           score_func=sf, norm_topk_prob=norm, routed_scaling_factor=scale)
    assert torch.equal(i, wi)
    assert torch.equal(w, ww)
    assert torch.equal(s, ws)
    warp_kernel = E <= 1024
    assert launches[0][:4] == ((-(-T // 4), 1, 1, 128) if warp_kernel else (-(-T // 128), 1, 1, 128))


def test_route_kernel_ties_lower_index(harness, tmp_path):
    """Equal choice scores everywhere: groups and experts go to the lower index, as on the CPU."""
    T, E = 3, 64
    logits = torch.zeros(T, E)
    for ng, tg, K in ((8, 3, 5), (1, 1, 7), (64, 64, 9)):
        w, i, _, _ = emulated_route(harness, tmp_path, logits, None, K, ng, tg, "sigmoid", True, 1.0, order=5)
        wi = moe_route(logits, top_k=K, n_group=ng, topk_group=tg, score_func="sigmoid", norm_topk_prob=True,
                       routed_scaling_factor=1.0)[1]
        assert torch.equal(i, wi)
        assert torch.equal(i[0], torch.arange(K))


@pytest.mark.parametrize("E", [64, 1040])  # the warp kernel, the one-thread-per-token kernel
@pytest.mark.parametrize("sf", ["sigmoid", "softmax"])
def test_route_kernel_nan_score_poisons_the_tokens_weights(harness, tmp_path, E, sf):
    """A NaN logit: the token's picks stay among the finite scores and all its weights are NaN
    (moe::routed_weight), as on the CPU; other tokens are untouched."""
    logits = torch.randn(3, E, generator=torch.Generator().manual_seed(E))
    logits[1, 37] = float("nan")
    w, i, s, _ = emulated_route(harness, tmp_path, logits, None, 4, 8, 2, sf, True, 1.0, order=3)
    ww, wi, ws = moe_route(logits, top_k=4, n_group=8, topk_group=2, score_func=sf, norm_topk_prob=True)
    assert torch.equal(i, wi)
    assert torch.isnan(w[1]).all() and torch.isnan(ww[1]).all()
    assert torch.equal(w[[0, 2]], ww[[0, 2]])
    assert torch.equal(s.isnan(), ws.isnan()) and torch.equal(s.nan_to_num(), ws.nan_to_num())


@pytest.mark.parametrize("E", [64, 1040])  # the warp kernel, the one-thread-per-token kernel
def test_route_kernel_nan_bias_poisons_every_tokens_weights(harness, tmp_path, E):
    """A NaN selection bias counts as a NaN score of every token, as on the CPU: the same picks (the
    NaN expert never among them) and all weights NaN."""
    logits = torch.randn(3, E, generator=torch.Generator().manual_seed(E))
    bias = torch.randn(E, generator=torch.Generator().manual_seed(E + 1)) * 0.1
    bias[37] = float("nan")
    w, i, s, _ = emulated_route(harness, tmp_path, logits, bias, 4, 8, 2, "sigmoid", True, 1.0, order=3)
    ww, wi, ws = moe_route(logits, top_k=4, n_group=8, topk_group=2, e_score_correction_bias=bias)
    assert torch.equal(i, wi) and not (i == 37).any()
    assert torch.isnan(w).all() and torch.isnan(ww).all()
    assert torch.equal(s, ws)
