"""Prepacked experts (CPU inference, bfloat16 and float32): latentmoe.ops.moe_pack_experts / moe_experts_packed and
MoEExperts.pack(), against the reference, the HF-layout op and HF DeepseekV3MoE."""

import copy

import pytest
import torch
from moe_helpers import hf_config, hf_moe

import latentmoe
from latentmoe.nn import MoE, pack_experts, unpack_experts
from latentmoe.ops import moe_experts, moe_experts_packed, moe_pack_experts
from latentmoe.reference import moe as ref

BF16, F32 = torch.bfloat16, torch.float32


def _problem(T, E, K, H, I, seed=0, dtype=BF16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    gu = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=g) * I**-0.5).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K).long()
    w = torch.rand(T, K, generator=g) + 0.1
    return x, gu, down, w, idx


def _layout(w: torch.Tensor, gate_up: bool) -> torch.Tensor:
    """The documented packed layout, built with plain torch (independent of the kernel)."""
    E, N, K = w.shape
    Kp = (K + 1) // 2
    Kpad = 2 * Kp if w.dtype == BF16 else K
    if gate_up:
        I = N // 2
        P = (I + 31) // 32
        pad = lambda t: torch.nn.functional.pad(t, (0, Kpad - K, 0, 32 * P - I))  # noqa: E731
        cols = torch.cat([pad(w[:, :I]).view(E, P, 32, Kpad), pad(w[:, I:]).view(E, P, 32, Kpad)], 2)
    else:
        P = (N + 63) // 64
        cols = torch.nn.functional.pad(w, (0, Kpad - K, 0, 64 * P - N)).view(E, P, 64, Kpad)
    if w.dtype == BF16:  # [E, P, Kp, 64, 2]: k pairs interleaved
        return cols.view(E, P, 64, Kp, 2).permute(0, 1, 3, 2, 4).contiguous()
    return cols.permute(0, 1, 3, 2).contiguous()  # [E, P, K, 64]


