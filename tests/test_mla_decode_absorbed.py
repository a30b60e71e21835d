"""latentmoe.ops.mla_decode_absorbed (CPU and CUDA): a decode step's RoPE of the queries, W_UK absorption,
mla_decode on the latent cache and W_UV in one op, against an fp64 pipeline built from
latentmoe.reference.mla and against the unfused ops (bmm_small + mla_decode)."""

from __future__ import annotations

import math

import pytest
import torch

import latentmoe
from latentmoe.ops import bmm_small, mla_decode, mla_decode_absorbed
from latentmoe.reference import mla as ref
from test_mla_decode import MASK_CASES, make_problem

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DTYPES = [F32, BF16, F16]
ODD = dict(N=24, R=16, C=48, V=20)  # small head dims off DeepSeek's powers of two
DEEPSEEK = dict(N=128, R=64, C=512, V=128)


def rope_tables(B, S, R, lens, per_row=True, factor=1.15):
    """HF rotary embeddings at the new tokens' positions: ``cat(freqs, freqs)``, cos and sin times
    an attention factor (as YaRN scales them), fp64. ``per_row``: ``[B, S, R]``, each row at its
    own positions ``lens[b] - S + s``; else ``[1, S, R]`` at row 0's positions."""
    pos = torch.tensor(lens, dtype=F64)[:, None] - S + torch.arange(S, dtype=F64)[None]
    if not per_row:
        pos = pos[:1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, R, 2, dtype=F64) / max(R, 1)))
    freqs = pos[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * factor, emb.sin() * factor


def make_absorbed(B, S, H, N, R, C, V, seqlens, page_size=None, dtype=F32, per_row=True, split_pe=False,
                  scale=None):
    """Keyword arguments of a valid mla_decode_absorbed call: random q, kv_b_weight, HF cos / sin,
    and the cache of tests/test_mla_decode.py's make_problem (contiguous, or paged over a permuted
    block table with spare pages; every slot past a row's length and every unused page NaN)."""
    _, _, kv, lens, table = make_problem(B, S, H, C, R, seqlens, page_size, dtype=dtype)
    q = torch.randn(B, S, H, N + R, dtype=F64).to(dtype)
    w = (torch.randn(H * (N + V), C, dtype=F64) / math.sqrt(C)).to(dtype)
    cos, sin = (t.to(dtype) for t in rope_tables(B, S, R, seqlens, per_row))
    pe_cache = None
    if split_pe:
        kv, pe_cache = kv[..., :C].contiguous(), kv[..., C:].contiguous()
    return dict(
        q=q, cos=cos, sin=sin, kv_b_weight=w, kv_cache=kv, cache_seqlens=lens,
        softmax_scale=(N + R) ** -0.5 if scale is None else scale, nope_dim=N, block_table=table,
        pe_cache=pe_cache,
    )


def reference(a, rope_interleave=True, causal=True, window=-1, dtype=F64, upcast=True):
    """The op's pipeline from latentmoe.reference.mla, in ``dtype``: apply_rope of the rope part,
    einsum with W_UK, the reference mla_decode, einsum with W_UV. Returns ``(out, lse)``.
    fp64 (upcast) is ground truth; the inputs' dtype with ``upcast=False`` is "the same pipeline
    run in low precision" (HF eager's numerics)."""
    q, w, N = a["q"], a["kv_b_weight"], a["nope_dim"]
    B, H = q.shape[0], q.shape[2]
    V = w.shape[0] // H - N
    kv = a["kv_cache"] if a["pe_cache"] is None else torch.cat([a["kv_cache"], a["pe_cache"]], dim=-1)
    cos, sin = (t.expand(B, -1, -1).to(dtype) for t in (a["cos"], a["sin"]))
    q_pe = ref.apply_rope(q[..., N:].to(dtype), cos, sin, rope_interleave)
    w_uk, w_uv = ref.split_kv_b(w.to(dtype), H, N, V)
    q_latent = torch.einsum("bshn,hnc->bshc", q[..., :N].to(dtype), w_uk)
    o_latent, lse = ref.mla_decode(
        q_latent, q_pe, kv.to(dtype), a["cache_seqlens"], a["softmax_scale"], block_table=a["block_table"],
        causal=causal, window=window, upcast=upcast,
    )
    return torch.einsum("bshc,hvc->bshv", o_latent, w_uv), lse


def max_err(x, y):
    return (x.double() - y.double()).abs().max().item() if x.numel() else 0.0


def check_close(out, a, rope_interleave=True, causal=True, window=-1):
    """fp32: to 1e-5 of the fp64 pipeline. bf16 / fp16: the error vs fp64 within twice that of the
    pipeline run in low precision (flash-attention's rule, as tests/test_mla_decode.py), that error
    taken as at least one rounding of the largest output. Queries that see no key give exactly 0."""
    q, V = a["q"], a["kv_b_weight"].shape[0] // a["q"].shape[2] - a["nope_dim"]
    want, lse = reference(a, rope_interleave, causal, window)
    assert out.shape == (*q.shape[:3], V) and out.dtype == q.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    empty = torch.isinf(lse)
    assert torch.all(out[empty] == 0)
    amax = want.abs().max().item() if want.numel() else 0.0
    if q.dtype == F32:
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5 * max(1.0, amax))
    else:
        low, _ = reference(a, rope_interleave, causal, window, dtype=q.dtype, upcast=False)
        e, ref_e = max_err(out, want), max_err(low, want)
        floor = torch.finfo(q.dtype).eps * amax
        assert e <= 2 * max(ref_e, floor) + 1e-4, (e, ref_e, floor)
    return want


