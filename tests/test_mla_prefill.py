"""latentmoe.ops.mla_prefill (CPU kernel with in-kernel latent decompression, chunked backward)
against the reference naive MLA (fp64 autograd)."""

from __future__ import annotations

import math

import pytest
import torch

import latentmoe.ops.mla as mla_ops
from latentmoe.ops import mla_prefill
from latentmoe.reference import mla as ref
from test_mla_decode import make_problem


def _weights(H, N, V, C, dtype=torch.float64):
    return torch.randn(H * (N + V), C, dtype=dtype) / math.sqrt(C)


def _reference(q_nope, q_pe, kv, seqlens, table, w, scale, causal, window):
    H, N = q_nope.shape[2], q_nope.shape[3]
    C = w.shape[1]
    V = w.shape[0] // H - N
    if table is not None:
        kv = ref.gather_paged(kv.cpu(), table.cpu(), int(seqlens.max()))
    kv = kv.double().cpu()
    L = kv.shape[1]
    for b in range(kv.shape[0]):  # the reference must not see the poison either
        kv[b, int(seqlens[b]) :] = 0
    w_uk, w_uv = ref.split_kv_b(w.double().cpu(), H, N, V)
    return ref.mla_naive(
        q_nope.double().cpu(), q_pe.double().cpu(), kv[:, :L, :C], kv[:, :L, C:], w_uk, w_uv, scale,
        cache_seqlens=seqlens.cpu(), causal=causal, window=window,
    )


def _problem(B, S, H, seqlens, page_size=None, N=20, V=12, C=48, R=16, dtype=torch.float32):
    q_nope, q_pe, kv, lens, table = make_problem(B, S, H, C, R, seqlens, page_size, dtype=dtype)
    q_nope = torch.randn(B, S, H, N, dtype=torch.float64).to(dtype)
    return q_nope, q_pe, kv, lens, table, _weights(H, N, V, C).to(dtype)


@pytest.mark.parametrize("page_size", [None, 1, 16, 17])
@pytest.mark.parametrize("H", [1, 3, 9])
def test_prefill_matches_reference(page_size, H):
    S = 33
    q_nope, q_pe, kv, lens, table, w = _problem(3, S, H, [40, 0, 290], page_size)
    out, lse = mla_prefill(q_nope, q_pe, kv, lens, w, 0.15, block_table=table)
    want, want_lse = _reference(q_nope, q_pe, kv, lens, table, w, 0.15, True, -1)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == -math.inf)  # empty row