def _close(out, x, gu, down, w, idx):
    """bf16: out within twice the bf16 reference's own error of the fp64 result (plus 1e-3);
    fp32: within 1e-5 of it, relative to its largest value."""
    exact = ref.swiglu_experts(x.double(), gu.double(), down.double(), w.double(), idx)
    err = (out.double() - exact).abs().max().item()
    if out.dtype == F32:
        assert err <= 1e-5 * exact.abs().max().item(), err
        return
    low = ref.swiglu_experts(x, gu, down, w, idx)
    ref_err = (low.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + 1e-3, (err, ref_err)


@pytest.mark.parametrize("E,N,K", [(2, 64, 32), (3, 70, 9), (1, 2, 1), (2, 130, 66)])
@pytest.mark.parametrize("gate_up", [False, True])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_pack_layout(E, N, K, gate_up, dtype):
    w = torch.randn(E, N, K).to(dtype)
    keep = w.clone()
    packed = torch.ops.latentmoe.moe_pack_weight(w, gate_up)
    assert torch.equal(w, keep)  # a copy: the weight is untouched
    assert torch.equal(packed, _layout(w, gate_up))


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_pack_reads_a_strided_weight(dtype):
    w = torch.randn(3, 40, 70).to(dtype)
    t = w.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert torch.equal(torch.ops.latentmoe.moe_pack_weight(t, False), _layout(w, False))


# Odd H and I (k tails, partial panels: I % 32, H % 64), more experts than tokens (idle ones),
# T = 1 (decode), and a 512-token call whose experts hold several 6-row tiles plus a remainder.
@pytest.mark.parametrize("T,E,K,H,I", [(1, 8, 2, 32, 16), (7, 16, 4, 41, 23), (97, 12, 3, 37, 19),
                                       (64, 4, 2, 130, 70), (512, 16, 6, 64, 96)])
@pytest.mark.parametrize("isa", ["native", "avx2", "generic"])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_packed_matches_reference(monkeypatch, T, E, K, H, I, isa, dtype):
    # bf16: avx2 / generic run fp32 arithmetic on the same panels (the AVX2 + FMA kernel, the
    # portable one); fp32: the 8-lane AVX2 tiles and the portable ones.
    if isa != "native":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", isa)
    x, gu, down, w, idx = _problem(T, E, K, H, I, dtype=dtype)
    gp, dp = moe_pack_experts(gu, down)
    out = moe_experts_packed(x, gp, dp, w, idx, I)
    assert out.dtype == dtype and out.shape == x.shape
    _close(out, x, gu, down, w, idx)
    # The HF-layout op computes the same function (its sums in another order).
    tol = 0.02 if dtype == BF16 else 1e-5
    assert (out.float() - moe_experts(x, gu, down, w, idx).float()).abs().max() <= tol * out.abs().max() + 1e-5


def test_packed_fp32_avx512_and_avx2_tiles_agree(monkeypatch):
    # The same FMAs in the same order at 16 and 8 lanes: bitwise equal.
    x, gu, down, w, idx = _problem(40, 6, 3, 70, 45, dtype=F32)
    gp, dp = moe_pack_experts(gu, down)
    native = moe_experts_packed(x, gp, dp, w, idx, 45)
    monkeypatch.setenv("LATENTMOE_CPU_ISA", "avx2")
    assert torch.equal(moe_experts_packed(x, gp, dp, w, idx, 45), native)


# Rows per expert 1, 2, 3, 4, 5 and more (each of the AVX2 kernel's row counts, a remainder after
# whole 5-row tiles), odd H and I (the widened rows' zero past the last k); from 17 rows per
# expert the AVX2 path widens each panel to fp32 once and runs the fp32 tiles on it (6-row tiles:
# 17, 40 and ~53 rows, with remainders).
@pytest.mark.parametrize("T,E,K,H,I", [(1, 8, 2, 33, 17), (2, 3, 1, 130, 65), (3, 1, 1, 37, 19), (4, 2, 2, 64, 32),
                                       (5, 1, 1, 40, 24), (61, 5, 3, 71, 45), (16, 1, 1, 37, 19),
                                       (17, 1, 1, 37, 19), (40, 1, 1, 130, 97), (53, 2, 2, 71, 45)])
def test_packed_bf16_avx2_and_portable_kernels_agree(monkeypatch, T, E, K, H, I):
    # Without AVX512_BF16 the AVX2 kernel adds each pair's two exact products by FMA, the portable
    # one by a multiply and an add: the same roundings, bitwise equal (none of these products
    # underflows). (On an AVX2-only CPU the first run is what `native` runs too.)
    x, gu, down, w, idx = _problem(T, E, K, H, I, dtype=BF16)
    gp, dp = moe_pack_experts(gu, down)
    monkeypatch.setenv("LATENTMOE_CPU_ISA", "avx2")
    avx2 = moe_experts_packed(x, gp, dp, w, idx, I)
    monkeypatch.setenv("LATENTMOE_CPU_ISA", "generic")
    assert torch.equal(moe_experts_packed(x, gp, dp, w, idx, I), avx2)
    _close(avx2, x, gu, down, w, idx)


@pytest.mark.parametrize("rows", [1, 20])  # (20: the AVX2 path's widened panels)
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_packed_bf16_fp32_sums_take_one_product_at_a_time(monkeypatch, isa, rows):
    # Without AVX512_BF16 each product is added to the fp32 sum on its own, in k order. Built so
    # that the order shows in the bf16 output: gate 64 (silu(64) = 64 in fp32) times up 2^-6,
    # 2^-14, 2^-18, 2^-18 gives act = 1, 2^-8, 2^-12, 2^-12 exactly; the down products for column
    # 0 are 1, 2^-8, 2^-24, 2^-24. One at a time: 1 + 2^-8, then each 2^-24 is half an fp32 ulp
    # (a tie, to even: dropped), so the sum is 1 + 2^-8, a bf16 tie that rounds to 1. Pair sums
    # (2^-24 + 2^-24 = 2^-23 first) would give 1 + 2^-8 + 2^-23, which rounds up to 1 + 2^-7.
    monkeypatch.setenv("LATENTMOE_CPU_ISA", isa)
    H, I = 2, 4
    x = torch.tensor([[1.0, 0.0]], dtype=BF16).expand(rows, H).contiguous()
    gu = torch.zeros(1, 2 * I, H)
    gu[0, :I, 0] = 64.0
    gu[0, I:, 0] = torch.tensor([2.0**-6, 2.0**-14, 2.0**-18, 2.0**-18])
    down = torch.zeros(1, H, I)
    down[0, 0] = torch.tensor([1.0, 1.0, 2.0**-12, 2.0**-12])
    gp, dp = moe_pack_experts(gu.to(BF16), down.to(BF16))
    out = moe_experts_packed(x, gp, dp, torch.ones(rows, 1), torch.zeros(rows, 1, dtype=torch.long), I)
    assert (out[:, 0] == 1.0).all() and (out[:, 1] == 0.0).all()


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_packed_one_expert_and_low_precision_weights(dtype):
    T, E, H, I = 50, 10, 24, 16
    x, gu, down, _, _ = _problem(T, E, 1, H, I, dtype=dtype)
    idx = torch.full((T, 1), 7)  # every token on expert 7, nine experts idle
    w = (torch.rand(T, 1) + 0.1).to(dtype)  # routing weights in hidden's dtype
    gp, dp = moe_pack_experts(gu, down)
    out = moe_experts_packed(x, gp, dp, w, idx, I)
    _close(out, x, gu, down, w.float(), idx)
    # Idle experts' panels are never read.
    gp2, dp2 = gp.clone(), dp.clone()
    gp2[:7] = float("nan")
    dp2[8:] = float("nan")
    assert torch.equal(moe_experts_packed(x, gp2, dp2, w, idx, I), out)


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_packed_nan_in_a_used_input_propagates(dtype):
    x, gu, down, w, idx = _problem(9, 4, 2, 33, 17, dtype=dtype)
    x[3, 5] = float("nan")
    gp, dp = moe_pack_experts(gu, down)
    out = moe_experts_packed(x, gp, dp, w, idx, 17)
    assert out[3].isnan().all() and not out[torch.arange(9) != 3].isnan().any()


@pytest.mark.parametrize("isa", ["native", "avx2", "generic"])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_packed_deterministic_across_threads(monkeypatch, isa, dtype):
    if isa != "native":
        monkeypatch.setenv("LATENTMOE_CPU_ISA", isa)
    x, gu, down, w, idx = _problem(200, 8, 3, 72, 40, dtype=dtype)
    gp, dp = moe_pack_experts(gu, down)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = moe_experts_packed(x, gp, dp, w, idx, 40)
        torch.set_num_threads(3)
        three = moe_experts_packed(x, gp, dp, w, idx, 40)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    assert torch.equal(moe_experts_packed(x, gp, dp, w, idx, 40), one)


def test_packed_empty_calls():
    _, gu, down, _, _ = _problem(1, 4, 2, 16, 8)
    gp, dp = moe_pack_experts(gu, down)
    out = moe_experts_packed(torch.zeros(0, 16, dtype=BF16), gp, dp, torch.zeros(0, 2), torch.zeros(0, 2).long(), 8)
    assert out.shape == (0, 16)
    x = torch.randn(3, 16).to(BF16)
    out = moe_experts_packed(x, gp, dp, torch.zeros(3, 0), torch.zeros(3, 0).long(), 8)
    assert torch.equal(out, torch.zeros(3, 16, dtype=BF16))  # no expert per token: 0


def test_packed_bad_input():
    x, gu, down, w, idx = _problem(5, 4, 2, 16, 8)
    gp, dp = moe_pack_experts(gu, down)
    with pytest.raises(ValueError, match="moe_experts_packed: argument 'indices' holds 4"):
        moe_experts_packed(x, gp, dp, w, torch.full((5, 2), 4), 8)
    with pytest.raises(ValueError, match="argument 'gate_up_packed' must have shape.*I the argument 'intermediate_size'"):
        moe_experts_packed(x, gp, dp, w, idx, 40)  # another intermediate size: the message says where I comes from
    with pytest.raises(ValueError, match="argument 'down_packed' must have shape"):
        moe_experts_packed(x, gp, gp, w, idx, 8)
    with pytest.raises(ValueError, match="argument 'gate_up_packed' must be contiguous"):
        moe_experts_packed(x, gp.transpose(3, 4).contiguous().transpose(3, 4), dp, w, idx, 8)
    # bf16 panels, fp32 hidden: named as a dtype mismatch (the layout check came first and named the rank)
    with pytest.raises(ValueError, match="argument 'gate_up_packed' has dtype BFloat16 but 'hidden' has dtype Float"):
        moe_experts_packed(x.float(), gp, dp, w, idx, 8)
    with pytest.raises(ValueError, match="argument 'hidden' must be bfloat16 or float32"):
        moe_experts_packed(x.half(), gp, dp, w, idx, 8)
    gp32, dp32 = moe_pack_experts(gu.float(), down.float())
    with pytest.raises(ValueError, match="argument 'gate_up_packed' has dtype BFloat16 but 'hidden' has dtype Float"):
        moe_experts_packed(x.float(), gp, dp32, w, idx, 8)
    with pytest.raises(ValueError, match="argument 'down_packed' has dtype BFloat16 but 'hidden' has dtype Float"):
        moe_experts_packed(x.float(), gp32, dp, w, idx, 8)
    with pytest.raises(ValueError, match="argument 'gate_up_packed' must be 4-D"):
        moe_experts_packed(x.float(), gp32[0], dp32, w, idx, 8)
    # moe_pack_experts checks the pair, naming its own arguments
    with pytest.raises(ValueError, match="moe_pack_experts: argument 'gate_up_proj' must be bfloat16 or float32"):
        moe_pack_experts(gu.half(), down.half())
    with pytest.raises(ValueError, match="moe_pack_experts: argument 'down_proj' has dtype Float but 'gate_up_proj'"):
        moe_pack_experts(gu, down.float())
    for bad in (down[:3], down[:, :15], down[..., :7], down[0]):  # E, H, I, rank
        with pytest.raises(ValueError, match="moe_pack_experts: argument 'down_proj' must be"):
            moe_pack_experts(gu, bad)
    with pytest.raises(ValueError, match=r"moe_pack_experts: argument 'gate_up_proj' must be \[E, 2I, H\]"):
        moe_pack_experts(gu[:, :15], down)
    # bf16: the shapes give I only up to its parity; a pack of I = 8 called with 7 is caught by its weights
    with pytest.raises(ValueError, match="argument 'intermediate_size' is 7 but 'down_packed' holds nonzero weights"):
        moe_experts_packed(x, gp, dp, w, idx, 7)
    gp7, dp7 = moe_pack_experts(gu.view(4, 2, 8, 16)[:, :, :7].reshape(4, 14, 16), down[..., :7])
    want = moe_experts(x, gu.view(4, 2, 8, 16)[:, :, :7].reshape(4, 14, 16), down[..., :7], w, idx)
    torch.testing.assert_close(moe_experts_packed(x, gp7, dp7, w, idx, 7), want, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="argument 'weight' must be gate_up_proj"):
        torch.ops.latentmoe.moe_pack_weight(gu[:, :15], True)


def test_packed_has_no_backward():
    x, gu, down, w, idx = _problem(5, 4, 2, 16, 8)
    gp, dp = moe_pack_experts(gu, down)
    out = moe_experts_packed(x.requires_grad_(), gp, dp, w, idx, 8)
    with pytest.raises(RuntimeError, match="moe_experts_packed: has no backward"):
        out.float().sum().backward()


def test_packed_opcheck_and_compile():
    x, gu, down, w, idx = _problem(6, 4, 2, 16, 8)
    gp, dp = moe_pack_experts(gu, down)
    torch.library.opcheck(torch.ops.latentmoe.moe_experts_packed.default, (x, gp, dp, w, idx, 8),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.latentmoe.moe_pack_weight.default, (gu, True),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda *a: moe_experts_packed(*a, 8), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, gp, dp, w, idx), moe_experts_packed(x, gp, dp, w, idx, 8))


