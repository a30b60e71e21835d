"""RMSNorm / fused add+RMSNorm: against the reference, HF DeepseekV3RMSNorm, opcheck, compile, bad input."""

import pytest
import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

import latentmoe
from latentmoe import reference
from latentmoe.ops import add_rms_norm, rms_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 7), (3, 5, 64), (129, 513), (2, 1536)]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


# The CPU kernels have an AVX2+FMA+F16C and a portable instantiation (LATENTMOE_CPU_ISA=generic).
ISAS = ["native", "generic"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference_and_hf(monkeypatch, device, dtype, shape, isa):
    if isa == "generic":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", "generic")
    x = torch.randn(shape, device=device, dtype=dtype) * 3
    w = torch.randn(shape[-1], device=device, dtype=dtype)
    out = rms_norm(x, w, 1e-6)
    hf = DeepseekV3RMSNorm(shape[-1], eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        hf.weight.copy_(w)
    expected = hf(x)
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:
        # Same rounding points as HF: allow one ulp of the output dtype.
        ref64 = reference.rms_norm(x.double(), w.double(), 1e-6)
        assert _err(out, ref64) <= 2 * _err(expected, ref64) + 1e-6
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("isa", ISAS)
def test_long_rows_sum_in_blocks(monkeypatch, device, isa):
    """Rows of 4M values, all positive (rounding errors of a running sum add up one way): the
    sum of squares and the backward's dot product are blocked sums, within a few times HF's error
    (a pairwise mean); one running sum per lane was 100x HF's (rel. 1.2e-5 against 1.2e-7)."""
    if isa == "generic":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", "generic")
    D = 1 << 22
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(2, D, generator=g) + 1).to(device)
    w = (torch.rand(D, generator=g) + 0.5).to(device)
    x64, w64 = x.double().requires_grad_(), w.double()
    ref = reference.rms_norm(x64, w64, 1e-6)
    hf = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    rel = lambda a: ((a.double() - ref.detach()).abs() / ref.detach().abs()).max().item()
    xg = x.clone().requires_grad_()
    out = rms_norm(xg, w, 1e-6)
    assert rel(out) <= 4 * rel(hf) + 1e-7, (rel(out), rel(hf))
    gy = torch.randn(2, D, generator=g).to(device)
    out.backward(gy)
    ref.backward(gy.double())
    gerr = ((xg.grad.double() - x64.grad).abs().max() / x64.grad.abs().max()).item()
    assert gerr <= 1e-6, gerr


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(monkeypatch, device, dtype, isa):
    if isa == "generic":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", "generic")
    x = torch.randn(4, 33, 97, device=device, dtype=dtype)
    r = torch.randn_like(x)
    w = torch.randn(97, device=device, dtype=dtype)
    x0, r0 = x.clone(), r.clone()
    out, h = add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(x, x0) and torch.equal(r, r0), "inputs must not be mutated"
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(out, reference.rms_norm(x + r, w, 1e-5), rtol=1e-2, atol=1e-2)
    if dtype == torch.float32:
        torch.testing.assert_close(out, reference.rms_norm(x + r, w, 1e-5), rtol=1e-5, atol=1e-5)


def test_rms_norm_gradients_match_hf(device):
    dtype = torch.float32
    D = 77
    x = torch.randn(5, 11, D, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(D, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(5, 11, D, device=device, dtype=dtype)
    rms_norm(x, w, 1e-6).backward(g)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    hf = DeepseekV3RMSNorm(D, eps=1e-6).to(device=device, dtype=dtype)
    with torch.no_grad():
        hf.weight.copy_(w)
    hf(x).backward(g)
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, hf.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rms_norm_backward_many_rows_cuda():
    # 4,194,305 rows: 64-row weight-gradient partials would need 65,537 blocks on grid y (limit
    # 65,535); the partials grow instead. Against fp64 autograd of the same math.
    rows, D = 4 * 1024 * 1024 + 1, 8
    x = torch.randn(rows, D, device="cuda", requires_grad=True)
    w = torch.randn(D, device="cuda", requires_grad=True)
    g = torch.randn(rows, D, device="cuda")
    rms_norm(x, w, 1e-6).backward(g)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * wd).backward(g.double())
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_gradients_low_precision(monkeypatch, device, dtype, isa):
    if isa == "generic":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", "generic")
    D = 261  # not a multiple of 8: the vector loop and its scalar tail
    x64 = torch.randn(300, D, device=device, dtype=torch.float64)
    w64 = torch.randn(D, device=device, dtype=torch.float64)
    g64 = torch.randn(300, D, device=device, dtype=torch.float64)

    def grads(fn, x, w, g):
        x = x.clone().requires_grad_()
        w = w.clone().requires_grad_()
        fn(x, w, 1e-6).backward(g)
        return x.grad, w.grad

    ref_x, ref_w = grads(reference.rms_norm, x64, w64, g64)
    low_x, low_w = grads(reference.rms_norm, x64.to(dtype), w64.to(dtype), g64.to(dtype))
    our_x, our_w = grads(rms_norm, x64.to(dtype), w64.to(dtype), g64.to(dtype))
    assert _err(our_x, ref_x) <= 2 * _err(low_x, ref_x) + 1e-3
    assert _err(our_w, ref_w) <= 2 * _err(low_w, ref_w) + 1e-2


def test_add_rms_norm_gradients(device):
    D = 40
    x = torch.randn(3, 9, D, device=device, requires_grad=True)
    r = torch.randn(3, 9, D, device=device, requires_grad=True)
    w = torch.randn(D, device=device, requires_grad=True)
    go, gh = torch.randn(3, 9, D, device=device), torch.randn(3, 9, D, device=device)
    out, h = add_rms_norm(x, r, w, 1e-6)
    (out * go + h * gh).sum().backward()
    ours = [t.grad.clone() for t in (x, r, w)]
    for t in (x, r, w):
        t.grad = None
    h_ref = x + r
    out_ref = reference.rms_norm(h_ref, w, 1e-6)
    (out_ref * go + h_ref * gh).sum().backward()
    for a, t in zip(ours, (x, r, w)):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-5)


def test_backward_is_deterministic(device):
    x = torch.randn(1000, 128, device=device, requires_grad=True)
    w = torch.randn(128, device=device, requires_grad=True)
    g = torch.randn(1000, 128, device=device)
    grads = []
    for _ in range(2):
        x.grad = w.grad = None
        rms_norm(x, w).backward(g)
        grads.append((x.grad.clone(), w.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_opcheck(device):
    x = torch.randn(6, 24, device=device, requires_grad=True)
    w = torch.randn(24, device=device, requires_grad=True)
    r = torch.randn(6, 24, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.latentmoe.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.latentmoe.add_rms_norm.default, (x, r, w, 1e-6))
    _, rstd = torch.ops.latentmoe.rms_norm(x, w, 1e-6)
    torch.library.opcheck(
        torch.ops.latentmoe.rms_norm_backward.default, (torch.randn_like(x), x.detach(), w.detach(), rstd.detach())
    )


def test_torch_compile_fullgraph(device):
    norm = latentmoe.nn.RMSNorm(48).to(device)
    with torch.no_grad():
        norm.weight.normal_()

    def f(x, r):
        a = norm(x)
        b, h = norm(x, r)
        return a + b, h

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 48, device=device)
    r = torch.randn(4, 48, device=device)
    for got, want in zip(compiled(x, r), f(x, r)):
        torch.testing.assert_close(got, want)


def test_module_matches_hf_state_dict(device):
    hf = DeepseekV3RMSNorm(32, eps=1e-5).to(device)
    with torch.no_grad():
        hf.weight.normal_()
    ours = latentmoe.nn.RMSNorm(32, eps=1e-5).to(device)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 5, 32, device=device)
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-6)


