"""mla_prefill / mla_prefill_backward: against reference.mla_naive and an fp64 einsum reference
(written here), varlen and empty rows, NaN-poisoned cache slots, chunked prefill, low precision,
gradients vs torch autograd, opcheck, bad input."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cuda_emulation import host_compiler

from latentmoe.reference import mla as reference
from latentmoe.ops.mla_prefill import mla_prefill

SMALL = dict(C=48, R=16, Dn=24, Dv=20)
V3 = dict(C=512, R=64, Dn=128, Dv=128)


def make_inputs(B, S, H, seqlens, Lmax, C, R, Dn, Dv, device, dtype=torch.float32, poison=True):
    """Random inputs; q_nope/q_pe are views of one q tensor and w_uk/w_uv views of one kv_b weight
    (as the module passes them). Cache slots beyond cache_seqlens are NaN (``clean`` has zeros)."""
    q = torch.randn(B, S, H, Dn + R, device=device).to(dtype)
    kv_b = (torch.randn(H * (Dn + Dv), C, device=device) / math.sqrt(C)).to(dtype)
    w_uk, w_uv = reference.split_kv_b(kv_b, H, Dn, Dv)
    clean = torch.zeros(B, Lmax, C + R, device=device)
    lens = torch.tensor(seqlens, dtype=torch.int32, device=device)
    for b, L in enumerate(seqlens):
        c_kv = torch.randn(L, C, device=device)
        c_kv = c_kv * torch.rsqrt(c_kv.pow(2).mean(-1, keepdim=True) + 1e-6)  # like kv_a_layernorm
        clean[b, :L] = torch.cat([c_kv, torch.randn(L, R, device=device)], dim=-1)
    clean = clean.to(dtype)
    cache = clean.clone()
    if poison:
        for b, L in enumerate(seqlens):
            cache[b, L:] = float("nan")
    return dict(q_nope=q[..., :Dn], q_pe=q[..., Dn:], latent_cache=cache, cache_seqlens=lens, w_uk=w_uk,
                w_uv=w_uv, clean=clean)


def ref_attention(
    q_nope, q_pe, cache, seqlens, w_uk, w_uv, scale, dtype=torch.float64, causal=True, window=-1
):
    """Independent reference: per row, decompress the valid cache rows to per-head K/V and attend
    with an explicit causal mask, all in ``dtype`` (fp64 = ground truth; bf16/fp16 = the reference
    run in low precision, softmax in fp32). Differentiable. Returns (out, lse) in ``dtype``/fp32."""
    B, S, H, _ = q_nope.shape
    C = w_uk.shape[-1]
    outs, lses = [], []
    for b in range(B):
        L = int(seqlens[b])
        rows = cache[b, :L].to(dtype)
        c_kv, k_pe = rows[:, :C], rows[:, C:]
        k = torch.einsum("lc,hnc->hln", c_kv, w_uk.to(dtype))
        v = torch.einsum("lc,hvc->hlv", c_kv, w_uv.to(dtype))
        s = torch.einsum("shn,hln->hsl", q_nope[b].to(dtype), k) + torch.einsum(
            "shr,lr->hsl", q_pe[b].to(dtype), k_pe
        )
        s = s.float() * scale if dtype != torch.float64 else s * scale
        pos = L - S + torch.arange(S, device=s.device)
        j = torch.arange(L, device=s.device)[None, :]
        mask = torch.ones(S, L, dtype=torch.bool, device=s.device)  # [S, L]
        if causal:
            mask &= j <= pos[:, None]
        if window >= 0:
            mask &= j >= pos[:, None] - window
        s = s.masked_fill(~mask, -math.inf)
        live = mask.any(-1)[None, :, None]  # [1, S, 1]: the query sees at least one key
        s_safe = torch.where(live, s, 0.0)  # dead rows: finite, so autograd stays NaN-free
        lse = torch.logsumexp(s_safe, -1, keepdim=True)
        p = torch.where(live, torch.exp(s_safe - lse), 0.0)
        lse = torch.where(live, lse, -math.inf)[..., 0]  # [H, S]
        out = torch.einsum("hsl,hlv->shv", p.to(dtype), v)
        outs.append(out)
        lses.append(lse.transpose(0, 1))
    return torch.stack(outs), torch.stack(lses).float()


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def run_op(x, scale):
    return mla_prefill(
        x["q_nope"], x["q_pe"], x["latent_cache"], x["cache_seqlens"], x["w_uk"], x["w_uv"], scale
    )


def run_ref(x, scale, dtype=torch.float64, cache_key="clean"):
    return ref_attention(
        x["q_nope"], x["q_pe"], x[cache_key], x["cache_seqlens"].tolist(), x["w_uk"], x["w_uv"], scale, dtype
    )


# ---- forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("H", [1, 3, 9])
def test_forward_small_dims_varlen(device, H):
    # Row 0: prefix 7 + 5 new tokens; row 1 empty; row 2 shorter than S (first 2 queries see nothing);
    # row 3 exactly S tokens (no prefix).
    S, seqlens, Lmax = 5, [12, 0, 3, 5], 16
    x = make_inputs(4, S, H, seqlens, Lmax, **SMALL, device=device)
    scale = 0.7 / math.sqrt(SMALL["Dn"] + SMALL["R"])
    out, lse = run_op(x, scale)
    assert out.shape == (4, S, H, SMALL["Dv"]) and out.dtype == torch.float32
    assert lse.shape == (4, S, H) and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    ref_out, ref_lse = run_ref(x, scale)
    assert err(out, ref_out) < 2e-5
    live = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), live)
    assert err(lse[live], ref_lse[live]) < 2e-5
    # Queries that see nothing: exactly 0 and -inf.
    assert (out[1] == 0).all() and (lse[1] == -math.inf).all()
    assert (out[2, :2] == 0).all() and (lse[2, :2] == -math.inf).all()
    # The library's own reference agrees too.
    c = x["clean"]
    naive_out, naive_lse = reference.mla_naive(
        x["q_nope"], x["q_pe"], c[..., : SMALL["C"]], c[..., SMALL["C"]:], x["w_uk"], x["w_uv"], scale,
        cache_seqlens=x["cache_seqlens"].cpu(),
    )
    torch.testing.assert_close(out, naive_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, naive_lse, rtol=1e-4, atol=1e-5)


def test_forward_v3_dims(device):
    # C=512, R=64, Dn=Dv=128; lengths crossing the 64-token key tile, one prefix of 0.
    S, seqlens, Lmax = 6, [70, 6, 133], 140
    x = make_inputs(3, S, 3, seqlens, Lmax, **V3, device=device)
    scale = 1 / math.sqrt(192)
    out, lse = run_op(x, scale)
    ref_out, ref_lse = run_ref(x, scale)
    assert err(out, ref_out) < 5e-5
    assert err(lse, ref_lse) < 5e-5


def test_forward_many_queries_and_tiles(device):
    # S > key tile and > query chunk; one head so the CPU kernel splits queries across threads.
    S, seqlens, Lmax = 150, [181], 190
    x = make_inputs(1, S, 1, seqlens, Lmax, **SMALL, device=device)
    out, lse = run_op(x, 0.2)
    ref_out, ref_lse = run_ref(x, 0.2)
    assert err(out, ref_out) < 2e-5
    assert err(lse, ref_lse) < 2e-5


def test_chunked_prefill_matches_full_prefill(device):
    # Prefill 40 tokens in chunks of 17, 16, 7 (prefix > 0): outputs equal one 40-token prefill.
    H, total = 3, 40
    x = make_inputs(2, total, H, [total, total], total, **SMALL, device=device, poison=False)
    full_out, full_lse = run_op(x, 0.3)
    start = 0
    for n in (17, 16, 7):
        end = start + n
        cache = x["latent_cache"].clone()
        cache[:, end:] = float("nan")  # tokens of later chunks are not written yet
        lens = torch.full((2,), end, dtype=torch.int32, device=device)
        out, lse = mla_prefill(
            x["q_nope"][:, start:end], x["q_pe"][:, start:end], cache, lens, x["w_uk"], x["w_uv"], 0.3
        )
        torch.testing.assert_close(out, full_out[:, start:end], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, full_lse[:, start:end], rtol=1e-5, atol=1e-5)
        start = end


def test_all_rows_empty(device):
    x = make_inputs(2, 3, 2, [0, 0], 4, **SMALL, device=device)
    out, lse = run_op(x, 0.5)
    assert (out == 0).all() and (lse == -math.inf).all()


def test_no_queries_and_inputs_not_mutated(device):
    x = make_inputs(2, 4, 3, [9, 4], 10, **SMALL, device=device)
    before = {k: v.clone() for k, v in x.items()}
    run_op(x, 0.5)
    for k, v in x.items():
        assert torch.equal(v.nan_to_num(7.0), before[k].nan_to_num(7.0)), k
    q0 = x["q_nope"][:, :0]
    out, lse = mla_prefill(
        q0, x["q_pe"][:, :0], x["latent_cache"], x["cache_seqlens"], x["w_uk"], x["w_uv"], 0.5
    )
    assert out.shape == (2, 0, 3, SMALL["Dv"]) and lse.shape == (2, 0, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_low_precision(device, dtype):
    S, seqlens, Lmax = 9, [30, 9, 4], 33
    x = make_inputs(3, S, 3, seqlens, Lmax, **SMALL, device=device, dtype=dtype)
    scale = 1 / math.sqrt(40)
    out, lse = run_op(x, scale)
    assert out.dtype == dtype and not out.isnan().any()
    ref_out, ref_lse = run_ref(x, scale)
    low_out, low_lse = run_ref(x, scale, dtype=dtype)
    assert err(out, ref_out) <= 2 * err(low_out, ref_out) + 1e-3
    live = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), live)
    assert err(lse[live], ref_lse[live]) <= 2 * err(low_lse[live], ref_lse[live]) + 1e-3


@pytest.mark.parametrize(
    "causal,window", [(True, 0), (True, 5), (True, 70), (False, -1), (False, 3), (False, 200)]
)
def test_forward_causal_and_window(device, causal, window):
    # Lengths shorter than, equal to and longer than S; prefix > 0; windows crossing key tiles.
    S, seqlens, Lmax = 7, [150, 0, 4, 7], 152
    x = make_inputs(4, S, 3, seqlens, Lmax, **SMALL, device=device)
    out, lse = mla_prefill(x["q_nope"], x["q_pe"], x["latent_cache"], x["cache_seqlens"], x["w_uk"],
                                 x["w_uv"], 0.3, causal=causal, window=window)
    ref_out, ref_lse = run_ref_masked(x, 0.3, causal, window)
    assert not out.isnan().any()
    assert err(out, ref_out) < 2e-5
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    live = torch.isfinite(ref_lse)
    assert err(lse[live], ref_lse[live]) < 2e-5
    c = x["clean"]
    naive_out, naive_lse = reference.mla_naive(
        x["q_nope"], x["q_pe"], c[..., : SMALL["C"]], c[..., SMALL["C"]:], x["w_uk"], x["w_uv"], 0.3,
        cache_seqlens=x["cache_seqlens"].cpu(), causal=causal, window=window,
    )
    torch.testing.assert_close(out, naive_out, rtol=1e-4, atol=1e-5)


def run_ref_masked(x, scale, causal, window):
    return ref_attention(
        x["q_nope"], x["q_pe"], x["clean"], x["cache_seqlens"].tolist(), x["w_uk"], x["w_uv"], scale,
        causal=causal, window=window,
    )


@pytest.mark.parametrize("causal,window", [(True, 9), (False, -1), (False, 4)])
def test_gradients_causal_and_window(device, causal, window):
    S, seqlens, Lmax = 20, [150, 12, 0], 152
    x = make_inputs(3, S, 2, seqlens, Lmax, **SMALL, device=device)
    g_out = torch.randn(3, S, 2, SMALL["Dv"], device=device, dtype=torch.float64)
    g_lse = torch.randn(3, S, 2, device=device, dtype=torch.float64)

    def op(t):
        return mla_prefill(t["q_nope"], t["q_pe"], t["latent_cache"], x["cache_seqlens"], t["w_uk"],
                                 t["w_uv"], 0.25, causal=causal, window=window)

    def ref(t):
        return ref_attention(t["q_nope"], t["q_pe"], t["latent_cache"], seqlens, t["w_uk"], t["w_uv"], 0.25,
                             causal=causal, window=window)

    got = grads_of(op, x, KEYS, g_out, g_lse)
    want = grads_of(ref, dict(x, latent_cache=x["clean"]), KEYS, g_out, g_lse)
    for k in KEYS:
        assert err(got[k], want[k]) < 1e-4 * max(1.0, want[k].abs().max().item()), k


# ---- backward --------------------------------------------------------------------------------------


def grads_of(fn, x, keys, g_out, g_lse):
    leaves = {k: x[k].detach().clone().requires_grad_() for k in keys}
    out, lse = fn(leaves)
    live = torch.isfinite(lse)
    loss = (out.double() * g_out).sum() + torch.where(live, lse.double() * g_lse, 0).sum()
    loss.backward()
    return {k: leaves[k].grad for k in keys}


KEYS = ["q_nope", "q_pe", "latent_cache", "w_uk", "w_uv"]


def op_fn(x, seqlens, scale):
    return lambda t: mla_prefill(
        t["q_nope"], t["q_pe"], t["latent_cache"], seqlens, t["w_uk"], t["w_uv"], scale
    )


def ref_fn(seqlens, scale, dtype=torch.float64):
    return lambda t: ref_attention(t["q_nope"], t["q_pe"], t["latent_cache"], seqlens.tolist(), t["w_uk"],
                                   t["w_uv"], scale, dtype)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_backward_is_bitwise_deterministic(threads):
    # The latent-cache and weight gradients are sums over (batch row, head, query chunk) tasks; the
    # CPU kernel adds them in a fixed order, so two runs give the same bits (at a given thread count).
    S, seqlens, Lmax, H = 40, [300, 0, 41, 130], 310, 5
    x = make_inputs(4, S, H, seqlens, Lmax, **SMALL, device="cpu")
    scale = 1 / math.sqrt(SMALL["Dn"] + SMALL["R"])
    g_out = torch.randn(4, S, H, SMALL["Dv"], dtype=torch.float64)
    g_lse = torch.randn(4, S, H, dtype=torch.float64)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = [grads_of(op_fn(x, x["cache_seqlens"], scale), x, KEYS, g_out, g_lse) for _ in range(2)]
    finally:
        torch.set_num_threads(prev)
    for k in KEYS:
        assert torch.equal(runs[0][k], runs[1][k]), k


@pytest.mark.parametrize("path", ["auto", "kernel"])
def test_deterministic_mode(monkeypatch, device, path):
    # torch.use_deterministic_algorithms(True): the CPU backward (fixed summation order) and CUDA's
    # default, the absorbed backward (GEMMs, no atomics), run; the CUDA backward kernel
    # (LATENTMOE_MLA_PREFILL_BACKWARD=kernel) sums gradients with fp32 atomics and must say so
    # (RuntimeError), not run.
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_BACKWARD", path)
    S, seqlens, Lmax, H = 5, [9, 3], 12, 2
    x = make_inputs(2, S, H, seqlens, Lmax, **SMALL, device=device)
    scale = 1 / math.sqrt(SMALL["Dn"] + SMALL["R"])
    g_out = torch.randn(2, S, H, SMALL["Dv"], dtype=torch.float64, device=device)
    g_lse = torch.randn(2, S, H, dtype=torch.float64, device=device)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        if device == "cpu" or path == "auto":
            runs = [grads_of(op_fn(x, x["cache_seqlens"], scale), x, KEYS, g_out, g_lse) for _ in range(2)]
            for k in KEYS:
                assert torch.equal(runs[0][k], runs[1][k]), k
        else:
            with pytest.raises(RuntimeError, match="mla_prefill_backward"):
                grads_of(op_fn(x, x["cache_seqlens"], scale), x, KEYS, g_out, g_lse)
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("seqlens", [[57], [57, 0, 23], [90, 12]])
def test_cpu_any_thread_count(seqlens):
    # Forward: tasks from a shared counter, last query chunks first. Backward: partitions of
    # (batch row, head, query chunk) tasks cut by work, through heads and batch rows at these
    # thread counts, each with weight-gradient buffers for its own heads only. Every count gives
    # the reference's outputs and gradients.
    B, S, H, Lmax = len(seqlens), 24, 5, 96
    x = make_inputs(B, S, H, seqlens, Lmax, **SMALL, device="cpu")
    scale = 1 / math.sqrt(SMALL["Dn"] + SMALL["R"])
    g_out = torch.randn(B, S, H, SMALL["Dv"], dtype=torch.float64)
    g_lse = torch.randn(B, S, H, dtype=torch.float64)
    clean = dict(x, latent_cache=x["clean"])
    want_out, want_lse = ref_fn(x["cache_seqlens"], scale)(clean)
    prev = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 3, 7, 16):
            torch.set_num_threads(threads)
            out, lse = op_fn(x, x["cache_seqlens"], scale)(x)
            assert err(out, want_out) < 1e-4 * max(1.0, want_out.abs().max().item())
            assert torch.equal(torch.isfinite(lse), torch.isfinite(want_lse))
            live = torch.isfinite(want_lse)
            assert err(lse[live], want_lse[live]) < 1e-4
            runs.append(grads_of(op_fn(x, x["cache_seqlens"], scale), x, KEYS, g_out, g_lse))
    finally:
        torch.set_num_threads(prev)
    want = grads_of(ref_fn(x["cache_seqlens"], scale), clean, KEYS, g_out, g_lse)
    for run in runs:
        for k in KEYS:
            tol = 1e-4 * max(1.0, want[k].abs().max().item())
            assert err(run[k], want[k]) < tol, (k, err(run[k], want[k]))


@pytest.mark.parametrize("causal,window", [(True, -1), (True, 150), (False, 40)])
def test_cpu_row_blocks_forward_and_gradients(causal, window):
    # The CPU kernels take a key tile's queries in blocks of 144 rows (their scores stay in L2), and
    # the backward's key and value gradients add block after block. Here a task holds all 330
    # queries of its (row, head) (B*H = 4 >= 2 x threads: one query chunk), so a tile's rows span
    # three blocks, with the causal / window edges inside them; against the fp64 reference.
    S, seqlens, Lmax, H = 330, [350, 331], 352, 2
    x = make_inputs(2, S, H, seqlens, Lmax, **SMALL, device="cpu")
    scale = 1 / math.sqrt(SMALL["Dn"] + SMALL["R"])
    g_out = torch.randn(2, S, H, SMALL["Dv"], dtype=torch.float64)
    g_lse = torch.randn(2, S, H, dtype=torch.float64)

    def op(t):
        return mla_prefill(t["q_nope"], t["q_pe"], t["latent_cache"], x["cache_seqlens"], t["w_uk"], t["w_uv"],
                           scale, causal=causal, window=window)

    def ref(t):
        return ref_attention(t["q_nope"], t["q_pe"], t["latent_cache"], seqlens, t["w_uk"], t["w_uv"], scale,
                             torch.float64, causal=causal, window=window)

    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            out, lse = op(x)
        got = grads_of(op, x, KEYS, g_out, g_lse)
    finally:
        torch.set_num_threads(prev)
    clean = dict(x, latent_cache=x["clean"])
    with torch.no_grad():
        ref_out, ref_lse = ref(clean)
    assert err(out, ref_out) < 2e-5
    live = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), live) and err(lse[live], ref_lse[live]) < 2e-5
    want = grads_of(ref, clean, KEYS, g_out, g_lse)
    for k in KEYS:
        assert err(got[k], want[k]) < 1e-4 * max(1.0, want[k].abs().max().item()), k


@pytest.mark.parametrize("H,dims", [(1, SMALL), (3, SMALL), (9, SMALL), (2, V3)])
def test_gradients_match_autograd_fp64(device, H, dims):
    S, seqlens, Lmax = 7, [75, 0, 4], 80
    x = make_inputs(3, S, H, seqlens, Lmax, **dims, device=device)
    scale = 1 / math.sqrt(dims["Dn"] + dims["R"])
    g_out = torch.randn(3, S, H, dims["Dv"], device=device, dtype=torch.float64)
    g_lse = torch.randn(3, S, H, device=device, dtype=torch.float64)
    got = grads_of(op_fn(x, x["cache_seqlens"], scale), x, KEYS, g_out, g_lse)
    clean = dict(x, latent_cache=x["clean"])
    want = grads_of(ref_fn(x["cache_seqlens"], scale), clean, KEYS, g_out, g_lse)
    for k in KEYS:
        assert not got[k].isnan().any(), k
        tol = 1e-4 * max(1.0, want[k].abs().max().item())
        assert err(got[k], want[k]) < tol, (k, err(got[k], want[k]))
    # Unread cache slots (beyond each row's length) get exactly zero gradient.
    for b, L in enumerate(seqlens):
        assert (got["latent_cache"][b, L:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_low_precision(device, dtype):
    S, seqlens, Lmax = 6, [20, 6], 24
    x = make_inputs(2, S, 3, seqlens, Lmax, **SMALL, device=device, dtype=dtype)
    scale = 1 / math.sqrt(40)
    g_out = torch.randn(2, S, 3, SMALL["Dv"], device=device, dtype=torch.float64)
    g_lse = torch.zeros(2, S, 3, device=device, dtype=torch.float64)
    got = grads_of(op_fn(x, x["cache_seqlens"], scale), x, KEYS, g_out.to(dtype), g_lse)
    clean = dict(x, latent_cache=x["clean"])
    want = grads_of(ref_fn(x["cache_seqlens"], scale), clean, KEYS, g_out, g_lse)
    low = grads_of(ref_fn(x["cache_seqlens"], scale, dtype), clean, KEYS, g_out.to(dtype), g_lse)
    for k in KEYS:
        assert err(got[k], want[k]) <= 2 * err(low[k], want[k]) + 1e-3, k


def test_gradients_chunked_prefix_and_long(device):
    # Prefix > 0, S spanning several key tiles and CPU query chunks.
    S, seqlens, Lmax = 90, [140], 150
    x = make_inputs(1, S, 1, seqlens, Lmax, **SMALL, device=device)
    g_out = torch.randn(1, S, 1, SMALL["Dv"], device=device, dtype=torch.float64)
    g_lse = torch.randn(1, S, 1, device=device, dtype=torch.float64)
    got = grads_of(op_fn(x, x["cache_seqlens"], 0.2), x, KEYS, g_out, g_lse)
    want = grads_of(ref_fn(x["cache_seqlens"], 0.2), dict(x, latent_cache=x["clean"]), KEYS, g_out, g_lse)
    for k in KEYS:
        assert err(got[k], want[k]) < 1e-4 * max(1.0, want[k].abs().max().item()), k


# ---- opcheck and bad input -------------------------------------------------------------------------


def test_opcheck(device):
    x = make_inputs(2, 3, 2, [7, 2], 8, **SMALL, device=device)
    args = [x["q_nope"].contiguous().requires_grad_(), x["q_pe"].contiguous().requires_grad_(),
            x["clean"].clone().requires_grad_(), x["cache_seqlens"], x["w_uk"].contiguous().requires_grad_(),
            x["w_uv"].contiguous().requires_grad_(), 0.3]
    torch.library.opcheck(torch.ops.latentmoe.mla_prefill.default, args)
    plain = [a.detach() if torch.is_tensor(a) else a for a in args]
    out, lse = torch.ops.latentmoe.mla_prefill.default(*plain)
    bargs = [torch.randn_like(out), torch.randn_like(lse)] + plain[:-1] + [out, lse, 0.3]
    torch.library.opcheck(torch.ops.latentmoe.mla_prefill_backward.default, bargs)


def _call(x, **over):
    a = dict(
        q_nope=x["q_nope"], q_pe=x["q_pe"], latent_cache=x["latent_cache"], cache_seqlens=x["cache_seqlens"],
        w_uk=x["w_uk"], w_uv=x["w_uv"], softmax_scale=0.5,
    )
    a.update(over)
    return mla_prefill(**a)


@pytest.mark.parametrize(
    "name,make",
    [
        ("cache_seqlens", lambda x: x["cache_seqlens"].long()),
        ("cache_seqlens", lambda x: x["cache_seqlens"] + 100),
        ("cache_seqlens", lambda x: x["cache_seqlens"] - 100),
        ("cache_seqlens", lambda x: x["cache_seqlens"][:1]),
        ("latent_cache", lambda x: x["latent_cache"][..., :-1]),
        ("latent_cache", lambda x: x["latent_cache"].to(torch.float16)),
        ("latent_cache", lambda x: x["latent_cache"][:1]),
        ("w_uv", lambda x: x["w_uv"][:, :, :-1]),
        ("w_uk", lambda x: x["w_uk"][:1]),
        ("q_pe", lambda x: x["q_pe"][:, :, :1]),
        ("q_nope", lambda x: x["q_nope"][..., 0]),
        ("q_nope", lambda x: x["q_nope"].transpose(-1, -2).contiguous().transpose(-1, -2)),
        ("softmax_scale", lambda x: float("nan")),
        ("window", lambda x: -2),
    ],
)
def test_bad_input_names_argument(device, name, make):
    x = make_inputs(2, 3, 2, [5, 3], 6, C=8, R=4, Dn=8, Dv=6, device=device)
    with pytest.raises(ValueError, match=name):
        _call(x, **{name: make(x)})


def test_unsupported_dtypes_rejected(device):
    x = make_inputs(1, 2, 1, [2], 2, C=8, R=4, Dn=8, Dv=6, device=device)
    for dtype in (torch.float64, torch.int32, torch.int64):
        with pytest.raises(ValueError, match="q_nope"):
            _call(x, q_nope=x["q_nope"].to(dtype))


# ---- the layer around the op vs HF DeepseekV3Attention ---------------------------------------------


def _latent_rows(attn, x, cos, sin):
    """HF layer's projections + RoPE -> (q_nope, q_pe, latent rows [B, S, C+R])."""
    B, S, _ = x.shape
    H, N, R, C = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.kv_lora_rank
    q = attn.q_proj(x) if attn.q_lora_rank is None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    q = q.view(B, S, H, N + R)
    kv = attn.kv_a_proj_with_mqa(x)
    interleave = bool(attn.config.rope_interleave)
    q_pe = reference.apply_rope(q[..., N:], cos, sin, interleave)
    k_pe = reference.apply_rope(kv[..., C:].view(B, S, 1, R), cos, sin, interleave)[:, :, 0]
    return q[..., :N], q_pe, torch.cat([attn.kv_a_layernorm(kv[..., :C]), k_pe], dim=-1)


