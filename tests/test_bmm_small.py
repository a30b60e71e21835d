"""latentmoe.ops.bmm_small (MLA's absorbed per-head products in a CPU decode step) against torch.bmm
in fp64, on weight views read in place, and the module's use of it."""

from __future__ import annotations

import pytest
import torch

from latentmoe.ops import bmm_small

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tol(dtype):
    # fp32 accumulation, one rounding to the output dtype.
    return 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps


def _close(got, want, dtype):
    tol = _tol(dtype)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


def _views(G, K, N, dtype, gap=3):
    """Both weight layouts as slices of NaN-poisoned parents: [G, K, N] with rows of N adjacent
    (row stride N + gap, batch stride past a NaN block), and the transposed view of [G, N, K] rows
    (rows of K adjacent). Only the viewed elements are finite: a read outside them shows as NaN."""
    kn_parent = torch.full((G, K + 2, N + gap), float("nan"), dtype=dtype)
    kn = kn_parent[:, 1 : K + 1, :N]
    kn.copy_((torch.randn(G, K, N) / max(K, 1) ** 0.5).to(dtype))
    nk_parent = torch.full((G, N + 2, K + gap), float("nan"), dtype=dtype)
    nk_rows = nk_parent[:, 1 : N + 1, :K]
    nk_rows.copy_((torch.randn(G, N, K) / max(K, 1) ** 0.5).to(dtype))
    return {"kn": kn, "nk": nk_rows.transpose(1, 2)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize(
    "G,M,K,N", [(1, 1, 1, 1), (16, 1, 128, 512), (16, 1, 512, 128), (3, 2, 37, 45), (2, 16, 65, 1100), (5, 5, 9, 31)]
)
def test_bmm_small_matches_fp64(dtype, layout, G, M, K, N):
    w = _views(G, K, N, dtype)[layout]
    x = torch.randn(G, M, K).to(dtype)
    got = bmm_small(x, w)
    assert got.dtype == dtype and got.shape == (G, M, N) and got.is_contiguous()
    assert torch.isfinite(got).all()  # never read the NaN gaps of the parents
    _close(got, torch.bmm(x.double(), w.double()), dtype)


def test_bmm_small_mla_absorbed_views():
    """The module's two products: q_nope [H, M, N] @ W_UK and o [H, M, C] @ W_UV^T, both views of
    kv_b_proj's weight [H * (N + V), C]."""
    H, N, V, C = 16, 128, 128, 512
    for dtype in DTYPES:
        wv = (torch.randn(H * (N + V), C) / C**0.5).to(dtype).view(H, N + V, C)
        q, o = torch.randn(H, 1, N).to(dtype), torch.randn(H, 1, C).to(dtype)
        _close(bmm_small(q, wv[:, :N]), torch.bmm(q.double(), wv[:, :N].double()), dtype)
        w_uv_t = wv[:, N:].transpose(1, 2)
        _close(bmm_small(o, w_uv_t), torch.bmm(o.double(), w_uv_t.double()), dtype)


def test_bmm_small_broadcast_batch_and_size_one_dims():
    # Batch stride 0 (one weight for every entry), and size-1 dims whose strides mean nothing.
    w = torch.randn(1, 6, 9).expand(4, 6, 9)
    x = torch.randn(4, 3, 6)
    _close(bmm_small(x, w), torch.bmm(x.double(), w.double()), torch.float32)
    for w in (torch.randn(3, 9, 1)[:, ::2], torch.randn(3, 1, 7)[:, :, ::2]):  # N = 1 strided; K = 1 strided
        x = torch.randn(3, 2, w.shape[1])
        _close(bmm_small(x, w), torch.bmm(x.double(), w.double()), torch.float32)


@pytest.mark.parametrize("isa", ["generic", "avx2", "native"])
def test_bmm_small_cpu_isa_paths(monkeypatch, isa):
    """The portable, AVX2 and AVX-512 instantiations (LATENTMOE_CPU_ISA) all match fp64 and are
    deterministic run to run."""
    if isa != "native":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", isa)
    for dtype in DTYPES:
        for w in _views(3, 70, 300, dtype).values():
            x = torch.randn(3, 3, 70).to(dtype)
            a, b = bmm_small(x, w), bmm_small(x, w)
            assert torch.equal(a, b)
            _close(a, torch.bmm(x.double(), w.double()), dtype)


def test_bmm_small_thread_count_does_not_change_bits():
    old = torch.get_num_threads()
    try:
        for w in _views(5, 300, 1100, torch.float32).values():
            x = torch.randn(5, 2, 300)
            outs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                outs.append(bmm_small(x, w))
            assert all(torch.equal(o, outs[0]) for o in outs[1:])
    finally:
        torch.set_num_threads(old)


def test_bmm_small_empty_and_inputs_untouched():
    assert bmm_small(torch.randn(0, 2, 8), torch.randn(0, 8, 5)).shape == (0, 2, 5)
    assert bmm_small(torch.randn(3, 0, 8), torch.randn(3, 8, 5)).shape == (3, 0, 5)
    assert bmm_small(torch.randn(3, 2, 8), torch.randn(3, 8, 0)).shape == (3, 2, 0)
    for w in (torch.randn(3, 0, 5), torch.randn(3, 5, 0).transpose(1, 2)):  # K = 0: empty sums
        out = bmm_small(torch.randn(3, 2, 0), w)
        assert out.shape == (3, 2, 5) and torch.equal(out, torch.zeros(3, 2, 5))
    x, w = torch.randn(2, 3, 8), torch.randn(2, 8, 5)
    copies = [t.clone() for t in (x, w)]
    bmm_small(x, w)
    assert all(torch.equal(t, c) for t, c in zip((x, w), copies))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(2, 17, 8), torch.randn(2, 8, 4)), "'input' has 17 rows per batch entry"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(3, 8, 4)), "'weight' dim 0"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(2, 9, 4)), "'weight' dim 1"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(2, 8, 4).double()), "'weight' has dtype"),
        (lambda: (torch.randn(2, 3, 8).int(), torch.randn(2, 8, 4)), "'input' must be float32"),
        (lambda: (torch.randn(3, 8), torch.randn(2, 8, 4)), "'input' must be 3-D"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(8, 4)), "'weight' must be 3-D"),
        (lambda: (torch.randn(2, 8, 3).transpose(1, 2), torch.randn(2, 8, 4)), "'input' must be contiguous"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(2, 8, 8)[:, :, ::2]), "'weight' .* must have unit stride"),
    ],
)
def test_bmm_small_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        bmm_small(*make())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bmm_small_rejects_cuda_tensors():
    with pytest.raises(RuntimeError, match="argument 'input' is on cuda"):
        bmm_small(torch.randn(2, 1, 8, device="cuda"), torch.randn(2, 8, 4, device="cuda"))


