"""latentmoe.ops.mla_append_cache against the reference (RMSNorm + HF RoPE + slot write) and HF's
own kv_a_layernorm / rotary functions."""

from __future__ import annotations

import pytest
import torch

from latentmoe.ops import mla_append_cache
from latentmoe.reference import mla as ref
from test_mla_common import make_config, rope_embeddings

from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3RMSNorm,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_interleave,
)


def make_inputs(B, S, C, R, seqlens, interleave, dtype, device):
    cfg = make_config(rope=R, interleave=interleave)
    pos = torch.tensor(seqlens)[:, None] + torch.arange(S)[None]
    cos, sin = rope_embeddings(cfg, pos, dtype)
    latent = torch.randn(B, S, C, dtype=dtype) * 3
    k_pe = torch.randn(B, S, R, dtype=dtype)
    weight = (1 + 0.3 * torch.randn(C)).to(dtype)
    return [t.to(device) for t in (latent, k_pe, weight, cos, sin)]


def expected_rows(latent, k_pe, weight, cos, sin, interleave):
    """[B, S, C+R] rows computed by HF's own modules."""
    norm = DeepseekV3RMSNorm(latent.shape[-1]).to(latent.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight.cpu())
        c = norm(latent.cpu())
    k = k_pe.cpu()[:, None]  # [B, 1, S, R]
    fn = apply_rotary_pos_emb_interleave if interleave else apply_rotary_pos_emb
    _, k_rot = fn(k, k, cos.cpu(), sin.cpu())
    return torch.cat([c, k_rot[:, 0]], dim=-1)


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("page_size", [None, 1, 16, 17, 64])
@pytest.mark.parametrize("S", [1, 5])
def test_append_matches_hf(device, interleave, page_size, S):
    B, C, R = 3, 48, 16
    seqlens = [0, 7, 20]
    latent, k_pe, weight, cos, sin = make_inputs(B, S, C, R, seqlens, interleave, torch.float32, device)
    capacity = 32
    lens = torch.tensor(seqlens, dtype=torch.int32, device=device)
    if page_size is None:
        cache = torch.full((B, capacity, C + R), float("nan"), device=device)
        table = None
    else:
        max_pages = (capacity + page_size - 1) // page_size
        n_pages = B * max_pages + 2
        table = torch.randperm(n_pages)[: B * max_pages].view(B, max_pages).to(torch.int32).to(device)
        cache = torch.full((n_pages, page_size, C + R), float("nan"), device=device)
    before = cache.clone()
    mla_append_cache(
        cache, latent, k_pe, weight, 1e-6, cos, sin, lens, block_table=table, rope_interleave=interleave
    )
    want = expected_rows(latent, k_pe, weight, cos, sin, interleave)
    cache_c, before_c = cache.cpu(), before.cpu()
    written = torch.zeros(cache_c.shape[:2], dtype=torch.bool)
    for b in range(B):
        for s in range(S):
            t = seqlens[b] + s
            idx = (b, t) if table is None else (int(table[b, t // page_size]), t % page_size)
            torch.testing.assert_close(cache_c[idx], want[b, s], rtol=1e-5, atol=1e-5)
            written[idx] = True
    # Nothing outside the target slots changed (still NaN).
    assert cache_c[~written].isnan().all() and before_c[~written].isnan().all()
    assert torch.equal(lens.cpu(), torch.tensor(seqlens, dtype=torch.int32))  # not advanced


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleave", [True, False])
def test_append_low_precision(device, dtype, interleave):
    B, S, C, R = 2, 3, 512, 64
    latent, k_pe, weight, cos, sin = make_inputs(B, S, C, R, [4, 0], interleave, dtype, device)
    cache = torch.full((B, 10, C + R), float("nan"), dtype=dtype, device=device)
    lens = torch.tensor([4, 0], dtype=torch.int32, device=device)
    mla_append_cache(cache, latent, k_pe, weight, 1e-6, cos, sin, lens, rope_interleave=interleave)
    got = torch.stack([cache[0, 4:7], cache[1, 0:3]]).cpu().double()
    # fp64 truth, and HF's own low-precision result: our error <= 2x HF's + eps.
    truth = expected_rows(*(t.cpu().double() for t in (latent, k_pe, weight, cos, sin)), interleave)
    hf_low = expected_rows(latent, k_pe, weight, cos, sin, interleave).double()
    err = (got - truth).abs().max()
    hf_err = (hf_low - truth).abs().max()
    assert err <= 2 * hf_err + 1e-3, (float(err), float(hf_err))
    assert cache[0, :4].isnan().all() and cache[0, 7:].isnan().all() and cache[1, 3:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["slices", "expanded_batch", "token_major"])
def test_append_strided_rows_match_contiguous(device, dtype, layout):
    """kv_latent / k_pe with unit-stride rows and any other strides (the module passes the two
    slices of kv_a_proj_with_mqa's output in place) write bit for bit what contiguous copies write,
    paged and contiguous; the gaps between the rows (NaN here) are never read."""
    B, S, C, R = 3, 4, 48, 16
    latent, k_pe, weight, cos, sin = make_inputs(B, S, C, R, [0, 5, 2], True, dtype, device)
    if layout == "slices":  # [B, S, C + R + 3] rows, NaN in the 3 trailing columns
        kv = torch.full((B, S, C + R + 3), float("nan"), dtype=dtype, device=device)
        kv[..., :C], kv[..., C:C + R] = latent, k_pe
        lat_s, pe_s = kv[..., :C], kv[..., C:C + R]
    elif layout == "expanded_batch":  # every row the same tokens (stride 0 over the batch)
        latent, k_pe = latent[:1].expand(B, S, C), k_pe[:1].expand(B, S, R)
        lat_s, pe_s = latent, k_pe
    else:  # [S, B, n] storage viewed as [B, S, n]
        lat_s = latent.transpose(0, 1).contiguous().transpose(0, 1)
        pe_s = k_pe.transpose(0, 1).contiguous().transpose(0, 1)
    assert not lat_s.is_contiguous() and not pe_s.is_contiguous() and lat_s.stride(-1) == pe_s.stride(-1) == 1
    lens = torch.tensor([0, 5, 2], dtype=torch.int32, device=device)
    for table in (None, torch.randperm(12, device=device)[:9].view(B, 3).to(torch.int32)):
        shape = (B, 12, C + R) if table is None else (12, 4, C + R)
        got = torch.full(shape, float("nan"), dtype=dtype, device=device)
        want = got.clone()
        mla_append_cache(got, lat_s, pe_s, weight, 1e-6, cos, sin, lens, block_table=table)
        mla_append_cache(want, latent.contiguous(), k_pe.contiguous(), weight, 1e-6, cos, sin, lens,
                         block_table=table)
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(got.view(bits), want.view(bits))
        assert (~got.isnan()).sum() == B * S * (C + R)  # the target rows only, none of them NaN


def test_append_reference_rope_agrees():
    # The reference's apply_rope is what the op implements; cross-check on one shape.
    latent, k_pe, weight, cos, sin = make_inputs(2, 3, 48, 16, [1, 2], True, torch.float32, "cpu")
    cache = torch.zeros(2, 8, 64)
    mla_append_cache(cache, latent, k_pe, weight, 1e-6, cos, sin, torch.tensor([1, 2], dtype=torch.int32))
    want_pe = ref.apply_rope(k_pe[:, :, None], cos, sin, True)[:, :, 0]
    torch.testing.assert_close(cache[0, 1:4, 48:], want_pe[0])
    torch.testing.assert_close(cache[1, 2:5, 48:], want_pe[1])


def test_append_opcheck(device):
    latent, k_pe, weight, cos, sin = make_inputs(2, 3, 48, 16, [1, 2], False, torch.float32, device)
    cache = torch.zeros(2, 8, 64, device=device)
    lens = torch.tensor([1, 2], dtype=torch.int32, device=device)
    torch.library.opcheck(
        torch.ops.latentmoe.mla_append_cache.default,
        (cache, latent, k_pe, weight, 1e-6, cos, sin, lens, None, False),
    )


def _good():
    latent, k_pe, weight, cos, sin = make_inputs(2, 3, 48, 16, [1, 2], True, torch.float32, "cpu")
    cache = torch.zeros(2, 8, 64)
    lens = torch.tensor([1, 2], dtype=torch.int32)
    return dict(kv_cache=cache, kv_latent=latent, k_pe=k_pe, norm_weight=weight, eps=1e-6, cos=cos, sin=sin,
                cache_seqlens=lens, block_table=None)


@pytest.mark.parametrize(
    "key,value,name",
    [
        ("cache_seqlens", torch.tensor([1, 6], dtype=torch.int32), "cache_seqlens"),  # 6 + 3 > 8 slots
        ("cache_seqlens", torch.tensor([1, 2, 3], dtype=torch.int32), "cache_seqlens"),
        ("kv_cache", torch.zeros(2, 8, 63), "kv_cache"),
        ("kv_cache", torch.zeros(2, 8, 64, dtype=torch.float16), "kv_cache"),
        ("k_pe", torch.randn(2, 3, 16, dtype=torch.float64), "k_pe"),
        ("k_pe", torch.randn(2, 2, 16), "k_pe"),
        ("norm_weight", torch.ones(47), "norm_weight"),
        ("cos", torch.randn(2, 3, 8), "cos"),
        ("kv_latent", torch.randn(2, 48, 3).transpose(1, 2), "kv_latent"),  # non-contiguous
        ("block_table", torch.full((2, 1), 99, dtype=torch.int32), "block_table"),
        ("block_table", torch.tensor([[0, 1], [-1, 3]], dtype=torch.int32), "block_table"),  # used page
        ("block_table", torch.zeros(2, 2, dtype=torch.int64), "block_table"),
        ("eps", float("nan"), "eps"),  # would write NaN rows into the cache
        ("eps", float("inf"), "eps"),
        ("eps", -1e-6, "eps"),
        # A strided view of a cache: an error that does not advise a .contiguous() copy (the op
        # writes in place; the copy would take the writes).
        ("kv_cache", torch.zeros(8, 2, 64).transpose(0, 1), "kv_cache' must be contiguous.*in place"),
    ],
)
@pytest.mark.parametrize("check_values", [True, False])  # the CPU checks values either way
def test_append_bad_input(key, value, name, check_values):
    args = _good()
    args[key] = value
    if key == "block_table":
        args["kv_cache"] = torch.zeros(4, 8, 64)
    before = args["kv_cache"].clone()
    with pytest.raises(ValueError, match=name):
        mla_append_cache(**args, check_values=check_values)
    assert torch.equal(args["kv_cache"], before)  # nothing written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["kv_latent", "k_pe", "norm_weight", "cos", "sin", "cache_seqlens"])
def test_append_device_mismatch(name):
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _good().items()}
    args[name] = args[name].cpu()
    before = args["kv_cache"].clone()
    with pytest.raises(RuntimeError, match=name):
        mla_append_cache(**args)
    assert torch.equal(args["kv_cache"], before)


def test_append_unchecked_matches_checked(device):
    if device == "cpu":
        pytest.skip("the CPU checks the values either way (check_values changes nothing there)")
    latent, k_pe, weight, cos, sin = make_inputs(2, 3, 48, 16, [1, 2], True, torch.float32, device)
    lens = torch.tensor([1, 4], dtype=torch.int32, device=device)
    a = torch.randn(2, 8, 64, device=device)
    b = a.clone()
    mla_append_cache(a, latent, k_pe, weight, 1e-6, cos, sin, lens)
    mla_append_cache(b, latent, k_pe, weight, 1e-6, cos, sin, lens, check_values=False)
    assert torch.equal(a, b)
