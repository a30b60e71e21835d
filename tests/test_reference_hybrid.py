"""latentmoe.reference.hybrid against SDPA, with a boolean mask built here entry by entry."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from latentmoe.reference import hybrid as H


def spelled_out_mask(sq, sk, windows, causal, global_keys=None):
    """FlashAttention's rule written entry by entry: [H, sq, sk] (global_keys: list of bools or None)."""
    out = [[[False] * sk for _ in range(sq)] for _ in windows]
    for h, (left, right) in enumerate(windows):
        for i in range(sq):
            p = i + sk - sq  # bottom-right alignment
            for j in range(sk):
                ok = (left == -1 or j >= p - left) and (right == -1 or j <= p + right)
                if global_keys is not None:
                    ok = ok or global_keys[j] or (0 <= p < sk and global_keys[p])
                if causal:
                    ok = ok and j <= p
                out[h][i][j] = bool(ok)
    return torch.tensor(out, dtype=torch.bool).view(len(windows), sq, sk)


def sdpa_reference(q, k, v, mask, scale=None):
    """SDPA on [B, S, H, D] tensors with a boolean mask [B|1, H|1, sq, sk]; GQA by repeating k/v heads."""
    group = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)
    kt = k.transpose(1, 2).repeat_interleave(group, 1)
    vt = v.transpose(1, 2).repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    logits = (qt @ kt.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    lse = torch.logsumexp(logits.masked_fill(~mask, -math.inf), dim=-1)
    return out.transpose(1, 2), lse


def check_against_sdpa(q, k, v, windows, causal, global_tokens=None, scale=None):
    batch, sq, hq, _ = q.shape
    sk = k.shape[1]
    win_arg = windows[0] if len(windows) == 1 else windows
    out, lse = H.windowed_attention(
        q, k, v, win_arg, causal=causal, global_tokens=global_tokens, softmax_scale=scale
    )
    assert out.shape == (batch, sq, hq, v.shape[-1]) and out.dtype == q.dtype
    assert lse.shape == (batch, hq, sq)

    if global_tokens is None or global_tokens.dim() == 1:
        keys = None if global_tokens is None else global_tokens.tolist()
        mask = spelled_out_mask(sq, sk, windows, causal, keys)[None]
    else:
        mask = torch.stack([spelled_out_mask(sq, sk, windows, causal, g.tolist()) for g in global_tokens])
    mask = mask.expand(batch, hq, sq, sk)
    assert torch.equal(
        H.window_mask(sq, sk, win_arg, causal=causal, global_tokens=global_tokens).expand_as(mask), mask
    )

    expected_out, expected_lse = sdpa_reference(q, k, v, mask, scale)
    seen = mask.any(-1)  # [B, H, sq]
    seen_bshd = seen.transpose(1, 2)[..., None].expand_as(out)
    torch.testing.assert_close(out[seen_bshd], expected_out[seen_bshd], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse[seen], expected_lse[seen], rtol=1e-10, atol=1e-10)
    # fully masked rows: output 0, LSE -inf, never NaN
    assert bool((out[~seen_bshd] == 0).all())
    assert bool(torch.isneginf(lse[~seen]).all())
    assert not out.isnan().any() and not lse.isnan().any()
    return seen


def rand_qkv(batch, sq, sk, hq, hkv, dim, dim_v, dtype=torch.float64):
    q = torch.randn(batch, sq, hq, dim, dtype=dtype)
    k = torch.randn(batch, sk, hkv, dim, dtype=dtype)
    v = torch.randn(batch, sk, hkv, dim_v, dtype=dtype)
    return q, k, v


SHAPES = [(37, 37), (13, 45), (45, 13), (1, 29), (29, 1)]
WINDOWS = [(-1, -1), (5, 3), (0, 0), (7, -1), (-1, 2), (2, 9)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("sq,sk", SHAPES)
def test_windows_match_sdpa(sq, sk, window, causal):
    q, k, v = rand_qkv(2, sq, sk, 3, 3, 17, 11)
    check_against_sdpa(q, k, v, [window], causal)


@pytest.mark.parametrize("sq,sk", [(23, 23), (9, 31), (31, 9)])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (3, 1), (4, 4)])
def test_per_head_windows_and_gqa(sq, sk, hq, hkv):
    windows = [(-1, -1), (3, 0), (0, 4), (6, 6), (-1, 0), (1, -1)][:hq]
    q, k, v = rand_qkv(2, sq, sk, hq, hkv, 16, 8)
    check_against_sdpa(q, k, v, windows, causal=False)
    check_against_sdpa(q, k, v, windows, causal=True, scale=0.3)
    # a tensor table is the same as the list of pairs
    table = torch.tensor(windows)
    out_list, lse_list = H.windowed_attention(q, k, v, windows)
    out_tab, lse_tab = H.windowed_attention(q, k, v, table)
    assert torch.equal(out_list, out_tab) and torch.equal(lse_list, lse_tab)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(33, 33), (12, 40), (40, 12)])