def test_bmm_small_opcheck_and_compile():
    x, w = torch.randn(3, 2, 40), torch.randn(3, 40, 7)
    torch.library.opcheck(torch.ops.latentmoe.bmm_small.default, (x, w))
    fn = torch.compile(lambda a, b: bmm_small(a, b) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, w), bmm_small(x, w) * 2)


def test_gradient_reaching_it_raises():
    x = torch.randn(2, 1, 8, requires_grad=True)
    out = bmm_small(x, torch.randn(2, 8, 4))
    with pytest.raises(RuntimeError, match="bmm_small: has no backward"):
        out.sum().backward()


def _decode_step_ops(attn, x, pe, cache):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = attn(x, pe, None, cache=cache)[0]
    return out, {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_decode_step_uses_bmm_small_without_grad(dtype, monkeypatch):
    """A CPU decode step without a gradient runs as one mla_decode_absorbed call (which takes both
    absorbed products through bmm_small's kernel); with that path off, both products go through
    the bmm_small op (no aten::bmm, no fp32 copy of bf16 weights); all give the result of the
    torch.bmm path."""
    import copy

    from transformers import DeepseekV3Config

    import latentmoe.nn.mla as mla_mod
    from latentmoe.nn import LatentKVCache, MultiHeadLatentAttention

    cfg = DeepseekV3Config(
        hidden_size=96, num_attention_heads=3, num_key_value_heads=3, q_lora_rank=None, kv_lora_rank=48,
        qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20, num_hidden_layers=1,
    )
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(cfg, 0).to(dtype).eval()
    cache = LatentKVCache(1, 2, 64, 48, 16, dtype=dtype)
    cache.kv[0][:, :30] = torch.randn(2, 30, 64).to(dtype)
    cache.advance(0, 30)
    caches = [copy.deepcopy(cache) for _ in range(2)]
    x = torch.randn(2, 1, 96).to(dtype)
    pe = (torch.randn(2, 1, 16).to(dtype), torch.randn(2, 1, 16).to(dtype))
    with torch.no_grad():
        fused, ops = _decode_step_ops(attn, x, pe, cache)
    assert "latentmoe::mla_decode_absorbed" in ops, ops
    assert not {"latentmoe::bmm_small", "latentmoe::mla_decode", "aten::bmm"} & ops, ops
    monkeypatch.setattr(MultiHeadLatentAttention, "_fused_decode_applies", lambda *a: False)
    with torch.no_grad():
        got, ops = _decode_step_ops(attn, x, pe, caches[0])
    assert "latentmoe::bmm_small" in ops and "aten::bmm" not in ops
    monkeypatch.setattr(mla_mod, "bmm_small_applies", lambda *a: False)
    with torch.no_grad():
        want, ops = _decode_step_ops(attn, x, pe, caches[1])
    assert "latentmoe::bmm_small" not in ops and "aten::bmm" in ops
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    # (bf16: the fused op rotates q_pe in fp32 and rounds once, the module per op as HF)
    torch.testing.assert_close(fused.float(), want.float(), rtol=tol, atol=tol)


def test_module_decode_step_keeps_fp32_products_for_a_wider_cache():
    """bf16 weights with an fp32 cache: the products stay in fp32 (ATen's bmm), as the comment in
    _absorbed_attention promises (bmm_small would round them to bf16); fp32 weights with a bf16
    cache take bmm_small in fp32."""
    from transformers import DeepseekV3Config

    from latentmoe.nn import LatentKVCache, MultiHeadLatentAttention

    cfg = DeepseekV3Config(
        hidden_size=96, num_attention_heads=3, num_key_value_heads=3, q_lora_rank=None, kv_lora_rank=48,
        qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20, num_hidden_layers=1,
    )
    for w_dt, cache_dt, want_small in ((torch.bfloat16, torch.float32, False), (torch.float32, torch.bfloat16, True)):
        torch.manual_seed(0)
        attn = MultiHeadLatentAttention(cfg, 0).to(w_dt).eval()
        cache = LatentKVCache(1, 1, 40, 48, 16, dtype=cache_dt)
        cache.kv[0][:, :20] = torch.randn(1, 20, 64).to(cache_dt)
        cache.advance(0, 20)
        x = torch.randn(1, 1, 96).to(w_dt)
        pe = (torch.randn(1, 1, 16).to(w_dt), torch.randn(1, 1, 16).to(w_dt))
        with torch.no_grad():
            _, ops = _decode_step_ops(attn, x, pe, cache)
        assert ("latentmoe::bmm_small" in ops) == want_small and ("aten::bmm" in ops) != want_small, (w_dt, cache_dt)


def test_bmm_small_applies_only_without_grad_for_few_cpu_rows():
    from latentmoe.nn._linear import bmm_small_applies

    x, w = torch.randn(4, 2, 8), torch.randn(4, 8, 5)
    assert bmm_small_applies(x, w, 16) and not bmm_small_applies(x, w, 17) and not bmm_small_applies(x, w, 0)
    w.requires_grad_()
    assert not bmm_small_applies(x, w, 2)
    with torch.no_grad():
        assert bmm_small_applies(x, w, 2)
    assert not bmm_small_applies(x.to("meta"), w.detach().to("meta"), 2)