@pytest.mark.parametrize("name", ["v3", "odd"])
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_module_packed_matches_hf(name, dtype):
    hf = hf_moe(name, dtype).eval()
    ours = MoE(hf_config(name)).to(dtype).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(3, 11, hf.config.hidden_size).to(dtype)
    with torch.no_grad():
        want = hf(x).float()
        plain = ours(x).float()
        ours.experts.pack()
        packed = ours(x).float()
    scale = want.abs().max()
    tol = (0.03, 0.02) if dtype == BF16 else (1e-4, 1e-5)  # fp32: the 1e-4 parity with HF
    assert (packed - want).abs().max() <= tol[0] * scale  # bf16: rounding of two implementations
    assert (packed - plain).abs().max() <= tol[1] * scale
    assert ours.state_dict().keys() == hf.state_dict().keys()  # the packed copy is not state


def test_module_pack_lifecycle():
    torch.manual_seed(0)
    moe = MoE(hf_config("odd")).to(BF16)
    x = torch.randn(7, moe.hidden_size).to(BF16)
    assert pack_experts(torch.nn.Sequential(moe)) == 1 and moe.experts.is_packed
    # A forward that needs a gradient is refused (packed weights are for inference).
    with pytest.raises(RuntimeError, match="packed for inference"):
        moe(x)
    with torch.no_grad():
        before = moe(x)
        # Weights changed in place (load_state_dict copies): re-packed on the next forward.
        sd = {k: v * 2 if k.startswith("experts.") else v for k, v in moe.state_dict().items()}
        moe.load_state_dict(sd)
        after = moe(x)
        unpack_experts(moe)
        plain = moe(x)
    assert not torch.equal(before, after)
    assert (after.float() - plain.float()).abs().max() <= 0.02 * plain.float().abs().max()
    # Copies re-pack on first use.
    moe.experts.pack()
    twin = copy.deepcopy(moe)
    with torch.inference_mode():
        assert torch.equal(twin(x), moe(x))
    # Cast to fp32: re-packed in fp32.
    moe.float()
    with torch.no_grad():
        got = moe(x.float())
        moe.experts.unpack()
        want = moe(x.float())
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # Not bf16 / fp32 on the CPU any more: a clear error, no silent fallback.
    moe.experts.pack()
    moe.half()
    with torch.no_grad(), pytest.raises(ValueError, match="need bfloat16 or float32 weights on the CPU"):
        moe(x.half())
    moe.experts.unpack()
    with torch.no_grad():
        moe(x.half())
    with pytest.raises(ValueError, match="need bfloat16 or float32 weights on the CPU"):
        moe.experts.pack()