@pytest.mark.parametrize(
    "heads,q_lora,interleave,yarn", [(1, None, True, False), (3, 24, False, True), (9, 24, True, True)]
)
def test_layer_chunked_prefill_matches_hf(heads, q_lora, interleave, yarn):
    from test_mla_common import (
        causal_additive_mask, hf_cache, make_config, make_hf_attention, rel_err, rope_embeddings,
    )

    cfg = make_config(heads=heads, q_lora=q_lora, interleave=interleave, yarn=yarn)
    attn = make_hf_attention(cfg)
    B, S1, S2 = 2, 7, 5
    x = torch.randn(B, S1 + S2, cfg.hidden_size)
    cos, sin = rope_embeddings(cfg, torch.arange(S1 + S2)[None].expand(B, -1))
    cache = hf_cache(cfg)
    with torch.no_grad():
        hf1 = attn(x[:, :S1], (cos[:, :S1], sin[:, :S1]), causal_additive_mask(B, S1, 0), cache=cache)[0]
        hf2 = attn(x[:, S1:], (cos[:, S1:], sin[:, S1:]), causal_additive_mask(B, S2, S1), cache=cache)[0]
        q_nope, q_pe, rows = _latent_rows(attn, x, cos, sin)
        Lmax = S1 + S2 + 3
        latent = torch.full((B, Lmax, rows.shape[-1]), float("nan"))
        w_uk, w_uv = reference.split_kv_b(attn.kv_b_proj.weight, heads, cfg.qk_nope_head_dim, cfg.v_head_dim)
        outs = []
        for lo, hi in ((0, S1), (S1, S1 + S2)):  # chunked prefill: the second chunk has a prefix
            latent[:, lo:hi] = rows[:, lo:hi]
            lens = torch.full((B,), hi, dtype=torch.int32)
            o, _ = mla_prefill(q_nope[:, lo:hi], q_pe[:, lo:hi], latent, lens, w_uk, w_uv, attn.scaling)
            outs.append(attn.o_proj(o.reshape(B, hi - lo, -1)))
    assert rel_err(outs[0], hf1) <= 1e-4
    assert rel_err(outs[1], hf2) <= 1e-4


