"""Index arithmetic past 2^31 elements (CPU kernels).

Serving-size tensors exceed 2^31 elements: a paged bf16 latent cache of 4M tokens x 576 values is
2.4e9 elements, a contiguous [64, 64K, 576] cache 2.4e9, an MoE gate_up_proj [256, 4096, 7168]
7.5e9. Any element offset computed in 32-bit int there wraps and reads or writes the wrong row.

These tests allocate such tensors with torch.empty (virtual memory: pages are only committed when
written), write only the few pages / rows / experts a call reads, place them at the top of the
tensor (offsets > 2^31), and check every result two ways:
  * bitwise against the same op on a compact copy holding the same data at small offsets (same
    shapes per call, same work split, so any difference is an addressing error), and
  * against latentmoe.reference within the usual tolerances.
Each test touches well under 1 GiB (linear_small reads ~4.3 GB of never-written, zero-mapped
pages) and runs in a few seconds. A test skips when the machine refuses the virtual allocation.
LATENTMOE_SKIP_LARGE_INDEX=1 skips the module (e.g. under a tight address-space ulimit).

All of these pass today: they guard the int64 index paths of the CPU kernels reviewed for 32-bit
overflow (csrc/cpu/*, csrc/common/*). The CUDA kernels share the index helpers of csrc/common.
"""

from __future__ import annotations

import os

import pytest
import torch

from latentmoe.ops import linear_small, mla_append_cache, mla_decode, mla_prefill, moe_experts
from latentmoe.reference import mla as ref_mla
from latentmoe.reference import moe as ref_moe
from latentmoe.reference import norm as ref_norm
from test_mla_decode import check_close

pytestmark = pytest.mark.skipif(
    os.environ.get("LATENTMOE_SKIP_LARGE_INDEX") == "1", reason="LATENTMOE_SKIP_LARGE_INDEX=1"
)

TWO31 = 2**31
C, R = 512, 64  # DeepSeek-V3 kv_lora_rank, rope dim
D = C + R


def huge(shape, dtype) -> torch.Tensor:
    """torch.empty of a tensor beyond 2^31 elements (never written here: no memory committed)."""
    n = 1
    for s in shape:
        n *= s
    assert n > TWO31, shape
    try:
        return torch.empty(shape, dtype=dtype)
    except (RuntimeError, MemoryError) as e:  # overcommit refused, address-space limit, ...
        pytest.skip(f"cannot reserve {n * torch.empty(0, dtype=dtype).element_size() / 2**30:.1f} GiB: {e}")


def randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def exact(a: torch.Tensor, b: torch.Tensor):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# ---- paged caches: compact pool <-> huge pool ---------------------------------------------------


def paged_pair(g, num_pages, page_size, table_big, dtype, last_dim=D):
    """The same pages twice: a compact pool (page i = i-th distinct page of `table_big`) and a huge
    pool of `num_pages` pages holding them at their `table_big` numbers (top of the pool)."""
    ids = sorted({int(v) for v in table_big.flatten().tolist()})
    remap = {p: i for i, p in enumerate(ids)}
    table_small = table_big.clone().apply_(lambda v: remap[v])
    small = randn(g, len(ids), page_size, last_dim, dtype=dtype)
    big = huge((num_pages, page_size, last_dim), dtype)
    for p, i in remap.items():
        big[p] = small[i]
    return small, big, table_small


@pytest.mark.parametrize(
    "dtype,pe_split", [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)]
)
def test_mla_decode_paged_pool_over_2g(dtype, pe_split):
    # 70000 pages x 64 tokens x 576 = 2.58e9 elements (c_kv alone 2.29e9 with a separate pe_cache).
    # fp32 pages of >= 32 tokens are read in place (decode_item's in_place path), 16-bit ones widened.
    g = torch.Generator().manual_seed(0)
    P, ps = 70000, 64
    assert P * ps * C > TWO31
    table_big = torch.tensor([[P - 1, 5, P - 2], [P - 3, P - 4, 0]], dtype=torch.int32)
    lens = torch.tensor([150, 128], dtype=torch.int32)
    B, Sq, H = 2, 2, 16
    small, big, table_small = paged_pair(g, P, ps, table_big, dtype)
    q = randn(g, B, Sq, H, C, dtype=dtype)
    qp = randn(g, B, Sq, H, R, dtype=dtype)
    scale = 0.06
    if pe_split:
        kv_big = huge((P, ps, C), dtype)
        pe_big = torch.empty((P, ps, R), dtype=dtype)
        for p in {int(v) for v in table_big.flatten().tolist()}:
            kv_big[p] = big[p, :, :C]
            pe_big[p] = big[p, :, C:]
        del big
        got = mla_decode(q, qp, kv_big, lens, scale, block_table=table_big, pe_cache=pe_big)
        small_kv, small_pe = small[..., :C].contiguous(), small[..., C:].contiguous()
        same = mla_decode(q, qp, small_kv, lens, scale, block_table=table_small, pe_cache=small_pe)
    else:
        got = mla_decode(q, qp, big, lens, scale, block_table=table_big)
        same = mla_decode(q, qp, small, lens, scale, block_table=table_small)
    exact(got[0], same[0])
    exact(got[1], same[1])
    want = ref_mla.mla_decode(q, qp, small, lens, scale, block_table=table_small)
    if dtype == torch.float32:
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    else:  # (bf16 rows in place: weighted sums on bf16-rounded weights) test_mla_decode's rule
        check_close(got[0], got[1], q, qp, small, lens, table_small, scale, True, -1)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


