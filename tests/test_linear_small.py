"""latentmoe.ops.linear_small (decode-step projections) against torch.nn.functional.linear in fp64."""

from __future__ import annotations

import pytest
import torch

from latentmoe.ops import linear_small


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 77, 2048), (2, 129, 95), (3, 64, 33), (16, 300, 520), (5, 3, 7)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_small_matches_fp64(device, dtype, M, N, K, with_bias):
    x = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if with_bias else None
    got = linear_small(x, w, b)
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == dtype and got.shape == (M, N)
    # fp32 accumulation, one rounding to the output dtype.
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("isa", ["generic", "avx2", "native"])
def test_linear_small_cpu_isa_paths_agree(monkeypatch, isa):
    """The portable, AVX2 and AVX-512 instantiations (LATENTMOE_CPU_ISA) give the same result up to
    fp32 summation order; each is deterministic run to run."""
    if isa != "native":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", isa)
    x = torch.randn(3, 1000)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = torch.randn(257, 1000).to(dtype)
        a, b = linear_small(x.to(dtype), w), linear_small(x.to(dtype), w)
        assert torch.equal(a, b)
        want = torch.nn.functional.linear(x.to(dtype).double(), w.double())
        tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
        torch.testing.assert_close(a.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("isa", ["generic", "avx2", "native"])
@pytest.mark.parametrize("K", [1, 15, 16, 33, 520])
def test_linear_small_rows_do_not_change_each_others_bits(monkeypatch, isa, K):
    # Each output is one accumulator over k in a fixed order, whichever register tile (rows of
    # the input by rows of the weight, smaller at the edges) computes it: a row's bits do not
    # depend on which other rows share the call, for 2..16 rows (one row has a kernel of its own).
    if isa != "native":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", isa)
    g = torch.Generator().manual_seed(K)
    x, w = torch.randn(16, K, generator=g), torch.randn(23, K, generator=g)
    full = linear_small(x, w)
    for rows in ([0, 1], [3, 4, 5], [2, 7, 9, 11, 13], list(range(5, 16))):
        part = linear_small(x[rows], w)
        assert torch.equal(part, full[rows]), rows
    # Weight rows too: outputs of a slice of the weight match the full call's columns.
    assert torch.equal(linear_small(x[:6], w[5:]), full[:6, 5:])
    torch.testing.assert_close(full.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5 * K**0.5)


@pytest.mark.parametrize("isa", ["generic", "avx2", "native"])
@pytest.mark.parametrize("K", [1, 8, 15, 24, 33, 520])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_small_one_row_same_bits_whatever_the_rows_grouping(monkeypatch, isa, K, dtype):
    # One input row: a task reads its weight rows as several sub-ranges at once (several memory
    # streams), in groups or one by one at the ends; every output is the same arithmetic either
    # way, so its bits do not depend on which weight rows share the call or on the thread count.
    if isa != "native":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", isa)
    g = torch.Generator().manual_seed(K)
    x, w = torch.randn(1, K, generator=g), torch.randn(203, K, generator=g).to(dtype)
    full = linear_small(x.to(dtype), w)
    for lo, hi in ((0, 1), (0, 7), (3, 4), (5, 203), (17, 120), (101, 202)):
        assert torch.equal(linear_small(x.to(dtype), w[lo:hi]), full[:, lo:hi]), (lo, hi)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(linear_small(x.to(dtype), w), full)
    finally:
        torch.set_num_threads(old)
    want = x.double() @ w.double().T
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(full.double(), want.to(dtype).double(), rtol=tol, atol=tol * K**0.5)


def test_linear_small_thread_count_does_not_change_bits():
    x, w = torch.randn(2, 513), torch.randn(1001, 513)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear_small(x, w)
        torch.set_num_threads(max(2, old))
        assert torch.equal(one, linear_small(x, w))
    finally:
        torch.set_num_threads(old)


def test_linear_small_empty_and_inputs_untouched(device):
    x, w = torch.randn(0, 8, device=device), torch.randn(5, 8, device=device)
    assert linear_small(x, w).shape == (0, 5)
    x, w, b = torch.randn(2, 8, device=device), torch.randn(5, 8, device=device), torch.randn(5, device=device)
    copies = [t.clone() for t in (x, w, b)]
    linear_small(x, w, b)
    assert all(torch.equal(t, c) for t, c in zip((x, w, b), copies))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(17, 8), torch.randn(4, 8), None), "at most 16"),
        (lambda: (torch.randn(2, 8), torch.randn(4, 9), None), "'weight' dim 1"),
        (lambda: (torch.randn(2, 8), torch.randn(4, 8).double(), None), "'weight' has dtype"),
        (lambda: (torch.randn(2, 8).int(), torch.randn(4, 8), None), "'input' must be float32"),
        (lambda: (torch.randn(2, 8, 1), torch.randn(4, 8), None), "'input' must be 2-D"),
        (lambda: (torch.randn(8, 2).t(), torch.randn(4, 8), None), "'input' must be contiguous"),
        (lambda: (torch.randn(2, 8), torch.randn(8, 4).t(), None), "'weight' must be contiguous"),
        (lambda: (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)), "'bias' dim 0"),
        (lambda: (torch.randn(2, 8), torch.randn(4, 8), torch.randn(4).half()), "'bias' has dtype"),
    ],
)
def test_linear_small_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        linear_small(*make())