def test_layer_training_gradients_match_hf():
    # Every parameter's gradient through projections + mla_prefill + o_proj equals HF autograd.
    from test_mla_common import causal_additive_mask, make_config, make_hf_attention, rel_err, rope_embeddings

    cfg = make_config(heads=3, q_lora=24, yarn=True)
    hf = make_hf_attention(cfg)
    ours = make_hf_attention(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True)
    B, S = 2, 9
    x = torch.randn(B, S, cfg.hidden_size)
    cos, sin = rope_embeddings(cfg, torch.arange(S)[None].expand(B, -1))
    g = torch.randn(B, S, cfg.hidden_size)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    (hf(x_hf, (cos, sin), causal_additive_mask(B, S, 0))[0] * g).sum().backward()
    q_nope, q_pe, rows = _latent_rows(ours, x_ours, cos, sin)
    w_uk, w_uv = reference.split_kv_b(ours.kv_b_proj.weight, 3, cfg.qk_nope_head_dim, cfg.v_head_dim)
    lens = torch.full((B,), S, dtype=torch.int32)
    o, _ = mla_prefill(q_nope, q_pe, rows, lens, w_uk, w_uv, ours.scaling)
    (ours.o_proj(o.reshape(B, S, -1)) * g).sum().backward()
    assert rel_err(x_ours.grad, x_hf.grad) <= 1e-4
    for (name, p_hf), p_ours in zip(hf.named_parameters(), ours.parameters()):
        assert rel_err(p_ours.grad, p_hf.grad) <= 1e-4, name