# ---- contiguous caches: [B, Lmax, C+R] with B * Lmax * 576 > 2^31 -------------------------------


def contiguous_pair(g, B, lmax, lens, keep, dtype):
    """A huge [B, lmax, D] cache whose rows hold data only in their last `keep` valid tokens, and a
    compact [B, keep, D] cache with those tokens (row b's lengths cut to min(lens[b], keep))."""
    small = randn(g, B, keep, D, dtype=dtype)
    big = huge((B, lmax, D), dtype)
    lens_small = []
    for b, L in enumerate(lens):
        n = min(L, keep)
        big[b, L - n : L] = small[b, :n]
        lens_small.append(n)
    return small, big, torch.tensor(lens_small, dtype=torch.int32)


def test_mla_decode_contiguous_cache_over_2g():
    # [64, 65536, 576] bf16 = 2.4e9 elements; the windowed queries read only the last keys of each
    # row, so the compact cache (last 64 tokens per row, same relative positions) gives the same keys.
    g = torch.Generator().manual_seed(1)
    B, lmax, Sq, H, window, keep = 64, 65536, 2, 8, 40, 64
    assert B * lmax * D > TWO31
    lens = [3 + b for b in range(B)]
    lens[63], lens[62], lens[40] = lmax, lmax - 1000, 60000
    dtype = torch.bfloat16
    small, big, lens_small = contiguous_pair(g, B, lmax, lens, keep, dtype)
    q = randn(g, B, Sq, H, C, dtype=dtype)
    qp = randn(g, B, Sq, H, R, dtype=dtype)
    lens_big = torch.tensor(lens, dtype=torch.int32)
    got = mla_decode(q, qp, big, lens_big, 0.06, window=window)
    same = mla_decode(q, qp, small, lens_small, 0.06, window=window)
    exact(got[0], same[0])
    exact(got[1], same[1])
    rows = torch.tensor([0, 40, 62, 63])  # the reference on the rows past 2^31 (and row 0)
    want = ref_mla.mla_decode(q[rows], qp[rows], small[rows], lens_small[rows], 0.06, window=window)
    # (bf16 rows in place: weighted sums on bf16-rounded weights) test_mla_decode's rule
    check_close(got[0][rows], got[1][rows], q[rows], qp[rows], small[rows], lens_small[rows], None, 0.06, True, window)
    torch.testing.assert_close(got[1][rows], want[1], rtol=1e-5, atol=1e-5)


# ---- mla_append_cache writes past 2^31 ----------------------------------------------------------


def append_inputs(g, B, S, dtype):
    latent = randn(g, B, S, C, dtype=dtype, scale=3.0)
    k_pe = randn(g, B, S, R, dtype=dtype)
    w = (1 + 0.3 * torch.randn(C, generator=g)).to(dtype)
    ang = torch.rand(B, S, R // 2, generator=g) * 6.0
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype)
    return latent, k_pe, w, cos, sin


