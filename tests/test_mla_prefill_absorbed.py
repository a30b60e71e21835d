"""mla_prefill's forwards in the absorbed form (csrc/mla_prefill_absorbed.cpp): `absorbed`, through
mla_decode (absorbed queries on the latent cache, chunk by chunk, each chunk's rows cut at its last
position), and `gemm`, on batched GEMMs (scores of the absorbed queries against the latent keys,
masked per query, P c, then W_UV), CUDA's default since session 32.

The CPU takes either only when LATENTMOE_MLA_PREFILL_FORWARD asks, which these tests do on every
device, with chunks small enough to cut rows mid-prefill (LATENTMOE_MLA_PREFILL_CHUNK), against
the fp64 reference of test_mla_prefill (NaN-poisoned cache slots, varlen rows, rows shorter than S,
empty rows, paged caches, windows) and through the backward.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import test_mla_prefill as tp
from test_mla_prefill import KEYS, SMALL, V3, err, grads_of, make_inputs, ref_fn, run_ref

from latentmoe.ops.mla_prefill import mla_prefill


_PATHS = [("absorbed", None), ("absorbed", 1), ("absorbed", 3), ("absorbed", 4), ("gemm", None), ("gemm", 1),
          ("gemm", 3)]


@pytest.fixture(params=_PATHS, ids=[f"{p}-chunk-{c or 'auto'}" for p, c in _PATHS])
def absorbed(request, monkeypatch):
    path, chunk = request.param
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_FORWARD", path)
    if chunk is None:
        monkeypatch.delenv("LATENTMOE_MLA_PREFILL_CHUNK", raising=False)
    else:
        monkeypatch.setenv("LATENTMOE_MLA_PREFILL_CHUNK", str(chunk))
    return request.param


def _op(x, scale, **kw):
    return mla_prefill(x["q_nope"], x["q_pe"], x["latent_cache"], x["cache_seqlens"], x["w_uk"], x["w_uv"],
                       scale, **kw)


# The forward tests of test_mla_prefill, run through the absorbed path (their bodies reused).


@pytest.mark.parametrize("H", [1, 3, 9])
def test_varlen_short_and_empty_rows(device, absorbed, H):
    # Row 2 is shorter than S: with chunks of 1 or 3 the first chunk's rows are cut below 0.
    tp.test_forward_small_dims_varlen(device, H)


def test_v3_dims(device, absorbed):
    tp.test_forward_v3_dims(device)


def test_many_queries_and_chunked_prefill(device, absorbed):
    tp.test_forward_many_queries_and_tiles(device)
    tp.test_chunked_prefill_matches_full_prefill(device)


@pytest.mark.parametrize("causal,window", [(True, 0), (True, 5), (True, 70), (False, -1)])
def test_causal_and_window(device, absorbed, causal, window):
    tp.test_forward_causal_and_window(device, causal, window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(device, absorbed, dtype):
    # q_latent and out_latent are rounded to the input dtype between the steps, one rounding more
    # than the kernel; the test's bound (2x the low-precision reference's error) still holds.
    tp.test_forward_low_precision(device, dtype)


@pytest.mark.parametrize("page_size", [1, 17])
def test_paged(device, absorbed, page_size):
    tp.test_paged_matches_contiguous(device, page_size)


def test_noncausal_window_is_refused(device, monkeypatch):
    # A non-causal window depends on each query's position, which the chunking moves: refused by
    # name when forced (auto keeps the prefill kernel for it).
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_FORWARD", "absorbed")
    x = make_inputs(1, 3, 2, [5], 6, **SMALL, device=device)
    with pytest.raises(ValueError, match="causal=True, or no window"):
        _op(x, 0.3, causal=False, window=2)


@pytest.mark.parametrize("var,value", [("LATENTMOE_MLA_PREFILL_FORWARD", "fast"),
                                       ("LATENTMOE_MLA_PREFILL_CHUNK", "0"),
                                       ("LATENTMOE_MLA_PREFILL_CHUNK", "12x")])
def test_bad_settings_are_refused(device, monkeypatch, var, value):
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_FORWARD", "absorbed")
    monkeypatch.setenv(var, value)
    x = make_inputs(1, 3, 2, [5], 6, **SMALL, device=device)
    with pytest.raises(ValueError, match=var):
        _op(x, 0.3)


def test_strided_cache_and_inputs_not_mutated(device, absorbed):
    # A cache whose rows are a strided view (padding columns): copied for mla_decode, never written.
    S, seqlens, Lmax = 4, [9, 4], 10
    x = make_inputs(2, S, 3, seqlens, Lmax, **SMALL, device=device)
    wide = torch.full((2, Lmax, SMALL["C"] + SMALL["R"] + 5), float("nan"), device=device)
    wide[..., : SMALL["C"] + SMALL["R"]] = x["latent_cache"]
    xs = dict(x, latent_cache=wide[..., : SMALL["C"] + SMALL["R"]])
    before = {k: v.clone() for k, v in xs.items()}
    out, lse = _op(xs, 0.5)
    ref_out, _ = run_ref(x, 0.5)
    assert err(out, ref_out) < 2e-5
    for k, v in xs.items():
        assert torch.equal(v.nan_to_num(7.0), before[k].nan_to_num(7.0)), k


def test_gradients_through_absorbed_forward(device, absorbed):
    # The backward (prefill kernels) takes out / lse from this forward: gradients match fp64 autograd.
    S, seqlens, Lmax = 5, [12, 3, 5], 14
    x = make_inputs(3, S, 2, seqlens, Lmax, **SMALL, device=device, poison=False)
    lens = x["cache_seqlens"]
    g_out = torch.randn(3, S, 2, SMALL["Dv"], device=device, dtype=torch.float64)
    g_lse = torch.randn(3, S, 2, device=device, dtype=torch.float64)

    def op(t):
        return mla_prefill(t["q_nope"], t["q_pe"], t["latent_cache"], lens, t["w_uk"], t["w_uv"], 0.4)

    got = grads_of(op, x, KEYS, g_out, g_lse)
    want = grads_of(ref_fn(lens, 0.4), x, KEYS, g_out, g_lse)
    for k in KEYS:
        if k == "latent_cache":
            for b, L in enumerate(seqlens):
                torch.testing.assert_close(got[k][b, :L], want[k][b, :L], rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_auto_agrees_with_kernel(monkeypatch, dtype):
    # On a GPU, auto runs the forward on batched GEMMs (tensor cores in bf16 / fp16): it agrees with
    # the prefill kernel (forced) within the low-precision reference's error.
    S, seqlens, Lmax = 70, [200, 70, 33], 210
    x = make_inputs(3, S, 4, seqlens, Lmax, **V3, device="cuda", dtype=dtype)
    scale = 1 / math.sqrt(192)
    monkeypatch.delenv("LATENTMOE_MLA_PREFILL_FORWARD", raising=False)
    out_auto, lse_auto = _op(x, scale)
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_FORWARD", "kernel")
    out_k, lse_k = _op(x, scale)
    ref_out, ref_lse = run_ref(x, scale)
    low_out, _ = run_ref(x, scale, dtype=dtype)
    bound = 2 * err(low_out, ref_out) + 1e-3
    assert err(out_auto, ref_out) <= bound and err(out_k, ref_out) <= bound
    live = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse_auto), live)
    assert err(lse_auto[live], lse_k[live]) < 2e-2


def test_autocast_region_does_not_leak_inside(device, absorbed):
    # Under autocast the op's inner GEMMs must keep the inputs' dtype (mla_prefill has no autocast
    # kernel): fp16 inputs inside a bf16 autocast region give the same result as outside it.
    x = make_inputs(2, 5, 3, [12, 5], 14, **SMALL, device=device, dtype=torch.float16)
    want_out, want_lse = _op(x, 0.3)
    amp = torch.bfloat16 if device == "cpu" else torch.float16
    other = torch.float16 if amp == torch.bfloat16 else torch.bfloat16
    x2 = make_inputs(2, 5, 3, [12, 5], 14, **SMALL, device=device, dtype=other)
    with torch.autocast(device, dtype=amp):
        out, lse = _op(x, 0.3)
        out2, _ = _op(x2, 0.3)
    assert out.dtype == torch.float16 and out2.dtype == other
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


def _random_cases(n, seed=2026):
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        B, S, H = int(rng.integers(1, 4)), int(rng.integers(1, 40)), int(rng.integers(1, 6))
        C, R = int(rng.integers(1, 40)), int(rng.integers(0, 20))
        Dn, Dv = int(rng.integers(1, 24)), int(rng.integers(1, 24))
        lens = [int(v) for v in rng.integers(0, S + 30, size=B)]
        Lmax = max(lens) + int(rng.integers(0, 5))
        causal = bool(rng.integers(0, 4))  # mostly causal, as prefill runs
        window = int(rng.choice([-1, -1, 0, 3, 17])) if causal else -1
        page = int(rng.choice([0, 0, 1, 5, 16]))
        chunk = int(rng.integers(1, S + 2))
        cases.append((B, S, H, dict(C=C, R=R, Dn=Dn, Dv=Dv), lens, Lmax, causal, window, page, chunk))
    return cases


@pytest.mark.parametrize("case", _random_cases(16), ids=lambda c: f"B{c[0]}S{c[1]}H{c[2]}chunk{c[9]}")
def test_random_configurations_match_the_kernel(monkeypatch, case):
    # Seeded random shapes, lengths (shorter and longer than S), masks, page sizes and chunk sizes:
    # the absorbed path agrees with the CPU prefill kernel (fp32).
    B, S, H, dims, lens, Lmax, causal, window, page, chunk = case
    x = make_inputs(B, S, H, lens, Lmax, **dims, device="cpu")
    cache, table = x["latent_cache"], None
    if page:
        cache, table = tp.to_paged(cache, page)
    kw = dict(block_table=table, causal=causal, window=window)
    scale = 0.3
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_FORWARD", "kernel")
    want_out, want_lse = mla_prefill(x["q_nope"], x["q_pe"], cache, x["cache_seqlens"], x["w_uk"], x["w_uv"],
                                     scale, **kw)
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_FORWARD", "absorbed")
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_CHUNK", str(chunk))
    out, lse = mla_prefill(x["q_nope"], x["q_pe"], cache, x["cache_seqlens"], x["w_uk"], x["w_uv"], scale, **kw)
    assert not out.isnan().any() and not lse.isnan().any()
    live = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), live)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lse[live], want_lse[live], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_paged_pool(device, absorbed, dtype):
    # A paged pool of no pages with every row empty (the kernel path takes it): the absorbed path
    # handed it to mla_decode, which refused it as "mla_decode: argument 'kv_cache' (paged) has
    # no pages" (on CUDA, auto takes this path for bf16 / fp16). All rows are empty: 0 and -inf.
    B, S, H, Dn, R, C, Dv = 2, 3, 2, 8, 8, 16, 8
    q_nope = torch.randn(B, S, H, Dn, device=device, dtype=dtype)
    q_pe = torch.randn(B, S, H, R, device=device, dtype=dtype)
    cache = torch.empty(0, 16, C + R, device=device, dtype=dtype)
    table = torch.zeros(B, 2, dtype=torch.int32, device=device)
    lens = torch.zeros(B, dtype=torch.int32, device=device)
    w_uk = torch.randn(H, Dn, C, device=device, dtype=dtype)
    w_uv = torch.randn(H, Dv, C, device=device, dtype=dtype)
    out, lse = mla_prefill(q_nope, q_pe, cache, lens, w_uk, w_uv, 0.1, block_table=table)
    assert out.shape == (B, S, H, Dv) and torch.all(out == 0) and torch.all(lse == -math.inf)


@pytest.mark.parametrize("case", _random_cases(12, seed=32), ids=lambda c: f"B{c[0]}S{c[1]}H{c[2]}chunk{c[9]}")
@pytest.mark.parametrize("noncausal_window", [False, True])
def test_gemm_random_configurations_match_the_kernel(monkeypatch, case, noncausal_window):
    # The GEMM forward against the CPU prefill kernel on the same seeded random cases, and with
    # non-causal windows (which the absorbed path refuses).
    B, S, H, dims, lens, Lmax, causal, window, page, chunk = case
    if noncausal_window:
        causal, window = False, 1 + S // 3
    x = make_inputs(B, S, H, lens, Lmax, **dims, device="cpu")
    cache, table = x["latent_cache"], None
    if page:
        cache, table = tp.to_paged(cache, page)
    kw = dict(block_table=table, causal=causal, window=window)
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_FORWARD", "kernel")
    want_out, want_lse = mla_prefill(x["q_nope"], x["q_pe"], cache, x["cache_seqlens"], x["w_uk"], x["w_uv"],
                                     0.3, **kw)
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_FORWARD", "gemm")
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_CHUNK", str(chunk))
    out, lse = mla_prefill(x["q_nope"], x["q_pe"], cache, x["cache_seqlens"], x["w_uk"], x["w_uv"], 0.3, **kw)
    assert not out.isnan().any() and not lse.isnan().any()
    live = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), live)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lse[live], want_lse[live], rtol=1e-5, atol=2e-5)


def test_gemm_forward_extra_memory_is_bounded_by_the_chunk(device, monkeypatch):
    # The GEMM forward (CUDA's default) keeps one chunk's [rows x keys] blocks plus the gathered
    # keys: at 2048 tokens in chunks of 32, fp32 scores and bf16 P for 512 query rows x 2048 keys
    # (6 MiB) and the keys' copy (2.3 MiB), under 16 MiB in all; all heads' K/V alone would be
    # 2048 x 16 x 320 bf16 = 20 MiB.
    if device != "cuda":
        pytest.skip("device peak memory is measured on CUDA")
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_FORWARD", "gemm")
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_CHUNK", "32")
    extra, outputs = tp._extra_cuda_bytes(2048, 16)
    assert extra - outputs <= (16 << 20), (extra, outputs)