def test_module_packed_repacks_after_replacement_at_a_reused_address():
    # The stamp compared the weights' address and version: a weight replaced twice between
    # forwards (or cast there and back) often lands at the stamped address with the same version,
    # and the old packed copy stayed in use (8 of 10 trials here, errors ~1). The storage is now
    # compared by a weak reference.
    from latentmoe.nn.moe import MoEExperts

    torch.manual_seed(0)
    ex = MoEExperts(8, 1024, 512).pack()
    x, w = torch.randn(5, 1024), torch.rand(5, 2)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(5)])
    with torch.no_grad():
        for _ in range(10):
            ex(x, w, idx)  # packs / stamps the current weights
            ex.gate_up_proj = torch.nn.Parameter(torch.randn_like(ex.gate_up_proj) * 0.05)
            ex.gate_up_proj = torch.nn.Parameter(torch.randn_like(ex.gate_up_proj) * 0.05)
            got = ex(x, w, idx)
            want = moe_experts(x, ex.gate_up_proj, ex.down_proj, w, idx)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for _ in range(5):
            ex.gate_up_proj.copy_(torch.randn_like(ex.gate_up_proj))
            ex(x, w, idx)
            ex.half().float()  # .data replaced twice: the same Parameter objects and versions
            got = ex(x, w, idx)
            want = moe_experts(x, ex.gate_up_proj, ex.down_proj, w, idx)
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()  # stale: ~3e-4 (unrounded weights)


