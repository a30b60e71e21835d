"""latentmoe.ops.linear_f32 (the CPU fp32 GEMM on latentmoe's own register tiles) against
torch.nn.functional.linear in fp64, and nn._linear.project's choice of it."""

from __future__ import annotations

import pytest
import torch

import latentmoe
from latentmoe.ops import linear_f32


def _want(x, w, b):
    return torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())


def _close(got, want, K):
    # fp32 accumulation over K terms of size ~1: error ~ sqrt(K) * eps * |terms|.
    tol = 4e-6 * max(1.0, K**0.5)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


# Rows around the 6-row register tile and the 144-row block, columns around the 64-column panel,
# K around the 256-deep k block (0: the bias alone, or zeros).
@pytest.mark.parametrize("M", [1, 5, 6, 7, 143, 145, 300])
@pytest.mark.parametrize("N,K", [(1, 3), (63, 257), (64, 256), (65, 255), (130, 600), (7, 0), (70, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_f32_matches_fp64(M, N, K, with_bias):
    x = torch.randn(M, K)
    w = torch.randn(N, K) / max(K, 1) ** 0.5
    b = torch.randn(N) if with_bias else None
    got = linear_f32(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    _close(got, _want(x, w, b), K)


@pytest.mark.parametrize("isa", ["generic", "avx2", "native"])
def test_linear_f32_cpu_isa_paths(monkeypatch, isa):
    """The 16-lane (AVX-512), 8-lane (AVX2) and portable tiles all match fp64, each deterministic."""
    if isa != "native":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", isa)
    for M, N, K in [(13, 200, 300), (150, 65, 513)]:
        x, w, b = torch.randn(M, K), torch.randn(N, K) / K**0.5, torch.randn(N)
        got = linear_f32(x, w, b)
        assert torch.equal(got, linear_f32(x, w, b))
        _close(got, _want(x, w, b), K)


def test_linear_f32_rows_and_threads_do_not_change_bits():
    # Each output is one accumulator over k in order, the bias first: a row's bits depend neither
    # on the other rows of the call nor on the thread count.
    x, w, b = torch.randn(301, 700), torch.randn(150, 700), torch.randn(150)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear_f32(x, w, b)
        torch.set_num_threads(max(2, old))
        full = linear_f32(x, w, b)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, full)
    for rows in (slice(0, 1), slice(7, 20), slice(144, 301)):
        assert torch.equal(linear_f32(x[rows].contiguous(), w, b), full[rows])
    # Weight rows too: a slice of the weight gives the full call's columns.
    assert torch.equal(linear_f32(x, w[70:].contiguous(), b[70:].contiguous()), full[:, 70:])


def test_linear_f32_nonfinite_and_inputs_untouched():
    x, w, b = torch.randn(9, 33), torch.randn(70, 33), torch.randn(70)
    x[2, 5], w[65, 1] = float("nan"), float("inf")
    copies = [t.clone() for t in (x, w, b)]
    got = linear_f32(x, w, b)
    assert all(torch.equal(t.nan_to_num(), c.nan_to_num()) for t, c in zip((x, w, b), copies))
    want = torch.nn.functional.linear(x, w, b)
    # NaN and inf where F.linear has them, nowhere else.
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    fin = want.isfinite()
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)


def test_linear_f32_empty():
    assert linear_f32(torch.randn(0, 8), torch.randn(5, 8)).shape == (0, 5)
    assert linear_f32(torch.randn(4, 8), torch.randn(0, 8)).shape == (4, 0)
    b = torch.randn(5)
    assert torch.equal(linear_f32(torch.randn(3, 0), torch.randn(5, 0), b), b.expand(3, 5))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(2, 8), torch.randn(4, 9), None), "'weight' dim 1"),
        (lambda: (torch.randn(2, 8).bfloat16(), torch.randn(4, 8).bfloat16(), None), "'input' must have dtype Float"),
        (lambda: (torch.randn(2, 8), torch.randn(4, 8).double(), None), "'weight' has dtype"),
        (lambda: (torch.randn(2, 8, 1), torch.randn(4, 8), None), "'input' must be 2-D"),
        (lambda: (torch.randn(8, 2).t(), torch.randn(4, 8), None), "'input' must be contiguous"),
        (lambda: (torch.randn(2, 8), torch.randn(8, 4).t(), None), "'weight' must be contiguous"),
        (lambda: (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)), "'bias' dim 0"),
        (lambda: (torch.randn(2, 8), torch.randn(4, 8), torch.randn(4).half()), "'bias' has dtype"),
        (lambda: (torch.randn(2, 8), torch.randn(4, 8), torch.randn(8)[::2]), "'bias' must be contiguous"),
    ],
)
def test_linear_f32_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        linear_f32(*make())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_linear_f32_cuda_tensor_raises():
    with pytest.raises(RuntimeError, match="linear_f32"):
        linear_f32(torch.randn(2, 8, device="cuda"), torch.randn(4, 8, device="cuda"))


def test_linear_f32_opcheck():
    x, w, b = torch.randn(9, 40), torch.randn(70, 40), torch.randn(70)
    torch.library.opcheck(torch.ops.latentmoe.linear_f32.default, (x, w, b))
    torch.library.opcheck(torch.ops.latentmoe.linear_f32.default, (x, w, None))


def test_linear_f32_gradient_reaching_it_raises():
    x = torch.randn(20, 8, requires_grad=True)
    out = linear_f32(x, torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="linear_f32: has no backward"):
        out.sum().backward()


@pytest.mark.parametrize("value,want", [("latentmoe", True), ("aten", False)])
def test_cpu_f32_gemm_setting(monkeypatch, value, want):
    monkeypatch.setenv("LATENTMOE_CPU_F32_GEMM", value)
    assert latentmoe._C.cpu_f32_gemm() is want


def test_cpu_f32_gemm_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("LATENTMOE_CPU_F32_GEMM", "mkl")
    with pytest.raises(ValueError, match="LATENTMOE_CPU_F32_GEMM must be auto, latentmoe or aten") as info:
        latentmoe._C.cpu_f32_gemm()
    assert "Exception raised from" not in str(info.value) and "frame #" not in str(info.value)  # no C++ backtrace
    assert "linear_f32" not in str(info.value)  # the modules read it, not the op


@pytest.mark.parametrize("value", ["latentmoe", "aten"])
def test_project_takes_linear_f32_for_many_fp32_rows_when_chosen(monkeypatch, value):
    """nn._linear.project: more than 16 fp32 CPU rows without a gradient go through linear_f32 when
    LATENTMOE_CPU_F32_GEMM picks it (same values as the layer), through the layer otherwise; never
    under autograd, never for bf16."""
    import latentmoe.nn._linear as lin

    monkeypatch.setenv("LATENTMOE_CPU_F32_GEMM", value)
    calls = []
    real = lin.linear_f32
    monkeypatch.setattr(lin, "linear_f32", lambda *a: calls.append(a[0].shape) or real(*a))
    layer = torch.nn.Linear(40, 70, bias=True)
    x = torch.randn(3, 11, 40)
    with torch.no_grad():
        got = lin.project(layer, x)
        torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
        assert got.shape == (3, 11, 70)
        lin.project(layer.bfloat16(), x.bfloat16())
        layer.float()
    assert calls == ([(33, 40)] if value == "latentmoe" else [])
    y = lin.project(layer, x)  # parameters require grad: autograd path
    assert y.grad_fn is not None and len(calls) == (1 if value == "latentmoe" else 0)
