"""latentmoe.ops.moe_experts (CPU and CUDA) against the reference and HF DeepseekV3Experts."""

from unittest import mock

import pytest
import torch
from moe_helpers import hf_moe, rel_err

import latentmoe
from latentmoe.ops import moe_experts
from latentmoe.reference import moe as ref


def assert_lowp_close(got: torch.Tensor, low_ref: torch.Tensor, exact: torch.Tensor) -> None:
    """A bf16 / fp16 result within twice the low-precision reference's own error of the fp64 one
    (plus 1e-3)."""
    err = (got.double() - exact).abs().max().item()
    assert err <= 2 * (low_ref.double() - exact).abs().max().item() + 1e-3


def _routing(T, E, K, device, dtype=torch.float32):
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(device)
    weights = (torch.rand(T, K) + 0.1).to(device=device, dtype=dtype)
    return weights, indices


def _experts(E, H, I, device, dtype=torch.float32):
    gu = torch.randn(E, 2 * I, H) * H**-0.5
    down = torch.randn(E, H, I) * I**-0.5
    return gu.to(device=device, dtype=dtype), down.to(device=device, dtype=dtype)


@pytest.mark.parametrize("T,E,K,H,I", [(1, 8, 2, 32, 16), (7, 16, 4, 40, 24), (97, 12, 3, 37, 19),
                                       (256, 64, 6, 64, 32)])
def test_experts_match_reference(device, T, E, K, H, I):
    x = torch.randn(T, H, device=device)
    gu, down = _experts(E, H, I, device)
    w, idx = _routing(T, E, K, device)
    out = moe_experts(x, gu, down, w, idx)
    want = ref.swiglu_experts(x.double().cpu(), gu.double().cpu(), down.double().cpu(),
                              w.double().cpu(), idx.cpu())
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel_err(out.cpu(), want) <= 1e-5


def test_experts_one_expert_and_idle(device):
    T, E, H, I = 50, 10, 24, 16
    x = torch.randn(T, H, device=device)
    gu, down = _experts(E, H, I, device)
    idx = torch.full((T, 1), 7, device=device)  # every token on expert 7; nine experts idle
    w = torch.rand(T, 1, device=device)
    out = moe_experts(x, gu, down, w, idx)
    want = ref.swiglu_experts(x.cpu().double(), gu.cpu().double(), down.cpu().double(),
                              w.cpu().double(), idx.cpu())
    assert rel_err(out.cpu(), want) <= 1e-5
    # Poisoning the idle experts' weights cannot change the result: they are never read.
    gu2, down2 = gu.clone(), down.clone()
    gu2[:7] = float("nan")
    down2[8:] = float("nan")
    assert torch.equal(moe_experts(x, gu2, down2, w, idx), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_experts_low_precision(device, dtype):
    T, E, K, H, I = 45, 16, 4, 64, 48
    x = torch.randn(T, H, device=device)
    gu, down = _experts(E, H, I, device)
    w, idx = _routing(T, E, K, device)
    want = ref.swiglu_experts(*(t.double().cpu() for t in (x, gu, down, w)), idx.cpu())
    lp = [t.to(dtype) for t in (x, gu, down)]
    ref_lp = ref.swiglu_experts(*(t.cpu() for t in lp), w.cpu(), idx.cpu())
    out = moe_experts(*lp, w, idx)
    assert out.dtype == dtype
    ref_err = (ref_lp.double() - want).abs().max().item()
    err = (out.cpu().double() - want).abs().max().item()
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)