def test_module_packed_stamps_the_weights_it_packs(monkeypatch):
    # Another thread replacing a weight while a forward re-packs, at the worst moment (after the
    # pack read the weights, before the stamp): the stamp read the attributes again, recorded the
    # new weight on panels of the old one, and every later forward used the old weight.
    from latentmoe.nn.moe import MoEExperts

    torch.manual_seed(1)
    ex = MoEExperts(4, 32, 16)
    x, w = torch.randn(5, 32), torch.rand(5, 2)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(5)])
    stamp = MoEExperts._stamp

    def swap_then_stamp(self, *args, **kwargs):
        monkeypatch.setattr(MoEExperts, "_stamp", stamp)  # once
        self.gate_up_proj = torch.nn.Parameter(torch.randn_like(self.gate_up_proj))  # "the other thread"
        return stamp(self, *args, **kwargs)

    monkeypatch.setattr(MoEExperts, "_stamp", swap_then_stamp)
    with torch.no_grad():
        ex.pack()
        got = ex(x, w, idx)
    torch.testing.assert_close(got, moe_experts(x, ex.gate_up_proj, ex.down_proj, w, idx), rtol=1e-5, atol=1e-5)


_INDEX_WRITER = """
import threading, torch
from latentmoe import ops
torch.set_num_threads(1)
T, k, E, H, I = 1 << 20, 1, 64, 8, 8
hidden, gu, dn = torch.randn(T, H), torch.randn(E, 2 * I, H), torch.randn(E, H, I)
w, idx = torch.ones(T, k), torch.zeros(T, k, dtype=torch.int64)
gup, dnp = ops.moe_pack_experts(gu, dn)
stop = False
def writer():  # in-range ids only
    while not stop:
        idx.fill_(0)
        idx.fill_(E - 1)
th = threading.Thread(target=writer)
th.start()
for _ in range(2):
    ops.moe_experts(hidden, gu, dn, w, idx)
    ops.moe_experts_packed(hidden, gup, dnp, w, idx, I)
stop = True
th.join()
print("ok")
"""