def test_global_tokens(sq, sk, causal):
    q, k, v = rand_qkv(2, sq, sk, 4, 2, 9, 13)
    shared = torch.zeros(sk, dtype=torch.bool)
    shared[[0, sk // 2, sk - 3]] = True
    check_against_sdpa(q, k, v, [(2, 1)], causal, global_tokens=shared)
    per_batch = torch.rand(2, sk) < 0.15
    per_batch[1, 1] = True
    check_against_sdpa(q, k, v, [(2, 1), (0, 0), (-1, 0), (4, 4)], causal, global_tokens=per_batch)


def test_fully_masked_rows_are_zero_with_neginf_lse():
    # causal with more queries than keys: the first sq - sk queries precede every key
    q, k, v = rand_qkv(1, 20, 7, 2, 1, 8, 8)
    seen = check_against_sdpa(q, k, v, [(-1, 0)], causal=True)
    assert not bool(seen[..., :13].any()) and bool(seen[..., 13:].all())
    # a window that falls entirely beyond the keys also masks whole rows
    seen = check_against_sdpa(q, k, v, [(0, 0)], causal=False)
    assert not bool(seen.all())


def test_no_keys_or_no_queries():
    q, k, v = rand_qkv(2, 4, 0, 2, 1, 8, 5)
    out, lse = H.windowed_attention(q, k, v, (3, 0), causal=True)
    assert out.shape == (2, 4, 2, 5) and bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    q, k, v = rand_qkv(2, 0, 6, 2, 1, 8, 5)
    out, lse = H.windowed_attention(q, k, v, (3, 0))
    assert out.shape == (2, 0, 2, 5) and lse.shape == (2, 2, 0)


def test_device_parity(device):
    q, k, v = rand_qkv(2, 21, 30, 4, 2, 16, 8, dtype=torch.float32)
    global_tokens = torch.rand(2, 30) < 0.2
    windows = torch.tensor([(3, 0), (-1, 2), (0, 0), (5, 5)])
    out, lse = H.windowed_attention(q, k, v, windows, causal=True, global_tokens=global_tokens)
    dev = [t.to(device) for t in (q, k, v)]
    out_d, lse_d = H.windowed_attention(
        *dev, windows.to(device), causal=True, global_tokens=global_tokens.to(device)
    )
    assert out_d.device.type == device
    torch.testing.assert_close(out_d.cpu(), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_d.cpu(), lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    q, k, v = rand_qkv(2, 19, 27, 4, 2, 32, 32)
    ref_out, ref_lse = H.windowed_attention(q, k, v, (4, 2), causal=True)
    out, lse = H.windowed_attention(q.to(dtype), k.to(dtype), v.to(dtype), (4, 2), causal=True)
    low = [t.to(dtype) for t in (q, k, v)]
    low_out, _ = H.windowed_attention(*low, (4, 2), causal=True, upcast=False)
    assert out.dtype == low_out.dtype == dtype and lse.dtype == torch.float32
    upcast_err = (out.double() - ref_out).abs().max().item()
    low_err = (low_out.double() - ref_out).abs().max().item()
    # flash-attention's rule, with the reference itself: upcasting never does worse than low precision
    assert upcast_err <= 2 * low_err + 1e-6
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=0.05)


def test_layer_types_match_hf_configs():
    transformers = pytest.importorskip("transformers")
    gemma2 = transformers.Gemma2Config(num_hidden_layers=7)
    assert H.layer_types(7, 2) == list(gemma2.layer_types)
    gemma3 = transformers.Gemma3TextConfig(num_hidden_layers=13)
    assert H.layer_types(13, 6) == list(gemma3.layer_types)
    assert H.layer_types(3, 1) == ["full_attention"] * 3


@pytest.mark.parametrize("sliding_window", [1, 4, 9])
@pytest.mark.parametrize("sq,sk", [(11, 11), (5, 17)])
def test_layer_window_matches_hf_sliding_mask(sliding_window, sq, sk):
    masking = pytest.importorskip("transformers.masking_utils")
    fn = masking.sliding_window_causal_mask_function(sliding_window)
    offset = sk - sq  # queries are the last sq positions, as with a cache
    zero = torch.tensor(0)
    hf = fn(zero, zero, torch.arange(sq)[:, None] + offset, torch.arange(sk)[None, :])
    window = H.layer_window("sliding_attention", sliding_window)
    assert window == (sliding_window - 1, 0)
    assert torch.equal(H.window_mask(sq, sk, window, causal=True)[0, 0], hf)
    full = H.window_mask(sq, sk, H.layer_window("full_attention", None), causal=True)[0, 0]
    assert torch.equal(full, torch.tensor([[j <= offset + i for j in range(sk)] for i in range(sq)]))
    assert H.layer_window("full_attention", None, causal=False) == (-1, -1)


def test_bad_inputs_name_the_argument():
    q, k, v = rand_qkv(1, 5, 6, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="window_size"):
        H.windowed_attention(q, k, v, (-2, 3))
    with pytest.raises(ValueError, match="window_size"):
        H.windowed_attention(q, k, v, [(1, 1)] * 3)
    with pytest.raises(ValueError, match="heads"):
        H.windowed_attention(q, k[:, :, :1].expand(1, 6, 3, 8), v[:, :, :1].expand(1, 6, 3, 8))
    with pytest.raises(ValueError, match="k must be"):
        H.windowed_attention(q, k[..., :7], v)
    with pytest.raises(ValueError, match="dtype"):
        H.windowed_attention(q, k.float(), v)
    with pytest.raises(ValueError, match="4-D"):
        H.windowed_attention(q[0], k, v)
    with pytest.raises(ValueError, match="global_tokens"):
        H.windowed_attention(q, k, v, global_tokens=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="layer_type"):
        H.layer_window("local", 4)
    with pytest.raises(ValueError, match="sliding_window"):
        H.layer_window("sliding_attention", 0)
    with pytest.raises(ValueError, match="full_attention_every"):
        H.layer_types(4, 0)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 12),
    st.lists(st.tuples(st.integers(-1, 6), st.integers(-1, 6)), min_size=1, max_size=3),
    st.booleans(),
    st.one_of(st.none(), st.lists(st.booleans(), min_size=12, max_size=12)),
)
def test_property_mask_matches_spelled_out_rule(sq, sk, windows, causal, global_keys):
    keys = None if global_keys is None else global_keys[:sk]
    global_tokens = None if keys is None else torch.tensor(keys, dtype=torch.bool)
    got = H.window_mask(sq, sk, windows, causal=causal, global_tokens=global_tokens)
    assert torch.equal(got[0], spelled_out_mask(sq, sk, windows, causal, keys))


@pytest.mark.parametrize("g_shape", [(0,), (2, 0)])
def test_no_keys_with_global_tokens(g_shape):
    # Sk = 0 with global_tokens crashed in window_mask (reshape(-1, 0) of an empty tensor) before the
    # empty-rows return; it gives output 0 and LSE -inf as without them.
    q, k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 0, 1, 4), torch.randn(2, 0, 1, 4)
    g = torch.zeros(g_shape, dtype=torch.bool)
    out, lse = H.windowed_attention(q, k, v, (1, 0), causal=True, global_tokens=g)
    assert out.shape == (2, 3, 2, 4) and torch.all(out == 0) and torch.all(lse == -math.inf)
