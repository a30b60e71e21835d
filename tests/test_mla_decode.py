"""latentmoe.ops.mla_decode (CPU and CUDA kernels) against latentmoe.reference.mla.mla_decode."""

from __future__ import annotations

import math

import pytest
import torch

import latentmoe
from latentmoe.ops import mla_decode
from latentmoe.reference import mla as ref


def make_problem(B, Sq, H, C, R, seqlens, page_size=None, dtype=torch.float32, device="cpu", extra_pages=3):
    """Random queries and a cache (contiguous or paged with a permuted block table); every slot
    beyond a row's length (and every unused page) is NaN."""
    seqlens = torch.tensor(seqlens, dtype=torch.int32)
    Lmax = max(int(seqlens.max()), 1) + 5
    q_latent = torch.randn(B, Sq, H, C, dtype=torch.float64)
    q_pe = torch.randn(B, Sq, H, R, dtype=torch.float64)
    cache = torch.randn(B, Lmax, C + R, dtype=torch.float64)
    for b in range(B):
        cache[b, int(seqlens[b]) :] = float("nan")
    table = None
    store = cache
    if page_size is not None:
        max_pages = (Lmax + page_size - 1) // page_size
        n_pages = B * max_pages + extra_pages
        table = torch.randperm(n_pages)[: B * max_pages].view(B, max_pages).to(torch.int32)
        store = torch.full((n_pages, page_size, C + R), float("nan"), dtype=torch.float64)
        for b in range(B):
            for t in range(int(seqlens[b])):
                store[table[b, t // page_size], t % page_size] = cache[b, t]
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return (
        cast(q_latent),
        cast(q_pe),
        cast(store),
        seqlens.to(device),
        None if table is None else table.to(device),
    )


def reference(q_latent, q_pe, kv, seqlens, table, scale, causal, window, upcast=True, fp64=True):
    args = [q_latent, q_pe, kv]
    if fp64:
        args = [t.double() for t in args]
    return ref.mla_decode(
        *[t.cpu() for t in args], seqlens.cpu(), scale, block_table=None if table is None else table.cpu(),
        causal=causal, window=window, upcast=upcast,
    )


def check_close(out, lse, q_latent, q_pe, kv, seqlens, table, scale, causal, window):
    want_o, want_l = reference(q_latent, q_pe, kv, seqlens, table, scale, causal, window)
    out, lse = out.cpu(), lse.cpu()
    assert not out.isnan().any() and not lse.isnan().any()
    assert lse.dtype == torch.float32 and out.dtype == q_latent.dtype
    empty = torch.isinf(want_l)
    assert torch.equal(torch.isinf(lse), empty) and torch.all(lse[empty] < 0)
    assert torch.all(out[empty] == 0)
    if q_latent.dtype == torch.float32:
        torch.testing.assert_close(out.double(), want_o, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[~empty].double(), want_l[~empty].double(), rtol=1e-5, atol=1e-5)
    else:
        # flash-attention's rule: our error vs fp64 <= 2x the error of the reference run in low precision.
        low_o, low_l = reference(
            q_latent, q_pe, kv, seqlens, table, scale, causal, window, upcast=False, fp64=False
        )
        err = (out.double() - want_o).abs().max()
        ref_err = (low_o.double() - want_o).abs().max()
        assert err <= 2 * ref_err + 1e-3, (float(err), float(ref_err))
        lerr = (lse[~empty].double() - want_l[~empty].double()).abs().max()
        ref_lerr = (low_l[~empty].double() - want_l[~empty].double()).abs().max()
        assert lerr <= 2 * ref_lerr + 1e-2, (float(lerr), float(ref_lerr))


@pytest.mark.parametrize("page_size", [None, 1, 16, 64, 17])
@pytest.mark.parametrize("H", [1, 3, 9])
@pytest.mark.parametrize("Sq", [1, 2])
def test_decode_matches_reference(device, page_size, H, Sq):
    C, R = 48, 16
    seqlens = [37, 0, 130, 1]
    prob = make_problem(4, Sq, H, C, R, seqlens, page_size, device=device)
    out, lse = mla_decode(*prob[:4], 0.17, block_table=prob[4], causal=True)
    check_close(out, lse, *prob, 0.17, True, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", [None, 64, 257])
def test_decode_deepseek_dims(device, dtype, page_size):
    C, R, H = 512, 64, 16
    prob = make_problem(2, 1, H, C, R, [300, 77], page_size, dtype=dtype, device=device)
    scale = (128 + 64) ** -0.5
    out, lse = mla_decode(*prob[:4], scale, block_table=prob[4])
    check_close(out, lse, *prob, scale, True, -1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_low_precision_odd_dims(device, dtype):
    prob = make_problem(3, 2, 9, 48, 16, [64, 5, 0], 17, dtype=dtype, device=device)
    out, lse = mla_decode(*prob[:4], 0.2, block_table=prob[4])
    check_close(out, lse, *prob, 0.2, True, -1)


MASK_CASES = [(False, -1, 2), (True, 0, 1), (True, 5, 3), (False, 7, 2), (True, 40, 2)]


@pytest.mark.parametrize("causal,window,Sq", MASK_CASES)
@pytest.mark.parametrize("page_size", [None, 16])
def test_decode_masks(device, causal, window, Sq, page_size):
    prob = make_problem(3, Sq, 3, 48, 16, [50, 2, 300], page_size, device=device)
    out, lse = mla_decode(*prob[:4], 0.3, block_table=prob[4], causal=causal, window=window)
    check_close(out, lse, *prob, 0.3, causal, window)


@pytest.mark.parametrize("causal", [False, True])
def test_decode_unbounded_window_is_no_window(device, causal):
    # window = INT64_MAX: p - window overflowed in visible_keys for queries at negative positions
    # (non-causal, Sq > seqlen + 1), which then saw no key (LSE -inf) instead of every key.
    prob = make_problem(3, 5, 3, 48, 16, [2, 0, 40], 16, device=device)
    want = mla_decode(*prob[:4], 0.3, block_table=prob[4], causal=causal, window=-1)
    for window in (2**63 - 1, 2**62):
        got = mla_decode(*prob[:4], 0.3, block_table=prob[4], causal=causal, window=window)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_decode_all_rows_empty(device):
    prob = make_problem(2, 2, 3, 48, 16, [0, 0], 16, device=device)
    out, lse = mla_decode(*prob[:4], 0.3, block_table=prob[4])
    assert torch.all(out == 0) and torch.all(lse == -math.inf)


def test_decode_long_context_splits(device):
    # Long enough that the kernels split the keys and merge partials by LSE.
    prob = make_problem(1, 1, 3, 48, 16, [3000], None, device=device)
    out, lse = mla_decode(*prob[:4], 0.1)
    check_close(out, lse, *prob, 0.1, True, -1)


# The CPU kernel has AVX-512, AVX2+FMA and portable instantiations of its tile micro-kernels (picked
# by CPU feature; LATENTMOE_CPU_ISA=avx2 or generic forces the others). Shapes that hit every tail:
# query rows not a multiple of 4 or 8, keys not a multiple of 3 or 6 or of the 128-key tile, C+R
# not a multiple of 8 and C not a multiple of 48, 24, 16 or 8, windows cutting tiles, exp
# arguments far below 0. fp16 caches are widened with F16C on the AVX paths.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("isa", ["native", "avx2", "generic"])
@pytest.mark.parametrize(
    "B,Sq,H,C,R,seqlens,page_size,causal,window,scale",
    [
        (2, 1, 5, 37, 3, [301, 130], None, True, -1, 0.3),
        (1, 3, 3, 512, 64, [389], 17, True, 200, 0.07),
        (3, 2, 7, 80, 0, [129, 1, 256], 64, False, 100, 1.3),
        (1, 1, 16, 24, 8, [700], None, True, -1, 40.0),  # large scale: most weights underflow to 0
        (1, 2, 11, 100, 12, [257], None, True, 50, 0.2),  # 22 rows: blocks of 8 and a tail of 6
        (2, 2, 40, 48, 16, [150, 77], 32, True, -1, 0.2),  # 80 rows: items of 64 and 16 rows
    ],
)
def test_decode_cpu_isa_paths(
    monkeypatch, dtype, isa, B, Sq, H, C, R, seqlens, page_size, causal, window, scale
):
    if isa != "native":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", isa)
    prob = make_problem(B, Sq, H, C, R, seqlens, page_size, dtype=dtype)
    out, lse = mla_decode(*prob[:4], scale, block_table=prob[4], causal=causal, window=window)
    check_close(out, lse, *prob, scale, causal, window)


@pytest.mark.parametrize("page_size", [None, 16])
def test_decode_given_max_seqlen_matches(device, page_size):
    # max_seqlen >= the longest row skips the host check on CUDA; the result is the same. The exact
    # bound gives the same bits. On CUDA the key splits are sized by max_seqlen, so a looser bound
    # (the capacity) moves the split boundaries and changes the last bits of the merge.
    prob = make_problem(3, 2, 3, 48, 16, [300, 0, 41], page_size, device=device)
    cap = prob[2].shape[1] if page_size is None else prob[4].shape[1] * page_size
    assert cap > 300
    want = mla_decode(*prob[:4], 0.3, block_table=prob[4])
    for bound in (300, cap):
        got = mla_decode(*prob[:4], 0.3, block_table=prob[4], max_seqlen=bound)
        exact = bound == 300 or device == "cpu"
        tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(got[0], want[0], **tol)
        torch.testing.assert_close(got[1], want[1], **tol)


def test_decode_bad_max_seqlen():
    prob = make_problem(2, 1, 3, 48, 16, [30, 7], None)
    cap = prob[2].shape[1]
    for bad in (-2, cap + 1):
        with pytest.raises(ValueError, match="max_seqlen"):
            mla_decode(*prob[:4], 0.3, max_seqlen=bad)
    with pytest.raises(ValueError, match="max_seqlen"):  # the CPU checks the promise
        mla_decode(*prob[:4], 0.3, max_seqlen=29)


def test_decode_does_not_mutate_inputs(device):
    prob = make_problem(2, 1, 3, 48, 16, [20, 9], 16, device=device)
    before = [t.clone() for t in prob]
    mla_decode(*prob[:4], 0.3, block_table=prob[4])
    for a, b in zip(prob, before):  # bitwise, NaN poison included (nan_to_num would hide a write of 0)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        if a.is_floating_point():
            assert torch.equal(a.isnan(), b.isnan())


def test_decode_opcheck(device):
    prob = make_problem(2, 2, 3, 48, 16, [20, 9], 16, device=device)
    q_latent, q_pe, kv, seqlens, table = prob
    kv = kv.nan_to_num()  # opcheck compares outputs with NaN-free inputs
    op = torch.ops.latentmoe.mla_decode.default
    torch.library.opcheck(op, (q_latent, q_pe, kv, seqlens, table, 0.3, True, -1))
    q_latent, q_pe, kv, seqlens, _ = make_problem(2, 1, 3, 48, 16, [20, 9], None, device=device)
    torch.library.opcheck(op, (q_latent, q_pe, kv.nan_to_num(), seqlens, None, 0.3, False, 4))


# ---- bad input ----------------------------------------------------------------------------------


def _good(device="cpu", page_size=None):
    return list(make_problem(2, 1, 3, 48, 16, [20, 9], page_size, device=device))


@pytest.mark.parametrize(
    "mutate,name",
    [
        (lambda a: a.__setitem__(0, a[0][..., :40].contiguous()), "kv_cache"),  # C mismatch vs cache row
        (lambda a: a.__setitem__(1, a[1].to(torch.float64)), "q_pe"),
        (lambda a: a.__setitem__(1, a[1][:, :, :2].contiguous()), "q_pe"),
        (lambda a: a.__setitem__(2, a[2][:1].contiguous()), "kv_cache"),
        (lambda a: a.__setitem__(2, a[2].half()), "kv_cache"),
        (lambda a: a.__setitem__(3, a[3].long()), "cache_seqlens"),
        (lambda a: a.__setitem__(3, torch.tensor([20, 9, 1], dtype=torch.int32)), "cache_seqlens"),
        (lambda a: a.__setitem__(3, torch.tensor([26, 9], dtype=torch.int32)), "cache_seqlens"),  # > capacity
        (lambda a: a.__setitem__(3, torch.tensor([-1, 9], dtype=torch.int32)), "cache_seqlens"),
        (lambda a: a.__setitem__(0, a[0].transpose(1, 2)), "q_latent"),  # non-contiguous
        (lambda a: a.__setitem__(0, a[0].to(torch.int32)), "q_latent"),
    ],
)
def test_decode_bad_input(mutate, name):
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=name):
        mla_decode(*args[:4], 0.3, block_table=args[4])


@pytest.mark.parametrize(
    "table_fn,seqlens,name",
    [
        (lambda t: t.fill_(10_000), None, "block_table"),
        (lambda t: t.fill_(-1), None, "block_table"),
        (lambda t: t.long(), None, "block_table"),
        (lambda t: t[:1].contiguous(), None, "block_table"),
        (lambda t: t.t().contiguous().t(), None, "block_table"),  # non-contiguous
        (lambda t: t, [20, 1000], "cache_seqlens"),  # more tokens than the pages hold
    ],
)
def test_decode_bad_paged_input(table_fn, seqlens, name):
    q_latent, q_pe, kv, lens, table = _good(page_size=16)
    table = table_fn(table.clone())
    if seqlens is not None:
        lens = torch.tensor(seqlens, dtype=torch.int32)
    with pytest.raises(ValueError, match=name):
        mla_decode(q_latent, q_pe, kv, lens, 0.3, block_table=table)


def test_decode_unused_table_entries_may_be_garbage():
    # Entries of pages past a row's length are never read, so padding like -1 is allowed there.
    q_latent, q_pe, kv, lens, table = _good(page_size=16)
    table[1, 1:] = -1  # row 1 has 9 tokens: only page 0 is used
    out, lse = mla_decode(q_latent, q_pe, kv, lens, 0.3, block_table=table)
    check_close(out, lse, q_latent, q_pe, kv, lens, table, 0.3, True, -1)


def test_decode_bad_window():
    args = _good()
    with pytest.raises(ValueError, match="window"):
        mla_decode(*args[:4], 0.3, block_table=args[4], window=-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_device_mismatch():
    args = _good()
    args[2] = args[2].cuda()
    with pytest.raises(RuntimeError, match="kv_cache"):
        mla_decode(*args[:4], 0.3)


def test_decode_torch_compile_fullgraph(device):
    prob = make_problem(2, 2, 3, 48, 16, [20, 9], 16, device=device)
    q_latent, q_pe, kv, seqlens, table = prob

    def step(q_latent, q_pe, kv, seqlens, table):
        out, lse = mla_decode(q_latent * 2, q_pe, kv, seqlens, 0.3, block_table=table)
        return out + 1, lse

    want = step(*prob)
    got = torch.compile(step, fullgraph=True)(*prob)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("H,C,R,Sq", [(63, 48, 16, 2), (128, 512, 64, 1)])
def test_decode_many_heads(device, H, C, R, Sq):
    prob = make_problem(2, Sq, H, C, R, [45, 3], 16, device=device)
    out, lse = mla_decode(*prob[:4], 0.05, block_table=prob[4])
    check_close(out, lse, *prob, 0.05, True, -1)


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_split_pe_cache_equals_fused(device, page_size, dtype):
    # c_kv and k_pe in separate tensors (HF's cache layout) give exactly the fused-cache result,
    # except on CPUs with AVX512_BF16: there fused bf16 rows (contiguous, or pages of 32+ keys) get
    # their scores from vdpbf16ps dot products on the rows in place, split rows through fp32; both
    # are checked against the reference.
    q_latent, q_pe, kv, seqlens, table = make_problem(3, 2, 3, 48, 16, [30, 0, 7], page_size, dtype, device)
    fused = mla_decode(q_latent, q_pe, kv, seqlens, 0.2, block_table=table)
    c_kv, k_pe = kv[..., :48].contiguous(), kv[..., 48:].contiguous()
    split = mla_decode(q_latent, q_pe, c_kv, seqlens, 0.2, block_table=table, pe_cache=k_pe)
    if device == "cpu" and dtype == torch.bfloat16 and page_size is None and latentmoe._C.cpu_bf16dp():
        check_close(*fused, q_latent, q_pe, kv, seqlens, table, 0.2, True, -1)
        check_close(*split, q_latent, q_pe, kv, seqlens, table, 0.2, True, -1)
        return
    torch.testing.assert_close(split[0], fused[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(split[1], fused[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "pe_fn,kv_dim,name",
    [
        (lambda kv: kv[..., 48:].contiguous(), 64, "kv_cache"),  # kv_cache must then be C wide
        (lambda kv: kv[..., 40:].contiguous(), 48, "pe_cache"),  # wrong rope dim
        (lambda kv: kv[:1, :, 48:].contiguous(), 48, "pe_cache"),  # leading dims differ
        (lambda kv: kv[..., 48:].double().contiguous(), 48, "pe_cache"),
        (lambda kv: kv[..., 48:], 48, "pe_cache"),  # non-contiguous view
    ],
)
def test_decode_bad_pe_cache(pe_fn, kv_dim, name):
    q_latent, q_pe, kv, seqlens, _ = _good()
    with pytest.raises(ValueError, match=name):
        mla_decode(q_latent, q_pe, kv[..., :kv_dim].contiguous(), seqlens, 0.3, pe_cache=pe_fn(kv))


def test_decode_random_shapes_property():
    """Random shapes, lengths, page sizes and masks (hypothesis): kernel == fp64 reference."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
    @hypothesis.given(
        B=st.integers(1, 3), Sq=st.integers(1, 3), H=st.integers(1, 5), C=st.integers(1, 70),
        R=st.sampled_from([0, 2, 16]), page=st.sampled_from([None, 1, 3, 16, 64]),
        lens=st.lists(st.integers(0, 150), min_size=3, max_size=3), causal=st.booleans(),
        window=st.sampled_from([-1, 0, 3, 40]),
    )
    def check(B, Sq, H, C, R, page, lens, causal, window):
        prob = make_problem(B, Sq, H, C, R, lens[:B], page)
        out, lse = mla_decode(*prob[:4], 0.25, block_table=prob[4], causal=causal, window=window)
        check_close(out, lse, *prob, 0.25, causal, window)

    check()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_cuda_grid_limit_is_a_clear_error():
    # Batch rows go on the grid's z axis (at most 65535): a larger batch is refused by name.
    B, C, R = 65536, 8, 0
    q = torch.randn(B, 1, 1, C, device="cuda")
    kv = torch.randn(B, 2, C + R, device="cuda")
    lens = torch.ones(B, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="q_latent.*65535"):
        mla_decode(q, q[..., :0], kv, lens, 1.0, max_seqlen=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,Sq,H,C,R,seqlens,page_size",
    [(1, 1, 16, 512, 64, [3000], None), (2, 2, 9, 48, 16, [300, 0], 17), (3, 1, 128, 512, 64, [700, 5, 64], 64),
     (2, 16, 3, 40, 16, [200, 16], 1)],
)
def test_decode_cuda_tensor_and_cuda_cores_agree(monkeypatch, dtype, B, Sq, H, C, R, seqlens, page_size):
    """The tensor-core split kernel (auto for bf16 / fp16 with C, R multiples of 8) and the
    CUDA-core one, forced by LATENTMOE_MLA_DECODE_KERNEL, both meet the reference tolerance."""
    prob = make_problem(B, Sq, H, C, R, seqlens, page_size, dtype=dtype, device="cuda")
    results = {}
    for kernel in ("tensor_cores", "cuda_cores", "auto"):
        monkeypatch.setenv("LATENTMOE_MLA_DECODE_KERNEL", kernel)
        results[kernel] = mla_decode(*prob[:4], 0.06, block_table=prob[4], causal=True)
        check_close(*results[kernel], *prob, 0.06, True, -1)
    assert torch.equal(results["auto"][0], results["tensor_cores"][0])
    torch.testing.assert_close(results["tensor_cores"][1], results["cuda_cores"][1], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_cuda_forced_tensor_cores_refused_where_they_do_not_apply(monkeypatch):
    monkeypatch.setenv("LATENTMOE_MLA_DECODE_KERNEL", "tensor_cores")
    prob = make_problem(1, 1, 4, 48, 16, [20], dtype=torch.float32, device="cuda")
    with pytest.raises(ValueError, match="tensor-core kernel does not apply"):
        mla_decode(*prob[:4], 0.1)
    prob = make_problem(1, 1, 4, 44, 16, [20], dtype=torch.bfloat16, device="cuda")  # C % 8 != 0
    with pytest.raises(ValueError, match="tensor-core kernel does not apply"):
        mla_decode(*prob[:4], 0.1)
    monkeypatch.setenv("LATENTMOE_MLA_DECODE_KERNEL", "fastest")
    with pytest.raises(ValueError, match="LATENTMOE_MLA_DECODE_KERNEL must be"):
        mla_decode(*prob[:4], 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("which", ["q_latent", "q_pe", "kv_cache"])
def test_decode_cuda_misaligned_inputs_use_cuda_cores(monkeypatch, which):
    """A contiguous input whose data starts off a 16-byte boundary (a view at an odd offset): auto
    runs the CUDA-core kernel (correct result), forcing tensor cores is a ValueError."""
    prob = list(make_problem(2, 1, 16, 64, 16, [90, 33], None, dtype=torch.bfloat16, device="cuda"))
    i = {"q_latent": 0, "q_pe": 1, "kv_cache": 2}[which]
    t = prob[i]
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
    shifted = flat[1:].view(t.shape)
    shifted.copy_(t)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    prob[i] = shifted
    out, lse = mla_decode(*prob[:4], 0.1, block_table=prob[4])
    check_close(out, lse, *prob, 0.1, True, -1)
    monkeypatch.setenv("LATENTMOE_MLA_DECODE_KERNEL", "tensor_cores")
    with pytest.raises(ValueError, match="tensor-core kernel does not apply"):
        mla_decode(*prob[:4], 0.1, block_table=prob[4])


@pytest.mark.parametrize("isa", ["native", "avx2", "generic"])
@pytest.mark.parametrize("L,bad", [(16, 3), (40, 9), (11, 9), (300, 290)])
def test_nan_in_used_inputs_propagates(monkeypatch, isa, L, bad):
    # A NaN in a key the row attends to, or in the query, makes that row's output and LSE NaN, as
    # softmax attention does (it once came out finite, or as an "empty" row: 0 and -inf). Other
    # rows stay finite. Key counts with vector lanes only, a scalar tail, and several splits.
    if isa != "native":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", isa)
    C, R, H = 16, 8, 3
    q, qp = torch.randn(1, 1, H, C), torch.randn(1, 1, H, R)
    cache = torch.randn(1, L, C + R)
    lens = torch.tensor([L], dtype=torch.int32)
    cache[0, bad, C + 1] = float("nan")  # k_pe of one key: every head's score of that key
    out, lse = mla_decode(q, qp, cache, lens, 0.3)
    assert out.isnan().all() and lse.isnan().all()
    cache[0, bad, C + 1] = 0.0
    q[0, 0, 1, 0] = float("nan")  # head 1's query only
    out, lse = mla_decode(q, qp, cache, lens, 0.3)
    assert out[:, :, 1].isnan().all() and lse[:, :, 1].isnan().all()
    assert torch.isfinite(out[:, :, [0, 2]]).all() and torch.isfinite(lse[:, :, [0, 2]]).all()


def test_gradient_reaching_it_raises():
    # An inference op: a gradient must raise, not leave the queries' .grad silently None.
    q = torch.randn(1, 1, 2, 8, requires_grad=True)
    out, _ = mla_decode(q, torch.randn(1, 1, 2, 4), torch.randn(1, 5, 12), torch.tensor([5], dtype=torch.int32), 0.3)
    with pytest.raises(RuntimeError, match="mla_decode: has no backward"):
        out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", [9, 200])
def test_nan_in_a_key_outside_every_window_stays_out(device, dtype, L):
    # Keys before every query's sliding window are never read: a NaN there must not reach the output
    # (Sq = 2, window 3). (A key hidden from one query but seen by another, e.g. the last key under
    # Sq = 2 causal, may pass NaN to both through 0 x NaN in P.V, as torch's SDPA does with a boolean
    # mask.) The bench's shapes (C 512, R 64, 16 heads) take the CUDA tensor-core kernel in bf16.
    C, R, H = 512, 64, 16
    q = torch.randn(1, 2, H, C, device=device).to(dtype)
    qp = torch.randn(1, 2, H, R, device=device).to(dtype)
    cache = torch.randn(1, L, C + R, device=device).to(dtype)
    lens = torch.tensor([L], dtype=torch.int32, device=device)
    cache[0, 0, 5] = float("nan")  # c_kv of key 0: its score and its value
    cache[0, 1, C + 3] = float("nan")  # k_pe of key 1: its score
    out, lse = mla_decode(q, qp, cache, lens, 0.05, causal=True, window=3)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    cache[0, 0, 5] = cache[0, 1, C + 3] = 0.0
    want, want_lse = mla_decode(q, qp, cache, lens, 0.05, causal=True, window=3)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_cache_width_error_names_where_the_width_comes_from():
    # The cache's row width is C + R of the queries: the error says so, with both numbers, so a
    # mismatch caused by the queries is not read as the cache's alone.
    q, qp = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 8)
    lens = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"'kv_cache' dim 2 must be 24 \(kv_lora_rank C=16 \+ rope dim R=8, as the "
                                         r"other arguments give them\)"):
        mla_decode(q, qp, torch.randn(1, 5, 30), lens, 0.1)