def test_torch_compile_fullgraph(device):
    x = make_inputs(2, 4, 3, [9, 4], 10, **SMALL, device=device)

    def f(qn, qp, cache, lens, wk, wv):
        out, lse = mla_prefill(qn, qp, cache, lens, wk, wv, 0.4)
        return out * 2, lse

    args = (x["q_nope"], x["q_pe"], x["latent_cache"], x["cache_seqlens"], x["w_uk"], x["w_uv"])
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    want = f(*args)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


# ---- paged cache -----------------------------------------------------------------------------------


def to_paged(cache, page_size, seed=0):
    """Contiguous [B, Lmax, D] -> (paged [num_pages, page_size, D] with NaN in unused slots and two
    spare pages, block_table [B, max_pages] int32, a random permutation of the pages)."""
    B, Lmax, D = cache.shape
    max_pages = -(-Lmax // page_size)
    num_pages = B * max_pages + 2
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pages, generator=g)[: B * max_pages].view(B, max_pages)
    paged = torch.full((num_pages, page_size, D), float("nan"), dtype=cache.dtype, device=cache.device)
    for b in range(B):
        for t in range(Lmax):
            paged[perm[b, t // page_size], t % page_size] = cache[b, t]
    return paged, perm.to(torch.int32).to(cache.device)


@pytest.mark.parametrize("page_size", [1, 16, 17, 64])
def test_paged_matches_contiguous(device, page_size):
    S, seqlens, Lmax = 6, [40, 0, 3, 23], 41
    x = make_inputs(4, S, 3, seqlens, Lmax, **SMALL, device=device)
    paged, table = to_paged(x["latent_cache"], page_size)
    g_out = torch.randn(4, S, 3, SMALL["Dv"], device=device, dtype=torch.float64)
    g_lse = torch.randn(4, S, 3, device=device, dtype=torch.float64)
    want = grads_of(op_fn(x, x["cache_seqlens"], 0.3), x, KEYS, g_out, g_lse)
    out_c, lse_c = run_op(x, 0.3)

    def paged_fn(t):
        return mla_prefill(
            t["q_nope"], t["q_pe"], t["latent_cache"], x["cache_seqlens"], t["w_uk"], t["w_uv"], 0.3,
            block_table=table,
        )

    xp = dict(x, latent_cache=paged)
    out_p, lse_p = paged_fn(xp)
    torch.testing.assert_close(out_p, out_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_p, lse_c, rtol=1e-5, atol=1e-6)
    got = grads_of(paged_fn, xp, KEYS, g_out, g_lse)
    for k in ["q_nope", "q_pe", "w_uk", "w_uv"]:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
    g_cache = reference.gather_paged(got["latent_cache"], table, Lmax)
    for b, L in enumerate(seqlens):
        torch.testing.assert_close(g_cache[b, :L], want["latent_cache"][b, :L], rtol=1e-4, atol=1e-5)
    # Slots no row reads (spare pages, tails of pages) get zero gradient.
    read = torch.zeros(paged.shape[:2], dtype=torch.bool)
    for b, L in enumerate(seqlens):
        for t in range(L):
            read[table[b, t // page_size].item(), t % page_size] = True
    assert (got["latent_cache"][~read.to(device)] == 0).all()


def _shared_page_gradients_match():
    # Rows 0 and 1 read one shared first page (a common prefix): its gradient is the sum of both
    # rows' gradients on those positions (contiguous cache with the prefix copied in both rows).
    page, S, seqlens, Lmax = 8, 5, [20, 13], 24
    x = make_inputs(2, S, 2, seqlens, Lmax, **SMALL, device="cpu")
    x["latent_cache"][1, :page] = x["latent_cache"][0, :page]
    paged, table = to_paged(x["latent_cache"], page)
    spare = table[1, 0].item()
    table[1, 0] = table[0, 0]
    paged[spare] = float("nan")  # the copy row 1 no longer reads
    g_out = torch.randn(2, S, 2, SMALL["Dv"], dtype=torch.float64)
    g_lse = torch.randn(2, S, 2, dtype=torch.float64)
    want = grads_of(op_fn(x, x["cache_seqlens"], 0.3), x, KEYS, g_out, g_lse)

    def paged_fn(t):
        return mla_prefill(t["q_nope"], t["q_pe"], t["latent_cache"], x["cache_seqlens"], t["w_uk"],
                           t["w_uv"], 0.3, block_table=table)

    got = grads_of(paged_fn, dict(x, latent_cache=paged), KEYS, g_out, g_lse)
    g = want["latent_cache"]
    torch.testing.assert_close(got["latent_cache"][table[0, 0]], g[0, :page] + g[1, :page], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["latent_cache"][table[1, 1], : seqlens[1] - page], g[1, page : seqlens[1]],
                               rtol=1e-4, atol=1e-5)
    assert (got["latent_cache"][spare] == 0).all()


def test_paged_shared_page_gradients():
    _shared_page_gradients_match()


@pytest.mark.parametrize("bwd_window", ["1", "37", "128", "100000"])
def test_cpu_backward_key_windows(monkeypatch, bwd_window):
    # When the threads' latent-gradient buffers would be too large, the CPU backward takes the
    # keys in windows (forced small here): every window size gives the reference's gradients,
    # fp32 and bf16, varlen rows with prefixes, sliding windows, paged caches, a shared page.
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_BWD_WINDOW", bwd_window)
    test_gradients_match_autograd_fp64("cpu", 3, SMALL)
    test_gradients_chunked_prefix_and_long("cpu")
    test_gradients_causal_and_window("cpu", True, 9)
    test_gradients_low_precision("cpu", torch.bfloat16)
    test_paged_matches_contiguous("cpu", 16)
    _shared_page_gradients_match()


def _random_backward_cases(n, seed=7):
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        B, S, H = int(rng.integers(1, 4)), int(rng.integers(1, 40)), int(rng.integers(1, 6))
        lens = [int(rng.integers(0, 90)) for _ in range(B)]
        causal = bool(rng.integers(0, 4))  # mostly causal
        window = int(rng.choice([-1, -1, 0, 5, 17]))
        page = int(rng.choice([0, 0, 1, 16, 17]))
        threads = int(rng.choice([1, 2, 3, 5, 16]))
        bwd_window = str(int(rng.choice([1, 7, 64, 129, 100000])))
        cases.append((B, S, H, lens, causal, window, page, threads, bwd_window))
    return cases


@pytest.mark.parametrize("case", _random_backward_cases(12),
                         ids=lambda c: f"B{c[0]}S{c[1]}H{c[2]}t{c[7]}w{c[8]}")
def test_cpu_backward_random_configurations(monkeypatch, case):
    # Seeded random shapes, lengths (shorter and longer than S, empty), masks, page sizes, thread
    # counts (partitions cut through heads and rows) and key windows: gradients vs fp64 autograd.
    B, S, H, lens, causal, window, page, threads, bwd_window = case
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_BWD_WINDOW", bwd_window)
    Lmax = max(lens + [1])
    x = make_inputs(B, S, H, lens, Lmax, **SMALL, device="cpu")
    cache, table = (x["latent_cache"], None) if page == 0 else to_paged(x["latent_cache"], page)
    g_out = torch.randn(B, S, H, SMALL["Dv"], dtype=torch.float64)
    g_lse = torch.randn(B, S, H, dtype=torch.float64)

    def op(t):
        return mla_prefill(t["q_nope"], t["q_pe"], t["latent_cache"], x["cache_seqlens"], t["w_uk"], t["w_uv"],
                           0.3, block_table=table, causal=causal, window=window)

    def ref(t):
        return ref_attention(t["q_nope"], t["q_pe"], t["latent_cache"], lens, t["w_uk"], t["w_uv"], 0.3,
                             causal=causal, window=window)

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = grads_of(op, dict(x, latent_cache=cache), KEYS, g_out, g_lse)
    finally:
        torch.set_num_threads(prev)
    want = grads_of(ref, dict(x, latent_cache=x["clean"]), KEYS, g_out, g_lse)
    if table is not None:
        got["latent_cache"] = reference.gather_paged(got["latent_cache"], table, Lmax)
    for k in KEYS:
        w = want[k] if k != "latent_cache" else torch.stack([want[k][b] * (torch.arange(Lmax) < L)[:, None]
                                                              for b, L in enumerate(lens)])
        g = got[k] if k != "latent_cache" else torch.stack([got[k][b] * (torch.arange(Lmax) < L)[:, None]
                                                             for b, L in enumerate(lens)])
        assert not g.isnan().any(), k
        assert err(g, w) < 1e-4 * max(1.0, w.abs().max().item()), (k, err(g, w))


def test_cpu_backward_window_setting_checked(monkeypatch):
    x = make_inputs(1, 3, 1, [5], 6, **SMALL, device="cpu")
    g_out = torch.randn(1, 3, 1, SMALL["Dv"], dtype=torch.float64)
    g_lse = torch.zeros(1, 3, 1, dtype=torch.float64)
    for bad in ("0", "-3", "abc"):
        monkeypatch.setenv("LATENTMOE_MLA_PREFILL_BWD_WINDOW", bad)
        with pytest.raises(ValueError, match="LATENTMOE_MLA_PREFILL_BWD_WINDOW"):
            grads_of(op_fn(x, x["cache_seqlens"], 0.3), x, KEYS, g_out, g_lse)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda t: t.long(), "block_table"),
        (lambda t: t[:1], "block_table"),
        (lambda t: t.masked_fill(t == t[0, 0], 10_000), "block_table"),
        (lambda t: t.masked_fill(t == t[0, 0], -1), "block_table"),
        (lambda t: t[:, :1], "cache_seqlens"),  # capacity 1 page < seqlens
    ],
)
def test_paged_bad_input(device, make, match):
    x = make_inputs(2, 3, 2, [5, 3], 6, C=8, R=4, Dn=8, Dv=6, device=device)
    paged, table = to_paged(x["latent_cache"], 4)
    with pytest.raises(ValueError, match=match):
        _call(x, latent_cache=paged, block_table=make(table))


def _extra_cuda_bytes(S, H):
    x = make_inputs(1, S, H, [S], S, **V3, device="cuda", dtype=torch.bfloat16, poison=False)
    run_op(x, 0.07)  # warm-up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, lse = run_op(x, 0.07)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    return extra, out.numel() * out.element_size() + lse.numel() * lse.element_size()


def test_forward_extra_memory_is_o_tokens(device, monkeypatch):
    if device != "cuda":
        pytest.skip("device peak memory is measured on CUDA (bench_mla_prefill measures CPU RSS at 16K)")
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_FORWARD", "kernel")
    extra, outputs = _extra_cuda_bytes(1024, 16)
    # No scratch beyond the outputs (materialising all heads' K/V would add S*H*(Dn+R+Dv) values).
    assert extra <= outputs + (1 << 20), (extra, outputs)


def test_forward_absorbed_extra_memory_is_bounded_by_the_chunk(device, monkeypatch):
    # The bf16 default on CUDA (the absorbed path through mla_decode) keeps chunk-sized temporaries:
    # the same at 512 and 2048 tokens for a fixed chunk. At 128 tokens: about 9 MiB of absorbed
    # queries / outputs and their head-major copies, plus mla_decode's split partials (2048 query
    # rows in 32 blocks: at most 4 splits on 132 SMs, 16 MiB of fp32 accumulators).
    if device != "cuda":
        pytest.skip("device peak memory is measured on CUDA")
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_FORWARD", "absorbed")
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_CHUNK", "128")
    small, out_small = _extra_cuda_bytes(512, 16)
    large, out_large = _extra_cuda_bytes(2048, 16)
    assert abs((large - out_large) - (small - out_small)) <= (1 << 20), (small, large)
    assert large - out_large <= 40 << 20, (large, out_large)


# ---- the CUDA kernels' logic, run on the host ------------------------------------------------------
# tests/mla_prefill_emulation/ compiles the .cu file's kernels as host C++ (one thread per CUDA
# thread, real barriers) so CI without a GPU still checks their indexing, masking and reductions
# against the CPU op (itself checked against the references above). fp32 only; the launch code,
# bf16/fp16 conversions and performance are covered only by the CUDA tests on a GPU.

_ROOT = Path(__file__).resolve().parents[1]
_EMU = Path(__file__).resolve().parent / "mla_prefill_emulation"
_PROBE = (
    "#include <barrier>\n#include <atomic>\n"
    "int main() { float f = 0; std::atomic_ref<float>(f).fetch_add(1.f); }\n"
)


def _kernels_as_host_code(cu_source: str) -> str:
    """The kernels and device helpers of mla_prefill_kernels.cu, without CUDA includes or launchers."""
    lines = [ln for ln in cu_source.split("\n") if not ln.startswith(("#include <cuda_", '#include "cuda/'))]
    src = "\n".join(lines).replace("extern __shared__ float smem[];", "float* smem = emu_block->smem;")
    cut = src.index("// ---- host launchers")
    return src[:cut] + "}  // namespace\n}  // namespace latentmoe::cuda\n"


@pytest.fixture(scope="module")
def emulated_kernels(tmp_path_factory):
    cxx = host_compiler()
    work = tmp_path_factory.mktemp("mla_prefill_emulation")
    # shared memory is untyped on the device (the forward keeps int64 row offsets in it)
    flags = ["-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas", "-fno-strict-aliasing"]
    (work / "probe.cpp").write_text(_PROBE)
    if subprocess.run([cxx, *flags, str(work / "probe.cpp"), "-o", str(work / "probe")],
                      capture_output=True).returncode != 0:
        pytest.skip("the C++ compiler lacks C++20 <barrier> / std::atomic_ref")
    cu = (_ROOT / "csrc" / "cuda" / "mla_prefill" / "mla_prefill_kernels.cu").read_text()
    (work / "kernels_host.inc").write_text(_kernels_as_host_code(cu))
    exe = work / "harness"
    res = subprocess.run(
        [cxx, *flags, f"-I{_ROOT / 'csrc'}", f"-I{_EMU}", f"-I{work}", str(_EMU / "harness.cpp"),
         "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return exe


def _emulate(exe, tmp_path, forward, q, cache, seqlens, kv_b, g_out, g_lse, scale, Lmax, page_size,
             table, causal, window, Dn, Dv):
    """Runs the emulated kernels (forward, then backward): [out, lse, grad_q_nope, grad_q_pe,
    grad_latent_cache, grad_w_uk, grad_w_uv], fp32."""
    B, S, H = q.shape[:3]
    R, C = q.shape[-1] - Dn, kv_b.shape[-1]
    num_pages = cache.shape[0] if page_size else 0
    with open(tmp_path / "in.bin", "wb") as f:
        head = [B, S, H, Dn, R, C, Dv, Lmax, page_size, num_pages, int(causal), window]
        f.write(np.array(head, dtype=np.int64).tobytes())
        f.write(np.float32(scale).tobytes())
        f.write(q.numpy().tobytes())
        f.write(cache.numpy().tobytes())
        f.write(np.array(seqlens, dtype=np.int32).tobytes())
        if table is not None:
            f.write(table.numpy().astype(np.int32).tobytes())
        for t in (kv_b, g_out, g_lse):
            f.write(t.numpy().tobytes())
    res = subprocess.run([str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin"), str(forward)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    flat = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float32))
    shapes = [(B, S, H, Dv), (B, S, H), (B, S, H, Dn), (B, S, H, R), tuple(cache.shape), (H, Dn, C),
              (H, Dv, C)]
    got = list(torch.split(flat, [math.prod(s) for s in shapes]))
    return [g.view(s) for g, s in zip(got, shapes)]


# forward: 0 = the absorbed kernel with the launcher's layout (queries first: 32 queries x 1 head
# unless S < 32); 8 = up to 8 heads per block (fewer queries per block), so multi-head blocks meet
# long prompts, several query tiles, key tiles and a partial last head group (H = 9 -> groups of 5
# and 4); -16 / -64 = the decompressing fallback (large C + R) with 16 / 64 queries per block.
@pytest.mark.parametrize("forward", [0, 8, -16, -64])
@pytest.mark.parametrize(
    "B,S,H,dims,seqlens,Lmax,page_size,causal,window",
    [
        (2, 13, 9, SMALL, [20, 7], 22, 0, True, -1),
        # C > 512: two passes over the keys; D = C + R = 525 odd: scalar loads, partial chunks; paged
        (1, 35, 2, dict(C=520, R=5, Dn=9, Dv=7), [60], 68, 17, True, -1),
        # D = 49: unaligned rows (scalar path), Dv < 8, window, S not a multiple of the tile
        (2, 33, 3, dict(C=45, R=4, Dn=5, Dv=3), [33, 77], 80, 0, True, 10),
        (4, 5, 3, SMALL, [12, 0, 3, 5], 16, 0, True, -1),
        (2, 70, 2, dict(C=40, R=4, Dn=8, Dv=6), [100, 69], 101, 0, True, -1),
        (1, 3, 2, V3, [70], 72, 0, True, -1),
        (4, 6, 3, SMALL, [40, 0, 3, 23], 41, 17, True, -1),
        (2, 5, 2, SMALL, [9, 5], 10, 1, True, -1),
        (3, 40, 2, dict(C=40, R=4, Dn=8, Dv=6), [90, 20, 0], 95, 0, True, 37),
        (3, 21, 2, dict(C=40, R=4, Dn=8, Dv=6), [70, 9, 0], 72, 16, False, 5),
        (2, 9, 2, SMALL, [50, 4], 52, 0, False, -1),
        # a window near INT64_MAX ("unbounded") is no window: t1 + window overflowed in the shared
        # end_query_seeing, so the CPU forward and the CUDA backward's key gradients dropped keys
        (1, 40, 2, SMALL, [50], 52, 0, True, 2**63 - 1),
    ],
)
def test_cuda_kernels_in_host_emulation(emulated_kernels, tmp_path, forward, B, S, H, dims, seqlens, Lmax,
                                        page_size, causal, window):
    C, R, Dn, Dv = dims["C"], dims["R"], dims["Dn"], dims["Dv"]
    q = torch.randn(B, S, H, Dn + R)
    kv_b = torch.randn(H, Dn + Dv, C) / math.sqrt(C)
    cache = torch.randn(B, Lmax, C + R)
    for b, L in enumerate(seqlens):
        cache[b, L:] = float("nan")
    g_out, g_lse = torch.randn(B, S, H, Dv), torch.randn(B, S, H)
    table = None
    if page_size:
        cache, table = to_paged(cache, page_size)
        Lmax = table.shape[1] * page_size
    scale = 1 / math.sqrt(Dn + R)
    got = _emulate(emulated_kernels, tmp_path, forward, q, cache, seqlens, kv_b, g_out, g_lse, scale, Lmax,
                   page_size, table, causal, window, Dn, Dv)

    leaves = [t.clone().requires_grad_() for t in (q, cache, kv_b)]
    qq, cc, kk = leaves
    lens = torch.tensor(seqlens, dtype=torch.int32)
    out, lse = mla_prefill(
        qq[..., :Dn], qq[..., Dn:], cc, lens, kk[:, :Dn], kk[:, Dn:], scale, block_table=table, causal=causal,
        window=window,
    )
    live = torch.isfinite(lse)
    ((out * g_out).sum() + torch.where(live, lse * g_lse, 0).sum()).backward()
    want = [out.detach(), lse.detach(), qq.grad[..., :Dn], qq.grad[..., Dn:], cc.grad, kk.grad[:, :Dn],
            kk.grad[:, Dn:]]
    names = ["out", "lse", "grad_q_nope", "grad_q_pe", "grad_latent_cache", "grad_w_uk", "grad_w_uv"]
    for name, g, w in zip(names, got, want):
        assert not g.isnan().any(), name
        if name == "lse":
            assert torch.equal(torch.isinf(g), torch.isinf(w))
            g, w = g[torch.isfinite(w)], w[torch.isfinite(w)]
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * max(1.0, w.abs().max().item()), msg=name)


@pytest.mark.parametrize("forward", [0, -16])
def test_cuda_kernels_nan_query_stays_nan(emulated_kernels, tmp_path, forward):
    # A NaN query makes every score of its row NaN; fmaxf skips NaN, so the running max stayed
    # -inf and the online softmax's "m_new == -inf: p = 0" branch dropped the row: output 0, LSE
    # -inf (an empty row) and zero gradients, where the CPU op gives NaN.
    B, S, H, Lmax, C, R, Dn, Dv = 1, 4, 2, 8, 32, 8, 16, 16
    q = torch.randn(B, S, H, Dn + R)
    q[0, 1, 0, 0] = float("nan")
    kv_b = torch.randn(H, Dn + Dv, C) / math.sqrt(C)
    cache = torch.randn(B, Lmax, C + R)
    cache[0, 6:] = float("nan")
    g_out, g_lse = torch.randn(B, S, H, Dv), torch.randn(B, S, H)
    scale = 1 / math.sqrt(Dn + R)
    out, lse, *_ = _emulate(emulated_kernels, tmp_path, forward, q, cache, [6], kv_b, g_out, g_lse, scale, Lmax,
                            0, None, True, -1, Dn, Dv)
    want_out, want_lse = mla_prefill(q[..., :Dn], q[..., Dn:], cache, torch.tensor([6], dtype=torch.int32),
                                     kv_b[:, :Dn], kv_b[:, Dn:], scale)
    assert out[0, 1, 0].isnan().all() and lse[0, 1, 0].isnan()
    assert want_out[0, 1, 0].isnan().all() and want_lse[0, 1, 0].isnan()
    ok = ~want_lse.isnan()
    torch.testing.assert_close(lse[ok], want_lse[ok], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[ok], want_out[ok], rtol=1e-4, atol=1e-4)


def test_unbounded_window_is_no_window():
    # window = INT64_MAX (a caller's "unbounded") overflowed t1 + window in end_query_seeing: the
    # CPU forward gave every row 0 / -inf. Any window >= the capacity must equal window = -1.
    torch.manual_seed(0)
    x = make_inputs(2, 20, 3, [30, 20], 32, **SMALL, device="cpu")
    leaves = {k: x[k].detach().clone().requires_grad_() for k in ("q_nope", "q_pe", "latent_cache")}
    res = []
    for window in (-1, 2**63 - 1, 2**62, 32):
        for t in leaves.values():
            t.grad = None
        out, lse = _call(x, window=window, **leaves)
        (out.square().sum() + lse.sum()).backward()
        res.append([out.detach(), lse.detach()] + [t.grad.clone() for t in leaves.values()])
    for r in res[1:]:
        for g, w in zip(r, res[0]):
            assert torch.equal(g, w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["latent_cache", "cache_seqlens", "w_uv"])
def test_device_mismatch_names_argument(name):
    x = make_inputs(2, 3, 2, [5, 3], 6, C=8, R=4, Dn=8, Dv=6, device="cuda")
    with pytest.raises(RuntimeError, match=name):
        _call(x, **{name: x[name].cpu()})


_PEAK_SCRIPT = """
import json, sys, torch
import latentmoe

def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

S, H, threads, mode = {S}, {H}, {threads}, "{mode}"
torch.set_num_threads(threads)
N, R, C, V = 128, 64, 512, 128
q_nope = torch.randn(1, S, H, N); q_pe = torch.randn(1, S, H, R); cache = torch.randn(1, S, C + R)
w_uk = torch.randn(H, N, C) * C ** -0.5; w_uv = torch.randn(H, V, C) * C ** -0.5
lens = torch.full((1,), S, dtype=torch.int32)
op = torch.ops.latentmoe
out, lse = op.mla_prefill(q_nope, q_pe, cache, lens, w_uk, w_uv, 0.07)
g, g_lse = torch.randn_like(out), torch.zeros_like(lse)
small = torch.full((1,), 64, dtype=torch.int32)
op.mla_prefill_backward(g[:, :64].contiguous(), g_lse[:, :64].contiguous(), q_nope[:, :64], q_pe[:, :64],
                        cache, small, w_uk, w_uv, out[:, :64].contiguous(), lse[:, :64].contiguous(), 0.07)
before = status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
if mode == "forward":
    res = op.mla_prefill(q_nope, q_pe, cache, lens, w_uk, w_uv, 0.07)
else:
    res = op.mla_prefill_backward(g, g_lse, q_nope, q_pe, cache, lens, w_uk, w_uv, out, lse, 0.07)
peak = status_kib("VmHWM")
print(json.dumps({{"extra": (peak - before) * 1024, "outputs": sum(t.numel() * t.element_size() for t in res)}}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (peak RSS)")
@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_cpu_extra_memory_with_many_threads(mode):
    # Per-thread buffers are bounded in all (query chunks, the backward's latent-gradient key
    # windows, weight gradients only for each partition's heads). 64 heads on 32 threads at 1K
    # tokens: per-thread full copies of the weight gradients alone were 1 GiB; the budget here
    # is what the kernels allow themselves (256 MiB of query buffers, 64 MiB of latent-gradient
    # windows, weight gradients of heads + threads heads) plus slack.
    import json
    import sys

    import latentmoe

    pkg_root = str(Path(latentmoe.__file__).resolve().parent.parent)
    code = f"import sys; sys.path.insert(0, {pkg_root!r})\n" + _PEAK_SCRIPT.format(S=1024, H=64, threads=32, mode=mode)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    per_head_w = (128 + 128) * 512 * 4
    budget = (256 << 20) + (64 << 20) + (64 + 32) * per_head_w + (64 << 20)
    assert got["extra"] <= got["outputs"] + budget, (got, budget)


def test_strided_cache_seqlens(device):
    # cache_seqlens may be a strided view: its values are checked as the kernel reads them (the
    # check once read the raw buffer, passed [6, 6] for the view [6, 200000], and the kernel read
    # far out of bounds), and valid strided lengths give the contiguous call's result.
    x = make_inputs(2, 4, 2, [6, 5], 8, **SMALL, device=device)
    args = (x["q_nope"], x["q_pe"], x["latent_cache"])
    w = (x["w_uk"], x["w_uv"], 0.3)
    bad = torch.tensor([6, 6, 200000, 5], dtype=torch.int32, device=device)[::2]
    with pytest.raises(ValueError, match="cache_seqlens"):
        mla_prefill(*args, bad, *w)
    good = torch.tensor([6, 0, 5, 0], dtype=torch.int32, device=device)[::2]
    out, lse = mla_prefill(*args, good, *w)
    want, want_lse = mla_prefill(*args, good.contiguous(), *w)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_nan_in_used_inputs_propagates(device):
    # A NaN in a cached key every query sees makes all outputs and LSEs NaN (the LSE once came
    # out -inf, as for an empty row); a NaN in one query's latent part only that query's head.
    x = make_inputs(1, 3, 2, [9], 9, **SMALL, device=device)
    cache = x["latent_cache"].clone()
    cache[0, 0, SMALL["C"] + 1] = float("nan")
    w = (x["w_uk"], x["w_uv"], 0.3)
    out, lse = mla_prefill(x["q_nope"], x["q_pe"], cache, x["cache_seqlens"], *w)
    assert out.isnan().all() and lse.isnan().all()
    q = x["q_nope"].clone()
    q[0, 2, 1, 0] = float("nan")
    out, lse = mla_prefill(q, x["q_pe"], x["latent_cache"], x["cache_seqlens"], *w)
    assert out[0, 2, 1].isnan().all() and lse[0, 2, 1].isnan()
    keep = torch.ones_like(lse, dtype=torch.bool)
    keep[0, 2, 1] = False
    assert torch.isfinite(lse[keep]).all() and torch.isfinite(out[keep]).all()


# ---- the absorbed backward (LATENTMOE_MLA_PREFILL_BACKWARD; CUDA's default) -------------------------
@pytest.mark.parametrize("chunk", [None, "1", "3"])
def test_absorbed_backward_matches_autograd(monkeypatch, device, chunk):
    # The batched-GEMM backward (query chunks of 1 and 3 tokens as well as the default), against
    # fp64 autograd of the reference on the cases the kernels pass: varlen rows shorter and longer
    # than S and empty, NaN past each row's length, prefixes, causal / non-causal / windows, grad_lse,
    # bf16 / fp16, paged caches with shuffled tables (page sizes 1 and 16) and unread slots at zero.
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_BACKWARD", "absorbed")
    if chunk is not None:
        monkeypatch.setenv("LATENTMOE_MLA_PREFILL_CHUNK", chunk)
    test_gradients_match_autograd_fp64(device, 3, SMALL)
    test_gradients_match_autograd_fp64(device, 2, V3)
    test_gradients_chunked_prefix_and_long(device)
    for causal, window in [(True, 9), (False, -1), (False, 4), (True, 0)]:
        test_gradients_causal_and_window(device, causal, window)
    test_gradients_low_precision(device, torch.bfloat16)
    test_gradients_low_precision(device, torch.float16)
    test_paged_matches_contiguous(device, 16)
    test_paged_matches_contiguous(device, 1)
    if device == "cpu":
        _shared_page_gradients_match()


@pytest.mark.parametrize("case", _random_backward_cases(8, seed=11),
                         ids=lambda c: f"B{c[0]}S{c[1]}H{c[2]}p{c[6]}")
def test_absorbed_backward_random_configurations(monkeypatch, case):
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_BACKWARD", "absorbed")
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_CHUNK", str(1 + case[1] // 3))
    test_cpu_backward_random_configurations(monkeypatch, case)


def test_backward_path_setting_checked(monkeypatch):
    x = make_inputs(1, 3, 1, [5], 6, **SMALL, device="cpu")
    g_out = torch.randn(1, 3, 1, SMALL["Dv"], dtype=torch.float64)
    g_lse = torch.zeros(1, 3, 1, dtype=torch.float64)
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_BACKWARD", "fast")
    with pytest.raises(ValueError, match="LATENTMOE_MLA_PREFILL_BACKWARD must be auto, kernel or absorbed"):
        grads_of(op_fn(x, x["cache_seqlens"], 0.3), x, KEYS, g_out, g_lse)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_backward_kernel_forced(monkeypatch):
    # The CUDA backward kernel stays reachable (LATENTMOE_MLA_PREFILL_BACKWARD=kernel) and correct.
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_BACKWARD", "kernel")
    test_gradients_match_autograd_fp64("cuda", 3, SMALL)
    test_gradients_causal_and_window("cuda", True, 9)
    test_paged_matches_contiguous("cuda", 16)


@pytest.mark.parametrize("forward", ["kernel", "absorbed", "gemm"])
def test_absorbed_backward_after_each_forward(monkeypatch, device, forward):
    # The GEMM backward recomputes P and normalises it itself, so it takes out / lse from any
    # forward: fp32 against fp64 autograd, and bf16 / fp16 within twice the low-precision
    # reference's error (after the GEMM forward, P taken as exp(z - lse) with the forward's lse
    # put the bf16 gradients an ulp past that bound).
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_BACKWARD", "absorbed")
    monkeypatch.setenv("LATENTMOE_MLA_PREFILL_FORWARD", forward)
    test_gradients_match_autograd_fp64(device, 3, SMALL)
    for dtype in (torch.bfloat16, torch.float16):
        for seed in range(3):
            torch.manual_seed(seed)
            test_gradients_low_precision(device, dtype)
