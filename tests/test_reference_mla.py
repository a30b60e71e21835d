"""latentmoe.reference.mla against HF DeepseekV3Attention (independent code), and self-consistency
of its naive / absorbed / paged paths."""

from __future__ import annotations

import math

import pytest
import torch

from latentmoe.reference import mla as ref
from test_mla_common import (
    causal_additive_mask,
    hf_cache,
    make_config,
    make_hf_attention,
    rel_err,
    rope_embeddings,
)

from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_interleave,
)


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_bit_identical_to_hf(interleave, dtype):
    cfg = make_config(rope=16, interleave=interleave)
    B, S, H, R = 2, 5, 3, 16
    pos = torch.randint(0, 200, (B, S))
    cos, sin = rope_embeddings(cfg, pos, dtype)
    q = torch.randn(B, S, H, R, dtype=dtype)
    k = torch.randn(B, S, 1, R, dtype=dtype)
    fn = apply_rotary_pos_emb_interleave if interleave else apply_rotary_pos_emb
    q_hf, k_hf = fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert torch.equal(ref.apply_rope(q, cos, sin, interleave), q_hf.transpose(1, 2))
    assert torch.equal(ref.apply_rope(k, cos, sin, interleave), k_hf.transpose(1, 2))


@pytest.mark.parametrize("yarn", [False, True])
def test_softmax_scale_matches_hf(yarn):
    cfg = make_config(yarn=yarn)
    assert ref.softmax_scale(cfg) == pytest.approx(make_hf_attention(cfg).scaling, rel=1e-12)