def expected_rows(latent, k_pe, w, cos, sin, interleave):
    c = ref_norm.rms_norm(latent, w, 1e-6)
    # RoPE in fp32, rounded once (as the kernels; HF's bf16 op order differs by an ulp here and there).
    k = ref_mla.apply_rope(k_pe[:, :, None].float(), cos.float(), sin.float(), interleave)[:, :, 0]
    return torch.cat([c, k.to(c.dtype)], -1)


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_mla_append_cache_over_2g(layout, interleave):
    g = torch.Generator().manual_seed(2)
    dtype = torch.bfloat16
    B, S = 2, 3
    latent, k_pe, w, cos, sin = append_inputs(g, B, S, dtype)
    if layout == "paged":
        P, ps = 65536, 64  # 2.4e9 elements
        # Row 0 writes tokens 62..64 (pages P-1 and P-2), row 1 tokens 0..2 (page P-3).
        table = torch.tensor([[0, P - 1, P - 2], [P - 3, 1, 2]], dtype=torch.int32)
        lens = torch.tensor([126, 0], dtype=torch.int32)
        cache = huge((P, ps, D), dtype)
        slots = [
            [(int(table[b, (int(lens[b]) + s) // ps]), (int(lens[b]) + s) % ps) for s in range(S)] for b in range(B)
        ]
        for p in {int(v) for v in table.flatten().tolist()}:
            cache[p] = float("nan")
        small_pool = torch.full((8, ps, D), float("nan"), dtype=dtype)
        small_table = table.clone().apply_(lambda v: {0: 0, P - 1: 1, P - 2: 2, P - 3: 3, 1: 4, 2: 5}[v])
        mla_append_cache(small_pool, latent, k_pe, w, 1e-6, cos, sin, lens, small_table, interleave)
        small_rows = [[small_pool[int(small_table[b, (int(lens[b]) + s) // ps]), (int(lens[b]) + s) % ps]
                       for s in range(S)] for b in range(B)]
        mla_append_cache(cache, latent, k_pe, w, 1e-6, cos, sin, lens, table, interleave)
    else:
        Bc, lmax = 64, 65536  # 2.4e9 elements; rows 62 and 63 of the batch take the writes
        lens = torch.tensor([65530, 65000], dtype=torch.int32)
        cache = huge((Bc, lmax, D), dtype)
        rows = [62, 63]
        slots = [[(rows[b], int(lens[b]) + s) for s in range(S)] for b in range(B)]
        for b in range(B):
            cache[rows[b], int(lens[b]) - 1 : int(lens[b]) + S + 1] = float("nan")
        # Run on a [B, lmax] view of the two rows at the top: same element offsets in the rows,
        # absolute offsets past 2^31 (row 62 starts at 2.34e9).
        view = cache[62:64]
        assert view.is_contiguous() and view.storage_offset() > TWO31
        small_cache = torch.full((B, 8, D), float("nan"), dtype=dtype)
        small_lens = torch.tensor([1, 1], dtype=torch.int32)
        mla_append_cache(small_cache, latent, k_pe, w, 1e-6, cos, sin, small_lens, None, interleave)
        small_rows = [[small_cache[b, 1 + s] for s in range(S)] for b in range(B)]
        mla_append_cache(view, latent, k_pe, w, 1e-6, cos, sin, lens, None, interleave)
    want = expected_rows(latent, k_pe, w, cos, sin, interleave)
    for b in range(B):
        for s in range(S):
            got = cache[slots[b][s]]
            exact(got, small_rows[b][s])
            torch.testing.assert_close(got, want[b, s])
    # The slots around the written ones were left alone (NaN sentinels).
    if layout == "paged":  # row 0 wrote P-1 slots 62-63 and P-2 slot 0; row 1 P-3 slots 0-2
        assert torch.isnan(cache[P - 1, 61]).all()
        assert torch.isnan(cache[P - 2, 1]).all()
        assert torch.isnan(cache[P - 3, 3]).all()
    else:
        for b in range(B):
            L = int(lens[b])
            assert torch.isnan(cache[rows[b], L - 1]).all() and torch.isnan(cache[rows[b], L + S]).all()


def test_mla_append_cache_contiguous_full_tensor_over_2g():
    # The cache tensor itself (not a view) with its last batch row written near its end.
    g = torch.Generator().manual_seed(3)
    dtype = torch.bfloat16
    Bc, lmax, S = 64, 65536, 2
    latent, k_pe, w, cos, sin = append_inputs(g, Bc, S, dtype)
    cache = huge((Bc, lmax, D), dtype)
    lens = torch.zeros(Bc, dtype=torch.int32)
    lens[63] = lmax - S  # the last two slots of the tensor
    lens[31] = 40000
    mla_append_cache(cache, latent, k_pe, w, 1e-6, cos, sin, lens, None, True)
    want = expected_rows(latent, k_pe, w, cos, sin, True)
    for b in (0, 31, 63):
        L = int(lens[b])
        torch.testing.assert_close(cache[b, L : L + S], want[b])


# ---- mla_prefill forward (kernel and absorbed paths) ---------------------------------------------


@pytest.mark.parametrize("path", ["kernel", "absorbed"])
@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_mla_prefill_over_2g(monkeypatch, layout, path):
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_FORWARD", path)
    g = torch.Generator().manual_seed(4)
    dtype = torch.bfloat16
    B, S, H, Dn, Dv = 2, 3, 2, 16, 16
    q_nope = randn(g, B, S, H, Dn, dtype=dtype)
    q_pe = randn(g, B, S, H, R, dtype=dtype)
    w_uk = randn(g, H, Dn, C, dtype=dtype, scale=0.05)
    w_uv = randn(g, H, Dv, C, dtype=dtype, scale=0.05)
    scale = 0.1
    if layout == "paged":
        P, ps = 65536, 64
        table_big = torch.tensor([[P - 1, 9, P - 2], [P - 3, P - 4, 0]], dtype=torch.int32)
        lens = torch.tensor([140, 100], dtype=torch.int32)
        small, big, table_small = paged_pair(g, P, ps, table_big, dtype)
        got = mla_prefill(q_nope, q_pe, big, lens, w_uk, w_uv, scale, block_table=table_big)
        same = mla_prefill(q_nope, q_pe, small, lens, w_uk, w_uv, scale, block_table=table_small)
        rows = ref_mla.gather_paged(small, table_small, int(lens.max()))
        want = ref_mla.mla_naive(
            q_nope, q_pe, rows[..., :C], rows[..., C:], w_uk, w_uv, scale, cache_seqlens=lens
        )
        window = -1
    else:
        Bc, lmax, keep, window = 64, 65536, 48, 30
        lens_all = [5] * Bc
        lens_all[62], lens_all[63] = 60000, lmax
        small_all, big_all, lens_small_all = contiguous_pair(g, Bc, lmax, lens_all, keep, dtype)
        big, small = big_all[62:64], small_all[62:64]  # the two rows at the top of the tensor
        assert big.storage_offset() > TWO31
        lens, lens_small = torch.tensor(lens_all[62:], dtype=torch.int32), lens_small_all[62:].clone()
        got = mla_prefill(q_nope, q_pe, big, lens, w_uk, w_uv, scale, window=window)
        same = mla_prefill(q_nope, q_pe, small, lens_small, w_uk, w_uv, scale, window=window)
        want = ref_mla.mla_naive(
            q_nope, q_pe, small[..., :C], small[..., C:], w_uk, w_uv, scale,
            cache_seqlens=lens_small, window=window,
        )
        # And the whole tensor (batch of 64) for the kernel path: rows 62 / 63 as above.
        if path == "kernel":
            qn_all = torch.zeros(Bc, S, H, Dn, dtype=dtype)
            qp_all = torch.zeros(Bc, S, H, R, dtype=dtype)
            qn_all[62:], qp_all[62:] = q_nope, q_pe
            full = mla_prefill(
                qn_all, qp_all, big_all, torch.tensor(lens_all, dtype=torch.int32), w_uk, w_uv, scale,
                window=window,
            )
            exact(full[0][62:], same[0])
            exact(full[1][62:], same[1])
    exact(got[0], same[0])
    exact(got[1], same[1])
    torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1], want[1], rtol=1e-3, atol=1e-3)


# ---- moe_experts with expert weights past 2^31 ---------------------------------------------------


@pytest.mark.parametrize(
    "dtype,env",
    [
        (torch.bfloat16, {}),
        (torch.bfloat16, {"LATENTMOE_CPU_LOWP_GEMM": "native"}),
        (torch.bfloat16, {"LATENTMOE_CPU_ISA": "generic"}),
        (torch.float32, {}),
    ],
)
def test_moe_experts_weights_over_2g(monkeypatch, dtype, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # fixes which experts take the large / concurrent / small paths
    try:
        g = torch.Generator().manual_seed(5)
        if dtype == torch.float32:
            E, I, H = 1100, 512, 2048  # gate_up [1100, 1024, 2048] = 2.3e9 fp32 elements
        else:
            E, I, H = 2100, 512, 2048  # gate_up 4.4e9, down [2100, 2048, 512] = 2.2e9 elements
        assert E * 2 * I * H > TWO31
        # T = 40 tokens, top-2: expert A gets 40 rows (a "large" expert at 2 threads: its GEMMs
        # multi-threaded), Bx and Cx 12 each and L_ 13 (concurrent, one thread each), S_ 3 rows
        # (the weight-streaming small path). All but L_ sit past 2^31 elements of gate_up_proj.
        A, Bx, Cx, S_, L_ = E - 1, E - 2, E - 3, E - 10, 1
        assert S_ * 2 * I * H > TWO31
        T = 40
        idx = torch.empty(T, 2, dtype=torch.long)
        idx[:, 0] = A
        idx[0:12, 1], idx[12:24, 1], idx[24:27, 1], idx[27:, 1] = Bx, Cx, S_, L_
        used = [L_, S_, Cx, Bx, A]
        remap = {e: i for i, e in enumerate(used)}
        gu_small = randn(g, len(used), 2 * I, H, dtype=dtype, scale=H**-0.5)
        dn_small = randn(g, len(used), H, I, dtype=dtype, scale=I**-0.5)
        gu = huge((E, 2 * I, H), dtype)
        dn = torch.empty((E, H, I), dtype=dtype)
        for e, i in remap.items():
            gu[e] = gu_small[i]
            dn[e] = dn_small[i]
        x = randn(g, T, H, dtype=dtype)
        wts = torch.rand(T, 2, generator=g)
        idx_small = idx.clone().apply_(lambda v: remap[v])
        # The raw op: out, sorted_pairs, expert_offsets, gate_up_out (the pairs' sorted order is the
        # same for both: the remap keeps the experts' order).
        got = torch.ops.latentmoe.moe_experts.default(x, gu, dn, wts, idx, True)
        same = torch.ops.latentmoe.moe_experts.default(x, gu_small, dn_small, wts, idx_small, True)
        exact(got[0], same[0])
        exact(got[1], same[1])
        exact(got[2][torch.tensor(used + [E])], same[2])
        exact(got[3], same[3])
        assert torch.equal(moe_experts(x, gu, dn, wts, idx), got[0])
        want = ref_moe.swiglu_experts(x, gu_small, dn_small, wts, idx_small)
        tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
        torch.testing.assert_close(got[0], want, **tol)
    finally:
        torch.set_num_threads(threads)


# ---- linear_small with a weight past 2^31 elements -----------------------------------------------


def test_linear_small_weight_over_2g():
    # weight [262208, 8192] bf16 = 2.15e9 elements. The op reads every row; only the first and last
    # rows are written (the rest are never-written pages, read as the zero page: no memory used).
    g = torch.Generator().manual_seed(6)
    N, K, M = 262144 + 64, 8192, 2
    assert N * K > TWO31
    w = huge((N, K), torch.bfloat16)
    top = randn(g, 64, K, dtype=torch.bfloat16)
    low = randn(g, 4, K, dtype=torch.bfloat16)
    w[N - 64 :] = top
    w[:4] = low
    x = randn(g, M, K, dtype=torch.bfloat16)
    out = linear_small(x, w)
    exact(out[:, N - 64 :], linear_small(x, top))
    exact(out[:, :4], linear_small(x, low))
    torch.testing.assert_close(out[:, N - 64 :], torch.nn.functional.linear(x.float(), top.float()).to(torch.bfloat16))


# ---- the CUDA kernels, host-emulated, past 2^31 elements -----------------------------------------
# The repository's emulation harnesses (tests/mla_decode_emulation/emu.h, tests/mla_prefill_emulation/
# shim.h) run the real .cu kernels on the host. The programs below give them caches reserved with
# mmap(MAP_NORESERVE) beyond 2^31 elements (only the used pages are ever written) and compare every
# output with the same launch on a compact copy of those pages. A few seconds of compile + run each.

_MLA_DECODE_BIG = r"""
#include <sys/mman.h>
#include <random>
#include <vector>
#include "emu.h"
#include "mla_kernels_host.inc"
using namespace latentmoe;
using namespace latentmoe::cuda;

static uint16_t bf(float f) { return __float2bfloat16(f).bits; }
static uint16_t* sparse(size_t n) {
  void* p = mmap(nullptr, n * 2, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) { std::printf("SKIP mmap\n"); std::exit(0); }
  return static_cast<uint16_t*>(p);
}
struct Out { std::vector<uint16_t> o; std::vector<float> l; };

int main() {
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  const int64_t C = 512, R = 64, D = C + R, P = 70000, ps = 64, B = 2, Sq = 1, H = 8, maxp = 3;
  static_assert(P * ps * D > (int64_t{1} << 31), "past 2^31 elements");
  uint16_t* big = sparse(size_t(P) * ps * D);  // 2.58e9 bf16 elements
  int32_t tb[6] = {int32_t(P - 1), 5, int32_t(P - 2), int32_t(P - 3), int32_t(P - 4), 0};
  int32_t ts[6] = {0, 1, 2, 3, 4, 5};
  std::vector<uint16_t> small(6 * ps * D);
  for (auto& v : small) v = bf(nd(rng));
  for (int i = 0; i < 6; ++i) std::memcpy(big + size_t(tb[i]) * ps * D, small.data() + size_t(i) * ps * D, ps * D * 2);
  int32_t lens[2] = {150, 128};
  std::vector<uint16_t> q(B * Sq * H * C), qp(B * Sq * H * R);
  for (auto& v : q) v = bf(nd(rng));
  for (auto& v : qp) v = bf(nd(rng));
  auto decode = [&](int kernel, const uint16_t* kv, const int32_t* table, int64_t num_pages) {
    const int64_t rows = Sq * H;
    Out r;
    r.o.assign(B * rows * C, 0xFFFF);
    r.l.assign(B * rows, NAN);
    MlaDecodeArgs a{};
    a.q_latent = q.data(); a.q_pe = qp.data(); a.kv_cache = kv; a.pe_src = kv + C;
    a.kv_stride = a.pe_stride = D;
    a.seqlens = lens; a.block_table = table; a.out = r.o.data(); a.lse = r.l.data();
    a.B = B; a.Sq = Sq; a.H = H; a.C = C; a.R = R;
    a.lmax = 0; a.page_size = ps; a.max_pages = maxp; a.num_pages = num_pages; a.capacity = maxp * ps;
    a.max_seqlen = 150; a.scale = 0.06f; a.causal = true; a.window = -1; a.kernel = kernel;
    const int64_t ns = mla_decode_num_splits(DType::kBFloat16, a, 132);
    std::vector<float> acc(B * ns * rows * C), pm(B * ns * rows), pl(B * ns * rows);
    a.part_acc = acc.data(); a.part_m = pm.data(); a.part_l = pl.data(); a.n_splits = ns;
    if (launch_mla_decode(DType::kBFloat16, a, nullptr) != cudaSuccess) emu::fail("decode launch");
    return r;
  };
  int fails = 0;
  for (int kernel : {kDecodeCudaCores, kDecodeTensorCores}) {
    Out x = decode(kernel, big, tb, P), y = decode(kernel, small.data(), ts, 6);
    const bool ok = x.o == y.o && std::memcmp(x.l.data(), y.l.data(), x.l.size() * 4) == 0 && x.l[0] == x.l[0];
    std::printf("decode kernel %d: %s\n", kernel, ok ? "same" : "DIFFERENT");
    fails += !ok;
  }
  // append: row 0 writes tokens 126..128 (pages P-2 and, across the boundary, table entry 2 = P-2 / slot 0
  // of the third page), row 1 tokens 0..2 (page P-3)
  const int64_t S = 3;
  int32_t alens[2] = {126, 0};
  std::vector<uint16_t> lat(B * S * C), kpe(B * S * R), w(C), cs(B * S * R), sn(B * S * R);
  for (auto& v : lat) v = bf(3 * nd(rng));
  for (auto& v : kpe) v = bf(nd(rng));
  for (auto& v : w) v = bf(1 + 0.3f * nd(rng));
  for (size_t i = 0; i < cs.size(); ++i) { const float t = nd(rng); cs[i] = bf(std::cos(t)); sn[i] = bf(std::sin(t)); }
  auto append = [&](uint16_t* cache, const int32_t* table, int64_t np) {
    MlaAppendArgs a{};
    a.kv_cache = cache; a.kv_latent = lat.data(); a.k_pe = kpe.data(); a.norm_weight = w.data();
    a.cos = cs.data(); a.sin = sn.data(); a.seqlens = alens; a.block_table = table;
    a.B = B; a.S = S; a.C = C; a.R = R; a.lmax = 0; a.page_size = ps; a.max_pages = maxp;
    a.latent_sb = S * C; a.latent_ss = C; a.pe_sb = S * R; a.pe_ss = R;
    a.num_pages = np; a.capacity = maxp * ps; a.eps = 1e-6f; a.interleave = true;
    if (launch_mla_append_cache(DType::kBFloat16, a, nullptr) != cudaSuccess) emu::fail("append launch");
  };
  append(big, tb, P);
  append(small.data(), ts, 6);
  bool ok = true;
  for (int i = 0; i < 6; ++i)
    ok &= std::memcmp(big + size_t(tb[i]) * ps * D, small.data() + size_t(i) * ps * D, ps * D * 2) == 0;
  std::printf("append: %s\n", ok ? "same" : "DIFFERENT");
  fails += !ok;
  std::printf("%s\n", fails ? "FAILURES" : "ALL OK");
  return fails;
}
"""

_MLA_PREFILL_BIG = r"""
#include <sys/mman.h>
#include <random>
#include "shim.h"
#include "common/math.h"
#include "common/mla_prefill_math.h"
#include "kernels_host.inc"
using namespace latentmoe;
using namespace latentmoe::cuda;

static float* sparse(size_t n) {
  void* p = mmap(nullptr, n * 4, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) { std::printf("SKIP mmap\n"); std::exit(0); }
  return static_cast<float*>(p);
}
struct Res { std::vector<float> out, lse, gqn, gqp, gwk, gwv; };

// Forward (mode 0: the absorbed kernel, -16: the decompressing fallback), then optionally the
// backward (dq and dkv kernels; grad_cache is the cache's shape and accumulated with atomics).
Res run(mla_prefill::Params p, const float* cache, float* gcache, const int32_t* bt, const int32_t* lens,
        const std::vector<float>& q, const std::vector<float>& kvb, const std::vector<float>& gout,
        const std::vector<float>& glse, int mode, bool bwd) {
  p.qn_sh = p.Dn + p.R, p.qn_ss = p.H * p.qn_sh, p.qn_sb = p.S * p.qn_ss;
  p.qp_sh = p.qn_sh, p.qp_ss = p.qn_ss, p.qp_sb = p.qn_sb;
  p.kv_sl = p.C + p.R;
  p.rows_per_major = p.page_size ? p.page_size : p.Lmax;
  p.kv_sb = p.rows_per_major * p.kv_sl;
  p.wuk_sh = (p.Dn + p.Dv) * p.C, p.wuk_sd = p.C, p.wuv_sh = p.wuk_sh, p.wuv_sd = p.C;
  const float *qn = q.data(), *qp = q.data() + p.Dn, *wuk = kvb.data(), *wuv = kvb.data() + p.Dn * p.C;
  Res r;
  r.out.assign(p.B * p.S * p.H * p.Dv, NAN);
  r.lse.assign(p.B * p.S * p.H, NAN);
  if (mode >= 0) {
    FwdLayout L = fwd_layout(p, mode);
    L.vec = reinterpret_cast<uintptr_t>(cache) % 16 == 0 && p.kv_sb % 4 == 0 && p.kv_sl % 4 == 0;
    emu_launch(L.blocks, kThreads, L.floats * 4, [&] {
      mla_prefill_fwd_kernel<float>(p, L, qn, qp, cache, bt, lens, wuk, wuv, r.out.data(), r.lse.data());
    });
  } else {
    emu_launch(p.B * p.H * n_query_tiles(p, 16), kThreads, fwd_floats(p, 16) * 4, [&] {
      mla_prefill_fwd_decompress_kernel<float, 16>(p, qn, qp, cache, bt, lens, wuk, wuv, r.out.data(), r.lse.data());
    });
  }
  if (!bwd) return r;
  r.gqn.assign(p.B * p.S * p.H * p.Dn, NAN);
  r.gqp.assign(p.B * p.S * p.H * p.R, NAN);
  r.gwk.assign(p.H * p.Dn * p.C, 0.f);
  r.gwv.assign(p.H * p.Dv * p.C, 0.f);
  std::vector<float> delta(p.B * p.S * p.H, NAN);
  emu_launch(p.B * p.H * n_query_tiles(p, kQTile), kThreads, bwd_dq_floats(p) * 4, [&] {
    mla_prefill_bwd_dq_kernel<float>(p, gout.data(), glse.data(), qn, qp, cache, bt, lens, wuk, wuv, r.out.data(),
                                     r.lse.data(), r.gqn.data(), r.gqp.data(), delta.data());
  });
  emu_launch(p.B * p.H * ((p.Lmax + kKTile - 1) / kKTile), kThreads, bwd_dkv_floats(p) * 4, [&] {
    mla_prefill_bwd_dkv_kernel<float>(p, gout.data(), qn, qp, cache, bt, lens, wuk, wuv, r.lse.data(), delta.data(),
                                      gcache, r.gwk.data(), r.gwv.data());
  });
  return r;
}

static double maxdiff(const float* a, const float* b, size_t n, bool* bad) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) {
    if (a[i] != a[i] || b[i] != b[i]) *bad = true;
    else m = std::max(m, double(std::fabs(a[i] - b[i])));
  }
  return m;
}

int main() {
  std::mt19937 rng(2);
  std::normal_distribution<float> nd;
  const int64_t C = 512, R = 64, D = C + R, Dn = 16, Dv = 16, H = 2, S = 3, B = 2;
  int fails = 0;
  std::vector<float> q(B * S * H * (Dn + R)), kvb(H * (Dn + Dv) * C), gout(B * S * H * Dv), glse(B * S * H);
  for (auto& v : q) v = nd(rng);
  for (auto& v : kvb) v = 0.05f * nd(rng);
  for (auto& v : gout) v = nd(rng);
  for (auto& v : glse) v = 0.1f * nd(rng);
  {  // paged: 60000 pages x 64 x 576 fp32 = 2.21e9 elements; forward and backward
    const int64_t P = 60000, ps = 64, maxp = 3;
    static_assert(P * ps * D > (int64_t{1} << 31), "past 2^31 elements");
    float* big = sparse(size_t(P) * ps * D);
    float* gbig = sparse(size_t(P) * ps * D);  // zero pages until the kernel adds into them
    int32_t tb[6] = {int32_t(P - 1), 9, int32_t(P - 2), int32_t(P - 3), int32_t(P - 4), 0};
    int32_t ts[6] = {0, 1, 2, 3, 4, 5};
    std::vector<float> small(6 * ps * D), gsmall(6 * ps * D, 0.f);
    for (auto& v : small) v = nd(rng);
    for (int i = 0; i < 6; ++i) std::memcpy(big + size_t(tb[i]) * ps * D, small.data() + size_t(i) * ps * D, ps * D * 4);
    int32_t lens[2] = {140, 100};
    mla_prefill::Params p{};
    p.B = B, p.S = S, p.H = H, p.Dn = Dn, p.R = R, p.C = C, p.Dv = Dv, p.Lmax = maxp * ps, p.page_size = ps,
    p.bt_sb = maxp, p.scale = 0.1f, p.causal = true, p.window = -1;
    for (int mode : {0, -16}) {
      const bool bwd = mode == 0;
      Res x = run(p, big, gbig, tb, lens, q, kvb, gout, glse, mode, bwd);
      Res y = run(p, small.data(), gsmall.data(), ts, lens, q, kvb, gout, glse, mode, bwd);
      const bool same = x.out == y.out && std::memcmp(x.lse.data(), y.lse.data(), x.lse.size() * 4) == 0;
      std::printf("paged forward %d: %s\n", mode, same ? "same" : "DIFFERENT");
      fails += !same;
      if (!bwd) continue;
      bool bad = false;  // atomics: sums in any order, so a tolerance for the gradients
      const double dq = std::max(maxdiff(x.gqn.data(), y.gqn.data(), x.gqn.size(), &bad),
                                 maxdiff(x.gqp.data(), y.gqp.data(), x.gqp.size(), &bad));
      const double dw = std::max(maxdiff(x.gwk.data(), y.gwk.data(), x.gwk.size(), &bad),
                                 maxdiff(x.gwv.data(), y.gwv.data(), x.gwv.size(), &bad));
      double dc = 0, gmax = 0, stray = 0;
      for (int i = 0; i < 6; ++i) {
        dc = std::max(dc, maxdiff(gbig + size_t(tb[i]) * ps * D, gsmall.data() + size_t(i) * ps * D, ps * D, &bad));
        for (int64_t k = 0; k < ps * D; ++k) gmax = std::max(gmax, double(std::fabs(gsmall[i * ps * D + k])));
      }
      for (int64_t pg : {int64_t(1), int64_t(2), P / 2, P - 5, (int64_t{1} << 31) / (ps * D)})
        for (int64_t k = 0; k < ps * D; ++k) stray = std::max(stray, double(std::fabs(gbig[pg * ps * D + k])));
      const bool ok = !bad && dq < 1e-5 && dw < 1e-5 && dc < 1e-5 && stray == 0 && gmax > 0;
      std::printf("paged backward: dq %g dw %g dcache %g stray %g -> %s\n", dq, dw, dc, stray, ok ? "ok" : "BAD");
      fails += !ok;
    }
  }
  {  // contiguous [2, 2^21, 576] fp32 = 2.42e9 elements: windowed queries at the rows' ends (forward)
    const int64_t L = int64_t(1) << 21, keep = 48;
    float* big = sparse(size_t(B) * L * D);
    std::vector<float> small(B * keep * D);
    for (auto& v : small) v = nd(rng);
    int32_t lens[2] = {int32_t(L - 7), int32_t(L)}, ls[2] = {int32_t(keep), int32_t(keep)};
    for (int b = 0; b < B; ++b)
      std::memcpy(big + (size_t(b) * L + lens[b] - keep) * D, small.data() + b * keep * D, keep * D * 4);
    for (int mode : {0, -16}) {
      mla_prefill::Params p{};
      p.B = B, p.S = S, p.H = H, p.Dn = Dn, p.R = R, p.C = C, p.Dv = Dv, p.Lmax = L, p.page_size = 0, p.bt_sb = 0,
      p.scale = 0.1f, p.causal = true, p.window = 30;
      Res x = run(p, big, nullptr, nullptr, lens, q, kvb, gout, glse, mode, false);
      p.Lmax = keep;
      Res y = run(p, small.data(), nullptr, nullptr, ls, q, kvb, gout, glse, mode, false);
      const bool same = x.out == y.out && std::memcmp(x.lse.data(), y.lse.data(), x.lse.size() * 4) == 0;
      std::printf("contiguous forward %d: %s\n", mode, same ? "same" : "DIFFERENT");
      fails += !same;
    }
  }
  std::printf("%s\n", fails ? "FAILURES" : "ALL OK");
  return fails;
}
"""


def _build_and_run(tmp_path, source: str, inc_name: str, inc_text: str, includes, flags):
    import subprocess

    from cuda_emulation import host_compiler

    cxx = host_compiler()
    (tmp_path / inc_name).write_text(inc_text)
    (tmp_path / "big.cpp").write_text(source)
    exe = tmp_path / "big"
    res = subprocess.run(
        [cxx, *flags, *[f"-I{p}" for p in includes], f"-I{tmp_path}", str(tmp_path / "big.cpp"), "-o", str(exe)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, f"emulation harness failed to build: {res.stderr[-2000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    if run.stdout.startswith("SKIP"):
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0 and "ALL OK" in run.stdout, run.stdout + run.stderr[-2000:]


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cuda_mla_decode_append_emulated_over_2g(tmp_path):
    from test_mla_cuda_emulation import kernels_as_host_code

    emu = os.path.join(_ROOT, "tests", "mla_decode_emulation")
    src = open(os.path.join(_ROOT, "csrc", "cuda", "mla", "mla_kernels.cu")).read()
    _build_and_run(
        tmp_path, _MLA_DECODE_BIG, "mla_kernels_host.inc", kernels_as_host_code(src),
        [os.path.join(_ROOT, "csrc"), os.path.join(emu, "cuda_headers"), emu],
        ["-std=c++20", "-O2", "-Wno-unknown-pragmas"],
    )


def test_cuda_mla_prefill_emulated_over_2g(tmp_path):
    from test_mla_prefill import _kernels_as_host_code

    emu = os.path.join(_ROOT, "tests", "mla_prefill_emulation")
    src = open(os.path.join(_ROOT, "csrc", "cuda", "mla_prefill", "mla_prefill_kernels.cu")).read()
    _build_and_run(
        tmp_path, _MLA_PREFILL_BIG, "kernels_host.inc", _kernels_as_host_code(src),
        [os.path.join(_ROOT, "csrc"), emu],
        ["-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas", "-fno-strict-aliasing"],
    )