def call(a, **kw):
    return mla_decode_absorbed(**a, **kw)


# ---- against the fp64 reference -------------------------------------------------------------------


@pytest.mark.parametrize("rope_interleave", [True, False])
@pytest.mark.parametrize("page_size", [None, 1, 16, 17, 64])
@pytest.mark.parametrize("H", [1, 3, 16])
@pytest.mark.parametrize("S", [1, 2])
def test_absorbed_matches_reference(S, H, page_size, rope_interleave):
    # Row 1 has no token (output 0); row 0 is short, row 2 spans pages and a 128-key tile.
    a = make_absorbed(3, S, H, **ODD, seqlens=[37, 0, 130], page_size=page_size)
    out = call(a, rope_interleave=rope_interleave)
    check_close(out, a, rope_interleave)
    assert torch.all(out[1] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [None, 64])
def test_absorbed_deepseek_dims(dtype, page_size):
    a = make_absorbed(3, 1, 16, **DEEPSEEK, seqlens=[300, 0, 77], page_size=page_size, dtype=dtype)
    for interleave in (True, False):
        out = call(a, rope_interleave=interleave)
        check_close(out, a, interleave)
        assert torch.all(out[1] == 0)


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("causal", [True, False])
def test_absorbed_low_precision_odd_dims(dtype, causal):
    a = make_absorbed(3, 2, 3, **ODD, seqlens=[64, 5, 0], page_size=17, dtype=dtype)
    check_close(call(a, rope_interleave=False, causal=causal), a, False, causal)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize(
    "N,R,V",
    [(0, 16, 20), (24, 16, 0), (24, 0, 20), (0, 2, 7), (0, 16, 0), (1, 2, 1)],
    ids=["no-nope", "no-value", "no-rope", "rope-of-2-only", "rope-only-no-value", "tiny"],
)
def test_absorbed_edge_dims(dtype, N, R, V):
    # N = 0: the scores come from the rope part alone (q_latent = 0); V = 0: an empty output;
    # R = 0: no rotation (cos / sin [B, S, 0]).
    a = make_absorbed(2, 2, 3, N, R, 37, V, seqlens=[20, 3], page_size=16, dtype=dtype,
                      scale=0.3)
    out = call(a)
    check_close(out, a)
    assert out.shape == (2, 2, 3, V)


@pytest.mark.parametrize("causal,window,S", MASK_CASES)
@pytest.mark.parametrize("page_size", [None, 16])
def test_absorbed_masks(causal, window, S, page_size):
    # Row 1 (2 tokens) with 3 queries: the first causal query sits before the cache and sees nothing.
    a = make_absorbed(3, S, 3, **ODD, seqlens=[50, 2, 300], page_size=page_size)
    check_close(call(a, causal=causal, window=window), a, True, causal, window)