def test_bad_inputs(device):
    x = torch.randn(4, 16, device=device)
    w = torch.randn(16, device=device)
    with pytest.raises(ValueError, match="'input'.*float32, bfloat16 or float16"):
        rms_norm(x.double(), w.double())
    with pytest.raises(ValueError, match="'weight'"):
        rms_norm(x, w.half())
    with pytest.raises(ValueError, match="'weight' has 15 elements"):
        rms_norm(x, w[:15])
    with pytest.raises(ValueError, match="'weight' must be 1-D"):
        rms_norm(x, w.view(4, 4))
    with pytest.raises(ValueError, match="'input' is empty"):
        rms_norm(x[:0], w)
    with pytest.raises(ValueError, match="'residual' has shape"):
        add_rms_norm(x, x[:2], w)
    with pytest.raises(ValueError, match="'input' must have dtype|'input'.*must be float32"):
        rms_norm(torch.ones(4, 16, dtype=torch.int32, device=device), w)


def test_wrong_device():
    # Mixed devices reach the kernel of the "higher" device; meta here (no GPU on CI), CUDA on a GPU.
    x = torch.randn(4, 16)
    w = torch.randn(16, device="meta")
    with pytest.raises(RuntimeError, match="'weight' is on meta but 'input' is on cpu"):
        rms_norm(x, w)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'weight' is on cuda"):
            rms_norm(x, torch.randn(16, device="cuda"))


