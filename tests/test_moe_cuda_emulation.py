"""The MoE CUDA kernels (csrc/cuda/moe/*.cu), run on the host against the CPU ops.

tests/moe_emulation/ compiles the .cu files' kernels AND their launchers (launch configuration,
decode vs tiled choice, tile counting and the tile-count bound) as host C++: one std::thread per
CUDA thread, std::barrier for __syncthreads, the warp butterfly of cuda_utils.cuh, NaN-filled
shared memory and scratch, nvcuda::wmma emulated on whole 16x16 tiles (fp32 accumulation), cp.async
copies deferred until their batch is waited for, dynamic shared memory with the device's limits.
Buffers can be shifted off 16-byte alignment to drive the kernels' element-wise paths. The CPU ops
are themselves tested against the references and HF (test_moe_route.py, test_moe_experts.py). Not
covered here: the ATen code of moe_binding.cpp (its large-batch expert sort is recomputed with the
same torch ops; its small-batch sort kernel is tested against them), the device's __expf (routing
uses std::exp here), the tensor cores' accumulation order, memory-ordering / race behaviour of
real warps, performance.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cuda_emulation import host_compiler, skip_unless_required

import latentmoe  # noqa: F401  (registers the ops)
from latentmoe.ops import moe_route

_ROOT = Path(__file__).resolve().parents[1]
_EMU = Path(__file__).resolve().parent / "moe_emulation"
_PROBE = (
    "#include <barrier>\n#include <cstring>\n"
    "int main() { std::barrier<> b(1); b.arrive_and_wait();\n"
    "  _Float16 h = (_Float16)1.5f; return (float)h != 1.5f; }\n"
)
_LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)
_SHARED = re.compile(r"__shared__\s+(?:__align__\(\d+\)\s+)?((?:unsigned\s+)?\w+)\s+(\w+)((?:\[[^\]]*\])+);")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?((?:unsigned\s+)?\w+)\s+(\w+)\[\];")


def _as_host_code(cu_source: str) -> str:
    """A .cu file as host C++ for shim.h: CUDA includes dropped, launches and shared arrays rewritten."""
    lines = [ln for ln in cu_source.split("\n")
             if not ln.startswith(("#include <cuda_", "#include <mma.h>", '#include "cuda/'))]
    src = "\n".join(lines)
    src, n_launch = _LAUNCH.subn(r"emu_launch(\2, reinterpret_cast<const void*>(&\1), [&] { \1(\3); });", src)
    src = _EXTERN_SHARED.sub(r"\1* \2 = static_cast<\1*>(emu::dynamic_shared());", src)
    src, n_shared = _SHARED.subn(
        r"\1 (&\2)\3 = *reinterpret_cast<\1(*)\3>(emu::shared_alloc(sizeof(\1\3)));", src)
    assert n_launch > 0 and "<<<" not in src, "a kernel launch was not rewritten"
    assert "__shared__" not in src, "a __shared__ declaration was not rewritten"
    return src


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = host_compiler()
    work = tmp_path_factory.mktemp("moe_emulation")
    # -fno-strict-aliasing: the kernels reinterpret 16-byte vectors as their elements, as CUDA code does.
    flags = ["-std=c++20", "-O2", "-pthread", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]
    (work / "probe.cpp").write_text(_PROBE)
    if subprocess.run([cxx, *flags, str(work / "probe.cpp"), "-o", str(work / "probe")],
                      capture_output=True).returncode != 0:
        skip_unless_required("the C++ compiler lacks C++20 <barrier> / _Float16")
    cu = _ROOT / "csrc" / "cuda" / "moe"
    (work / "route_host.inc").write_text(_as_host_code((cu / "moe_route_kernels.cu").read_text()))
    (work / "experts_host.inc").write_text(_as_host_code((cu / "moe_experts_kernels.cu").read_text()))
    exe = work / "harness"
    res = subprocess.run(
        [cxx, *flags, "-Wall", "-Werror=return-type", f"-I{_ROOT / 'csrc'}", f"-I{_EMU}", f"-I{work}",
         str(_EMU / "harness.cpp"), "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr[-5000:]
    return exe


def _run(exe, mode, tmp_path, blobs, smem_optin=None):
    with open(tmp_path / "in.bin", "wb") as f:
        for b in blobs:
            f.write(b)
    env = dict(os.environ)
    env.pop("LATENTMOE_EMU_SMEM_OPTIN", None)
    if smem_optin is not None:
        env["LATENTMOE_EMU_SMEM_OPTIN"] = str(smem_optin)
    res = subprocess.run([str(exe), mode, str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    return (tmp_path / "out.bin").read_bytes()


def _i64(*v):
    return np.array(v, dtype=np.int64).tobytes()


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def test_harness_builds(harness):
    assert harness.exists()


# ---- routing -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "T,E,K,n_group,topk_group,score_func,norm,scale,bias,grad_scores,ties",
    [
        (300, 16, 4, 4, 2, "sigmoid", True, 2.5, True, True, False),   # V3-like, > 2 blocks of 128
        (129, 12, 3, 3, 2, "sigmoid", True, 1.7, True, False, False),  # T = one block + 1
        (1, 8, 2, 1, 1, "sigmoid", False, 1.0, False, True, False),    # T = 1, norm off
        (50, 10, 3, 1, 1, "softmax", False, 1.3, False, True, False),
        (40, 24, 6, 8, 3, "softmax", True, 1.0, True, True, False),
        (64, 16, 4, 4, 2, "sigmoid", True, 1.0, True, True, True),     # ties everywhere
        (33, 8, 8, 2, 2, "sigmoid", True, 1.0, False, False, True),    # K = E, all tied
        (5, 256, 8, 8, 4, "sigmoid", True, 2.5, True, True, False),    # DeepSeek-V3 sizes
    ],
)
def test_route_kernels_match_cpu(harness, tmp_path, T, E, K, n_group, topk_group, score_func, norm, scale,
                                 bias, grad_scores, ties):
    torch.manual_seed(T * 31 + E)
    logits = torch.randn(T, E)
    if ties:
        logits = torch.randint(-2, 3, (T, E)).float()  # equal logits and equal group scores
    b = None
    if bias:
        b = torch.randint(-1, 2, (E,)).float() * 0.5 if ties else torch.randn(E) * 0.3
    gw, gs = torch.randn(T, K), (torch.randn(T, E) if grad_scores else None)
    _check_route(harness, tmp_path, logits, b, gw, gs, n_group, topk_group, score_func, norm, scale)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_route_kernels_nan_logits(harness, tmp_path, score_func):
    # NaN scores are never preferred over finite ones (a NaN row still yields top_k indices).
    torch.manual_seed(5)
    T, E, K = 6, 8, 2
    logits = torch.randn(T, E)
    logits[1, 3] = logits[4, 0] = float("nan")
    logits[2] = float("nan")
    _check_route(harness, tmp_path, logits, torch.randn(E) * 0.1, torch.randn(T, K), torch.randn(T, E), 2, 1,
                 score_func, True, 1.5)


def _check_route(harness, tmp_path, logits, b, gw, gs, n_group, topk_group, score_func, norm, scale):
    (T, E), K = logits.shape, gw.shape[1]
    bias, grad_scores = b is not None, gs is not None
    head = _i64(T, E, K, n_group, topk_group, 0 if score_func == "sigmoid" else 1, int(norm), int(bias),
                int(grad_scores))
    blobs = [head, np.float32(scale).tobytes(), _raw(logits)]
    blobs += ([_raw(b)] if bias else []) + [_raw(gw)] + ([_raw(gs)] if grad_scores else [])
    raw = _run(harness, "route", tmp_path, blobs)
    w_got = torch.from_numpy(np.frombuffer(raw, np.float32, T * K).copy()).view(T, K)
    i_got = torch.from_numpy(np.frombuffer(raw, np.int64, T * K, offset=4 * T * K).copy()).view(T, K)
    rest = torch.from_numpy(np.frombuffer(raw, np.float32, offset=12 * T * K).copy())
    s_got, g_got = rest[: T * E].view(T, E), rest[T * E:].view(T, E)

    lg = logits.clone().requires_grad_()
    w, idx, s = moe_route(lg, K, n_group=n_group, topk_group=topk_group, e_score_correction_bias=b,
                          score_func=score_func, norm_topk_prob=norm, routed_scaling_factor=scale)
    assert torch.equal(i_got, idx)  # same selections, ties -> lower index, same order
    torch.testing.assert_close(s_got, s.detach(), rtol=1e-6, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(w_got, w.detach(), rtol=1e-6, atol=1e-7, equal_nan=True)
    (w * gw).sum().backward() if gs is None else ((w * gw).sum() + (s * gs).sum()).backward()
    torch.testing.assert_close(g_got, lg.grad, rtol=1e-5, atol=1e-6, equal_nan=True)


# ---- routed experts ------------------------------------------------------------------------------
_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _experts_case(T, E, K, H, I, dtype, idx=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    gu = (torch.randn(E, 2 * I, H, generator=g) * max(H, 1)**-0.5).to(dtype)
    dn = (torch.randn(E, H, I, generator=g) * I**-0.5).to(dtype)
    if idx is None and T == 0:
        idx = torch.zeros(0, K, dtype=torch.long)
    elif idx is None:
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g) + 0.1
    return x, gu, dn, w, idx


def _emulate_experts(harness, tmp_path, x, gu, dn, w, idx, misalign=0, smem_optin=None):
    T, H = x.shape
    E, I, K = gu.shape[0], gu.shape[1] // 2, idx.shape[1]
    flat = idx.reshape(-1)
    # What moe_binding.cpp does with ATen before the launch.
    sorted_ids, sorted_pairs = torch.sort(flat, stable=True)
    offsets = torch.searchsorted(sorted_ids, torch.arange(E + 1))
    pos = torch.empty_like(sorted_pairs).scatter_(0, sorted_pairs, torch.arange(flat.numel()))
    blobs = [_i64(_DT[x.dtype], T, K, E, H, I, misalign), _raw(x), _raw(sorted_pairs), _raw(offsets), _raw(pos),
             _raw(gu), _raw(dn), _raw(w.float())]
    raw = _run(harness, "experts", tmp_path, blobs, smem_optin)
    ints = np.frombuffer(raw, np.int32 if x.dtype == torch.float32 else np.int16).copy()
    vals = torch.from_numpy(ints).view(x.dtype)
    return vals[: T * H].view(T, H), vals[T * H:].view(T * K, 2 * I), sorted_pairs, offsets


def _fp64_reference(x, gu, dn, w, idx):
    """out [T, H] and the pre-activation gate|up [T, K, 2I] in fp64 from the same (rounded) inputs."""
    I = gu.shape[1] // 2
    xd, gud, dnd = x.double(), gu.double(), dn.double()
    pre = torch.einsum("th,tkoh->tko", xd, gud[idx])
    act = torch.nn.functional.silu(pre[..., :I]) * pre[..., I:]
    y = torch.einsum("tki,tkhi->tkh", act, dnd[idx])
    return (w.double()[..., None] * y).sum(1), pre


def _pattern_idx(pattern, T, K, one_expert):
    if pattern == "one":
        return torch.full((T, K), one_expert)
    if pattern == "skewed":  # K = 2, E >= 9
        return torch.stack([torch.tensor([0, 8 if t % 40 == 0 else 3]) if t % 2 else torch.tensor([3, 5])
                            for t in range(T)])
    return None


# Paths (see moe_experts_kernels.cu): S = T*K <= 64 runs the decode GEMV, larger S the tiled GEMMs.
# 16-byte vector loads need the reduction length (H for gate_up, I for down) to be a multiple of
# 4 fp32 / 8 16-bit elements and aligned operands; vector stores need N (I, H) likewise and
# aligned outputs; otherwise the kernels take their element-wise paths. `misalign` shifts buffers
# one element off 16-byte alignment (bits: 1 x, 2 gate_up, 4 down, 8 outputs and scratch).
@pytest.mark.parametrize(
    "T,E,K,H,I,pattern,misalign",
    [
        (1, 8, 2, 32, 16, "random", 0),       # T = 1 (decode GEMV), vector loads
        (1, 8, 2, 32, 16, "random", 15),      # the same with every buffer misaligned: scalar paths
        (7, 16, 4, 37, 19, "random", 0),      # decode path, odd sizes (scalar), idle experts
        (6, 5, 1, 44, 20, "one", 0),          # decode, one expert with 6 rows (row groups 4 + 2)
        (64, 6, 1, 24, 12, "one", 0),         # S = 64 on one expert: 16 row groups of the GEMV
        (16, 8, 4, 21, 17, "random", 0),      # S = 64: the largest decode batch
        (17, 8, 4, 21, 33, "random", 0),      # S = 68: the smallest tiled batch (scalar loads)
        (13, 8, 5, 24, 12, "random", 0),      # S = 65: tiled, vector loads
        (97, 12, 3, 37, 19, "random", 0),     # tiled, H / I not multiples of the tiles
        (150, 6, 1, 130, 70, "one", 0),       # every token on one expert (3 M-tiles), 5 idle experts
        (40, 9, 2, 24, 8, "skewed", 0),       # uneven: experts with 0, 1 and 60+ rows
        (90, 4, 4, 65, 67, "random", 0),      # K = E, N-tiles 2 with a 1- / 3-column tail
        (64, 8, 2, 68, 36, "random", 0),      # vector loads, 5 / 3 k-steps (k tails of 4)
        (64, 8, 2, 68, 36, "random", 1),      # x misaligned: gate_up scalar, down vector
        (64, 8, 2, 68, 36, "random", 14),     # weights and outputs misaligned
    ],
)
def test_experts_fp32_kernels_match_cpu(harness, tmp_path, T, E, K, H, I, pattern, misalign):
    idx = _pattern_idx(pattern, T, K, 4)
    x, gu, dn, w, idx = _experts_case(T, E, K, H, I, torch.float32, idx, seed=T + H)
    out, gate_up, sp, off = _emulate_experts(harness, tmp_path, x, gu, dn, w, idx, misalign)
    want_out, sp_w, off_w, want_gu = torch.ops.latentmoe.moe_experts.default(x, gu, dn, w, idx)
    assert torch.equal(sp, sp_w) and torch.equal(off, off_w)
    assert not out.isnan().any() and not gate_up.isnan().any()
    torch.testing.assert_close(gate_up, want_gu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    ref_out, _ = _fp64_reference(x, gu, dn, w, idx)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)


def _err(a, b):
    return (a.double() - b).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "T,E,K,H,I,pattern,misalign,smem_optin",
    [
        (3, 8, 2, 40, 24, "random", 0, None),       # decode GEMV in 16-bit, vector loads
        (7, 16, 4, 36, 20, "random", 0, None),      # decode, H / I not multiples of 8: scalar paths
        (6, 5, 1, 48, 24, "one", 0, None),          # decode, 6 rows of one expert (row groups 4 + 2)
        (64, 6, 1, 16, 16, "one", 0, None),         # S = 64 on one expert
        (16, 8, 4, 24, 16, "random", 0, None),      # S = 64: the largest decode batch
        (13, 8, 5, 24, 16, "random", 0, None),      # S = 65: the smallest tiled batch
        (70, 8, 2, 40, 33, "random", 0, None),      # WMMA tiles: K tail of 8, odd I (scalar down / stores)
        (130, 5, 1, 48, 80, "one", 0, None),        # one expert, 3 M-tiles (the last with 2 rows), 4 idle
        (40, 9, 2, 24, 8, "skewed", 0, None),       # experts with 0, 1 and 60+ rows
        (100, 4, 2, 264, 72, "random", 0, None),    # 5 / 2 k-steps of 64 (> 4 pipeline stages), N tails of 8
        (100, 4, 2, 264, 72, "random", 1, None),    # x misaligned: gate_up scalar loads
        (100, 4, 2, 264, 72, "random", 6, None),    # weights misaligned: scalar loads, vector stores
        (100, 4, 2, 264, 72, "random", 8, None),    # outputs / scratch misaligned: scalar stores
        (100, 4, 2, 264, 72, "random", 0, 99 * 1024),  # 99 KB per block (sm_86): 2-stage pipeline
        (100, 4, 2, 264, 72, "random", 6, 99 * 1024),  # the same on the element-wise loads
    ],
)
def test_experts_16bit_kernels_match_cpu(harness, tmp_path, dtype, T, E, K, H, I, pattern, misalign,
                                         smem_optin):
    idx = _pattern_idx(pattern, T, K, 2)
    x, gu, dn, w, idx = _experts_case(T, E, K, H, I, dtype, idx, seed=T * 7 + H)
    out, gate_up, sp, off = _emulate_experts(harness, tmp_path, x, gu, dn, w, idx, misalign, smem_optin)
    want_out, _, _, want_gu = torch.ops.latentmoe.moe_experts.default(x, gu, dn, w, idx)
    assert not out.float().isnan().any() and not gate_up.float().isnan().any()
    ref_out, ref_pre = _fp64_reference(x, gu, dn, w, idx)
    ref_gu = ref_pre.reshape(T * K, 2 * I)[sp]  # sorted pair order, as gate_up_out
    eps = 2.0 ** -10
    # The kernels' error vs fp64 is at most twice the CPU op's (same rounding points: gate|up and
    # act rounded to the dtype, fp32 accumulation) plus a small epsilon.
    assert _err(gate_up, ref_gu) <= 2 * _err(want_gu, ref_gu) + eps * ref_gu.abs().max().item()
    assert _err(out, ref_out) <= 2 * _err(want_out, ref_out) + eps * ref_out.abs().max().item()
    torch.testing.assert_close(gate_up.float(), want_gu.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), want_out.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "S,E,pattern",
    [
        (1, 8, "random"),        # T = 1, K = 1
        (6, 64, "random"),       # V2-Lite decode step (top-6 of 64)
        (300, 16, "random"),     # more pairs than threads, many ties
        (1024, 256, "random"),   # the largest batch of the one-block sort, E > threads
        (1024, 3, "one"),        # every pair on the last expert: offsets [0, 0, 0, S]
        (257, 5, "first"),       # every pair on expert 0
        (300, 9, "out_of_range"),  # unchecked call: ids < 0 and >= E land outside every expert's rows
        (64, 9, "huge"),  # ids beyond int32 (2^32 + 3 once wrapped to 3): still outside
    ],
)
def test_sort_pairs_kernel_matches_aten(harness, tmp_path, S, E, pattern):
    # The binding's small-batch sort must give what its ATen path gives (stable sort,
    # searchsorted, scatter).
    g = torch.Generator().manual_seed(S * 13 + E)
    if pattern == "one":
        ids = torch.full((S,), E - 1, dtype=torch.long)
    elif pattern == "first":
        ids = torch.zeros(S, dtype=torch.long)
    elif pattern == "out_of_range":
        ids = torch.randint(-3, E + 3, (S,), generator=g)
    elif pattern == "huge":
        ids = torch.randint(0, E, (S,), generator=g)
        ids[::3] = (1 << 32) + 3
        ids[1::7] = -(1 << 33) + 5
    else:
        ids = torch.randint(0, E, (S,), generator=g)
    raw = _run(harness, "sort", tmp_path, [_i64(S, E), _raw(ids)])
    got = torch.from_numpy(np.frombuffer(raw, np.int64).copy())
    sp, off, pos = got[:S], got[S:S + E + 1], got[S + E + 1:]
    sorted_ids, want_sp = torch.sort(ids, stable=True)
    want_off = torch.searchsorted(sorted_ids, torch.arange(E + 1))
    want_pos = torch.empty_like(want_sp).scatter_(0, want_sp, torch.arange(S))
    assert torch.equal(sp, want_sp) and torch.equal(off, want_off) and torch.equal(pos, want_pos)


@pytest.mark.parametrize("T,dtype", [(5, torch.float32), (40, torch.float32), (40, torch.bfloat16)])
def test_experts_unchecked_bad_indices_are_dropped(harness, tmp_path, T, dtype):
    """check_values=False on CUDA: indices outside [0, E) are not checked on the host. The sort
    places them outside every expert's rows, no expert kernel touches those rows (their scratch
    stays NaN-poisoned), and the combine drops them: the output is the experts' sum over the valid
    pairs only (decode GEMV at T=5, tiled GEMMs at T=40)."""
    E, K, H, I = 6, 3, 24, 16
    x, gu, dn, w, idx = _experts_case(T, E, K, H, I, dtype, seed=T)
    bad = torch.rand(T, K, generator=torch.Generator().manual_seed(1)) < 0.3
    idx = torch.where(bad, torch.where(torch.rand(T, K) < 0.5, torch.tensor(-2), torch.tensor(E + 1)), idx)
    out, _, _, off = _emulate_experts(harness, tmp_path, x, gu, dn, w, idx)
    assert off[0] == (idx < 0).sum() and off[-1] == (idx < E).sum()
    assert not out.float().isnan().any()
    ref_out, _ = _fp64_reference(x, gu, dn, w.masked_fill(bad, 0.0), idx.clamp(0, E - 1))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol * max(1.0, ref_out.abs().max().item()))


def test_experts_no_tokens(harness, tmp_path):
    x, gu, dn, w, idx = _experts_case(0, 3, 2, 8, 3, torch.float32)
    out, gate_up, _, _ = _emulate_experts(harness, tmp_path, x, gu, dn, w, idx)
    assert out.shape == (0, 8) and gate_up.shape == (0, 6)


def test_experts_no_pairs_give_zeros(harness, tmp_path):
    # k = 0 with tokens: no pairs, so the launcher returned before the combine and `out` (from
    # at::empty; the harness poisons it with NaN) was never written. The CPU op gives zeros.
    x, gu, dn, w, idx = _experts_case(3, 4, 0, 8, 4, torch.float32)
    out, _, _, _ = _emulate_experts(harness, tmp_path, x, gu, dn, w, idx)
    assert torch.equal(out, torch.zeros(3, 8))
    assert torch.equal(torch.ops.latentmoe.moe_experts.default(x, gu, dn, w, idx)[0], out)


@pytest.mark.parametrize("T,K", [(5, 2), (40, 2)])  # decode GEMV and tiled paths
def test_experts_zero_hidden_size(harness, tmp_path, T, K):
    # H = 0 is accepted by the op (out is [T, 0], gate_up_out all zero); a launch with a zero grid
    # dimension is a CUDA error, so the launcher must not issue the down GEMM / combine.
    x, gu, dn, w, idx = _experts_case(T, 6, K, 0, 5, torch.float32, seed=3)
    out, gate_up, _, _ = _emulate_experts(harness, tmp_path, x, gu, dn, w, idx)
    want_out, _, _, want_gu = torch.ops.latentmoe.moe_experts.default(x, gu, dn, w, idx)
    assert out.shape == want_out.shape == (T, 0)
    assert torch.equal(gate_up, want_gu)


# ---- the grouped path's kernels (launch_moe_swiglu / _combine / _zero_idle) ----------------------
def _from_raw(raw: bytes, dtype, shape):
    ints = np.frombuffer(raw, np.int32 if dtype == torch.float32 else np.int16).copy()
    return torch.from_numpy(ints).view(dtype).view(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,I,misalign", [(7, 16, 0), (5, 13, 0), (9, 24, 1), (1, 8, 0)])
def test_grouped_swiglu_kernel(harness, tmp_path, dtype, S, I, misalign):
    """act = silu(g) * u of the grouped forward's gate_up_out rows, in fp32 rounded to the dtype:
    vector rows (I a multiple of 16 bytes, aligned) and element rows (odd I or misaligned); every
    element written (the output starts NaN-poisoned)."""
    g = torch.Generator().manual_seed(S * 7 + I)
    gu = (torch.randn(S, 2 * I, generator=g) * 3).to(dtype)
    raw = _run(harness, "swiglu", tmp_path, [_i64(_DT[dtype], S, I, misalign), _raw(gu)])
    act = _from_raw(raw, dtype, (S, I))
    gf = gu.double()
    want = (torch.nn.functional.silu(gf[:, :I]) * gf[:, I:]).to(dtype)
    # One rounding of an fp32 value: at most one unit in the last place of the dtype apart.
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(act.double(), want.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,K,E,H,misalign", [(9, 3, 4, 16, 0), (6, 2, 3, 13, 0), (5, 4, 8, 24, 1)])
def test_grouped_combine_kernel(harness, tmp_path, dtype, T, K, E, H, misalign):
    """out[t] = sum_k w[t, k] * y[pos[t*K+k]] in fp32, k order, over the pairs whose sorted row lies in
    [offsets[0], offsets[E]): rows before and after (ids out of range, sorted aside) hold NaN and
    must not reach the output."""
    g = torch.Generator().manual_seed(T * 5 + H)
    S = T * K
    y = torch.randn(S, H, generator=g).to(dtype)
    lo, hi = 2, S - 3  # rows [0, 2) and [S-3, S) belong to no expert
    y[:lo] = float("nan")
    y[hi:] = float("nan")
    offsets = torch.linspace(lo, hi, E + 1).round().long()
    pos = torch.randperm(S, generator=g)
    w = torch.rand(S, generator=g) + 0.1
    raw = _run(harness, "combine", tmp_path,
               [_i64(_DT[dtype], T, K, E, H, misalign), _raw(y), _raw(w), _raw(pos), _raw(offsets)])
    out = _from_raw(raw, dtype, (T, H))
    kept = ((pos >= lo) & (pos < hi)).view(T, K, 1)
    terms = torch.where(kept, w.view(T, K, 1).double() * y.double()[pos].view(T, K, H), 0.0)
    want = terms.sum(1)
    assert not out.float().isnan().any()
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.double(), want.to(dtype).double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("E,bytes_per_expert,shift", [(6, 4096, 0), (5, 100, 0), (4, 64, 3), (3, 70000, 0)])
def test_zero_idle_kernel(harness, tmp_path, E, bytes_per_expert, shift):
    """Only the idle experts' slices (offsets[e+1] == offsets[e]) become zero; the others keep every
    byte. 16-byte stores (aligned, a multiple of 16 bytes) and byte stores (100 bytes, or data 3
    bytes off alignment); 70000 bytes spans several blocks per expert."""
    g = torch.Generator().manual_seed(E + bytes_per_expert)
    data = torch.randint(1, 256, (E * bytes_per_expert,), generator=g, dtype=torch.uint8)
    counts = torch.tensor([0, 3, 0, 1, 0, 2][:E])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]) + 4
    raw = _run(harness, "zero_idle", tmp_path,
               [_i64(E, bytes_per_expert, shift), data.numpy().tobytes(), _raw(offsets)])
    got = torch.from_numpy(np.frombuffer(raw, np.uint8).copy()).view(E, bytes_per_expert)
    want = data.view(E, bytes_per_expert).clone()
    want[counts == 0] = 0
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,I", [(9, 16), (6, 300)])
def test_swiglu_backward_kernel(harness, tmp_path, dtype, S, I):
    """The backward's SwiGLU step against the ATen steps it replaces (moe_host::experts_backward):
    gh = [ga * u * sig * (1 + g (1 - sig)) | ga * silu], ga = gau * w_s, and grad_w = sum gau * act
    (act rounded to the dtype). Rows outside [offsets[0], offsets[E]) hold NaN in gate_up_out and
    gau and must come out as zeros; I = 300 takes two passes of the 256-thread block."""
    g = torch.Generator().manual_seed(S + I)
    E = 3
    gu = (torch.randn(S, 2 * I, generator=g) * 2).to(dtype)
    gau = torch.randn(S, I, generator=g).to(dtype)
    w = torch.rand(S, generator=g) + 0.2
    lo, hi = 1, S - 2
    gu[:lo], gu[hi:], gau[:lo], gau[hi:] = float("nan"), float("nan"), float("nan"), float("nan")
    offsets = torch.tensor([lo, lo + 2, lo + 2, hi])
    raw = _run(harness, "swiglu_bwd", tmp_path,
               [_i64(_DT[dtype], S, E, I), _raw(gu), _raw(gau), _raw(w), _raw(offsets)])
    el = 4 if dtype == torch.float32 else 2
    gh = _from_raw(raw[: S * 2 * I * el], dtype, (S, 2 * I))
    gw = torch.from_numpy(np.frombuffer(raw[S * 2 * I * el:], np.float32).copy())
    gf, uf, af = gu[:, :I].double(), gu[:, I:].double(), gau.double()
    sig = torch.sigmoid(gf)
    ga = af * w.double()[:, None]
    want_gh = torch.cat([ga * uf * sig * (1 + gf * (1 - sig)), ga * gf * sig], 1).to(dtype)
    act = (gf * sig * uf).to(dtype).double()
    want_gw = (af * act).sum(1)
    kept = torch.zeros(S, dtype=torch.bool)
    kept[lo:hi] = True
    assert (gh[~kept] == 0).all() and (gw[~kept] == 0).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(gh[kept].double(), want_gh[kept].double(), rtol=tol, atol=tol)
    torch.testing.assert_close(gw[kept].double(), want_gw[kept], rtol=tol, atol=tol * I**0.5)