@pytest.mark.parametrize("rope_interleave", [True, False])
def test_absorbed_cos_sin_leading_dim_one_or_batch(rope_interleave):
    a = make_absorbed(3, 2, 3, **ODD, seqlens=[40, 9, 25], per_row=False)
    one = call(a, rope_interleave=rope_interleave)
    check_close(one, a, rope_interleave)
    # The same tables given per row give the same bits.
    expanded = dict(a, cos=a["cos"].expand(3, -1, -1).contiguous(),
                    sin=a["sin"].expand(3, -1, -1).contiguous())
    assert torch.equal(call(expanded, rope_interleave=rope_interleave), one)
    # Different tables per row: each row reads its own (the positions differ, so do the outputs).
    cos, sin = rope_tables(3, 2, ODD["R"], [40, 9, 25], per_row=True)
    per_row = dict(a, cos=cos.float(), sin=sin.float())
    got = call(per_row, rope_interleave=rope_interleave)
    check_close(got, per_row, rope_interleave)
    torch.testing.assert_close(got[0], one[0], rtol=0, atol=0)  # row 0's tables are the shared ones
    assert not torch.equal(got[1:], one[1:])


def test_absorbed_cos_sin_batch_of_one():
    # B = 1: [1, S, R] is both the shared and the per-row layout.
    a = make_absorbed(1, 2, 16, **ODD, seqlens=[33], page_size=16)
    check_close(call(a), a)


def test_absorbed_sixteen_rows():
    # The most query rows the op takes (B * S = 16), rows of different lengths, one empty.
    a = make_absorbed(8, 2, 3, **ODD, seqlens=[40, 0, 1, 2, 17, 64, 129, 5], page_size=16)
    out = call(a, rope_interleave=False)
    check_close(out, a, False)
    assert torch.all(out[1] == 0)


