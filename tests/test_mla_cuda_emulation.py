"""The MLA decode / append CUDA kernels (csrc/cuda/mla/mla_kernels.cu) run on the host.

tests/mla_decode_emulation/ compiles the real .cu file, kernels and host launchers alike, as C++
against a small CUDA stand-in (emu.h: every CUDA thread a fiber; real __syncthreads / warp-shuffle
barriers with divergence and deadlock detection; threads run between barriers in forward, reverse
or seeded random order; shared memory poisoned with NaN; sm_90 launch limits). Only three
constructs of the source are rewritten (shared-memory declarations and the <<<>>> launches). Every
buffer a kernel touches ends at an inaccessible page, so out-of-bounds accesses fault. Results are
compared with the CPU op (latentmoe.ops, itself tested in test_mla_decode.py /
test_mla_append_cache.py) and, for fp32 decode, the fp64 reference, on contiguous and paged caches
with NaN in every unused slot: CI without a GPU still checks the kernels' indexing, masking,
split/merge logic and launch configuration. The workspace allocation of mla_binding.cpp (torch
code) is mirrored in the harness. Not covered: timing, the hardware memory model (only the thread
orders above), device-only fast math (__expf, rsqrtf). LATENTMOE_EMU_SANITIZE=1 builds the harness
with ASan + UBSan.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cuda_emulation import as_host_code, host_compiler, skip_unless_required
from latentmoe.ops import mla_append_cache, mla_decode
from latentmoe.reference import mla as ref

_ROOT = Path(__file__).resolve().parents[1]
_EMU = Path(__file__).resolve().parent / "mla_decode_emulation"
_KERNELS = _ROOT / "csrc" / "cuda" / "mla" / "mla_kernels.cu"
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_PROBE = (
    "#include <ucontext.h>\n#include <type_traits>\n#include <concepts>\n"
    "int f(int l = __builtin_LINE()) { return l; }\n"
    "int main() { ucontext_t c; getcontext(&c); return std::is_trivially_copyable_v<float> && f() > 0 ? 0 : 1; }\n"
)
SM_COUNT = 132  # H100 / H200 SXM
_KERNEL = {"auto": 0, "cuda_cores": 1, "tensor_cores": 2}  # MlaDecodeKernel


def kernels_as_host_code(src: str) -> str:
    """mla_kernels.cu with shared-memory declarations and <<<>>> launches in emu.h's terms."""
    src, n_dyn, n_static, n_launch = as_host_code(src)
    # Fail loudly when the kernel file changes shape under the rewrite.
    assert n_dyn >= 2 and n_launch >= 3, (n_dyn, n_static, n_launch)
    return src


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = host_compiler()
    work = tmp_path_factory.mktemp("mla_decode_emulation")
    flags = ["-std=c++20", "-O2", "-Wno-unknown-pragmas"]
    if os.environ.get("LATENTMOE_EMU_SANITIZE") == "1":  # opt-in: slower build (~30 s), ASan + UBSan
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-g"]
    (work / "probe.cpp").write_text(_PROBE)
    probe = subprocess.run(
        [cxx, *flags, str(work / "probe.cpp"), "-o", str(work / "probe")], check=False, capture_output=True
    )
    if probe.returncode != 0 or subprocess.run([str(work / "probe")], check=False).returncode != 0:
        skip_unless_required("the C++ compiler lacks C++20 or <ucontext.h>")
    (work / "mla_kernels_host.inc").write_text(kernels_as_host_code(_KERNELS.read_text()))
    exe = work / "harness"
    res = subprocess.run(
        [
            cxx,
            *flags,
            "-Wall",
            f"-I{_ROOT / 'csrc'}",
            f"-I{_EMU / 'cuda_headers'}",
            f"-I{_EMU}",
            f"-I{work}",
            str(_EMU / "harness.cpp"),
            "-o",
            str(exe),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return exe


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    return (t if t.dtype == torch.float32 else t.view(torch.int16)).numpy().tobytes()


def _span(t: torch.Tensor) -> torch.Tensor:
    """The elements a [B, S, n] tensor with unit-stride rows reaches, flat from its first: (B - 1)
    sb + (S - 1) ss + n of them (a strided slice's gaps included, as the kernel indexes them)."""
    B, S, n = t.shape
    sb, ss, _ = t.stride()
    return t.as_strided(((B - 1) * sb + (S - 1) * ss + n,), (1,))


def _from_raw(buf: bytes, dtype, shape) -> torch.Tensor:
    np_dtype = np.float32 if dtype == torch.float32 else np.int16
    t = torch.from_numpy(np.frombuffer(buf, dtype=np_dtype).copy())
    return (t if dtype == torch.float32 else t.view(dtype)).view(shape)


def _run(exe, mode, payload: bytes, tmp_path, order):
    (tmp_path / "in.bin").write_bytes(payload)
    res = subprocess.run(
        [str(exe), mode, str(tmp_path / "in.bin"), str(tmp_path / "out.bin"), str(order)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    launches = [
        tuple(int(v) for v in ln.split()[1:]) for ln in res.stdout.splitlines() if ln.startswith("launch")
    ]
    return (tmp_path / "out.bin").read_bytes(), launches


def paged(cache: torch.Tensor, page_size: int, seed: int):
    """Contiguous [B, L, D] -> randomly permuted pages (NaN in unused slots/pages), block_table."""
    B, L, D = cache.shape
    max_pages = -(-L // page_size)
    n_pages = B * max_pages + 3
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(n_pages, generator=g)[: B * max_pages].view(B, max_pages).to(torch.int32)
    pages = torch.full((n_pages, page_size, D), float("nan"), dtype=cache.dtype)
    for b in range(B):
        for t in range(L):
            pages[table[b, t // page_size], t % page_size] = cache[b, t]
    return pages, table


def emulated_decode(
    exe,
    tmp_path,
    q_latent,
    q_pe,
    kv,
    seqlens,
    table,
    scale,
    causal,
    window,
    pe_cache=None,
    n_splits=0,
    order=0,
    max_seqlen=-1,
    kernel="auto",
):
    B, Sq, H, C = q_latent.shape
    R = q_pe.shape[-1]
    is_paged = table is not None
    head = [
        _DTYPES[q_latent.dtype],
        B,
        Sq,
        H,
        C,
        R,
        int(is_paged),
        kv.shape[1],
        kv.shape[0] if is_paged else 0,
        table.shape[1] if is_paged else 0,
        int(causal),
        window,
        int(pe_cache is not None),
        SM_COUNT,
        n_splits,
        max_seqlen,
        _KERNEL[kernel],
    ]
    payload = np.array(head, dtype=np.int64).tobytes() + np.float32(scale).tobytes()
    payload += _raw(q_latent) + _raw(q_pe) + _raw(kv) + (b"" if pe_cache is None else _raw(pe_cache))
    payload += seqlens.numpy().astype(np.int32).tobytes()
    if is_paged:
        payload += table.numpy().astype(np.int32).tobytes()
    buf, launches = _run(exe, "decode", payload, tmp_path, order)
    used = int(np.frombuffer(buf[:8], dtype=np.int64)[0])
    n_out = B * Sq * H * C * q_latent.element_size()
    out = _from_raw(buf[8 : 8 + n_out], q_latent.dtype, (B, Sq, H, C))
    lse = _from_raw(buf[8 + n_out :], torch.float32, (B, Sq, H))
    return out, lse, used, launches


def decode_problem(B, Sq, H, C, R, seqlens, cap, page_size, pe_split, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q_latent = torch.randn(B, Sq, H, C, generator=g).to(dtype)
    q_pe = torch.randn(B, Sq, H, R, generator=g).to(dtype)
    cache = torch.randn(B, cap, C + R, generator=g)
    for b, L in enumerate(seqlens):
        cache[b, L:] = float("nan")
    cache = cache.to(dtype)
    table = None
    if page_size:
        cache, table = paged(cache, page_size, seed)
    pe_cache = None
    if pe_split:
        pe_cache = cache[..., C:].contiguous()
        cache = cache[..., :C].contiguous()
    return q_latent, q_pe, cache, torch.tensor(seqlens, dtype=torch.int32), table, pe_cache


V3 = {"C": 512, "R": 64}
SMALL = {"C": 48, "R": 16}
# (B, Sq, H, dims, seqlens, capacity, page_size, causal, window, pe_split, n_splits override)
DECODE_CASES = {
    "contig_zero_len_row": (3, 1, 3, SMALL, [37, 0, 5], 40, 0, True, -1, False, 0),
    "contig_sq2_h1_two_splits": (3, 2, 1, SMALL, [300, 2, 1], 300, 0, True, -1, False, 0),
    "contig_h9_many_splits": (2, 1, 9, SMALL, [1100, 700], 1100, 0, True, -1, False, 0),
    "contig_sq2_h9_window": (2, 2, 9, SMALL, [90, 3], 95, 0, True, 5, False, 0),
    "contig_window0_noncausal": (2, 2, 3, SMALL, [40, 1], 41, 0, False, 0, False, 0),
    "contig_window_noncausal_7splits": (2, 2, 3, SMALL, [100, 64], 100, 0, False, 9, False, 7),
    "paged1": (2, 2, 3, SMALL, [20, 1], 21, 1, True, -1, False, 0),
    "paged16_zero_row": (3, 1, 9, SMALL, [40, 0, 16], 48, 16, True, -1, False, 0),
    "paged17_sq2_splits": (2, 2, 3, SMALL, [600, 17], 612, 17, True, -1, False, 0),
    "paged64_window": (2, 2, 1, SMALL, [130, 64], 192, 64, True, 70, False, 3),
    "pe_cache_contig": (2, 2, 3, SMALL, [50, 7], 50, 0, True, -1, True, 2),
    "pe_cache_paged17": (2, 1, 3, SMALL, [70, 0], 85, 17, True, -1, True, 0),
    "v3_contig_sq2": (2, 2, 3, V3, [520, 33], 600, 0, True, -1, False, 0),
    "v3_paged16_h1": (2, 1, 1, V3, [45, 9], 64, 16, True, -1, False, 0),
    # The last row fills its cache: one key too far runs off the end of the buffer / block table.
    "contig_full_last_row": (2, 2, 3, SMALL, [10, 40], 40, 0, True, -1, False, 0),
    "paged16_full_last_row": (2, 1, 3, SMALL, [5, 48], 48, 16, True, -1, False, 0),
    "pe_cache_paged16_full": (2, 1, 3, SMALL, [5, 48], 48, 16, True, -1, True, 2),
    "c1040_cpt8_paged17": (1, 2, 9, {"C": 1040, "R": 16}, [300], 306, 17, True, -1, False, 0),
    "c300_no_rope": (2, 1, 3, {"C": 300, "R": 0}, [70, 12], 70, 0, True, -1, False, 3),
    # Large caches holding short rows: the splits follow the longest row, not the capacity.
    "contig_big_capacity_short_rows": (2, 1, 3, SMALL, [300, 40], 4000, 0, True, -1, False, 0),
    "paged17_big_capacity_short_rows": (2, 2, 3, SMALL, [20, 530], 17 * 300, 17, True, -1, False, 0),
    # mla_prefill's absorbed path (forced in fp32): a chunk of query tokens, some before the row.
    "prefill_chunk_sq24_h5_short_row": (2, 24, 5, SMALL, [150, 10], 150, 0, True, -1, False, 0),
}


def _random_cases(n, seed=1234):
    """Small seeded random configurations on top of the hand-picked ones."""
    rng = np.random.default_rng(seed)
    cases = {}
    for i in range(n):
        B, Sq, H = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 10))
        C, R = int(rng.integers(8, 90)), int(rng.choice([0, 4, 16]))
        cap = int(rng.integers(1, 140))
        page = int(rng.choice([0, 1, 5, 16, 17]))
        lens = [int(v) for v in rng.integers(0, cap + 1, size=B)]
        lens[int(rng.integers(0, B))] = cap  # one row full
        window = int(rng.choice([-1, -1, 0, 3, 20]))
        cases[f"random{i}"] = (
            B,
            Sq,
            H,
            {"C": C, "R": R},
            lens,
            cap,
            page,
            bool(rng.integers(0, 2)),
            window,
            bool(rng.integers(0, 2)),
            int(rng.choice([0, 0, 1, 2, 5, 9])),
        )
    return cases


DECODE_CASES.update(_random_cases(8))


def split_smem_bytes(C, R, elt, staged):
    """Dynamic shared memory of the split kernel (as mla_kernels.cu lays it out): transposed
    query and key tiles, partial scores, probabilities, plus the raw staging tile when the rows
    come in by async 16-byte copies."""
    D, rpb = C + R, (16 if C <= 512 else 8)
    nw = 16 if rpb == 16 else 8  # warps: 512 or 256 threads
    slt = -(-D // (4 * nw)) * (4 * nw)
    base = 4 * (slt * rpb + slt * 36 + nw * rpb * 32 + 32 * rpb + -(-rpb // 4) * 4) + 16 * rpb  # + int64 ranges
    ds = -(-D // (16 // elt)) * (16 // elt)
    while (ds * elt // 4) % 32 != 4:
        ds += 16 // elt
    return base + (-(-(32 * ds * elt) // 16) * 16 if staged else 0)


def expect_staged(C, R, elt, cache_rows, pe_split):
    """The launcher stages rows by async copies when every row segment and row start is 16-byte
    aligned. The harness ends each buffer flush against a page, so a buffer starts 16-byte aligned
    when its size is a multiple of 16."""
    kv_stride, pe_stride = (C, R) if pe_split else (C + R, C + R)
    kv_ok = (cache_rows * kv_stride * elt) % 16 == 0
    pe_ok = (cache_rows * R * elt) % 16 == 0 if pe_split else kv_ok and (C * elt) % 16 == 0
    segs = all(v * elt % 16 == 0 for v in (C, R, kv_stride, pe_stride))
    return segs and kv_ok and pe_ok and split_smem_bytes(C, R, elt, True) <= 232448


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode_matches_cpu_op_fp32(harness, tmp_path, name):
    order = [0, 1, 100 + len(name)][list(DECODE_CASES).index(name) % 3]  # forward / reverse / random
    B, Sq, H, dims, seqlens, cap, page_size, causal, window, pe_split, n_splits = DECODE_CASES[name]
    C, R = dims["C"], dims["R"]
    q_latent, q_pe, kv, lens, table, pe_cache = decode_problem(
        B, Sq, H, C, R, seqlens, cap, page_size, pe_split, torch.float32, seed=len(name)
    )
    scale = 1 / math.sqrt(192)
    out, lse, used, launches = emulated_decode(
        harness, tmp_path, q_latent, q_pe, kv, lens, table, scale, causal, window, pe_cache, n_splits, order
    )
    want_o, want_l = mla_decode(
        q_latent, q_pe, kv, lens, scale, block_table=table, causal=causal, window=window, pe_cache=pe_cache
    )
    # Launch configuration: split kernel (n_splits, row groups of 16 (C <= 512, 512 threads) or 8
    # (256 threads), B),
    # merge (B*rows, column chunks of 32) x 256 (8 groups of 32 columns).
    rpb = 16 if C <= 512 else 8
    assert used == (n_splits or used) and used >= 1
    if not n_splits:  # the policy: at most one split per 32 keys of the longest row, at most one wave
        assert used == max(1, min(-(-max(seqlens) // 32), SM_COUNT // (B * -(-(Sq * H) // rpb))))
    assert launches[0][:4] == (used, -(-(Sq * H) // rpb), B, 512 if rpb == 16 else 256)
    if used == 1:  # one split writes out and lse itself
        assert len(launches) == 1
    else:
        assert launches[1][:4] == (B * Sq * H, -(-C // 32), 1, 256)
    cache_rows = kv.shape[0] * kv.shape[1]
    staged = expect_staged(C, R, 4, cache_rows, pe_split)
    assert launches[0][4] == split_smem_bytes(C, R, 4, staged)
    assert not out.isnan().any() and not lse.isnan().any(), "NaN reached the output"
    empty = torch.isinf(want_l)
    assert torch.equal(torch.isinf(lse), empty) and torch.all(lse[empty] < 0)
    assert torch.all(out[empty] == 0)
    torch.testing.assert_close(lse[~empty], want_l[~empty], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, want_o, rtol=1e-5, atol=1e-5 * max(1.0, want_o.abs().max().item()))
    # And against the pure-PyTorch reference in fp64 (independent masking / paging code).
    full = kv if pe_cache is None else torch.cat([kv, pe_cache], -1)
    ref_o, ref_l = ref.mla_decode(
        q_latent.double(),
        q_pe.double(),
        full.double(),
        lens,
        scale,
        block_table=table,
        causal=causal,
        window=window,
    )
    assert torch.equal(torch.isinf(ref_l), empty)
    torch.testing.assert_close(lse[~empty].double(), ref_l[~empty].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref_o, rtol=1e-4, atol=1e-4 * max(1.0, ref_o.abs().max().item()))


def test_decode_cases_cover_both_load_paths():
    """Some cases stage cache rows by async copies, others (odd widths) load them directly."""
    staged = []
    for B, _, _, dims, _, cap, page_size, _, _, pe_split, _ in DECODE_CASES.values():
        cache_rows = B * cap if not page_size else (B * -(-cap // page_size) + 3) * page_size
        staged.append(expect_staged(dims["C"], dims["R"], 4, cache_rows, pe_split))
    assert any(staged) and not all(staged)


def test_decode_splits_exercised(harness, tmp_path):
    """The launcher's split policy gives several splits on a long cache (not one big block)."""
    B, Sq, H, dims, seqlens, cap, *_ = DECODE_CASES["contig_h9_many_splits"]
    q_latent, q_pe, kv, lens, _, _ = decode_problem(
        B, Sq, H, dims["C"], dims["R"], seqlens, cap, 0, False, torch.float32, seed=3
    )
    *_, used, _ = emulated_decode(harness, tmp_path, q_latent, q_pe, kv, lens, None, 0.1, True, -1)
    assert used == min(SM_COUNT // 2, -(-1100 // 32)) == 35


@pytest.mark.parametrize("name", ["paged17_sq2_splits", "contig_sq2_h9_window", "v3_paged16_h1"])
def test_decode_thread_order_independent(harness, tmp_path, name):
    """Same result (bitwise) whether the threads of each block run forward, in reverse or in random
    order between barriers: a missing __syncthreads would make some order read poisoned or stale
    shared memory."""
    B, Sq, H, dims, seqlens, cap, page_size, causal, window, pe_split, n_splits = DECODE_CASES[name]
    args = decode_problem(
        B, Sq, H, dims["C"], dims["R"], seqlens, cap, page_size, pe_split, torch.float32, seed=5
    )
    q_latent, q_pe, kv, lens, table, pe_cache = args
    runs = [
        emulated_decode(
            harness,
            tmp_path,
            q_latent,
            q_pe,
            kv,
            lens,
            table,
            0.07,
            causal,
            window,
            pe_cache,
            n_splits,
            order=o,
        )
        for o in (0, 1, 77)
    ]
    assert not runs[0][0].isnan().any()
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["paged17_sq2_splits", "pe_cache_contig", "v3_contig_sq2"])
def test_decode_low_precision(harness, tmp_path, dtype, name):
    B, Sq, H, dims, seqlens, cap, page_size, causal, window, pe_split, n_splits = DECODE_CASES[name]
    q_latent, q_pe, kv, lens, table, pe_cache = decode_problem(
        B, Sq, H, dims["C"], dims["R"], seqlens, cap, page_size, pe_split, dtype, seed=11
    )
    scale = 1 / math.sqrt(192)
    out, lse, _, _ = emulated_decode(
        harness, tmp_path, q_latent, q_pe, kv, lens, table, scale, causal, window, pe_cache, n_splits
    )
    want_o, want_l = mla_decode(
        q_latent, q_pe, kv, lens, scale, block_table=table, causal=causal, window=window, pe_cache=pe_cache
    )
    assert out.dtype == dtype and not out.isnan().any()
    empty = torch.isinf(want_l)
    assert torch.equal(torch.isinf(lse), empty)
    torch.testing.assert_close(lse[~empty], want_l[~empty], rtol=1e-5, atol=1e-5)
    # Same fp32 math, different summation order: at most one rounding step of the output dtype apart.
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(
        out.float(), want_o.float(), rtol=ulp, atol=ulp * want_o.float().abs().max().item()
    )


# ---- tensor-core split kernel (bf16 / fp16; csrc/cuda/common/mma.cuh emulated by emu.h) ----------


def mma_smem_bytes(C, R, mt):
    """Dynamic shared memory of the tensor-core split kernel (as mla_kernels.cu lays it out): 3 key
    buffers of 32 rows and the query rows (SW = round_up(D, 16) / 2 + 4 words each), fp32 scores,
    16-bit probabilities, alpha / m / l floats and the int64 key ranges of its 16 * mt rows."""
    sw = -(-(C + R) // 16) * 16 // 2 + 4
    rb = 16 * mt
    kparts = {1: 4, 2: 2}.get(mt, 1)  # score partial sums over parts of D
    return 4 * (3 * 32 * sw + rb * sw + kparts * rb * 36) + 2 * rb * 40 + 12 * rb + 16 * rb


def mma_tiles(rows):
    return min(4, -(-rows // 16))


# (B, Sq, H, dims, seqlens, capacity, page_size, causal, window, pe_split, n_splits override):
# every m-tile count (rows 16 / 18 / 48 / 34 / 128), many splits, a padded D (C=40, R=16: D=56 -> 64), pages of
# 1 and 17 with NaN in unused slots, zero-length rows, MTP causal rows with a window, a separate
# pe cache, a single split (out / lse written by the split kernel), full last rows.
MMA_CASES = {
    "v3_h16_one_mtile_splits": (1, 1, 16, V3, [700], 700, 0, True, -1, False, 0),
    "h9_sq2_two_mtiles_paged17_zero_row": (2, 2, 9, SMALL, [300, 0], 306, 17, True, -1, False, 0),
    "h3_sq16_three_mtiles_window": (1, 16, 3, SMALL, [200], 200, 0, True, 7, False, 4),
    "h17_sq2_padded_d_paged16": (2, 2, 17, {"C": 40, "R": 16}, [45, 1], 48, 16, False, 0, False, 0),
    "h128_four_mtiles_paged1": (1, 1, 128, {"C": 64, "R": 16}, [70], 70, 1, True, -1, False, 2),
    "h5_pe_cache_single_split": (2, 1, 5, SMALL, [33, 5], 40, 0, True, -1, True, 1),
    "v3_h8_sq2_full_row_pe_cache": (2, 2, 8, V3, [64, 100], 100, 0, True, -1, True, 0),
    # 94 splits: every merge thread group (splits in turns of 8 over 8 groups) has work.
    "h16_many_splits": (1, 1, 16, {"C": 32, "R": 16}, [3000], 3000, 0, True, -1, False, 0),
    # 8 tiles through the 3 key buffers of one split; C = 72: 9 output n-tiles over 8 warps.
    "c72_one_split_eight_tiles": (1, 1, 16, {"C": 72, "R": 8}, [250], 250, 0, True, -1, False, 1),
    # More than 64 rows, not a multiple of 64, over several splits (row blocks of 64 and 6 / 35).
    "h70_paged16_three_splits": (2, 1, 70, SMALL, [150, 90], 150, 16, True, -1, False, 3),
    "sq3_h33_c504_window_policy": (1, 3, 33, {"C": 504, "R": 8}, [120], 120, 0, True, 20, False, 0),
    # 40 rows: one block of 3 m-tiles, so the policy's wave wants 132 splits (63 by length), not 44.
    "h40_policy_long": (1, 1, 40, SMALL, [2000], 2000, 0, True, -1, False, 0),
    # As mla_prefill's absorbed path calls it: a chunk of many query tokens, each row block holding
    # 4 tokens x 16 heads with their own causal ranges (16 blocks); rows cut below S, so the first
    # queries of a row sit at negative positions (no key), with a window and a paged cache.
    "prefill_chunk_sq64_h16": (1, 64, 16, SMALL, [200], 200, 0, True, -1, False, 0),
    "prefill_short_rows_sq48_h5_window_paged": (2, 48, 5, SMALL, [30, 48], 48, 16, True, 9, False, 0),
}


def _random_mma_cases(n, seed=4321):
    """Seeded random configurations the tensor-core kernel takes (C, R multiples of 8)."""
    rng = np.random.default_rng(seed)
    cases = {}
    for i in range(n):
        B, Sq, H = int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(1, 40))
        C, R = 8 * int(rng.integers(1, 12)), 8 * int(rng.integers(0, 4))
        cap = int(rng.integers(1, 200))
        lens = [int(v) for v in rng.integers(0, cap + 1, size=B)]
        lens[int(rng.integers(0, B))] = cap
        cases[f"random_mma{i}"] = (
            B, Sq, H, {"C": C, "R": R}, lens, cap, int(rng.choice([0, 1, 7, 16])), bool(rng.integers(0, 2)),
            int(rng.choice([-1, -1, 0, 5, 33])), bool(rng.integers(0, 2)), int(rng.choice([0, 0, 1, 3])),
        )
    return cases


MMA_CASES.update(_random_mma_cases(8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(MMA_CASES))
def test_decode_tensor_cores_match_reference(harness, tmp_path, dtype, name):
    B, Sq, H, dims, seqlens, cap, page_size, causal, window, pe_split, n_splits = MMA_CASES[name]
    C, R = dims["C"], dims["R"]
    q_latent, q_pe, kv, lens, table, pe_cache = decode_problem(
        B, Sq, H, C, R, seqlens, cap, page_size, pe_split, dtype, seed=len(name) + 7
    )
    scale = 1 / math.sqrt(192)
    order = 0 if dtype == torch.bfloat16 else 1 + len(name)  # forward, or a random thread order
    out, lse, used, launches = emulated_decode(
        harness, tmp_path, q_latent, q_pe, kv, lens, table, scale, causal, window, pe_cache, n_splits, order
    )
    mt, rows = mma_tiles(Sq * H), Sq * H
    assert launches[0] == (used, -(-rows // (16 * mt)), B, 256, mma_smem_bytes(C, R, mt), 0)
    assert len(launches) == (1 if used == 1 else 2)
    if used > 1:
        assert launches[1][:4] == (B * rows, -(-C // 32), 1, 256)
    if name == "h16_many_splits":
        assert used == 94
    if not n_splits:  # the policy counts the tensor-core kernel's blocks of 16 * mt rows
        blocks = B * -(-rows // (16 * mt))
        assert used == max(1, min(SM_COUNT // blocks, -(-max(seqlens) // 32), 1024))
    assert out.dtype == dtype and not out.isnan().any() and not lse.isnan().any()
    want_o, want_l = mla_decode(
        q_latent, q_pe, kv, lens, scale, block_table=table, causal=causal, window=window, pe_cache=pe_cache
    )
    empty = torch.isinf(want_l)
    assert torch.equal(torch.isinf(lse), empty) and torch.all(lse[empty] < 0)
    assert torch.all(out[empty] == 0)
    # Scores are exact products of the 16-bit inputs summed in fp32: lse as the CPU op's.
    torch.testing.assert_close(lse[~empty], want_l[~empty], rtol=1e-5, atol=1e-5)
    # The probabilities enter P V rounded to the 16-bit type (half an ulp each), the output is
    # rounded once more: within about two ulps of the largest output.
    ulp = torch.finfo(dtype).eps
    full = kv if pe_cache is None else torch.cat([kv, pe_cache], -1)
    ref_o, _ = ref.mla_decode(
        q_latent.double(), q_pe.double(), full.double(), lens, scale, block_table=table, causal=causal, window=window
    )
    tol = 2 * ulp * ref_o.abs().max().item()
    torch.testing.assert_close(out.double(), ref_o, rtol=ulp, atol=tol)
    torch.testing.assert_close(out.float(), want_o.float(), rtol=ulp, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_tensor_cores_peaked_softmax(harness, tmp_path, dtype):
    """Large queries (x30): scores of several hundred, a sharply peaked softmax. Scores stay fp32
    (the 16-bit queries are never scaled before the product), so the result matches the CPU op."""
    q_latent, q_pe, kv, lens, table, pe_cache = decode_problem(
        2, 2, 9, 48, 16, [200, 77], 200, 16, False, dtype, seed=13
    )
    q_latent, q_pe = (q_latent.float() * 30).to(dtype), (q_pe.float() * 30).to(dtype)
    out, lse, _, launches = emulated_decode(harness, tmp_path, q_latent, q_pe, kv, lens, table, 0.125, True, -1)
    assert launches[0][3] == 256 and not out.isnan().any() and not out.isinf().any()
    want_o, want_l = mla_decode(q_latent, q_pe, kv, lens, 0.125, block_table=table)
    torch.testing.assert_close(lse, want_l, rtol=1e-5, atol=1e-4)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), want_o.float(), rtol=ulp, atol=2 * ulp * want_o.float().abs().max().item())


def test_decode_kernel_choice(harness, tmp_path):
    """Auto picks tensor cores for bf16 / fp16 with C, R multiples of 8 and the CUDA-core kernel
    for fp32 or other widths; forcing either works where it applies, and forcing tensor cores
    where they do not is an error (no silent fallback)."""
    args = decode_problem(2, 1, 9, 48, 16, [90, 40], 90, 0, False, torch.bfloat16, seed=2)
    q_latent, q_pe, kv, lens, table, pe_cache = args
    run = lambda kernel, *a: emulated_decode(  # noqa: E731
        harness, tmp_path, *a, lens, table, 0.1, True, -1, pe_cache, 2, kernel=kernel
    )
    out_tc, lse_tc, _, l_tc = run("auto", q_latent, q_pe, kv)
    out_cc, lse_cc, _, l_cc = run("cuda_cores", q_latent, q_pe, kv)
    assert l_tc[0][3] == 256 and l_tc[0][4] == mma_smem_bytes(48, 16, 1)
    assert l_cc[0][3] == 512 and l_cc[0][4] != l_tc[0][4]
    ulp = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(lse_tc, lse_cc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_tc.float(), out_cc.float(), rtol=ulp, atol=2 * ulp * out_cc.abs().max().item())
    # fp32: CUDA cores under auto; tensor cores refused.
    q32, p32, kv32 = q_latent.float(), q_pe.float(), kv.float()
    assert run("auto", q32, p32, kv32)[3][0][3] == 512
    with pytest.raises(AssertionError, match="launch_mla_decode returned 1"):
        run("tensor_cores", q32, p32, kv32)
    # C not a multiple of 8: CUDA cores under auto; tensor cores refused.
    odd = decode_problem(2, 1, 9, 44, 16, [90, 40], 90, 0, False, torch.bfloat16, seed=2)
    assert run("auto", *odd[:3])[3][0][3] == 512
    with pytest.raises(AssertionError, match="launch_mla_decode returned 1"):
        run("tensor_cores", *odd[:3])


def test_decode_tensor_cores_thread_order_independent(harness, tmp_path):
    B, Sq, H, dims, seqlens, cap, page_size, causal, window, pe_split, n_splits = MMA_CASES[
        "h9_sq2_two_mtiles_paged17_zero_row"
    ]
    args = decode_problem(B, Sq, H, dims["C"], dims["R"], seqlens, cap, page_size, pe_split, torch.bfloat16, 9)
    q_latent, q_pe, kv, lens, table, pe_cache = args
    runs = [
        emulated_decode(harness, tmp_path, q_latent, q_pe, kv, lens, table, 0.1, causal, window, pe_cache, 3, o)
        for o in (0, 1, 55)
    ]
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])


def _selftest(exe, which):
    return subprocess.run(
        [str(exe), "selftest", which], check=False, capture_output=True, text=True, timeout=60
    )


def test_emulator_reports_defects(harness):
    """The CUDA stand-in itself: divergent / skipped __syncthreads are errors, a missing barrier
    exposes poisoned shared memory, shuffles reduce over the warp, launch limits are enforced."""
    for which in ("divergent", "early_exit"):
        res = _selftest(harness, which)
        assert res.returncode == 3 and "emulation error" in res.stderr, (which, res.stderr)
    race = _selftest(harness, "race").stdout.split("\n")[0].split()
    # Forward order: thread 2k reads thread 2k+1, which has not run yet (poison); odd ones are fine.
    assert all(("nan" in v) == (t % 2 == 0) for t, v in enumerate(race)), race
    shuffle = _selftest(harness, "shuffle").stdout.split("\n")[0].split()
    assert shuffle == ["496"] * 64
    for which in ("too_much_smem", "big_grid"):  # > 48 KiB without cudaFuncSetAttribute; grid.y > 65535
        assert _selftest(harness, which).stdout.split("\n")[1] != "err 0", which


def test_emulated_bf16_fp16_conversions_match_torch(harness, tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.randn(20000, generator=g) * torch.logspace(-9, 6, 20000),  # subnormal fp16 ... overflow
            torch.randint(-(2**31), 2**31 - 1, (20000,), generator=g, dtype=torch.int64)
            .to(torch.int32)
            .view(torch.float32),
            torch.tensor(
                [
                    0.0,
                    -0.0,
                    65504.0,
                    65519.99,
                    65520.0,
                    2.0**-24,
                    2.0**-25,
                    3 * 2.0**-26,
                    float("inf"),
                    -float("inf"),
                    1 + 2.0**-8,
                    1 + 3 * 2.0**-8,
                    1 + 2.0**-11,
                    1 + 3 * 2.0**-11,
                ]
            ),
        ]
    )
    (tmp_path / "x.bin").write_bytes(x.numpy().tobytes())
    res = subprocess.run(
        [str(harness), "convert", str(tmp_path / "x.bin"), str(tmp_path / "y.bin"), "0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    buf = (tmp_path / "y.bin").read_bytes()
    n = x.numel()
    parts = [(buf[: 2 * n], torch.bfloat16), (buf[2 * n : 4 * n], torch.float16)]
    live = ~x.isnan()  # NaN payloads may differ; NaN-ness may not
    for raw, dtype in parts:
        got = _from_raw(raw, dtype, (n,))
        want = x.to(dtype)
        assert torch.equal(got.isnan(), x.isnan())
        assert torch.equal(got[live].view(torch.int16), want[live].view(torch.int16)), dtype
    back_b = _from_raw(buf[4 * n : 8 * n], torch.float32, (n,))
    back_h = _from_raw(buf[8 * n :], torch.float32, (n,))
    assert torch.equal(back_b[live], x[live].to(torch.bfloat16).float())
    assert torch.equal(back_h[live], x[live].to(torch.float16).float())


# ---- append -------------------------------------------------------------------------------------


def emulated_append(exe, tmp_path, cache, latent, k_pe, w, eps, cos, sin, lens, table, interleave, order=0):
    B, S, C = latent.shape
    R = k_pe.shape[-1]
    is_paged = table is not None
    head = [
        _DTYPES[latent.dtype],
        B,
        S,
        C,
        R,
        int(is_paged),
        cache.shape[1],
        cache.shape[0] if is_paged else 0,
        table.shape[1] if is_paged else 0,
        int(interleave),
        *latent.stride()[:2],
        *k_pe.stride()[:2],
    ]
    payload = np.array(head, dtype=np.int64).tobytes() + np.float32(eps).tobytes()
    for t in (cache, _span(latent), _span(k_pe), w, cos, sin):
        payload += _raw(t)
    payload += lens.numpy().astype(np.int32).tobytes()
    if is_paged:
        payload += table.numpy().astype(np.int32).tobytes()
    buf, launches = _run(exe, "append", payload, tmp_path, order)
    assert launches == [(B * S, 1, 1, 128, 0, 32 * 4)]  # no dynamic shared memory: any R
    return _from_raw(buf, cache.dtype, tuple(cache.shape))


# (B, S, dims, seqlens already cached, capacity, page_size, interleave)
APPEND_CASES = {
    "contig_s1": (3, 1, SMALL, [0, 7, 39], 40, 0, True),
    "contig_s3_rotate_half": (2, 3, SMALL, [5, 0], 9, 0, False),
    "paged1_s2": (2, 2, SMALL, [3, 0], 6, 1, True),
    "paged16_s3": (3, 3, SMALL, [14, 0, 29], 32, 16, False),
    "paged17_s2": (2, 2, SMALL, [16, 32], 34, 17, True),
    "paged64_s1": (2, 1, SMALL, [63, 0], 64, 64, False),
    "v3_paged16_s2": (2, 2, V3, [15, 3], 32, 16, True),
    "v3_contig_s1": (2, 1, V3, [4, 0], 8, 0, False),
    "fills_last_slot": (2, 2, SMALL, [3, 30], 32, 16, True),
}


def append_problem(B, S, C, R, seqlens, cap, page_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(B, cap, C + R, generator=g)
    for b, L in enumerate(seqlens):
        cache[b, L:] = float("nan")  # the slots to be written and everything after them
    table = None
    if page_size:
        cache, table = paged(cache, page_size, seed)
    latent = torch.randn(B, S, C, generator=g) * 3
    k_pe = torch.randn(B, S, R, generator=g)
    w = torch.rand(C, generator=g) + 0.5
    ang = torch.rand(B, S, R // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    cast = lambda t: t.to(dtype)
    return (
        cast(cache),
        cast(latent),
        cast(k_pe),
        cast(w),
        cast(cos),
        cast(sin),
        torch.tensor(seqlens, dtype=torch.int32),
        table,
    )


def _target_mask(cache, lens, S, table):
    """True at the cache rows the append writes (slots lens[b] + s)."""
    mask = torch.zeros(cache.shape[:-1], dtype=torch.bool)
    for b, L in enumerate(lens.tolist()):
        for t in range(L, L + S):
            if table is None:
                mask[b, t] = True
            else:
                ps = cache.shape[1]
                mask[table[b, t // ps], t % ps] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(APPEND_CASES))
def test_append_matches_cpu_op_and_writes_only_targets(harness, tmp_path, name, dtype):
    B, S, dims, seqlens, cap, page_size, interleave = APPEND_CASES[name]
    C, R = dims["C"], dims["R"]
    cache, latent, k_pe, w, cos, sin, lens, table = append_problem(
        B, S, C, R, seqlens, cap, page_size, dtype, seed=len(name)
    )
    eps = 1e-6
    got = emulated_append(harness, tmp_path, cache, latent, k_pe, w, eps, cos, sin, lens, table, interleave)
    want = cache.clone()
    mla_append_cache(
        want, latent, k_pe, w, eps, cos, sin, lens, block_table=table, rope_interleave=interleave
    )
    target = _target_mask(cache, lens, S, table)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    # Everything else untouched, bit for bit (NaN poison included).
    assert torch.equal(got[~target].view(bits), cache[~target].view(bits))
    assert not got[target].isnan().any()
    if dtype == torch.float32:
        torch.testing.assert_close(got[target], want[target], rtol=1e-6, atol=1e-6)
    else:  # the block reduction sums in another order: at most one rounding step apart
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(got[target].float(), want[target].float(), rtol=ulp, atol=ulp)


@pytest.mark.parametrize("interleave", [True, False])
def test_append_any_rope_dim(harness, tmp_path, interleave):
    # R = 4096: a staging buffer of 4 R floats (64 KiB) in shared memory was over the 48 KiB a
    # launch gets without opting in, and the launch failed.
    B, S, C, R = 1, 2, 24, 4096
    cache, latent, k_pe, w, cos, sin, lens, table = append_problem(
        B, S, C, R, [3], 8, 0, torch.float32, seed=11
    )
    got = emulated_append(harness, tmp_path, cache, latent, k_pe, w, 1e-6, cos, sin, lens, table, interleave)
    want = cache.clone()
    mla_append_cache(want, latent, k_pe, w, 1e-6, cos, sin, lens, block_table=table, rope_interleave=interleave)
    target = _target_mask(cache, lens, S, table)
    assert torch.equal(got[~target].view(torch.int32), cache[~target].view(torch.int32))
    torch.testing.assert_close(got[target], want[target], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_strided_rows(harness, tmp_path, dtype):
    """kv_latent / k_pe as the two slices of one [B, S, C + R + 2] tensor (the module's kv_a output,
    read in place), with NaN in the gaps: the kernel reads only the rows, at their strides (the
    harness's buffers end at the last row: a read past it faults), as the CPU op does."""
    B, S, dims, seqlens, cap, page_size, interleave = APPEND_CASES["paged17_s2"]
    C, R = dims["C"], dims["R"]
    cache, latent, k_pe, w, cos, sin, lens, table = append_problem(
        B, S, C, R, seqlens, cap, page_size, dtype, seed=5
    )
    kv = torch.full((B, S, C + R + 2), float("nan"), dtype=dtype)
    kv[..., :C], kv[..., C:C + R] = latent, k_pe
    lat_s, pe_s = kv[..., :C], kv[..., C:C + R]
    got = emulated_append(harness, tmp_path, cache, lat_s, pe_s, w, 1e-6, cos, sin, lens, table, interleave)
    want = emulated_append(harness, tmp_path, cache, latent, k_pe, w, 1e-6, cos, sin, lens, table, interleave)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(bits), want.view(bits))
    cpu = cache.clone()
    mla_append_cache(cpu, lat_s, pe_s, w, 1e-6, cos, sin, lens, block_table=table, rope_interleave=interleave)
    target = _target_mask(cache, lens, S, table)
    assert not got[target].isnan().any()
    ulp = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(got[target].float(), cpu[target].float(), rtol=ulp, atol=ulp)


def test_append_thread_order_independent(harness, tmp_path):
    B, S, dims, seqlens, cap, page_size, interleave = APPEND_CASES["paged17_s2"]
    args = append_problem(B, S, dims["C"], dims["R"], seqlens, cap, page_size, torch.float32, seed=2)
    cache, latent, k_pe, w, cos, sin, lens, table = args
    a = emulated_append(
        harness, tmp_path, cache, latent, k_pe, w, 1e-6, cos, sin, lens, table, interleave, order=0
    )
    for order in (1, 91):
        b = emulated_append(
            harness, tmp_path, cache, latent, k_pe, w, 1e-6, cos, sin, lens, table, interleave, order=order
        )
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


# ---- unchecked calls (mla_decode max_seqlen >= 0, mla_append_cache check_values=False) ----------
# No host copy of the lengths / table: the CUDA kernels must keep every access inside the buffers
# whatever the values (the harness's guard pages fault on any stray access), and with good values
# give what the checked CPU op gives.


def test_decode_unchecked_good_values_match_checked(harness, tmp_path):
    B, Sq, H, C, R, seqlens, cap, page = 3, 2, 3, 48, 16, [70, 0, 33], 85, 17
    f32 = torch.float32
    q_latent, q_pe, kv, lens, table, _ = decode_problem(B, Sq, H, C, R, seqlens, cap, page, False, f32, 5)
    want_o, want_l = mla_decode(q_latent, q_pe, kv, lens, 0.2, block_table=table)
    for bound in (70, 85):  # the longest row, or the capacity
        out, lse, used, _ = emulated_decode(
            harness, tmp_path, q_latent, q_pe, kv, lens, table, 0.2, True, -1, max_seqlen=bound
        )
        assert used <= max(1, -(-bound // 32))
        torch.testing.assert_close(out, want_o, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, want_l, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # CUDA-core / tensor-core kernel
def test_decode_unchecked_bad_values_stay_in_bounds(harness, tmp_path, dtype):
    B, Sq, H, C, R, cap, page = 3, 1, 3, 48, 16, 68, 17
    q_latent, q_pe, kv, lens, table, _ = decode_problem(B, Sq, H, C, R, [68, 5, 20], cap, page, False, dtype, 6)
    bad_lens = torch.tensor([10**6, -7, 20], dtype=torch.int32)  # past the capacity, negative, fine
    bad_table = table.clone()
    bad_table[0, 1], bad_table[0, 3], bad_table[1, 0] = 10**6, -3, 2**31 - 1
    out, lse, _, launches = emulated_decode(
        harness, tmp_path, q_latent, q_pe, kv, bad_lens, bad_table, 0.2, True, -1, max_seqlen=cap
    )
    assert launches[0][3] == (512 if dtype == torch.float32 else 256)
    # Row 1 (negative length) is empty; row 2's values are good and its result is the checked one.
    assert torch.all(out[1] == 0) and torch.all(lse[1] == -math.inf)
    want_o, want_l = mla_decode(q_latent[2:], q_pe[2:], kv, lens[2:], 0.2, block_table=table[2:])
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(out[2:].float(), want_o.float(), rtol=tol, atol=tol * want_o.float().abs().max().item())
    torch.testing.assert_close(lse[2:], want_l, rtol=1e-5, atol=1e-5)


def test_decode_unchecked_bound_below_a_row_cuts_it(harness, tmp_path):
    # A max_seqlen below a row's length (a broken caller contract) cuts the row there: the result is
    # attention over the first max_seqlen keys, never a read past them.
    B, Sq, H, C, R = 1, 1, 3, 48, 16
    q_latent, q_pe, kv, lens, table, _ = decode_problem(B, Sq, H, C, R, [300], 300, 0, False, torch.float, 7)
    out, lse, _, _ = emulated_decode(
        harness, tmp_path, q_latent, q_pe, kv, lens, table, 0.2, False, -1, max_seqlen=100
    )
    want_o, want_l = mla_decode(q_latent, q_pe, kv, torch.tensor([100], dtype=torch.int32), 0.2, causal=False)
    torch.testing.assert_close(out, want_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_l, rtol=1e-5, atol=1e-5)


def test_append_without_host_check_skips_slots_outside_the_cache(harness, tmp_path):
    # Row 0's second token would land past the capacity: it is skipped, the first is written; row 1
    # is written as the checked CPU op writes it; nothing else changes.
    B, S, C, R, cap = 2, 2, 48, 16, 32
    cache, latent, k_pe, w, cos, sin, lens, _ = append_problem(B, S, C, R, [31, 3], cap, 0, torch.float32, 8)
    got = emulated_append(harness, tmp_path, cache, latent, k_pe, w, 1e-6, cos, sin, lens, None, True)
    want = cache.clone()
    mla_append_cache(want[1:], latent[1:], k_pe[1:], w, 1e-6, cos[1:], sin[1:], lens[1:])
    one = cache[:1].clone()
    mla_append_cache(one, latent[:1, :1], k_pe[:1, :1], w, 1e-6, cos[:1, :1], sin[:1, :1], lens[:1])
    want[0] = one[0]
    bits = lambda t: t.view(torch.int32)  # noqa: E731  (NaN poison compared bit for bit)
    assert torch.equal(bits(got[0, :31]), bits(cache[0, :31]))
    torch.testing.assert_close(got[0, 31], want[0, 31], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1, 3:5], want[1, 3:5], rtol=1e-6, atol=1e-6)
    assert torch.equal(bits(got[1, :3]), bits(cache[1, :3]))
    assert torch.equal(bits(got[1, 5:]), bits(cache[1, 5:]))


def test_append_without_host_check_bad_table_stays_in_bounds(harness, tmp_path):
    B, S, C, R, cap, page = 2, 3, 48, 16, 34, 17
    f32 = torch.float32
    cache, latent, k_pe, w, cos, sin, lens, table = append_problem(B, S, C, R, [15, 0], cap, page, f32, 9)
    bad = table.clone()
    bad[0, 0], bad[0, 1], bad[1, 0] = -1, 10**6, 2**31 - 1
    got = emulated_append(harness, tmp_path, cache, latent, k_pe, w, 1e-6, cos, sin, lens, bad, True)
    assert got.shape == cache.shape  # ran to completion: every write stayed inside the page pool