@pytest.mark.parametrize("name", ["v3", "odd"])
def test_experts_match_hf(device, name):
    moe = hf_moe(name)
    x = torch.randn(23, moe.config.hidden_size)
    _, w, idx = moe.gate(x)
    want = moe.experts(x, idx, w)
    ex = moe.experts.to(device)
    out = moe_experts(x.to(device), ex.gate_up_proj, ex.down_proj, w.to(device), idx.to(device))
    assert rel_err(out.cpu(), want) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_experts_routing_weights_in_hidden_dtype(device, dtype):
    # Routing weights may come in the hidden dtype: used as their fp32 values, with their
    # gradient returned in their own dtype.
    T, H, I, E, K = 13, 24, 20, 6, 3
    x = torch.randn(T, H).to(dtype)
    gu = (torch.randn(E, 2 * I, H) * 0.2).to(dtype)
    dn = (torch.randn(E, H, I) * 0.2).to(dtype)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K).to(dtype)
    args = [t.to(device) for t in (x, gu, dn)]
    wl = w.to(device).clone().requires_grad_()
    wf = w.float().to(device).requires_grad_()
    out_l = moe_experts(*args, wl, idx.to(device))
    out_f = moe_experts(*args, wf, idx.to(device))
    assert out_l.dtype == dtype and torch.equal(out_l, out_f)
    g = torch.randn_like(out_l)
    out_l.backward(g)
    out_f.backward(g)
    assert wl.grad.dtype == dtype
    assert torch.equal(wl.grad, wf.grad.to(dtype))
    want = ref.swiglu_experts(x.float(), gu.float(), dn.float(), w.float(), idx)
    assert rel_err(out_l.float().cpu(), want) <= 3e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_deterministic(device, dtype):
    T, E, K, H, I = 300, 32, 6, 64, 40
    x = torch.randn(T, H, device=device, dtype=dtype, requires_grad=True)
    gu, down = (t.requires_grad_() for t in _experts(E, H, I, device, dtype))
    w, idx = _routing(T, E, K, device)
    w.requires_grad_()
    g = torch.randn(T, H, device=device, dtype=dtype)
    runs = []
    for _ in range(2):
        out = moe_experts(x, gu, down, w, idx)
        grads = torch.autograd.grad((out * g).sum(), (x, gu, down, w))
        runs.append((out, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_experts_gradients(device):
    T, E, K, H, I = 33, 12, 3, 40, 24
    torch.manual_seed(3)
    x = torch.randn(T, H)
    gu, down = _experts(E, H, I, "cpu")
    w, idx = _routing(T, E, K, "cpu")
    g = torch.randn(T, H)
    ours = [t.clone().to(device).requires_grad_() for t in (x, gu, down, w)]
    (moe_experts(*ours, idx.to(device)) * g.to(device)).sum().backward()
    theirs = [t.double().requires_grad_() for t in (x, gu, down, w)]
    (ref.swiglu_experts(*theirs, idx) * g.double()).sum().backward()
    for a, b in zip(ours, theirs):
        assert rel_err(a.grad.cpu(), b.grad) <= 1e-5


def test_experts_gradients_match_hf(device):
    moe = hf_moe("v3")
    x = torch.randn(21, 40, requires_grad=True)
    _, w, idx = moe.gate(x.detach())
    w = w.detach().requires_grad_()
    g = torch.randn(21, 40)
    (moe.experts(x, idx, w) * g).sum().backward()
    hf = [x.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad, w.grad]
    ours = [t.detach().to(device).requires_grad_()
            for t in (x, moe.experts.gate_up_proj, moe.experts.down_proj, w)]
    (moe_experts(*ours, idx.to(device)) * g.to(device)).sum().backward()
    for a, b in zip(ours, hf):
        assert rel_err(a.grad.cpu(), b) <= 1e-5


def test_experts_opcheck(device):
    T, E, K, H, I = 11, 6, 2, 16, 8
    x = torch.randn(T, H, device=device, requires_grad=True)
    gu, down = (t.requires_grad_() for t in _experts(E, H, I, device))
    w, idx = _routing(T, E, K, device)
    w.requires_grad_()
    torch.library.opcheck(torch.ops.latentmoe.moe_experts.default, (x, gu, down, w, idx))
    _, sp, off, guo = torch.ops.latentmoe.moe_experts.default(x, gu, down, w, idx)
    torch.library.opcheck(torch.ops.latentmoe.moe_experts_backward.default,
                          (torch.randn(T, H, device=device), x.detach(), gu.detach(),
                           down.detach(), w.detach(), sp, off, guo.detach()))


def test_experts_sorted_pairs_stable(device):
    idx = torch.tensor([[2, 0], [0, 2], [1, 2]], device=device)
    x = torch.randn(3, 8, device=device)
    gu, down = _experts(3, 8, 4, device)
    _, sp, off, _ = torch.ops.latentmoe.moe_experts.default(x, gu, down, torch.rand(3, 2, device=device), idx)
    assert sp.cpu().tolist() == [1, 2, 4, 0, 3, 5]
    assert off.cpu().tolist() == [0, 2, 3, 6]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T,E,K", [(1, 64, 6), (128, 256, 8), (205, 64, 5), (171, 16, 6)])
def test_experts_cuda_sort_matches_cpu(T, E, K):
    # S = 6 and 1024 take the binding's one-block sort, 1025 and 1026 the ATen sort; indices as a
    # non-contiguous view.
    x = torch.randn(T, 8)
    gu, down = _experts(E, 8, 4, "cpu")
    w, idx = _routing(T, E, K, "cpu")
    _, sp, off, _ = torch.ops.latentmoe.moe_experts.default(x, gu, down, w, idx)
    idx_view = idx.t().contiguous().cuda().t()
    _, sp_c, off_c, _ = torch.ops.latentmoe.moe_experts.default(x.cuda(), gu.cuda(), down.cuda(),
                                                                w.cuda(), idx_view)
    assert torch.equal(sp_c.cpu(), sp) and torch.equal(off_c.cpu(), off)


def _args(device="cpu", T=5, E=4, K=2, H=8, I=6):
    x = torch.randn(T, H, device=device)
    gu, down = _experts(E, H, I, device)
    w, idx = _routing(T, E, K, device)
    return [x, gu, down, w, idx]


@pytest.mark.parametrize("bad_value", [4, -1])
def test_experts_index_out_of_range(device, bad_value):
    a = _args(device)
    a[4][2, 1] = bad_value
    with pytest.raises(ValueError, match="indices"):
        moe_experts(*a)


def test_experts_unchecked_still_checks_on_cpu():
    # check_values=False only skips the CUDA host copy; the CPU checks the range either way.
    a = _args()
    a[4][1, 0] = 9
    with pytest.raises(ValueError, match="indices"):
        moe_experts(*a, check_values=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gemm", ["kernel", "grouped"])  # LATENTMOE_MOE_FORWARD_GEMM
@pytest.mark.parametrize("T", [5, 700])  # T * K past 1024 takes the sort-based permute
def test_experts_unchecked_cuda_drops_bad_pairs(monkeypatch, T, gemm):
    # No host copy of the range: pairs with an index outside [0, E) contribute nothing. They are
    # sorted aside (before expert 0's rows, after the last expert's), for the kernels and for the
    # grouped forward (whose at::_grouped_mm starts group 0 at row 0).
    monkeypatch.setenv("LATENTMOE_MOE_FORWARD_GEMM", gemm)
    x, gu, down, w, idx = _args("cuda", T=T, H=16, I=8)
    E = gu.shape[0]
    bad = torch.zeros_like(idx, dtype=torch.bool)
    bad[0, 0], bad[2, 1], bad[T - 1, 1] = True, True, True
    idx_bad = idx.clone()
    idx_bad[0, 0], idx_bad[2, 1], idx_bad[T - 1, 1] = -5, E + 3, E
    got = moe_experts(x, gu, down, w, idx_bad, check_values=False)
    want = moe_experts(x, gu, down, w.masked_fill(bad, 0.0), idx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "pos,make,match",
    [
        (1, lambda a: a[1][:, :-1], "gate_up_proj"),       # odd 2I
        (1, lambda a: a[1][..., :-1], "gate_up_proj"),     # hidden mismatch
        (2, lambda a: a[2][..., :-1], "down_proj"),        # I mismatch
        (2, lambda a: a[2][:-1], "down_proj"),             # E mismatch
        (3, lambda a: a[3][:, :1], "weights"),
        (4, lambda a: a[4].int(), "indices"),
        (1, lambda a: a[1].bfloat16(), "gate_up_proj"),
        (0, lambda a: a[0].double(), "hidden"),
        (3, lambda a: a[3].double(), "weights"),
        (0, lambda a: a[0][:-1], "indices"),               # T mismatch
    ],
)
def test_experts_bad_input(pos, make, match):
    a = _args()
    a[pos] = make(a)
    with pytest.raises(ValueError, match=match):
        moe_experts(*a)


@pytest.mark.parametrize("dev", ["cpu", "meta"])
def test_experts_no_experts(dev):
    # E = 0 passed the checks; with check_values=False the CUDA decode kernel then read past the
    # [E + 1] offsets and the empty weights. Every pair is out of range: refused by name.
    x, gu, down, w, idx = (t.to(dev) for t in _args())
    with pytest.raises(ValueError, match="'gate_up_proj' holds no experts"):
        moe_experts(x, gu[:0], down[:0], w, idx, check_values=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_experts_device_mismatch():
    a = _args("cuda")
    a[2] = a[2].cpu()
    with pytest.raises(RuntimeError, match="down_proj"):
        moe_experts(*a)


def test_experts_compile(device):
    x = torch.randn(9, 16, device=device)
    gu, down = _experts(5, 16, 8, device)
    w, idx = _routing(9, 5, 2, device)
    f = torch.compile(moe_experts, fullgraph=True)
    assert torch.equal(f(x, gu, down, w, idx), moe_experts(x, gu, down, w, idx))


@pytest.mark.parametrize("T", [1, 3, 11, 40])
def test_experts_decode_and_tile_boundaries(device, T):
    # Few pairs (the CUDA decode path, the CPU small-M path) and sizes around both paths' limits.
    _check_all_dtypes(T, 16, 6, 72, 40, device)


def _check_all_dtypes(T, E, K, H, I, device):
    """fp32 against the fp64 reference; bf16 / fp16 within twice the reference's own error."""
    x = torch.randn(T, H, device=device)
    gu, down = _experts(E, H, I, device)
    w, idx = _routing(T, E, K, device)
    want = ref.swiglu_experts(*(t.double().cpu() for t in (x, gu, down, w)), idx.cpu())
    assert rel_err(moe_experts(x, gu, down, w, idx).cpu(), want) <= 1e-5
    for dtype in (torch.bfloat16, torch.float16):
        lp = [t.to(dtype) for t in (x, gu, down)]
        ref_lp = ref.swiglu_experts(*(t.cpu() for t in lp), w.cpu(), idx.cpu())
        assert_lowp_close(moe_experts(*lp, w, idx).cpu(), ref_lp, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("H,I", [(392, 136), (390, 130)])  # vector loads / element-wise loads
def test_experts_cuda_long_reduction(H, I):
    # k-loops longer than the GEMM pipelines (7 / 3 steps of 64 in 16-bit, 25 / 9 of 16 in fp32),
    # several M-tiles per expert and N tails, on the 16-byte and the element-wise paths.
    _check_all_dtypes(300, 16, 4, H, I, "cuda")


@pytest.mark.parametrize("path", ["native", "fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_experts_cpu_low_precision_paths(monkeypatch, path, dtype):
    # Both CPU strategies for bf16/fp16 (native oneDNN GEMMs as on AVX-512 machines, and fp32
    # GEMMs on upconverted operands), forward and backward, whatever this machine picks itself.
    monkeypatch.setenv("LATENTMOE_CPU_LOWP_GEMM", path)
    T, E, K, H, I = 29, 8, 3, 48, 40  # some experts above, some below the small-M limit
    x = torch.randn(T, H)
    gu, down = _experts(E, H, I, "cpu")
    w, idx = _routing(T, 5, K, "cpu")
    idx[:4] = torch.tensor([5, 6, 7])  # experts 5..7: 4 rows each (small-M), 0..4: ~15 rows
    g = torch.randn(T, H)
    want = [t.double().requires_grad_() for t in (x, gu, down, w)]
    (ref.swiglu_experts(*want, idx) * g.double()).sum().backward()
    lp_ref = [t.to(dtype).requires_grad_() if i < 3 else t.clone().requires_grad_()
              for i, t in enumerate((x, gu, down, w))]
    (ref.swiglu_experts(*lp_ref, idx).float() * g).sum().backward()
    ours = [t.to(dtype).requires_grad_() if i < 3 else t.clone().requires_grad_()
            for i, t in enumerate((x, gu, down, w))]
    out = moe_experts(*ours, idx)
    (out.float() * g).sum().backward()
    ref_out = ref.swiglu_experts(*(t.detach() for t in want), idx)
    ref_lp_out = ref.swiglu_experts(*(t.detach() for t in lp_ref), idx)
    assert_lowp_close(out, ref_lp_out, ref_out)
    for a, b, c in zip(ours, lp_ref, want):
        assert_lowp_close(a.grad, b.grad, c.grad)



def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,E", [(1, 8), (40, 64), (200, 4)])  # 1, ~2 and ~150 rows per active expert
def test_experts_cpu_low_precision_auto_choice(monkeypatch, T, E, dtype):
    # LATENTMOE_CPU_LOWP_GEMM=auto gives the bits of the forced path it should pick, in the forward
    # and (the backward op on the same saved tensors) in the backward:
    # - bf16 on a CPU with AVX512_BF16 (latentmoe._C.cpu_bf16dp()): bf16dp's GEMMs (what native
    #   runs there) at any row count, forward and backward;
    # - elsewhere: native (oneDNN) GEMMs only on CPUs where oneDNN is fast in the dtype (bf16:
    #   AVX-512; fp16: AVX512_FP16) and for calls with at least 32 rows per active expert, in both
    #   directions.
    K, H, I = 3, 48, 40
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    fast = avx512 and (dtype == torch.bfloat16 or "avx512_fp16" in _cpu_flags())
    rule = "native" if fast and T * K >= 32 * min(E, T * K) else "fp32"
    dp = dtype == torch.bfloat16 and latentmoe._C.cpu_bf16dp()
    want_fwd, want_bwd = ("native", "native") if dp else (rule, rule)
    x = torch.randn(T, H, dtype=dtype)
    gu, down = _experts(E, H, I, "cpu", dtype)
    w, idx = _routing(T, E, K, "cpu")
    g = torch.randn(T, H, dtype=dtype)
    op = torch.ops.latentmoe

    def forward(path):
        monkeypatch.setenv("LATENTMOE_CPU_LOWP_GEMM", path)
        return op.moe_experts.default(x, gu, down, w, idx, True)

    def backward(path, saved):
        monkeypatch.setenv("LATENTMOE_CPU_LOWP_GEMM", path)
        _, pairs, offsets, gate_up_out = saved
        return op.moe_experts_backward.default(g, x, gu, down, w, pairs, offsets, gate_up_out)

    auto = forward("auto")
    for a, b in zip(auto, forward(want_fwd)):
        assert torch.equal(a, b)
    for a, b in zip(backward("auto", auto), backward(want_bwd, auto)):
        assert torch.equal(a, b)


def _bf16dp_or_skip():
    if not latentmoe._C.cpu_bf16dp():
        pytest.skip("the CPU lacks AVX512_BF16 (bf16dp's GEMMs do not run here)")


@pytest.mark.parametrize("T,E,K,H,I", [
    (97, 12, 3, 37, 19),     # K tails below one 32-lane step; every row remainder of the 4-row tile
    (61, 5, 2, 530, 47),     # H = 530: 16 full k steps and a tail of 18; 2I = 94 / H end mid-span
    (300, 2, 1, 2048, 40),   # ~150 rows per expert above rows_per_pass(2048) = 124: two passes
    (40, 3, 3, 100, 101),    # every expert holds every token: too large to share out (threads split columns)
])
def test_experts_cpu_bf16dp_shapes(T, E, K, H, I):
    # bf16dp's GEMMs (AVX512_BF16; the SwiGLU in the gate_up epilogue) against the fp64 reference
    # within twice the bf16 reference's error, and bitwise equal at 1, 2 and 3 threads (experts
    # concurrently, or one expert's columns split across the threads).
    _bf16dp_or_skip()
    x = torch.randn(T, H).to(torch.bfloat16)
    gu, down = _experts(E, H, I, "cpu", torch.bfloat16)
    w, idx = _routing(T, E, K, "cpu")
    lp_ref = ref.swiglu_experts(x, gu, down, w, idx)
    want = ref.swiglu_experts(*(t.double() for t in (x, gu, down, w)), idx)
    prev = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(moe_experts(x, gu, down, w, idx))
    finally:
        torch.set_num_threads(prev)
    assert_lowp_close(outs[0], lp_ref, want)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_experts_cpu_bf16dp_gate_up_out_and_paths():
    # The saved gate|up rows (the backward's input) are bf16 of the fp32 sums, as a bf16 GEMM
    # returns them; and bf16dp's forward agrees with the oneDNN one (LATENTMOE_CPU_ISA=avx2 and
    # LATENTMOE_CPU_LOWP_GEMM=native) within a bf16 rounding of the outputs.
    _bf16dp_or_skip()
    T, E, K, H, I = 50, 4, 2, 200, 70
    x = torch.randn(T, H).to(torch.bfloat16)
    gu, down = _experts(E, H, I, "cpu", torch.bfloat16)
    w, idx = _routing(T, E, K, "cpu")
    out, pairs, offsets, gate_up_out = torch.ops.latentmoe.moe_experts.default(x, gu, down, w, idx, True)
    tok, e = pairs // K, idx.flatten()[pairs]
    exact = torch.einsum("ph,pnh->pn", x[tok].double(), gu[e].double())
    assert (gate_up_out.double() - exact).abs().max() <= 2 ** -7 * exact.abs().max()
    with mock.patch.dict("os.environ", {"LATENTMOE_CPU_ISA": "avx2", "LATENTMOE_CPU_LOWP_GEMM": "native"}):
        latentmoe.reload_settings()
        assert not latentmoe._C.cpu_bf16dp()
        other = moe_experts(x, gu, down, w, idx)
    latentmoe.reload_settings()
    assert (out.float() - other.float()).abs().max() <= 2 ** -6 * out.float().abs().max()


@pytest.mark.parametrize("I", [40, 48])  # a 16-lane tail in the AVX-512 epilogue, and none
def test_experts_cpu_bf16_gate_up_out_rounds_to_nearest_even(I):
    # Integer inputs: every gate / up sum is an integer exact in fp32 whatever the summation order,
    # so the saved gate|up rows must be torch's bf16 rounding of it bit for bit (to nearest, ties
    # to even; odd sums between 256 and 512 are ties), on whichever CPU path runs here.
    T, E, K, H = 64, 4, 2, 64
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-8, 9, (T, H), generator=g).to(torch.bfloat16)
    gu = torch.randint(-8, 9, (E, 2 * I, H), generator=g).to(torch.bfloat16)
    down = torch.randint(-8, 9, (E, H, I), generator=g).to(torch.bfloat16)
    w, idx = _routing(T, E, K, "cpu")
    _, pairs, _, gate_up_out = torch.ops.latentmoe.moe_experts.default(x, gu, down, w, idx, True)
    tok, e = pairs // K, idx.flatten()[pairs]
    exact = torch.einsum("ph,pnh->pn", x[tok].double(), gu[e].double())
    ties = (exact.abs() > 256) & (exact.abs() < 512) & (exact % 2 != 0)
    assert ties.sum() > 100  # the case the rounding must get right is well represented
    assert torch.equal(gate_up_out, exact.float().to(torch.bfloat16))


def _scheduling_routing(case, T, E):
    """(weights, indices) that drive each branch of the CPU scheduler (experts run concurrently,
    multi-threaded large experts, the small-M path) and each row remainder of the 6-row tile."""
    if case == "uniform":
        return _routing(T, E, 3, "cpu")
    if case == "one_heavy":  # expert 3 holds every token: above a thread's share at 2 threads
        w, idx = _routing(T, E - 1, 1, "cpu")
        idx = torch.cat([torch.where(idx >= 3, idx + 1, idx), torch.full((T, 1), 3)], 1)
        return torch.rand(T, 2) + 0.1, idx
    if case == "few_active":  # experts 1 (all tokens: large), 4 and 6 (half each: concurrent)
        second = torch.where(torch.arange(T) < T // 2, 4, 6)
        return torch.rand(T, 2) + 0.1, torch.stack([torch.full((T,), 1), second], 1)
    # "ragged": expert e gets e + 1 rows (T * K = 1 + 2 + ... + E pairs): every row remainder
    # of the 6-row tile, small-M experts (<= 4 rows) and larger ones in one call.
    rows = torch.repeat_interleave(torch.arange(E), torch.arange(E) + 1)
    return torch.rand(T, 6) + 0.1, rows[torch.randperm(rows.numel())].view(T, 6)


def _scheduling_problem(monkeypatch, case, isa):
    """(x, gate_up, down, weights, indices) of a scheduler case (H = 530, I = 45); isa "generic"
    selects the CPU path without AVX2, "avx2" the one without AVX-512 kernels."""
    if isa != "native":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", isa)
    T, E, H, I = (13, 12, 530, 45) if case == "ragged" else (40, 10, 530, 45)
    x = torch.randn(T, H)
    gu, down = _experts(E, H, I, "cpu")
    return (x, gu, down, *_scheduling_routing(case, T, E))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("case", ["uniform", "one_heavy", "few_active", "ragged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# generic: the path of CPUs without AVX2; avx2: no AVX-512 kernels (bf16 through oneDNN or fp32)
@pytest.mark.parametrize("isa", ["native", "avx2", "generic"])
def test_experts_cpu_scheduling_and_tiles(monkeypatch, case, dtype, threads, isa):
    # H = 530: three k blocks of the CPU GEMM, the last one ragged; H and 2I = 90 end in partial
    # 16-column panels; I = 45 leaves a ragged k tail in the down projection. At 3 threads
    # "few_active" runs two concurrent experts on three threads beside one large expert.
    x, gu, down, w, idx = _scheduling_problem(monkeypatch, case, isa)
    want = ref.swiglu_experts(*(t.double() for t in (x, gu, down, w)), idx)
    lp = [t.to(dtype) for t in (x, gu, down)]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = moe_experts(*lp, w, idx)
        again = moe_experts(*lp, w, idx)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(out, again)
    if dtype == torch.float32:
        assert rel_err(out, want) <= 1e-5
    else:
        assert_lowp_close(out, ref.swiglu_experts(*lp, w, idx), want)


@pytest.mark.parametrize("case", ["uniform", "one_heavy", "few_active", "ragged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# generic: the ATen backward; avx2: no AVX-512 kernels (bf16 on the fp32 panels or oneDNN)
@pytest.mark.parametrize("isa", ["native", "avx2", "generic"])
def test_experts_cpu_backward_scheduling(monkeypatch, case, dtype, isa):
    # The CPU backward: experts concurrently (one thread each) or, too large to share out, alone
    # with their GEMMs split across the threads; H = 530 spans three 256-row k blocks of the
    # activation-gradient GEMMs, 2I = 90 and I = 45 end in partial 16-column panels and 6-row
    # tiles, and "ragged" gives every row count from 1 to E. Gradients against fp64 autograd of
    # the reference; and the AVX2 backward op gives the same bits at 1, 2 and 3 threads.
    x, gu, down, w, idx = _scheduling_problem(monkeypatch, case, isa)
    g = torch.randn_like(x)
    leaves = [t.double().requires_grad_() for t in (x, gu, down, w)]
    ref.swiglu_experts(*leaves, idx).backward(g.double())
    lp = [t.to(dtype) for t in (x, gu, down)]
    lp_ref = [t.clone().requires_grad_() for t in lp] + [w.clone().requires_grad_()]
    ref.swiglu_experts(*lp_ref, idx).backward(g.to(dtype))
    ins = [t.clone().requires_grad_() for t in lp] + [w.clone().requires_grad_()]
    moe_experts(*ins, idx).backward(g.to(dtype))
    for got, low, exact in zip(ins, lp_ref, leaves):
        if dtype == torch.float32:
            assert rel_err(got.grad, exact.grad) <= 1e-5
        else:
            assert_lowp_close(got.grad, low.grad, exact.grad)
    if isa == "generic":
        return  # (the ATen backward's GEMMs may split sums by thread count)
    op = torch.ops.latentmoe
    _, pairs, offsets, gate_up_out = op.moe_experts.default(*lp, w, idx, True)
    prev = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(op.moe_experts_backward.default(g.to(dtype), *lp, w, pairs, offsets, gate_up_out))
    finally:
        torch.set_num_threads(prev)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ["native", "avx2", "generic"])
@pytest.mark.parametrize("T,H,I", [(1, 75, 41), (2, 530, 45), (4, 61, 33)])
def test_experts_cpu_small_m_bf16_groups(monkeypatch, isa, T, H, I):
    # The bf16 small-M path: groups of 4 weight rows (each row dotted on its own, the group after
    # next prefetched), shared out over threads in contiguous ranges. Row counts 1..4 per expert
    # (T tokens, top-6 of 8), gate|up / down row counts that leave 1..3 rows in the last group (2I = 82, 90, 66; H = 75,
    # 530, 61), k tails past the 32-element prefetch blocks and the 16-element ones. Against the
    # reference, and bitwise equal at 1, 2 and 3 threads (the ranges, so the groups split
    # between threads differ).
    # native: vdpbf16ps on the bf16 rows, one weight row at a time, where the CPU has AVX512_BF16
    # (dot_bf16dp), else the AVX2 split kernel (dot_bf16_split_avx2); avx2: that kernel on any
    # AVX2 CPU; generic: the portable one.
    if isa != "native":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", isa)
    E, K = 8, 6
    x = torch.randn(T, H)
    gu, down = _experts(E, H, I, "cpu")
    w, idx = _routing(T, E, K, "cpu")
    want = ref.swiglu_experts(*(t.double() for t in (x, gu, down, w)), idx)
    lp = [t.to(torch.bfloat16) for t in (x, gu, down)]
    ref_lp = ref.swiglu_experts(*lp, w, idx)
    prev = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(moe_experts(*lp, w, idx))
    finally:
        torch.set_num_threads(prev)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    assert_lowp_close(outs[0], ref_lp, want)


def _aten_backward_case(dtype, device="cpu", T=45, E=12, K=3, H=40, I=24, idle=3):
    """A backward problem whose last `idle` experts get no tokens and hold NaN weights (an empty
    group that read them, or a weight gradient left unset, shows up as NaN)."""
    x = torch.randn(T, H)
    gu, down = _experts(E, H, I, "cpu")
    gu[E - idle:] = float("nan")
    down[E - idle:] = float("nan")
    w, idx = _routing(T, E - idle, K, "cpu")
    g = torch.randn(T, H)
    exact = [t.double().requires_grad_() for t in (x, gu, down, w)]
    ref.swiglu_experts(*exact, idx).backward(g.double())
    low = [t.to(dtype).clone().requires_grad_() for t in (x, gu, down)] + [w.clone().requires_grad_()]
    ref.swiglu_experts(*low, idx).backward(g.to(dtype))
    ours = [t.to(device=device, dtype=dtype).clone().requires_grad_() for t in (x, gu, down)]
    ours.append(w.to(device).clone().requires_grad_())
    return ours, idx.to(device), g.to(device=device, dtype=dtype), low, exact


def _check_aten_backward(ours, low, exact, dtype, idle=3):
    for got, lo, ex in zip(ours, low, exact):
        got = got.grad.cpu()
        if got.dim() == 3:  # the weight gradients: exactly zero for the experts without tokens
            assert torch.equal(got[-idle:], torch.zeros_like(got[-idle:]))
            got, lo, ex = got[:-idle], lo.grad[:-idle], ex.grad[:-idle]
        else:
            lo, ex = lo.grad, ex.grad
        assert torch.isfinite(got).all()
        if dtype == torch.float32:
            assert rel_err(got, ex) <= 1e-5
        else:
            assert_lowp_close(got, lo, ex)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gemms", ["grouped", "loop"])
def test_experts_aten_backward_gemms(monkeypatch, dtype, gemms):
    # The device-generic ATen backward (the one CUDA runs), with its four GEMM groups as one
    # at::_grouped_mm each or as one GEMM per active expert (LATENTMOE_MOE_BACKWARD_GEMM), on the
    # CPU's at::_grouped_mm with bf16 / fp16 operands as CUDA passes them (LATENTMOE_CPU_LOWP_GEMM
    # =native). Three idle experts with NaN weights; gradients against fp64 autograd of the
    # reference. The profiler shows which GEMMs ran: four grouped calls, or none.
    monkeypatch.setenv("LATENTMOE_CPU_ISA", "generic")
    monkeypatch.setenv("LATENTMOE_CPU_LOWP_GEMM", "native")
    monkeypatch.setenv("LATENTMOE_MOE_BACKWARD_GEMM", gemms)
    ours, idx, g, low, exact = _aten_backward_case(dtype)
    out = moe_experts(*ours, idx)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.backward(g)
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::_grouped_mm")
    assert calls == (4 if gemms == "grouped" else 0)
    _check_aten_backward(ours, low, exact, dtype)


def test_experts_aten_backward_gemms_no_rows(monkeypatch):
    # No tokens: no GEMM at all (at::_grouped_mm rejects an empty jagged dimension), zero weight
    # gradients.
    monkeypatch.setenv("LATENTMOE_CPU_ISA", "generic")
    monkeypatch.setenv("LATENTMOE_MOE_BACKWARD_GEMM", "grouped")
    op = torch.ops.latentmoe
    x = torch.randn(0, 16)
    gu, down = _experts(4, 16, 8, "cpu")
    w, idx = torch.rand(0, 2), torch.zeros(0, 2, dtype=torch.long)
    _, pairs, offsets, gate_up_out = op.moe_experts.default(x, gu, down, w, idx, True)
    gx, ggu, gd, gw = op.moe_experts_backward.default(torch.randn(0, 16), x, gu, down, w, pairs,
                                                      offsets, gate_up_out)
    assert gx.shape == (0, 16) and gw.shape == (0, 2)
    assert torch.equal(ggu, torch.zeros_like(gu)) and torch.equal(gd, torch.zeros_like(down))


@pytest.mark.parametrize("gemms", ["grouped", "loop"])
def test_experts_aten_backward_dropped_pairs(monkeypatch, gemms):
    # A CUDA forward with check_values=False drops pairs whose id is out of range: sorted before
    # expert 0 (id < 0) or after the last expert (id >= E), their gate_up_out rows never written.
    # The backward (the device-generic ATen one) gives them no gradient and keeps them out of
    # expert 0's group (at::_grouped_mm starts group 0 at row 0): the same gradients as the
    # backward of the pairs that remain.
    monkeypatch.setenv("LATENTMOE_CPU_ISA", "generic")
    monkeypatch.setenv("LATENTMOE_MOE_BACKWARD_GEMM", gemms)
    op = torch.ops.latentmoe
    T, K, E, H, I = 3, 2, 2, 16, 8
    x = torch.randn(T, H)
    gu, down = _experts(E, H, I, "cpu")
    w = torch.rand(T, K) + 0.1
    g = torch.randn(T, H)
    # Pair 0 (token 0) had id -1, pair 5 (token 2) id E: pairs 1..4 go to experts 0, 0, 1, 1.
    idx = torch.tensor([[0, 0], [0, 1], [1, 1]])
    _, pairs, offsets, gate_up_out = op.moe_experts.default(x, gu, down, w, idx, True)
    pairs_d = torch.tensor([0] + [p for p in pairs.tolist() if p not in (0, 5)] + [5])
    rows = {p: r for r, p in enumerate(pairs.tolist())}
    gate_up_d = torch.full((T * K, 2 * I), float("nan"))
    for r, p in enumerate(pairs_d.tolist()):
        if p not in (0, 5):
            gate_up_d[r] = gate_up_out[rows[p]]
    offs_d = torch.tensor([1, 1 + int((idx.view(-1)[1:5] == 0).sum()), 5])
    gx, ggu, gd, gw = op.moe_experts_backward.default(g, x, gu, down, w, pairs_d, offs_d, gate_up_d)
    # The reference: the same call with pairs 0 and 5 given zero routing weight on valid experts.
    w_ref = w.clone()
    w_ref[0, 0] = w_ref[2, 1] = 0
    leaves = [t.clone().double().requires_grad_() for t in (x, gu, down, w_ref)]
    (ref.swiglu_experts(*leaves, idx) * g.double()).sum().backward()
    for got, want in ((gx, leaves[0].grad), (ggu, leaves[1].grad), (gd, leaves[2].grad)):
        assert torch.isfinite(got).all()
        assert rel_err(got.double(), want) <= 1e-5
    assert gw[0, 0] == 0 and gw[2, 1] == 0
    keep = torch.ones(T, K, dtype=torch.bool)
    keep[0, 0] = keep[2, 1] = False
    assert rel_err(gw[keep].double(), leaves[3].grad[keep]) <= 1e-5


def test_experts_aten_backward_gemms_errors(monkeypatch):
    monkeypatch.setenv("LATENTMOE_CPU_ISA", "generic")
    op = torch.ops.latentmoe
    x, gu, down, w, idx = _args()
    _, pairs, offsets, gate_up_out = op.moe_experts.default(x, gu, down, w, idx, True)
    g = torch.randn_like(x)
    monkeypatch.setenv("LATENTMOE_MOE_BACKWARD_GEMM", "fastest")
    with pytest.raises(ValueError, match="LATENTMOE_MOE_BACKWARD_GEMM must be auto, grouped or loop"):
        op.moe_experts_backward.default(g, x, gu, down, w, pairs, offsets, gate_up_out)
    # Forced grouped GEMMs on rows whose stride is not a multiple of 16 bytes: a clear error
    # naming the sizes, not at::_grouped_mm's own.
    monkeypatch.setenv("LATENTMOE_MOE_BACKWARD_GEMM", "grouped")
    x, gu, down = torch.randn(5, 37), *_experts(4, 37, 8, "cpu")
    w, idx = _routing(5, 4, 2, "cpu")
    _, pairs, offsets, gate_up_out = op.moe_experts.default(x, gu, down, w, idx, True)
    with pytest.raises(ValueError, match="multiples of 16 bytes in Float; got H=37, I=8"):
        op.moe_experts_backward.default(torch.randn_like(x), x, gu, down, w, pairs, offsets,
                                        gate_up_out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gemms", ["auto", "grouped", "loop"])
def test_experts_cuda_backward_gemms(monkeypatch, dtype, gemms):
    # The CUDA backward's GEMM groups: auto (grouped for bf16 on sm90 / sm100), forced grouped
    # (at::_grouped_mm's own kernel for bf16 there, its fallback elsewhere), and the per-expert
    # loop; idle experts with NaN weights get exactly zero weight gradients.
    monkeypatch.setenv("LATENTMOE_MOE_BACKWARD_GEMM", gemms)
    ours, idx, g, low, exact = _aten_backward_case(dtype, "cuda", T=300, E=16, H=64, I=40)
    moe_experts(*ours, idx).backward(g)
    _check_aten_backward(ours, low, exact, dtype)


@pytest.mark.parametrize("path", ["default", "generic", "bf16-native", "loop-fp32", "grouped"])
def test_experts_backward_rejects_a_bad_sort(monkeypatch, path):
    # The backward op reads the forward's sort as indices: offsets and pairs are checked first, on
    # every CPU path (the ATen one, taken without AVX2 or with native bf16 GEMMs, checked nothing:
    # a repeated pair left a slot of its inverse permutation unwritten, then read it as an index).
    env = {"generic": {"LATENTMOE_CPU_ISA": "generic"},
           "bf16-native": {"LATENTMOE_CPU_LOWP_GEMM": "native"},
           "loop-fp32": {"LATENTMOE_CPU_ISA": "generic", "LATENTMOE_MOE_BACKWARD_GEMM": "loop"},
           "grouped": {"LATENTMOE_CPU_ISA": "generic", "LATENTMOE_MOE_BACKWARD_GEMM": "grouped"}}.get(path, {})
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    x, gu, down, w, idx = _args(H=32, I=16) if path == "grouped" else _args()
    if path == "bf16-native":
        x, gu, down, w = (t.bfloat16() for t in (x, gu, down, w))
    op = torch.ops.latentmoe
    _, pairs, offsets, gate_up_out = op.moe_experts.default(x, gu, down, w, idx, True)
    g = torch.randn_like(x)
    S = pairs.numel()
    bad_pairs, negative, repeated = pairs.clone(), pairs.clone(), pairs.clone()
    bad_pairs[3] = S + 7
    negative[1] = -1
    repeated[2] = pairs[5]
    bad_offsets = offsets.clone()
    bad_offsets[-1] += 1
    shuffled = offsets.clone()
    shuffled[1], shuffled[2] = offsets[2] + 1, offsets[1]
    cases = ((bad_pairs, offsets, "sorted_pairs"), (negative, offsets, "sorted_pairs"),
             (repeated, offsets, "'sorted_pairs' must be a permutation"), (pairs, bad_offsets, "expert_offsets"),
             (pairs, shuffled, "expert_offsets"))
    for p, o, name in cases:
        seen = (p.clone(), o.clone())
        with pytest.raises(ValueError, match=name):
            op.moe_experts_backward.default(g, x, gu, down, w, p, o, gate_up_out)
        assert torch.equal(p, seen[0]) and torch.equal(o, seen[1])
    # The valid sort still passes on this path.
    op.moe_experts_backward.default(g, x, gu, down, w, pairs, offsets, gate_up_out)


@pytest.mark.parametrize("isa", ["native", "generic"])
def test_experts_backward_checks_dtypes_before_converting(monkeypatch, isa):
    # bf16 without AVX2 or native bf16 GEMMs runs the backward on fp32 copies: the saved tensors'
    # dtypes are checked before that conversion, not after it.
    if isa == "generic":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", "generic")
    monkeypatch.setenv("LATENTMOE_CPU_LOWP_GEMM", "fp32")
    x, gu, down, w, idx = (t.bfloat16() if t.is_floating_point() else t for t in _args())
    op = torch.ops.latentmoe
    _, pairs, offsets, gate_up_out = op.moe_experts.default(x, gu, down, w, idx, True)
    for name, g, guo in (("grad_out", torch.randn(x.shape), gate_up_out),
                         ("gate_up_out", torch.randn_like(x), gate_up_out.float())):
        with pytest.raises(ValueError, match=name):
            op.moe_experts_backward.default(g, x, gu, down, w, pairs, offsets, guo)


def _random_backward_cases(n, seed=11):
    g = torch.Generator().manual_seed(seed)

    def pick(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    cases = []
    for _ in range(n):
        E = pick(1, 20)
        cases.append(dict(T=pick(1, 70), E=E, K=pick(1, min(E, 6) + 1), H=pick(1, 300), I=pick(1, 80),
                          dtype=[torch.float32, torch.bfloat16, torch.float16][pick(0, 3)],
                          threads=[1, 2, 3, 5][pick(0, 4)]))
    return cases


@pytest.mark.parametrize("case", _random_backward_cases(12),
                         ids=lambda c: "T{T}E{E}K{K}H{H}I{I}t{threads}".format(**c))
def test_experts_cpu_backward_random_shapes(case):
    # Seeded random sizes (panel and tile tails in every GEMM of the backward), dtypes and
    # thread counts: gradients of all four inputs vs fp64 autograd of the reference.
    T, E, K, H, I, dtype = (case[k] for k in ("T", "E", "K", "H", "I", "dtype"))
    x = torch.randn(T, H)
    gu, down = _experts(E, H, I, "cpu")
    w, idx = _routing(T, E, K, "cpu")
    g = torch.randn(T, H)
    exact = [t.double().requires_grad_() for t in (x, gu, down, w)]
    ref.swiglu_experts(*exact, idx).backward(g.double())
    low = [t.to(dtype).clone().requires_grad_() for t in (x, gu, down)] + [w.clone().requires_grad_()]
    ref.swiglu_experts(*low, idx).backward(g.to(dtype))
    ins = [t.to(dtype).clone().requires_grad_() for t in (x, gu, down)] + [w.clone().requires_grad_()]
    prev = torch.get_num_threads()
    torch.set_num_threads(case["threads"])
    try:
        moe_experts(*ins, idx).backward(g.to(dtype))
    finally:
        torch.set_num_threads(prev)
    for got, lp, ex in zip(ins, low, exact):
        if dtype == torch.float32:
            assert rel_err(got.grad, ex.grad) <= 1e-5
        else:
            assert_lowp_close(got.grad, lp.grad, ex.grad)


def test_settings_are_a_snapshot():
    # The kernels read LATENTMOE_* once and never call getenv while running (getenv is not safe
    # against another thread's os.environ assignment): a change takes effect at reload_settings().
    import os

    import latentmoe

    op = torch.ops.latentmoe
    x, gu, down, w, idx = _args()
    try:
        with mock.patch.dict(os.environ):  # every variable restored on exit
            os.environ["LATENTMOE_CPU_ISA"] = "generic"  # the ATen backward, which reads the GEMM switch
            latentmoe.reload_settings()
            _, pairs, offsets, gate_up_out = op.moe_experts.default(x, gu, down, w, idx, True)
            args = (torch.randn_like(x), x, gu, down, w, pairs, offsets, gate_up_out)
            os.environ["LATENTMOE_MOE_BACKWARD_GEMM"] = "fastest"
            op.moe_experts_backward.default(*args)  # the snapshot predates the bad value
            latentmoe.reload_settings()
            with pytest.raises(ValueError, match="LATENTMOE_MOE_BACKWARD_GEMM must be"):
                op.moe_experts_backward.default(*args)
    finally:
        latentmoe.reload_settings()


@pytest.mark.parametrize("name", ["LATENTMOE_CPU_ISA", "LATENTMOE_CPU_LOWP_GEMM"])
def test_unknown_cpu_switch_values_raise(name):
    # The kernels read these without an op to blame: an unknown value is refused when the settings
    # are (re)loaded, not silently run as the default.
    import os

    import latentmoe

    try:
        with mock.patch.dict(os.environ, {name: "bogus"}):
            with pytest.raises(ValueError, match=f"{name} must be"):
                latentmoe.reload_settings()
        with mock.patch.dict(os.environ, {name: "auto"}):
            latentmoe.reload_settings()
    finally:
        latentmoe.reload_settings()


def test_raw_op_saved_outputs_are_not_differentiable():
    # The raw op's extra outputs (sorted pairs, offsets and the saved gate|up pre-activation) are for
    # the backward: gate_up_out came back requiring grad, and a gradient through it was dropped
    # silently. They are marked non-differentiable; the output trains as before.
    x, gu, down, w, idx = _args()
    for t in (x, gu, down, w):
        t.requires_grad_()
    out, sorted_pairs, offsets, gate_up_out = torch.ops.latentmoe.moe_experts(x, gu, down, w, idx, True)
    assert out.requires_grad and not gate_up_out.requires_grad
    assert not sorted_pairs.requires_grad and not offsets.requires_grad
    out.sum().backward()
    assert all(t.grad is not None for t in (x, gu, down, w))


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unavailable"


def _thp_eligible(t: torch.Tensor) -> bool:
    """Whether the mapping holding the 2 MiB-aligned start of t's data may use transparent huge
    pages (/proc/self/smaps 'THPeligible': the advice, not whether huge pages were free)."""
    huge = 2 << 20
    addr = (t.data_ptr() + huge - 1) // huge * huge
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "THPeligible:":
                return line.split()[1] == "1"
    raise AssertionError("no THPeligible line for the tensor's mapping")


@pytest.mark.skipif(_thp_mode() != "madvise", reason="needs THP in 'madvise' mode (with 'always' every "
                    "mapping is eligible, with 'never' none is)")
def test_large_cpu_buffers_ask_for_huge_pages():
    # Buffers of 32 MiB and more are fresh mappings on every call (cpu/huge_pages.h): the forward's
    # [T*k, 2I] rows and the weight gradients (32 MiB each here) ask for huge pages before they
    # are written.
    T, E, K, H, I = 2048, 8, 2, 512, 1024
    x = torch.randn(T, H)
    gu, down = torch.randn(E, 2 * I, H) * H**-0.5, torch.randn(E, H, I) * I**-0.5
    w, idx = _routing(T, E, K, "cpu")
    out, sp, off, guo = torch.ops.latentmoe.moe_experts(x, gu, down, w, idx, True)
    assert guo.nbytes >= 32 << 20 and _thp_eligible(guo)
    grads = torch.ops.latentmoe.moe_experts_backward(torch.randn_like(out), x, gu, down, w, sp, off, guo)
    assert grads[1].shape == gu.shape and grads[1].nbytes >= 32 << 20 and _thp_eligible(grads[1])
    assert grads[2].shape == down.shape and grads[2].nbytes < 32 << 20  # (16 MiB: from the heap)
    small = torch.empty(64 << 20 >> 2)  # a plain large tensor of torch's is not advised
    assert not _thp_eligible(small)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("choice", ["grouped", "kernel", "auto"])
def test_experts_forward_gemm_choice(monkeypatch, device, dtype, choice):
    # LATENTMOE_MOE_FORWARD_GEMM: the forward's GEMMs as one at::_grouped_mm each over the
    # expert-sorted rows (the device-generic forward; auto takes it on CUDA for bf16 on sm90 /
    # sm100 at 128+ rows per expert in calls of S * H * I >= 2^34, not this one), or latentmoe's
    # kernels. Output against the fp64
    # reference (three idle experts with NaN weights: an empty group that read them shows up),
    # gradients through the backward, which reads the forward's gate_up_out; the profiler shows
    # which GEMMs ran.
    monkeypatch.setenv("LATENTMOE_MOE_FORWARD_GEMM", choice)
    T, E, H, I = 2200, 8, 64, 40
    ours, idx, g, low, exact = _aten_backward_case(dtype, device, T=T, E=E, K=2, H=H, I=I)
    acts = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        out = moe_experts(*ours, idx)
    S = T * 2
    grouped = choice == "grouped" or (
        choice == "auto" and device == "cuda" and dtype == torch.bfloat16
        and torch.cuda.get_device_capability()[0] in (9, 10) and S >= 128 * E and S * H * I >= 2**34
    )
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::_grouped_mm")
    assert calls == (2 if grouped else 0)
    want = ref.swiglu_experts(*[t.detach().double().cpu() for t in ours[:3]], ours[3].detach().double().cpu(),
                              idx.cpu())
    if dtype == torch.float32:
        assert rel_err(out.detach().cpu(), want) <= 1e-5
    else:
        lo = ref.swiglu_experts(*[t.detach().cpu() for t in ours[:3]], ours[3].detach().cpu().to(dtype), idx.cpu())
        assert_lowp_close(out.detach().cpu(), lo, want)
    out.backward(g)
    _check_aten_backward(ours, low, exact, dtype)


@pytest.mark.parametrize("K", [0, 2])
def test_experts_grouped_forward_edges(monkeypatch, K):
    # The grouped forward with no pairs (k = 0: zeros, no GEMM) and with one token; and its errors:
    # rows not a multiple of 16 bytes, an unknown choice.
    monkeypatch.setenv("LATENTMOE_MOE_FORWARD_GEMM", "grouped")
    x, gu, down = torch.randn(1, 16), *_experts(4, 16, 8, "cpu")
    w, idx = _routing(1, 4, K, "cpu")
    out = moe_experts(x, gu, down, w, idx)
    want = ref.swiglu_experts(x.double(), gu.double(), down.double(), w.double(), idx)
    assert rel_err(out, want) <= 1e-5 if K else torch.equal(out, torch.zeros_like(x))
    x, gu, down = torch.randn(5, 37), *_experts(4, 37, 8, "cpu")
    w, idx = _routing(5, 4, 2, "cpu")
    with pytest.raises(ValueError, match="LATENTMOE_MOE_FORWARD_GEMM=grouped\\) need .*got H=37, I=8"):
        moe_experts(x, gu, down, w, idx)
    monkeypatch.setenv("LATENTMOE_MOE_FORWARD_GEMM", "fastest")
    with pytest.raises(ValueError, match="LATENTMOE_MOE_FORWARD_GEMM must be auto, grouped or kernel"):
        moe_experts(x, gu, down, w, idx)