CASES = [
    dict(heads=3, q_lora=24, interleave=True, yarn=False, B=2),
    dict(heads=1, q_lora=None, interleave=False, yarn=False, B=1),
    dict(heads=9, q_lora=None, interleave=True, yarn=True, B=3),
    dict(heads=3, q_lora=24, interleave=False, yarn=True, B=2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_reference_layer_matches_hf_prefill_then_decode(case, mode):
    cfg = make_config(
        heads=case["heads"], q_lora=case["q_lora"], interleave=case["interleave"], yarn=case["yarn"]
    )
    hf = make_hf_attention(cfg)
    mine = ref.ReferenceMLA(cfg, 0)
    mine.load_state_dict(hf.state_dict(), strict=True)
    B = case["B"]
    cache_hf, cache_ref = hf_cache(cfg), ref.ReferenceLatentCache()
    past = 0
    for step_len in [7, 1, 1, 2, 1]:
        x = torch.randn(B, step_len, cfg.hidden_size)
        pos = (past + torch.arange(step_len))[None].expand(B, -1)
        pe = rope_embeddings(cfg, pos)
        with torch.no_grad():
            want, _ = hf(x, pe, causal_additive_mask(B, step_len, past), cache=cache_hf)
            got = mine(x, pe, None, latent_cache=cache_ref, mode=mode)
        assert rel_err(got, want) <= 1e-4, (step_len, rel_err(got, want))
        past += step_len
    # The reference cache holds what HF caches: normalised latents and rotated k_pe.
    hf_layer = cache_hf.layers[0]
    assert torch.allclose(cache_ref.kv[..., : cfg.kv_lora_rank], hf_layer.keys[:, 0], atol=1e-6)
    assert torch.allclose(cache_ref.kv[..., cfg.kv_lora_rank :], hf_layer.values[:, 0], atol=1e-6)


def _random_decode_problem(B, Sq, H, C, R, Lmax, dtype=torch.float64):
    q_latent = torch.randn(B, Sq, H, C, dtype=dtype)
    q_pe = torch.randn(B, Sq, H, R, dtype=dtype)
    cache = torch.randn(B, Lmax, C + R, dtype=dtype)
    return q_latent, q_pe, cache


def to_paged(cache: torch.Tensor, seqlens: torch.Tensor, page_size: int, poison=float("nan")):
    """Scatter a contiguous ``[B, Lmax, D]`` cache into randomly permuted pages; slots beyond
    ``seqlens`` and unused pages are poisoned. Returns (pages, block_table int32)."""
    B, Lmax, D = cache.shape
    max_pages = (Lmax + page_size - 1) // page_size
    n_pages = B * max_pages + 3
    perm = torch.randperm(n_pages)[: B * max_pages].view(B, max_pages).to(torch.int32)
    pages = torch.full((n_pages, page_size, D), poison, dtype=cache.dtype)
    for b in range(B):
        for t in range(int(seqlens[b])):
            pages[perm[b, t // page_size], t % page_size] = cache[b, t]
    return pages, perm


@pytest.mark.parametrize("Sq,causal,window", [(1, True, -1), (2, True, -1), (3, False, -1), (2, True, 4)])
def test_absorbed_equals_naive(Sq, causal, window):
    B, H, N, V, C, R = 3, 3, 10, 7, 48, 16
    f = torch.float64
    w_uk, w_uv = torch.randn(H, N, C, dtype=f), torch.randn(H, V, C, dtype=f)
    q_nope, q_pe = torch.randn(B, Sq, H, N, dtype=f), torch.randn(B, Sq, H, R, dtype=f)
    Lmax = 13
    cache = torch.randn(B, Lmax, C + R, dtype=f)
    seqlens = torch.tensor([13, 0, 5], dtype=torch.int32)
    cache[1:, 5:] = float("nan")
    cache[1] = float("nan")
    out_n, lse_n = ref.mla_naive(
        q_nope, q_pe, cache[..., :C].nan_to_num(), cache[..., C:].nan_to_num(), w_uk, w_uv, 0.3,
        cache_seqlens=seqlens, causal=causal, window=window,
    )
    q_latent = torch.einsum("bshn,hnc->bshc", q_nope, w_uk)
    out_l, lse_a = ref.mla_decode(q_latent, q_pe, cache, seqlens, 0.3, causal=causal, window=window)
    out_a = torch.einsum("bshc,hvc->bshv", out_l, w_uv)
    assert not out_a.isnan().any() and not out_n.isnan().any()
    torch.testing.assert_close(out_a, out_n, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse_a, lse_n, rtol=1e-9, atol=1e-9)
    # The zero-length row gives 0 and -inf.
    assert torch.all(out_l[1] == 0) and torch.all(lse_a[1] == -math.inf)


@pytest.mark.parametrize("page_size", [1, 16, 17])
def test_paged_equals_contiguous(page_size):
    B, Sq, H, C, R, Lmax = 3, 2, 3, 48, 16, 40
    q_latent, q_pe, cache = _random_decode_problem(B, Sq, H, C, R, Lmax)
    seqlens = torch.tensor([40, 0, 23], dtype=torch.int32)
    for b in range(B):
        cache[b, int(seqlens[b]) :] = float("nan")
    pages, table = to_paged(cache, seqlens, page_size)
    out_c, lse_c = ref.mla_decode(q_latent, q_pe, cache, seqlens, 0.2, causal=True)
    out_p, lse_p = ref.mla_decode(q_latent, q_pe, pages, seqlens, 0.2, block_table=table, causal=True)
    assert not out_c.isnan().any()
    torch.testing.assert_close(out_p, out_c, rtol=0, atol=0)
    torch.testing.assert_close(lse_p, lse_c, rtol=0, atol=0)


def test_reference_layer_absorbed_keeps_fp64():
    # mode="absorbed" cast everything to fp32 (1e-7 off an fp64 layer's naive result), which capped
    # fp64 checks against it; it computes in the layer's dtype where that is wider than fp32 now.
    cfg = make_config(heads=3, q_lora=24, interleave=True, yarn=True)
    mine = ref.ReferenceMLA(cfg, 0).double()
    x = torch.randn(2, 5, cfg.hidden_size, dtype=torch.float64)
    pe = tuple(t.double() for t in rope_embeddings(cfg, torch.arange(5)[None].expand(2, -1)))
    with torch.no_grad():
        naive = mine(x, pe, None, latent_cache=ref.ReferenceLatentCache(), mode="naive")
        absorbed = mine(x, pe, None, latent_cache=ref.ReferenceLatentCache(), mode="absorbed")
    assert absorbed.dtype == torch.float64 and rel_err(absorbed, naive) <= 1e-12