def test_absorbed_matches_naive_attention():
    """An independent route: decompress every cached token to per-head K / V (reference.mla_naive,
    fp64) rather than absorbing W_UK and W_UV."""
    a = make_absorbed(2, 2, 3, **ODD, seqlens=[45, 19])
    N, R, C, V = ODD["N"], ODD["R"], ODD["C"], ODD["V"]
    q, kv = a["q"].double(), a["kv_cache"].double().nan_to_num()
    q_pe = ref.apply_rope(q[..., N:], a["cos"].double(), a["sin"].double(), True)
    w_uk, w_uv = ref.split_kv_b(a["kv_b_weight"].double(), 3, N, V)
    want, _ = ref.mla_naive(q[..., :N], q_pe, kv[..., :C], kv[..., C:], w_uk, w_uv, a["softmax_scale"],
                            cache_seqlens=a["cache_seqlens"], causal=True)
    torch.testing.assert_close(call(a).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ["native", "generic"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_absorbed_cpu_isa_paths(monkeypatch, isa, dtype):
    # The portable instantiations (LATENTMOE_CPU_ISA=generic) of the products and the attention.
    if isa != "native":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", isa)
    a = make_absorbed(2, 2, 5, 33, 8, 37, 11, seqlens=[301, 130], page_size=17, dtype=dtype, scale=0.2)
    check_close(call(a, window=200), a, True, True, 200)


# ---- paged / split / max_seqlen variants give the same bits --------------------------------------


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_absorbed_split_pe_cache_equals_fused(page_size, dtype):
    a = make_absorbed(3, 2, 3, **ODD, seqlens=[30, 0, 7], page_size=page_size, dtype=dtype)
    fused = call(a)
    C = ODD["C"]
    split = dict(a, kv_cache=a["kv_cache"][..., :C].contiguous(),
                 pe_cache=a["kv_cache"][..., C:].contiguous())
    got = call(split)
    check_close(got, split)
    # As tests/test_mla_decode.py's test_decode_split_pe_cache_equals_fused: on CPUs with
    # AVX512_BF16, fused contiguous bf16 rows are scored with vdpbf16ps, split rows through fp32.
    if dtype == BF16 and page_size is None and latentmoe._C.cpu_bf16dp():
        check_close(fused, a)
        return
    assert torch.equal(got, fused)


@pytest.mark.parametrize("page_size", [None, 16])
def test_absorbed_given_max_seqlen_matches(page_size):
    a = make_absorbed(3, 2, 3, **ODD, seqlens=[300, 0, 41], page_size=page_size)
    cap = a["kv_cache"].shape[1] if page_size is None else a["block_table"].shape[1] * page_size
    assert cap > 300
    want = call(a)
    for bound in (300, cap):  # the CPU checks the values either way: the same bits
        assert torch.equal(call(a, max_seqlen=bound), want)


@pytest.mark.parametrize("page_size", [1, 17])
def test_absorbed_paged_equals_contiguous(page_size):
    # The same tokens in a contiguous cache and in pages over a permuted table: the same bits.
    lens = [70, 12]
    a = make_absorbed(2, 1, 3, **ODD, seqlens=lens)
    kv = a["kv_cache"]
    per_row = -(-kv.shape[1] // page_size)
    n_pages = 2 * per_row + 2
    table = torch.randperm(n_pages)[: 2 * per_row].view(2, per_row).to(torch.int32)
    store = torch.full((n_pages, page_size, kv.shape[2]), float("nan"))
    for b, L in enumerate(lens):
        for t in range(L):
            store[table[b, t // page_size], t % page_size] = kv[b, t]
    assert torch.equal(call(dict(a, kv_cache=store, block_table=table)), call(a))


# ---- the unfused ops ----------------------------------------------------------------------------


def unfused(a, rope_interleave=True, causal=True, window=-1):
    """What the module did before the fused op: q_pe rotated in fp32 and rounded once, bmm_small
    with W_UK, mla_decode, bmm_small with W_UV^T, W_UK / W_UV views of kv_b_weight."""
    q, w, N = a["q"], a["kv_b_weight"], a["nope_dim"]
    B, S, H, _ = q.shape
    C = w.shape[1]
    V = w.shape[0] // H - N
    q_pe = ref.apply_rope(q[..., N:].float(), a["cos"].expand(B, -1, -1).float(),
                          a["sin"].expand(B, -1, -1).float(), rope_interleave).to(q.dtype).contiguous()
    wv = w.view(H, N + V, C)
    q_heads = q[..., :N].permute(2, 0, 1, 3).reshape(H, B * S, N).contiguous()
    q_latent = bmm_small(q_heads, wv[:, :N]).view(H, B, S, C).permute(1, 2, 0, 3).contiguous()
    o_latent, _ = mla_decode(q_latent, q_pe, a["kv_cache"], a["cache_seqlens"], a["softmax_scale"],
                             block_table=a["block_table"], causal=causal, window=window,
                             pe_cache=a["pe_cache"])
    o_heads = o_latent.view(B * S, H, C).transpose(0, 1).contiguous()
    return bmm_small(o_heads, wv[:, N:].transpose(1, 2)).view(H, B, S, V).permute(1, 2, 0, 3).contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope_interleave", [True, False])
@pytest.mark.parametrize("page_size,split_pe", [(None, False), (17, False), (16, True)])
def test_absorbed_equals_unfused_ops(dtype, rope_interleave, page_size, split_pe):
    a = make_absorbed(3, 2, 3, **ODD, seqlens=[60, 0, 129], page_size=page_size, dtype=dtype,
                      split_pe=split_pe)
    got = call(a, rope_interleave=rope_interleave, window=70)
    want = unfused(a, rope_interleave, window=70)
    assert got.dtype == want.dtype and got.shape == want.shape
    if dtype == F32:
        # The same kernels; the rotation may round an ulp differently (FMA contraction).
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    else:
        # A q_pe an ulp apart in bf16 / fp16 moves the result by a rounding or two of the output.
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got.float(), want.float(), rtol=2 * eps,
                                   atol=2 * eps * want.abs().max().item())


def test_absorbed_equals_unfused_ops_deepseek_dims():
    a = make_absorbed(2, 1, 16, **DEEPSEEK, seqlens=[200, 33], page_size=64)
    got, want = call(a), unfused(a)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


# ---- memory: inputs untouched, unused slots never read -------------------------------------------


def _bits(t):
    """The raw bits of a floating tensor (exact comparison, NaN payloads included)."""
    if not t.is_floating_point():
        return t
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("page_size,split_pe", [(None, False), (16, False), (1, True)])
def test_absorbed_does_not_mutate_inputs(page_size, split_pe):
    a = make_absorbed(2, 2, 3, **ODD, seqlens=[20, 9], page_size=page_size, dtype=BF16, split_pe=split_pe)
    before = {k: v.clone() for k, v in a.items() if isinstance(v, torch.Tensor)}
    call(a, rope_interleave=False)
    for k, v in before.items():  # bitwise, NaN poison included (nan_to_num would hide a write of 0)
        assert torch.equal(_bits(a[k]), _bits(v)), k


def test_absorbed_unused_cache_and_pages_never_reach_the_output():
    # Slots past each row's length, spare pages, and table entries past a row's pages (garbage
    # like -1 padding) are never read: NaN there changes nothing, inf there neither.
    a = make_absorbed(3, 2, 3, **ODD, seqlens=[20, 0, 33], page_size=16)
    want = call(a)
    assert torch.isfinite(want).all()
    kv = a["kv_cache"]
    nan_slots = kv.isnan().all(-1)
    assert nan_slots.sum() > 16  # spare pages and partial pages hold the poison
    other = kv.clone()
    other[nan_slots] = float("inf")
    table = a["block_table"].clone()
    table[0, 2:] = -1  # row 0 has 20 tokens: pages 0 and 1 only
    table[1, :] = 1_000_000  # row 1 has none
    assert torch.equal(call(dict(a, kv_cache=other, block_table=table)), want)
    # ... while a NaN in a slot a row reads does reach it (the poison is where it would show).
    used = int(a["block_table"][2, 1])
    poisoned = kv.clone()
    poisoned[used, 0, 0] = float("nan")  # row 2's token 16
    got = call(dict(a, kv_cache=poisoned))
    assert got[2].isnan().all() and torch.isfinite(got[:2]).all()


def test_absorbed_reads_each_heads_weight_rows():
    # kv_b_weight rows are per head [N rows of W_UK | V rows of W_UV]: a NaN in head 1's W_UK
    # spoils head 1 only, a NaN in head 2's W_UV row v spoils out[..., 2, v] only.
    H, N, V = 3, ODD["N"], ODD["V"]
    a = make_absorbed(2, 2, H, **ODD, seqlens=[30, 7])
    w = a["kv_b_weight"].clone()
    w[1 * (N + V) + 5, 3] = float("nan")
    out = call(dict(a, kv_b_weight=w))
    assert out[:, :, 1].isnan().all()
    assert torch.isfinite(out[:, :, [0, 2]]).all()
    w = a["kv_b_weight"].clone()
    w[2 * (N + V) + N + 7, 11] = float("nan")
    out = call(dict(a, kv_b_weight=w))
    assert out[:, :, 2, 7].isnan().all()
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[:, :, 2, 7] = False
    assert torch.isfinite(out[mask]).all()


def test_absorbed_query_rope_part_matters_per_row_and_head():
    # A NaN in one head's rope part of one query spoils exactly that (row, token, head).
    a = make_absorbed(2, 2, 3, **ODD, seqlens=[30, 7])
    q = a["q"].clone()
    q[1, 0, 2, ODD["N"] + 3] = float("nan")
    out = call(dict(a, q=q))
    assert out[1, 0, 2].isnan().all()
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[1, 0, 2] = False
    assert torch.isfinite(out[mask]).all()


# ---- bad input ----------------------------------------------------------------------------------


def _good(page_size=16):
    return make_absorbed(2, 1, 3, **ODD, seqlens=[20, 9], page_size=page_size)


def _set(**kw):
    """A mutation: each value a function of the good arguments."""
    return lambda a: a.update({k: f(a) for k, f in kw.items()})


D = ODD["N"] + ODD["R"]
W_ROWS = 3 * (ODD["N"] + ODD["V"])
# (mutation, the argument the error names, whether the fake kernel (meta tensors) sees it: values
# and contiguity are checked by the real kernel only).
BAD = [
    (_set(q=lambda a: a["q"][0]), "q", True),  # 3-D
    (_set(q=lambda a: torch.randn(2, 1, 3, D + 2)[..., :D]), "q", False),  # non-contiguous
    (_set(q=lambda a: a["q"].to(torch.int32)), "q", True),
    (_set(q=lambda a: a["q"].double()), "q", True),
    (_set(q=lambda a: torch.randn(17, 1, 3, D)), "q", True),  # 17 query rows
    (_set(q=lambda a: torch.randn(1, 17, 3, D)), "q", True),
    (_set(q=lambda a: torch.randn(2, 1, 0, D)), "q", True),  # no heads
    (_set(q=lambda a: torch.randn(2, 1, 3, 0), nope_dim=lambda a: 0), "q", True),  # N = R = 0: empty
    (_set(nope_dim=lambda a: -1), "nope_dim", True),
    (_set(nope_dim=lambda a: D + 1), "nope_dim", True),
    (_set(nope_dim=lambda a: ODD["N"] + 1), "q", True),  # odd rope dim
    (_set(cos=lambda a: a["cos"][..., :-2].contiguous()), "cos", True),
    (_set(cos=lambda a: torch.cat([a["cos"]] * 3)), "cos", True),  # leading dim neither B nor 1
    (_set(cos=lambda a: torch.cat([a["cos"], a["cos"]], 1)), "cos", True),  # S mismatch
    (_set(cos=lambda a: a["cos"].double()), "cos", True),
    (_set(cos=lambda a: a["cos"][0]), "cos", True),  # 2-D
    (_set(sin=lambda a: a["sin"][..., :-2].contiguous()), "sin", True),
    (_set(sin=lambda a: a["sin"].half()), "sin", True),
    (_set(sin=lambda a: torch.randn(2, 1, 2 * ODD["R"])[..., ::2]), "sin", False),  # non-contiguous
    (_set(kv_b_weight=lambda a: a["kv_b_weight"][:-1].contiguous()), "kv_b_weight", True),  # rows % H
    (_set(kv_b_weight=lambda a: a["kv_b_weight"][: 3 * (ODD["N"] - 1)].contiguous()), "kv_b_weight", True),
    (_set(kv_b_weight=lambda a: a["kv_b_weight"].half()), "kv_b_weight", True),
    (_set(kv_b_weight=lambda a: a["kv_b_weight"].reshape(-1)), "kv_b_weight", True),  # 1-D
    (_set(kv_b_weight=lambda a: a["kv_b_weight"].t().contiguous().t()), "kv_b_weight", False),
    (_set(kv_b_weight=lambda a: torch.randn(W_ROWS, 0)), "kv_b_weight", True),  # C = 0
    (_set(kv_b_weight=lambda a: a["kv_b_weight"][:, :-1].contiguous()), "kv_cache", True),  # C vs the cache
    (_set(kv_cache=lambda a: a["kv_cache"].half()), "kv_cache", True),
    (_set(kv_cache=lambda a: a["kv_cache"][..., :-2].contiguous()), "kv_cache", True),
    (_set(cache_seqlens=lambda a: a["cache_seqlens"].long()), "cache_seqlens", True),
    (_set(cache_seqlens=lambda a: torch.tensor([20, 9, 1], dtype=torch.int32)), "cache_seqlens", True),
    (_set(cache_seqlens=lambda a: torch.tensor([20, 1000], dtype=torch.int32)), "cache_seqlens",
     False),  # more tokens than the capacity
    (_set(cache_seqlens=lambda a: torch.tensor([-1, 9], dtype=torch.int32)), "cache_seqlens", False),
    (_set(block_table=lambda a: a["block_table"].fill_(10_000)), "block_table", False),
    (_set(block_table=lambda a: a["block_table"].fill_(-1)), "block_table", False),
    (_set(block_table=lambda a: a["block_table"].long()), "block_table", True),
    (_set(block_table=lambda a: a["block_table"][:1].contiguous()), "block_table", True),
    (_set(window=lambda a: -2), "window", True),
    (_set(softmax_scale=lambda a: float("nan")), "softmax_scale", True),
    (_set(softmax_scale=lambda a: float("inf")), "softmax_scale", True),
    (_set(max_seqlen=lambda a: 19), "max_seqlen", False),  # below the longest entry (20)
    (_set(max_seqlen=lambda a: -2), "max_seqlen", True),
    (_set(max_seqlen=lambda a: 10_000), "max_seqlen", True),  # above the capacity
    # with a pe_cache, kv_cache must be C wide
    (_set(pe_cache=lambda a: a["kv_cache"][..., ODD["C"]:].contiguous()), "kv_cache", True),
    (_set(kv_cache=lambda a: a["kv_cache"][..., : ODD["C"]].contiguous(),
          pe_cache=lambda a: a["kv_cache"][..., ODD["C"] + 2 :].contiguous()), "pe_cache", True),
    (_set(kv_cache=lambda a: a["kv_cache"][..., : ODD["C"]].contiguous(),
          pe_cache=lambda a: a["kv_cache"][..., ODD["C"]:].double().contiguous()), "pe_cache", True),
]


def _bad_args(mutate):
    a = _good()
    a.setdefault("window", -1)
    a.setdefault("max_seqlen", -1)
    mutate(a)
    return a


@pytest.mark.parametrize("mutate,name,_", BAD, ids=[f"{i}-{name}" for i, (_, name, _) in enumerate(BAD)])
def test_absorbed_bad_input(mutate, name, _):
    with pytest.raises(ValueError, match=rf"latentmoe\.mla_decode_absorbed: .*argument '{name}'"):
        call(_bad_args(mutate))


def _to_meta(a):
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in a.items()}


@pytest.mark.parametrize(
    "mutate,name", [(m, n) for m, n, meta in BAD if meta],
    ids=[f"{i}-{n}" for i, (_, n, meta) in enumerate(BAD) if meta],
)
def test_absorbed_fake_raises_as_the_cpu_kernel(mutate, name):
    a = _bad_args(mutate)
    with pytest.raises(ValueError) as cpu:
        call(a)
    with pytest.raises(ValueError) as meta:
        call(_to_meta(a))
    assert str(meta.value) == str(cpu.value)


def test_absorbed_good_edge_arguments_accepted():
    # The boundaries of the checks: max_seqlen exactly the longest row, unused table entries out
    # of range (nope_dim 0 and q.size(3): test_absorbed_edge_dims).
    a = _good()
    want = call(a)
    check_close(want, a)
    assert torch.equal(call(a, max_seqlen=20), want)
    a["block_table"][1, 1:] = -1  # row 1 has 9 tokens: page 0 only
    assert torch.equal(call(a), want)


# ---- fake kernel, opcheck, compile ----------------------------------------------------------------


@pytest.mark.parametrize("page_size,split_pe", [(None, False), (16, False), (16, True)])
def test_absorbed_fake_kernel_shapes(page_size, split_pe):
    # (V = 0, an empty output, is among tests/test_fake_checks.py's variants.)
    V = 20
    from torch._subclasses.fake_tensor import FakeTensorMode

    a = make_absorbed(2, 2, 3, 24, 16, 48, V, seqlens=[20, 9], page_size=page_size, split_pe=split_pe,
                      dtype=BF16)
    real = call(a)
    with FakeTensorMode() as mode:
        fake_args = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
        fake = call(fake_args)
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride())
    meta = call(_to_meta(a))
    assert meta.device.type == "meta"
    assert (meta.shape, meta.dtype, meta.stride()) == (real.shape, real.dtype, real.stride())


def _positional(a, interleave=True, causal=True, window=-1, max_seqlen=-1):
    return (a["q"], a["cos"], a["sin"], a["kv_b_weight"], a["kv_cache"], a["cache_seqlens"], a["block_table"],
            a["softmax_scale"], a["nope_dim"], interleave, causal, window, a["pe_cache"], max_seqlen)


def test_absorbed_opcheck():
    op = torch.ops.latentmoe.mla_decode_absorbed.default
    a = make_absorbed(2, 2, 3, 8, 4, 12, 6, seqlens=[20, 9], page_size=16)
    a["kv_cache"] = a["kv_cache"].nan_to_num()  # opcheck compares outputs with NaN-free inputs
    torch.library.opcheck(op, _positional(a, False, True, -1, 20))
    a = make_absorbed(2, 1, 3, 8, 4, 12, 6, seqlens=[20, 9], split_pe=True, per_row=False)
    a["kv_cache"], a["pe_cache"] = a["kv_cache"].nan_to_num(), a["pe_cache"].nan_to_num()
    torch.library.opcheck(op, _positional(a, True, False, 4))


def test_absorbed_torch_compile_fullgraph():
    a = make_absorbed(2, 2, 3, **ODD, seqlens=[20, 9], page_size=16)

    def step(q, cos, sin, w, kv, seqlens, table):
        out = mla_decode_absorbed(q * 2, cos, sin, w, kv, seqlens, 0.3, ODD["N"], block_table=table,
                                  rope_interleave=False)
        return out + 1

    args = (a["q"], a["cos"], a["sin"], a["kv_b_weight"], a["kv_cache"], a["cache_seqlens"], a["block_table"])
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(got, step(*args), rtol=0, atol=0)


# ---- autograd, devices, determinism --------------------------------------------------------------


@pytest.mark.parametrize("which", ["q", "kv_b_weight", "kv_cache"])
def test_gradient_reaching_it_raises(which):
    a = make_absorbed(1, 1, 2, 8, 4, 12, 6, seqlens=[5])
    a["kv_cache"] = a["kv_cache"].nan_to_num()
    a[which] = a[which].clone().requires_grad_()
    out = call(a)
    with pytest.raises(RuntimeError, match="mla_decode_absorbed: has no backward"):
        out.sum().backward()


def test_no_grad_mode_runs():
    a = make_absorbed(1, 1, 2, 8, 4, 12, 6, seqlens=[5])
    a["q"] = a["q"].clone().requires_grad_()
    with torch.no_grad():
        out = call(a)
    assert not out.requires_grad


def _to_cuda(a):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in a.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("which", ["cos", "kv_b_weight", "kv_cache", "cache_seqlens", "block_table"])
def test_absorbed_cuda_device_mismatch_names_argument(which):
    # Everything on CUDA but one argument (or only that one on CUDA): a clear error naming it.
    a = _to_cuda(_good())
    a[which] = a[which].cpu()
    with pytest.raises((RuntimeError, ValueError), match=f"mla_decode_absorbed: argument '{which}'"):
        call(a)
    b = _good()
    b[which] = b[which].cuda()
    with pytest.raises((RuntimeError, ValueError), match="mla_decode_absorbed: argument"):
        call(b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size,split_pe", [(None, False), (16, False), (17, True), (None, True)])
@pytest.mark.parametrize("rope_interleave", [True, False])
def test_absorbed_cuda_matches_reference(dtype, page_size, split_pe, rope_interleave):
    """The CUDA op (RoPE kernel, cuBLAS products into the interleaved layouts, mla_decode's kernels)
    against the fp64 pipeline on the CPU, with NaN in every unused cache slot and page, per-row cos /
    sin, two query tokens, odd dims, a row longer than the others and an empty row."""
    a = make_absorbed(3, 2, 5, **ODD, seqlens=[300, 0, 41], page_size=page_size, dtype=dtype, split_pe=split_pe)
    out = call(_to_cuda(a), rope_interleave=rope_interleave)
    assert out.is_cuda
    check_close(out.cpu(), a, rope_interleave)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal,window,Sq", MASK_CASES)
def test_absorbed_cuda_masks_and_deepseek_dims(causal, window, Sq):
    a = make_absorbed(2, Sq, 16, **DEEPSEEK, seqlens=[700, 33], page_size=64, dtype=BF16, per_row=False)
    out = call(_to_cuda(a), causal=causal, window=window)
    check_close(out.cpu(), a, causal=causal, window=window)
    # the same call with max_seqlen given (the capacity, 768: no host copy) and captured in a CUDA graph
    g = _to_cuda(a)
    cap = a["block_table"].shape[1] * 64
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call(g, causal=causal, window=window, max_seqlen=cap)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = call(g, causal=causal, window=window, max_seqlen=cap)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_absorbed_deterministic_across_runs_and_threads(dtype):
    """The same bits run to run at a given thread count. Across thread counts the results agree to
    rounding only: like mla_decode, the op sizes its key splits (merged by LSE) by the thread count
    (bmm_small alone is bitwise the same whatever the count)."""
    a = make_absorbed(3, 2, 16, **ODD, seqlens=[700, 0, 300], page_size=17, dtype=dtype)
    old = torch.get_num_threads()
    outs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            first, again = call(a), call(a)
            assert torch.equal(_bits(first), _bits(again)), threads
            # the unfused ops at the same thread count split the keys the same way
            tol = 1e-6 if dtype == F32 else 2 * torch.finfo(dtype).eps
            torch.testing.assert_close(first, unfused(a), rtol=tol, atol=tol)
            outs[threads] = first
    finally:
        torch.set_num_threads(old)
    for out in outs.values():
        check_close(out, a)
    tol = 1e-6 if dtype == F32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(outs[1].float(), outs[2].float(), rtol=tol, atol=tol)