def test_linear_small_opcheck(device):
    x, w, b = torch.randn(3, 40, device=device), torch.randn(7, 40, device=device), torch.randn(7, device=device)
    torch.library.opcheck(torch.ops.latentmoe.linear_small.default, (x, w, b))
    torch.library.opcheck(torch.ops.latentmoe.linear_small.default, (x, w, None))


def test_project_picks_linear_small_only_without_grad_for_few_cpu_rows(monkeypatch):
    """nn._linear.project: linear_small for <= 16 CPU rows when no gradient is needed (same values
    as the layer), the layer itself under autograd or for more rows."""
    import latentmoe.nn._linear as lin

    calls = []
    real = lin.linear_small
    monkeypatch.setattr(lin, "linear_small", lambda *a: calls.append(a[0].shape) or real(*a))
    layer = torch.nn.Linear(40, 24, bias=True)
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        got = lin.project(layer, x)
        torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
        assert calls == [(6, 40)] and got.shape == (2, 3, 24)
        lin.project(layer, torch.randn(17, 40))  # more rows than linear_small takes
        assert len(calls) == 1
    y = lin.project(layer, x)  # parameters require grad: autograd path
    assert y.grad_fn is not None and len(calls) == 1


def test_project_reads_the_layers_current_parameters():
    """project reads a plain layer's weight and bias from its parameter dict: parameters swapped in
    by torch.func.functional_call (there, not in the instance) and a weight deleted and set again
    as a plain tensor attribute (then not in the dict) are both the ones used, as the layer's own
    call would use them."""
    import latentmoe.nn._linear as lin

    layer = torch.nn.Linear(40, 24, bias=True)
    x = torch.randn(3, 40)
    swapped = {"inner.weight": torch.randn(24, 40), "inner.bias": torch.randn(24)}
    with torch.no_grad():
        want = torch.nn.functional.linear(x, swapped["inner.weight"], swapped["inner.bias"])
        got = torch.func.functional_call(_Projected(layer), swapped, (x,))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        del layer.weight
        layer.weight = torch.randn(24, 40)
        assert "weight" not in layer._parameters
        torch.testing.assert_close(lin.project(layer, x), torch.nn.functional.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-5)


class _Projected(torch.nn.Module):
    """A wrapper whose forward is project(inner, x), with the inner layer's parameter names."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        import latentmoe.nn._linear as lin

        return lin.project(self.inner, x)


def test_gradient_reaching_it_raises():
    # No backward: a gradient must raise, not leave the inputs' .grad silently None.
    x = torch.randn(2, 8, requires_grad=True)
    out = linear_small(x, torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="linear_small: has no backward"):
        out.sum().backward()