@pytest.mark.parametrize("causal,window", [(False, -1), (True, 0), (True, 9), (False, 4)])
def test_prefill_masks(causal, window):
    q_nope, q_pe, kv, lens, table, w = _problem(2, 21, 3, [21, 140], 16)
    out, lse = mla_prefill(q_nope, q_pe, kv, lens, w, 0.2, block_table=table, causal=causal, window=window)
    want, want_lse = _reference(q_nope, q_pe, kv, lens, table, w, 0.2, causal, window)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_low_precision(dtype):
    q_nope, q_pe, kv, lens, table, w = _problem(2, 17, 3, [17, 60], None, dtype=dtype)
    out, _ = mla_prefill(q_nope, q_pe, kv, lens, w, 0.2)
    want, _ = _reference(q_nope, q_pe, kv, lens, table, w, 0.2, True, -1)
    # Reference "in low precision": the same inputs (already rounded to dtype), output in dtype.
    H, N = q_nope.shape[2], q_nope.shape[3]
    w_uk, w_uv = ref.split_kv_b(w, H, N, w.shape[0] // H - N)
    kv0 = kv.clone()
    kv0[0, 17:] = 0
    kv0[1, 60:] = 0
    low, _ = ref.mla_naive(q_nope, q_pe, kv0[..., :48], kv0[..., 48:], w_uk, w_uv, 0.2, cache_seqlens=lens)
    err = (out.double() - want).abs().max()
    ref_err = (low.double() - want).abs().max()
    assert err <= 2 * ref_err + 1e-3, (float(err), float(ref_err))


@pytest.mark.parametrize("causal,window", [(True, -1), (False, -1), (True, 6)])
def test_prefill_backward_matches_reference_autograd(causal, window, monkeypatch):
    monkeypatch.setattr(mla_ops, "_BWD_CHUNK_ELEMS", 3 * 19 * 7)  # force several key chunks
    B, S, H, N, V, C, R = 2, 19, 3, 20, 12, 48, 16
    q_nope, q_pe, kv, lens, _, w = _problem(B, S, H, [19, 30], None, N=N, V=V, C=C, R=R)
    kv = kv.nan_to_num()  # slots beyond a row's length get zero gradient either way
    leaves = [t.clone().requires_grad_() for t in (q_nope, q_pe, kv, w)]
    out, _ = mla_prefill(leaves[0], leaves[1], leaves[2], lens, leaves[3], 0.2, causal=causal, window=window)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ref_leaves = [t.detach().double().clone().requires_grad_() for t in (q_nope, q_pe, kv, w)]
    w_uk, w_uv = ref.split_kv_b(ref_leaves[3], H, N, V)
    kv_r = ref_leaves[2]
    want, _ = ref.mla_naive(
        ref_leaves[0], ref_leaves[1], kv_r[..., :C], kv_r[..., C:], w_uk, w_uv, 0.2,
        cache_seqlens=lens, causal=causal, window=window,
    )
    (want * g.double()).sum().backward()
    for name, a, b in zip(["q_nope", "q_pe", "kv_cache", "kv_b_weight"], leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert torch.all(leaves[2].grad[0, 19:] == 0)  # beyond row 0's length


def test_prefill_opcheck():
    q_nope, q_pe, kv, lens, table, w = _problem(2, 5, 3, [5, 9], 4)
    kv = kv.nan_to_num()
    op = torch.ops.latentmoe.mla_prefill.default
    torch.library.opcheck(op, (q_nope, q_pe, kv, lens, table, w, 0.3, True, -1))
    q_nope, q_pe, kv, lens, _, w = _problem(2, 5, 3, [5, 9])
    args = [t.nan_to_num().requires_grad_() if t.is_floating_point() else t for t in (q_nope, q_pe, kv, lens)]
    torch.library.opcheck(op, (*args, None, w.requires_grad_(), 0.3, True, -1))


@pytest.mark.parametrize(
    "idx,value,name",
    [
        (5, torch.randn(100, 48), "kv_b_weight"),  # rows not a multiple of H
        (5, torch.randn(3 * 32, 40), "kv_cache"),  # C mismatch vs cache rows
        (1, torch.randn(2, 5, 3, 16, dtype=torch.float64), "q_pe"),
        (3, torch.tensor([5, 99], dtype=torch.int32), "cache_seqlens"),
        (0, torch.randn(2, 3, 5, 20).transpose(1, 2), "q_nope"),
    ],
)
def test_prefill_bad_input(idx, value, name):
    args = list(_problem(2, 5, 3, [5, 9]))
    args[idx] = value
    q_nope, q_pe, kv, lens, table, w = args
    with pytest.raises(ValueError, match=name):
        mla_prefill(q_nope, q_pe, kv, lens, w, 0.3, block_table=table)


def test_prefill_paged_backward_is_refused():
    q_nope, q_pe, kv, lens, table, w = _problem(2, 5, 3, [5, 9], 4)
    q_nope.requires_grad_()
    out, _ = mla_prefill(q_nope, q_pe, kv.nan_to_num(), lens, w, 0.3, block_table=table)
    with pytest.raises(NotImplementedError, match="contiguous"):
        out.sum().backward()


def test_prefill_torch_compile_fullgraph_with_backward():
    q_nope, q_pe, kv, lens, _, w = _problem(2, 7, 3, [7, 12])
    kv = kv.nan_to_num()

    def f(q_nope, q_pe, kv, w):
        out, _ = mla_prefill(q_nope, q_pe, kv, lens, w, 0.3)
        return (out * out).sum()

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (q_nope, q_pe, kv, w)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_prefill_random_shapes_property():
    """Random shapes, lengths, page sizes and masks (hypothesis): kernel == fp64 reference."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
    @hypothesis.given(
        B=st.integers(1, 3), S=st.integers(1, 40), H=st.integers(1, 4), N=st.integers(1, 24),
        V=st.integers(1, 20), C=st.integers(1, 60), R=st.sampled_from([0, 2, 16]),
        page=st.sampled_from([None, 1, 5, 16]), extra=st.lists(st.integers(0, 200), min_size=3, max_size=3),
        causal=st.booleans(), window=st.sampled_from([-1, 0, 7]),
    )
    def check(B, S, H, N, V, C, R, page, extra, causal, window):
        lens = [e if e == 0 else S + e - 1 for e in extra[:B]]  # 0 (empty) or >= S tokens
        q_nope, q_pe, kv, lens_t, table, w = _problem(B, S, H, lens, page, N=N, V=V, C=C, R=R)
        out, lse = mla_prefill(
            q_nope, q_pe, kv, lens_t, w, 0.3, block_table=table, causal=causal, window=window
        )
        want, want_lse = _reference(q_nope, q_pe, kv, lens_t, table, w, 0.3, causal, window)
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-5)

    check()