def test_moe_ops_read_each_index_once():
    # The counting sort read the caller's indices twice (count, then scatter): another thread
    # writing them in between, even with in-range ids, sent the scatter's cursors out of bounds
    # (a segfault on the first call here). A subprocess: a crash must not take pytest with it.
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", _INDEX_WRITER], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-2000:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_rejects_cuda_tensors():
    x, gu, down, w, idx = _problem(5, 4, 2, 16, 8)
    with pytest.raises(RuntimeError, match="argument 'gate_up_proj' is on cuda"):
        moe_pack_experts(gu.cuda(), down.cuda())
    gp, dp = moe_pack_experts(gu, down)
    with pytest.raises(RuntimeError, match="argument 'hidden' is on cuda"):
        moe_experts_packed(x.cuda(), gp, dp, w, idx, 8)


def test_module_packed_under_inference_mode_weights():
    # Parameters made under inference_mode are inference tensors (no version counter).
    with torch.inference_mode():
        moe = MoE(hf_config("odd")).to(BF16)
        moe.experts.pack()
        x = torch.randn(5, moe.hidden_size).to(BF16)
        packed = moe(x)
        moe.experts.unpack()
        plain = moe(x)
    assert (packed.float() - plain.float()).abs().max() <= 0.02 * plain.float().abs().max()


@pytest.mark.parametrize("fused", [False, True])
def test_module_packed_repacks_after_an_optimizer_step(fused):
    # A fused AdamW step (HF Trainer's default) changes the parameters without a version bump: the
    # packed copy was stale. As an RL loop does: train, roll out packed, train, roll out again.
    torch.manual_seed(0)
    moe = MoE(hf_config("odd"))
    x = torch.randn(9, moe.hidden_size)
    opt = torch.optim.AdamW(moe.parameters(), lr=0.1, fused=fused, foreach=None if fused else False)
    moe(x).sum().backward()
    moe.eval().experts.pack()
    with torch.no_grad():
        moe(x)
    opt.step()
    with torch.no_grad():
        packed = moe(x)
        moe.experts.unpack()
        fresh = moe(x)
    assert (packed - fresh).abs().max() <= 1e-5 * fresh.abs().max()


def test_module_packed_load_state_dict_under_inference_mode():
    # Inference-tensor weights (module made under inference_mode) loaded in place under it: no
    # version counter to show the change; load_state_dict itself drops the packed copy.
    torch.manual_seed(0)
    new_sd = MoE(hf_config("odd")).state_dict()
    x = torch.randn(9, new_sd["experts.gate_up_proj"].shape[-1])
    with torch.inference_mode():
        moe = MoE(hf_config("odd")).eval()
        moe.experts.pack()
        moe(x)
        moe.load_state_dict(new_sd)
        packed = moe(x)
        moe.experts.unpack()
        fresh = moe(x)
    assert (packed - fresh).abs().max() <= 1e-5 * fresh.abs().max()


def test_module_packed_partial_load_keeps_the_packed_copy():
    # A strict=False load without the experts' weights leaves them, and so their packed copy, alone.
    moe = MoE(hf_config("odd")).eval()
    moe.experts.pack()
    packed = moe.experts._packed
    moe.load_state_dict({"gate.weight": torch.zeros_like(moe.gate.weight)}, strict=False)
    assert moe.experts._packed is packed
    moe.load_state_dict(moe.state_dict())
    assert moe.experts._packed is None  # re-packed at the next forward


def test_module_packed_deepcopy_repacks_on_first_use():
    moe = MoE(hf_config("odd")).to(BF16)
    moe.experts.pack()
    twin = copy.deepcopy(moe)
    assert twin.experts.is_packed and twin.experts._packed is None  # not shared, not copied
    x = torch.randn(4, moe.hidden_size).to(BF16)
    with torch.no_grad():
        assert torch.equal(twin(x), moe(x))
    assert twin.experts._packed is not None and twin.experts._packed[0] is not moe.experts._packed[0]


def test_module_packed_compiles_whole():
    torch.manual_seed(0)
    moe = MoE(hf_config("v3")).to(BF16).eval()
    moe.experts.pack()
    x = torch.randn(2, 9, moe.hidden_size).to(BF16)
    compiled = torch.compile(moe, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), moe(x))
    fresh = copy.deepcopy(moe)  # packed, its copy not made yet: a clear error while tracing
    with torch.no_grad(), pytest.raises(Exception, match="call pack\\(\\) outside torch.compile"):
        torch.compile(fresh, fullgraph=True, backend="eager")(x)