def test_non_contiguous_input(device):
    x = torch.randn(16, 10, device=device).t()  # [10, 16] non-contiguous
    w = torch.randn(16, device=device)
    torch.testing.assert_close(rms_norm(x, w), reference.rms_norm(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_rounds_like_torch(monkeypatch, dtype, isa):
    # The vectorised bf16 / fp16 stores round as torch's casts do (to nearest even; NaN stays NaN):
    # the output equals HF's bit for bit wherever both round the same fp32 values.
    if isa == "generic":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", "generic")
    x = (torch.randn(7, 203) * 5).to(dtype)
    x[3, 17] = float("nan")
    w = torch.ones(203, dtype=dtype)
    out = rms_norm(x, w, 1e-6)
    assert torch.isnan(out[3]).all() and not torch.isnan(out[[0, 1, 2, 4, 5, 6]]).any()
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    want = (x.float() * rstd).to(dtype)  # weight 1: out = T(T(x * rstd) * 1)
    ok = [0, 1, 2, 4, 5, 6]
    same = out[ok] == want[ok]
    # Different sum orders may move rstd by an ulp and flip a rounding; nearly all bits must match.
    assert same.float().mean() > 0.99


def test_module_mixed_dtypes_as_hf():
    # fp32 weight on bf16 / fp16 activations (e.g. under autocast): HF returns weight *
    # normed.to(input dtype) in fp32; a bf16 weight on fp32 activations gives fp32 either way.
    from latentmoe.nn import RMSNorm

    for w_dt, x_dt in [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                       (torch.bfloat16, torch.float32)]:
        hf, ours = DeepseekV3RMSNorm(24, eps=1e-5), RMSNorm(24, eps=1e-5)
        with torch.no_grad():
            hf.weight.copy_(torch.randn(24))
        ours.load_state_dict(hf.state_dict())
        hf, ours = hf.to(w_dt), ours.to(w_dt)
        x = torch.randn(5, 24, dtype=x_dt)
        want, got = hf(x), ours(x)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        res = torch.randn(5, 24, dtype=x_dt)
        normed, summed = ours(x, res)
        assert torch.equal(summed, x + res)
        torch.testing.assert_close(normed, hf(x + res), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="RMSNorm: 'hidden_states' must be float32"):
        RMSNorm(4)(torch.randn(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [7, 33, 203, 1040])
@pytest.mark.parametrize("fused_add", [False, True])
def test_rounding_points_exact_with_nonfinite(monkeypatch, dtype, D, fused_add, isa):
    # Given the kernel's own rstd, every output is T(T(src * rstd) * w) bit for bit, src = x or
    # h = T(x + r), on rows holding NaN / +-inf / values whose products overflow, on weights holding
    # NaN / inf, and on rows where all is finite (the bf16 kernel's no-NaN fast path); D not a
    # multiple of the vector width, so the scalar tails agree too.
    if isa == "generic":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", "generic")
    g = torch.Generator().manual_seed(D * 7 + fused_add)
    x = (torch.randn(9, D, generator=g) * 4).to(dtype)
    r = (torch.randn(9, D, generator=g) * 4).to(dtype)
    big = torch.finfo(dtype).max
    x[1, D // 2] = float("nan")
    x[2, D - 1] = float("inf")
    x[3, 0] = -float("inf")
    x[4, :] = 0  # all-zero row: rstd = 1 / sqrt(eps)
    x[5, 1 % D] = big  # sum of squares overflows to inf in fp32 for 16-bit and fp32 alike
    x[5, 2 % D] = big
    for w_case in ["finite", "nan", "inf", "huge"]:
        w = torch.randn(D, generator=g).to(dtype)
        if w_case == "nan":
            w[D // 3] = float("nan")
        elif w_case == "inf":
            w[D - 1] = float("inf")
        elif w_case == "huge":
            w[:] = big  # finite weights whose products overflow to inf
        if fused_add:
            out, h, rstd = torch.ops.latentmoe.add_rms_norm(x, r, w, 1e-6)
            hv = x + r
            assert torch.equal(torch.nan_to_num(h.float(), 7.0), torch.nan_to_num(hv.float(), 7.0))
            src = hv
        else:
            out, rstd = torch.ops.latentmoe.rms_norm(x, w, 1e-6)
            src = x
        # fp32 sums as the kernel's (big values overflow them to inf: rstd 0).
        want_rstd = torch.rsqrt(src.float().pow(2).sum(-1) / D + 1e-6)
        torch.testing.assert_close(rstd, want_rstd, rtol=3e-6, atol=0, equal_nan=True)
        want = ((src.float() * rstd[:, None]).to(dtype).float() * w.float()).to(dtype)
        same = (out == want) | (out.isnan() & want.isnan())
        bad = (~same).nonzero()[:5].tolist()
        assert same.all(), f"w={w_case}: first mismatches at {bad}"


def test_rstd_is_not_differentiable():
    # rstd came back with requires_grad and a grad_fn, but the backward has no term for it: a
    # gradient through it was dropped silently (d sum(rstd)/dx read 0). It is marked
    # non-differentiable now; out (and h) train as before.
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    out, rstd = torch.ops.latentmoe.rms_norm(x, w, 1e-6)
    assert out.requires_grad and not rstd.requires_grad
    out2, h, rstd2 = torch.ops.latentmoe.add_rms_norm(x, torch.randn(3, 8), w, 1e-6)
    assert out2.requires_grad and h.requires_grad and not rstd2.requires_grad


def test_rmsnorm_under_vmap():
    # The README says vmap over inputs works for RMSNorm: each slice as its own call.
    norm = latentmoe.nn.RMSNorm(48)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48) + 0.5)
    xs = torch.randn(4, 3, 7, 48)
    got = torch.func.vmap(norm)(xs)
    want = torch.stack([norm(x) for x in xs])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
